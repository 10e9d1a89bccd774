// Catch2 runner of the core tests. After every test has run it checks that no segment
// made by this test process is left in /dev/shm, and fails the run if one is: every test
// cleans up after itself. (A custom main rather than CATCH_CONFIG_MAIN, so that this
// check runs last whatever the test order.)
#define CATCH_CONFIG_RUNNER
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <string>
#include <vector>

#include "catch.hpp"
#include "region.hpp"

namespace {

/// Segments created by this process: a test name with our pid, or our pid in the header.
/// (Other programs, other test runs included, may create segments meanwhile.)
bool made_by_us(const std::string& id) {
  const std::string test_prefix = "spshm_n_t";
  if (id.rfind(test_prefix, 0) == 0) {
    std::size_t dash = id.find('-', test_prefix.size());
    return dash != std::string::npos &&
           id.substr(test_prefix.size(), dash - test_prefix.size()) == std::to_string(getpid());
  }
  auto snap = spshm::inspect("/dev/shm/" + id);
  return snap && snap->creator_pid == spshm::self_pid();
}

}  // namespace

int main(int argc, char* argv[]) {
  std::vector<std::string> before = spshm::list_segments();
  int failed = Catch::Session().run(argc, argv);
  int leaked = 0;
  for (const std::string& id : spshm::list_segments()) {
    if (std::find(before.begin(), before.end(), id) != before.end()) continue;
    if (!made_by_us(id)) continue;  // another program's segment, created meanwhile
    std::cerr << "core_tests: segment left behind in /dev/shm: " << id << "\n";
    ++leaked;
  }
  if (leaked == 0) std::cerr << "core_tests: no segment of ours left in /dev/shm\n";
  return failed != 0 ? failed : (leaked != 0 ? 1 : 0);
}
