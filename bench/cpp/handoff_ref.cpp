// The physical reference of the handoff benchmark (path e): one memcpy of the payload
// into already-touched memory, then one read pass (the same xor-reduce over uint64 words
// the Python worker computes). Persistent, so that it is measured in the same rounds as
// the other paths: it reads commands on stdin and answers one line each.
//
//   run <bytes> <iterations>   -> "<total ns> <xor>"   (buffers grown and touched first,
//                                                      outside the timed part)
//   quit
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>

#include "bench_util.hpp"

namespace {

struct Buffers {
  bench::Mapping source, target;

  void ensure(std::size_t bytes) {
    if (source.size() >= bytes) return;
    source = bench::map_anonymous(bytes);
    target = bench::map_anonymous(bytes);
    bench::fill_pattern(source.data(), bytes);
    std::memset(target.data(), 0, bytes);  // warm: the reference pays no page faults
  }
};

}  // namespace

int main() {
  Buffers buffers;
  char line[256];
  while (std::fgets(line, sizeof line, stdin) != nullptr) {
    unsigned long long bytes = 0, iterations = 0;
    if (std::strncmp(line, "quit", 4) == 0) break;
    if (std::sscanf(line, "run %llu %llu", &bytes, &iterations) != 2 || bytes == 0 ||
        iterations == 0) {
      std::printf("error expected 'run <bytes> <iterations>', got: %s", line);
      std::fflush(stdout);
      continue;
    }
    buffers.ensure(bytes);
    std::uint64_t result = 0;
    std::uint64_t start = bench::now_ns();
    for (unsigned long long i = 0; i < iterations; ++i) {
      std::memcpy(buffers.target.data(), buffers.source.data(), bytes);
      result ^= bench::xor_reduce(buffers.target.data(), bytes);
      // Keep each iteration's copy observable so the compiler cannot merge iterations.
      asm volatile("" : : "r"(buffers.target.data()) : "memory");
    }
    std::uint64_t elapsed = bench::now_ns() - start;
    std::printf("%" PRIu64 " %" PRIu64 "\n", elapsed, result);
    std::fflush(stdout);
  }
  return 0;
}
