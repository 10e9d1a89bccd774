// A huge-page region whose data object another process punched a hole in (attack run 3).
//
// A hugetlbfs memfd can be sealed against shrinking and growing, but not against
// fallocate(PUNCH_HOLE) short of F_SEAL_WRITE: a process of the same user that opens
// /proc/<pid>/fd/<n> can free its pages. Touching such a page again needs a free huge
// page from the host's pool; when there is none (another process took them) the kernel
// answers the fault with SIGBUS. Every access of the data must then fail with an error,
// never kill the process. Needs root (vm.nr_hugepages); skipped otherwise.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "helpers.hpp"
#include "platform.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

constexpr std::uint64_t kHuge = 2 << 20;
const char* const kNr = "/proc/sys/vm/nr_hugepages";

std::string read_nr() {
  std::ifstream in(kNr);
  std::string s;
  in >> s;
  return s;
}

bool write_nr(const std::string& v) {
  std::ofstream out(kNr);
  out << v;
  out.flush();
  return static_cast<bool>(out);
}

/// Reserves `pages` huge pages for the scope; restores the old value.
struct HugeReservation {
  std::string old;
  bool ok = false;
  explicit HugeReservation(int pages) {
    if (geteuid() != 0 || access(kNr, W_OK) != 0) return;
    old = read_nr();
    ok = write_nr(std::to_string(pages)) && std::stoi(read_nr()) >= pages;
  }
  ~HugeReservation() {
    if (!old.empty()) write_nr(old);
  }
};

/// Punches a hole over the first huge page of the data object of `r` through another
/// open (as a hostile process does through /proc/<pid>/fd/<n>), then takes every free
/// huge page with a memfd of its own, kept open (returned) so the pool stays empty.
int punch_and_starve(const std::string& data_path, std::uint64_t offset) {
  int other = ::open(data_path.c_str(), O_RDWR | O_CLOEXEC);
  if (other < 0) return -1;
  int punched = ::fallocate(other, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                            static_cast<off_t>(offset), kHuge);
  ::close(other);
  if (punched != 0) return -1;
  int eater = ::memfd_create("eater", MFD_HUGETLB | MFD_CLOEXEC);
  if (eater < 0) return -1;
  // Take pages until none is left (an mmap of a hugetlb file reserves its pages).
  for (std::uint64_t n = 1; n <= 64; ++n) {
    if (::ftruncate(eater, static_cast<off_t>(n * kHuge)) != 0) break;
    void* p = ::mmap(nullptr, kHuge, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, eater,
                     static_cast<off_t>((n - 1) * kHuge));
    if (p == MAP_FAILED) break;
    if (*static_cast<volatile char*>(p) != 0) break;
  }
  return eater;
}

CreateOptions huge_options(std::uint64_t size) {
  CreateOptions o = options(BackendKind::memfd, size);
  o.huge_pages = HugePages::on;
  return o;
}

}  // namespace

TEST_CASE("huge pages: a hole punched by a peer and no free huge page give errors, no SIGBUS",
          "[huge][attack]") {
  HugeReservation reserve(3);
  if (!reserve.ok) {
    WARN("skipped: needs root and a hugetlb pool (vm.nr_hugepages)");
    return;
  }
  REQUIRE(platform::install_fault_guard());

  // In a child: before the fix it died of SIGBUS (exit 128 + 7) at the read.
  int rc = in_child([] {
    auto made = Region::create(huge_options(2 * kHuge));
    if (!made) return 10;
    Region r = std::move(made).value();
    auto bytes = pattern(2 * kHuge, 3);
    if (!r.write(0, bytes.data(), bytes.size())) return 11;
    int eater = punch_and_starve(r.data_path(), 0);
    if (eater < 0) return 12;
    std::vector<std::uint8_t> back(16);
    auto read = r.read(0, back.data(), back.size());
    if (read.ok() || read.error().code != Errc::truncated) return 13;
    if (r.write(0, bytes.data(), 16).ok()) return 14;
    // The second huge page is intact, but the region is damaged as a whole.
    if (r.read(kHuge, back.data(), back.size()).ok()) return 15;
    if (!r.deallocate(true).ok()) return 16;  // zeroes by freeing the pages instead
    ::close(eater);
    return 0;
  });
  REQUIRE(rc == 0);
}
