// Catch2 runner of the Windows tests. Three jobs:
// - `core_tests.exe --spshm-child <command> ...` runs a child command (child.cpp) for the
//   two-process tests instead of Catch;
// - without a test spec on the command line, skips the test cases of the shared test
//   files that need memfd or POSIX shm (kNotOnWindows);
// - after the run, fails if a file mapping created by this process still exists: on
//   Windows that means a handle or view was leaked (the memory is freed only when the
//   last one closes), which is exactly what every test must not do.
#define CATCH_CONFIG_RUNNER
#include <iostream>
#include <string>
#include <vector>

#include "catch.hpp"
#include "win_test.hpp"

namespace {

// Tags of tests that use memfd or POSIX shm, and shared test cases that use memfd
// without such a tag (header_crc is covered on Windows by region_windows_test.cpp).
const char kNotOnWindows[] =
    "~[memfd]~[posix]~[linux]~\"header_crc covers the prefix and the metadata only\"";

/// Segments in this session's Local\ namespace that this process created.
std::vector<std::string> made_by_us() {
  std::vector<std::string> ours;
  for (const std::string& id : spshm::list_segments()) {
    auto snap = spshm::inspect("Local\\" + id);
    if (snap && snap->creator_pid == spshm::self_pid()) ours.push_back(id);
  }
  return ours;
}

}  // namespace

int main(int argc, char* argv[]) {
  if (argc >= 2 && std::string(argv[1]) == spshm_wintest::kChildFlag)
    return spshm_wintest::child_main(argc - 2, argv + 2);
  Catch::Session session;
  if (int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
  if (session.configData().testsOrTags.empty())
    session.configData().testsOrTags.emplace_back(kNotOnWindows);
  int failed = session.run();
  std::vector<std::string> leaked = made_by_us();
  for (const std::string& id : leaked)
    std::cerr << "core_tests: file mapping Local\\" << id
              << " is still open after the tests: a handle or view was leaked\n";
  return failed != 0 ? failed : (leaked.empty() ? 0 : 1);
}
