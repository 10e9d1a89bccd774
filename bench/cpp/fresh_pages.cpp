// Fresh-page cost (issue 6, part 7): what first use of a new shared-memory region costs
// per GiB, by way of obtaining its pages, to decide whether the product should keep a
// pool of warm regions and whether to prefault with MADV_POPULATE_WRITE.
//
//   fresh_pages <bytes> <repetitions>
//
// Prints one JSON object per line: {"mode": "...", "ns": [...]} or
// {"mode": "...", "unavailable": "reason"}. Every mode starts from a new memfd (the
// product's default backend) unless its name says otherwise.
#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "bench_util.hpp"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

namespace {

std::size_t g_bytes = 0;

bench::Fd new_memfd(unsigned flags = 0) {
  int fd = static_cast<int>(::syscall(SYS_memfd_create, "spshm_bench", MFD_CLOEXEC | flags));
  if (fd < 0) return bench::Fd(-1);
  bench::Fd owned(fd);
  if (::ftruncate(fd, static_cast<off_t>(g_bytes)) != 0) bench::die("ftruncate memfd");
  return owned;
}

bench::Mapping map_shared(int fd, int extra_flags = 0) {
  void* p = ::mmap(nullptr, g_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | extra_flags, fd, 0);
  if (p == MAP_FAILED) bench::die("mmap memfd");
  return bench::Mapping(p, g_bytes);
}

void fallocate_all(int fd) {
  int err = ::posix_fallocate(fd, 0, static_cast<off_t>(g_bytes));
  if (err != 0) {
    errno = err;
    bench::die("posix_fallocate");
  }
}

bool populate(const bench::Mapping& m, int advice) {
  return ::madvise(m.data(), m.size(), advice) == 0;
}

std::string read_first_line(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

void print_samples(const char* mode, const std::vector<std::uint64_t>& ns) {
  std::printf("{\"mode\": \"%s\", \"bytes\": %zu, \"ns\": [", mode, g_bytes);
  for (std::size_t i = 0; i < ns.size(); ++i) std::printf("%s%" PRIu64, i == 0 ? "" : ", ", ns[i]);
  std::printf("]}\n");
  std::fflush(stdout);
}

void print_unavailable(const char* mode, const std::string& reason) {
  std::printf("{\"mode\": \"%s\", \"bytes\": %zu, \"unavailable\": \"%s\"}\n", mode, g_bytes,
              reason.c_str());
  std::fflush(stdout);
}

// Runs `setup` untimed, then times `body`, `reps` times. A body returning false means
// the mode is unavailable (errno says why).
void measure(const char* mode, int reps, const std::function<bool(std::uint64_t&)>& body) {
  std::vector<std::uint64_t> samples;
  for (int r = 0; r < reps; ++r) {
    std::uint64_t ns = 0;
    if (!body(ns)) {
      print_unavailable(mode, std::strerror(errno));
      return;
    }
    samples.push_back(ns);
  }
  print_samples(mode, samples);
}

void run_all(int reps) {
  const std::size_t page = bench::page_size();

  // What the product does today: create, fallocate (pages allocated and zeroed), map,
  // then the writer's first touch of each page (minor faults).
  measure("memfd_fallocate", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    std::uint64_t t0 = bench::now_ns();
    fallocate_all(fd.get());
    ns = bench::now_ns() - t0;
    return true;
  });
  measure("memfd_fallocate_then_touch", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    std::uint64_t t0 = bench::now_ns();
    fallocate_all(fd.get());
    bench::Mapping m = map_shared(fd.get());
    bench::touch_pages(m.data(), m.size(), page);
    ns = bench::now_ns() - t0;
    return true;
  });
  measure("memfd_touch", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    bench::Mapping m = map_shared(fd.get());
    std::uint64_t t0 = bench::now_ns();
    bench::touch_pages(m.data(), m.size(), page);
    ns = bench::now_ns() - t0;
    return true;
  });
  measure("memfd_populate_write", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    bench::Mapping m = map_shared(fd.get());
    std::uint64_t t0 = bench::now_ns();
    bool ok = populate(m, MADV_POPULATE_WRITE);
    ns = bench::now_ns() - t0;
    return ok;
  });
  measure("memfd_fallocate_populate_write", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    std::uint64_t t0 = bench::now_ns();
    fallocate_all(fd.get());
    bench::Mapping m = map_shared(fd.get());
    bool ok = populate(m, MADV_POPULATE_WRITE);
    ns = bench::now_ns() - t0;
    return ok;
  });
  measure("memfd_map_populate", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    std::uint64_t t0 = bench::now_ns();
    bench::Mapping m = map_shared(fd.get(), MAP_POPULATE);
    bench::touch_pages(m.data(), m.size(), page);
    ns = bench::now_ns() - t0;
    return true;
  });

  // The product's fallocate (fails early when memory is short) followed by a mapping
  // that is populated in the same call: the writer then takes no fault at all.
  measure("memfd_fallocate_map_populate", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    std::uint64_t t0 = bench::now_ns();
    fallocate_all(fd.get());
    bench::Mapping m = map_shared(fd.get(), MAP_POPULATE);
    bench::touch_pages(m.data(), m.size(), page);
    ns = bench::now_ns() - t0;
    return true;
  });
  // MADV_POPULATE_READ allocates shmem pages too and, unlike MAP_POPULATE, reports
  // ENOMEM: an early failure without the separate fallocate pass.
  measure("memfd_populate_read_then_touch", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    bench::Mapping m = map_shared(fd.get());
    std::uint64_t t0 = bench::now_ns();
    bool ok = populate(m, MADV_POPULATE_READ);
    bench::touch_pages(m.data(), m.size(), page);
    ns = bench::now_ns() - t0;
    return ok;
  });

  // Transparent huge pages on shmem need shmem_enabled != never; madvise alone is not
  // enough. Measured anyway: the kernel's setting is reported beside it.
  std::string thp = read_first_line("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
  if (thp.find("[never]") != std::string::npos || thp.find("[deny]") != std::string::npos) {
    print_unavailable("memfd_thp_touch", "shmem_enabled: " + thp);
  } else {
    measure("memfd_thp_touch", reps, [&](std::uint64_t& ns) {
      bench::Fd fd = new_memfd();
      bench::Mapping m = map_shared(fd.get());
      std::uint64_t t0 = bench::now_ns();
      if (::madvise(m.data(), m.size(), MADV_HUGEPAGE) != 0) return false;
      bench::touch_pages(m.data(), m.size(), page);
      ns = bench::now_ns() - t0;
      return true;
    });
  }
  {
    bench::Fd probe = new_memfd(MFD_HUGETLB);
    std::string pages = read_first_line("/proc/sys/vm/nr_hugepages");
    if (probe.get() < 0 || pages == "0") {
      print_unavailable("memfd_hugetlb_touch",
                        "vm.nr_hugepages = " + pages + " (no reserved huge pages)");
    } else {
      measure("memfd_hugetlb_touch", reps, [&](std::uint64_t& ns) {
        bench::Fd fd = new_memfd(MFD_HUGETLB);
        if (fd.get() < 0) return false;
        std::uint64_t t0 = bench::now_ns();
        void* p = ::mmap(nullptr, g_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
        if (p == MAP_FAILED) return false;
        bench::Mapping m(p, g_bytes);
        bench::touch_pages(m.data(), m.size(), page);
        ns = bench::now_ns() - t0;
        return true;
      });
    }
  }

  // A warm region: pages already allocated. A new mapping of it (another process, or a
  // fresh map) takes minor faults only; a reused mapping takes none.
  measure("warm_new_mapping_touch", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    {
      bench::Mapping first = map_shared(fd.get());
      populate(first, MADV_POPULATE_WRITE);
    }
    bench::Mapping m = map_shared(fd.get());
    std::uint64_t t0 = bench::now_ns();
    bench::touch_pages(m.data(), m.size(), page);
    ns = bench::now_ns() - t0;
    return true;
  });
  measure("warm_new_mapping_populate_read", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    {
      bench::Mapping first = map_shared(fd.get());
      populate(first, MADV_POPULATE_WRITE);
    }
    bench::Mapping m = map_shared(fd.get());
    std::uint64_t t0 = bench::now_ns();
    bool ok = populate(m, MADV_POPULATE_READ);
    ns = bench::now_ns() - t0;
    return ok;
  });
  measure("warm_reused_mapping_touch", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    bench::Mapping m = map_shared(fd.get());
    populate(m, MADV_POPULATE_WRITE);
    std::uint64_t t0 = bench::now_ns();
    bench::touch_pages(m.data(), m.size(), page);
    ns = bench::now_ns() - t0;
    return true;
  });
  measure("release_populated_memfd", reps, [&](std::uint64_t& ns) {
    bench::Fd fd = new_memfd();
    bench::Mapping m = map_shared(fd.get());
    populate(m, MADV_POPULATE_WRITE);
    std::uint64_t t0 = bench::now_ns();
    m.reset();
    fd.reset();
    ns = bench::now_ns() - t0;
    return true;
  });
  measure("anonymous_private_touch", reps, [&](std::uint64_t& ns) {
    bench::Mapping m = bench::map_anonymous(g_bytes);
    std::uint64_t t0 = bench::now_ns();
    bench::touch_pages(m.data(), m.size(), page);
    ns = bench::now_ns() - t0;
    return true;
  });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: fresh_pages <bytes> <repetitions>\n");
    return 2;
  }
  g_bytes = bench::parse_size(argv[1]);
  if (g_bytes % bench::page_size() != 0) {
    std::fprintf(stderr, "fresh_pages: <bytes> must be a multiple of the page size\n");
    return 2;
  }
  run_all(static_cast<int>(bench::parse_size(argv[2])));
  return 0;
}
