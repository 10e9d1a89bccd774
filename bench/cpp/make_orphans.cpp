// Leaves <count> POSIX regions of <bytes> each in /dev/shm and exits without freeing
// them: what a VM killed with SIGKILL leaves behind. The orphan-sweep benchmark (issue 6,
// part 6) then measures how fast the manager finds and frees them. Links the product's
// core, so the segments carry real headers naming this (dead) process as creator.
//
//   make_orphans <count> <bytes>     prints the region ids, one per line
#include <cstdio>
#include <string>
#include <vector>

#include "../../c_src/core/region.hpp"
#include "bench_util.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: make_orphans <count> <bytes>\n");
    return 2;
  }
  std::uint64_t count = bench::parse_size(argv[1]);
  spshm::CreateOptions options;
  options.backend = spshm::BackendKind::posix;
  options.size = bench::parse_size(argv[2]);
  options.metadata_json = "{\"bench\":\"orphan\"}";
  // The Region objects only unmap and close when destroyed, never unlink: keeping none
  // alive is exactly an exit without cleanup.
  for (std::uint64_t i = 0; i < count; ++i) {
    auto region = spshm::Region::create(options);
    if (!region) {
      std::fprintf(stderr, "make_orphans: region %llu: %s\n", static_cast<unsigned long long>(i),
                   region.error().message.c_str());
      return 1;
    }
    std::printf("%s\n", region->id().c_str());
  }
  return 0;
}
