// Catch2 runner of the core tests. After every test has run it checks that no segment
// of ours is left in /dev/shm, and fails the run if one is: every test cleans up.
#define CATCH_CONFIG_RUNNER
#include <dirent.h>

#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "catch.hpp"

namespace {

std::vector<std::string> leftover_segments() {
  std::vector<std::string> left;
  if (DIR* dir = opendir("/dev/shm")) {
    while (dirent* e = readdir(dir))
      if (std::strncmp(e->d_name, "spshm_", 6) == 0) left.emplace_back(e->d_name);
    closedir(dir);
  }
  return left;
}

}  // namespace

int main(int argc, char* argv[]) {
  std::vector<std::string> before = leftover_segments();
  int failed = Catch::Session().run(argc, argv);
  std::vector<std::string> after = leftover_segments();
  int leaked = 0;
  for (const std::string& name : after) {
    bool preexisting = false;
    for (const std::string& b : before) preexisting = preexisting || b == name;
    if (!preexisting) {
      std::cerr << "core_tests: segment left behind in /dev/shm: " << name << "\n";
      ++leaked;
    }
  }
  if (!before.empty())
    std::cerr << "core_tests: warning: " << before.size()
              << " spshm_* segment(s) were already in /dev/shm before the run\n";
  return failed != 0 ? failed : (leaked != 0 ? 1 : 0);
}
