// Helpers of the Windows tests (mingw build, run under wine by scripts/test-wine.sh).
#pragma once

#include "helpers.hpp"
#include "platform_windows.hpp"

namespace spshm_wintest {

/// argv[1] that makes core_tests.exe run a child command (child.cpp) instead of Catch.
inline constexpr char kChildFlag[] = "--spshm-child";

/// Runs a child command in a new process (CreateProcessW of this very executable) and
/// returns its exit code; -1 if it could not start or ran for more than a minute. A first
/// argument "--quiet" silences the child's message when a failure is what the test wants.
int run_child(const std::vector<std::string>& args);

/// child.cpp: runs one child command; its return value is the process's exit code.
int child_main(int argc, char* argv[]);

/// Creation options of a region of the Windows backend.
inline spshm::CreateOptions windows_options(std::uint64_t size) {
  return spshm_test::options(spshm::BackendKind::windows, size);
}

/// Hex of 16 bytes (boot ids on a command line).
std::string hex16(const std::array<std::uint8_t, 16>& bytes);

/// The protection (PAGE_READONLY, PAGE_READWRITE, ...) of the page holding `address`.
DWORD page_protection(const void* address);

}  // namespace spshm_wintest
