// Internal: a test hook that parks the calling thread at a named point of a protocol, so
// that reliability tests can SIGKILL a process exactly there (a worker between claiming a
// holder slot and making it live, a creator between O_EXCL and fallocate, ...).
//
// Inert unless the environment variable SNAKEPIT_SHM_TEST_PARK is "<point>=<ms>": the
// thread reaching <point> writes "snakepit_shm: parked at <point>\n" to stderr and
// sleeps <ms> milliseconds. Points: "claim" (holders.cpp: slot taken, not live yet),
// "release" (count at 0, slot not free yet), "create_<size>" (region.cpp: named object
// created and locked, not sized yet; <size> is the user size, so one test's creation is
// parked and no other), "seal" (region.cpp: sealing bit set, seal lock held), "seal_commit"
// (this process's writes drained, the gate held, the seal not committed yet), "data_path"
// (region.cpp: a memfd region's data descriptor checked valid, its number not read yet).
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

namespace spshm {

inline void test_park(const std::string& point) noexcept {
  const char* spec = std::getenv("SNAKEPIT_SHM_TEST_PARK");
  if (spec == nullptr || spec[0] == '\0') return;
  std::size_t n = point.size();
  if (std::strncmp(spec, point.c_str(), n) != 0 || spec[n] != '=') return;
  long ms = std::strtol(spec + n + 1, nullptr, 10);
  std::fprintf(stderr, "snakepit_shm: parked at %s\n", point.c_str());
  std::fflush(stderr);
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

}  // namespace spshm
