// Shared helpers of the core tests.
#pragma once

#if !defined(_WIN32)  // SegmentCleanup, in_child, drop_capabilities: POSIX/Linux only
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#endif
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "catch.hpp"
#include "region.hpp"

namespace spshm_test {

/// REQUIRE that a Result is ok, printing its error message if not.
#define REQUIRE_OK(expr)                                                        \
  do {                                                                          \
    const auto& spshm_result_ = (expr);                                         \
    INFO((spshm_result_.ok() ? std::string() : spshm_result_.error().message)); \
    REQUIRE(spshm_result_.ok());                                                \
  } while (0)

/// REQUIRE that a Result failed with `code`.
#define REQUIRE_ERR(expr, errc)                                                                   \
  do {                                                                                            \
    const auto& spshm_result_ = (expr);                                                           \
    REQUIRE_FALSE(spshm_result_.ok());                                                            \
    INFO(spshm_result_.error().message);                                                          \
    REQUIRE(spshm::errc_name(spshm_result_.error().code) == std::string(spshm::errc_name(errc))); \
  } while (0)

/// A well-known name unique to this test process: "t<pid>-<tag>" (<= 21 characters).
inline std::string unique_name(const std::string& tag) {
  static std::atomic<int> counter{0};
  std::string name = "t" + std::to_string(getpid()) + "-" + tag + std::to_string(counter++);
  return name.substr(0, 21);
}

#if !defined(_WIN32)
/// Removes a POSIX segment by id when the test scope ends, whatever happened.
struct SegmentCleanup {
  std::string id;
  ~SegmentCleanup() {
    if (!id.empty()) shm_unlink(("/" + id).c_str());
  }
};
#endif

inline spshm::CreateOptions options(spshm::BackendKind backend, std::uint64_t size) {
  spshm::CreateOptions o;
  o.backend = backend;
  o.size = size;
  return o;
}

/// Creates a region and returns it, failing the test (with the message) otherwise.
inline spshm::Region create_ok(const spshm::CreateOptions& o) {
  auto r = spshm::Region::create(o);
  INFO((r ? std::string() : r.error().message));
  REQUIRE(r.ok());
  return std::move(r).value();
}

#if !defined(_WIN32)
/// Runs `body` in a forked child; returns its exit code (128 + signal if killed).
/// The child never returns into Catch: it _exit()s with body's result.
template <class Body>
int in_child(Body&& body) {
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int rc = 99;
    try {
      rc = body();
    } catch (...) {
      rc = 98;
    }
    _exit(rc);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/// Drops capabilities from this (child) process, so that root behaves like a plain user
/// for the checks they bypass. Returns false if the kernel refused.
inline bool drop_capabilities(std::initializer_list<int> caps) {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  for (int cap : caps) {
    data[cap / 32].effective &= ~(1u << (cap % 32));
    data[cap / 32].permitted &= ~(1u << (cap % 32));
  }
  return syscall(SYS_capset, &header, data) == 0;
}
#endif  // !_WIN32

inline std::vector<std::uint8_t> pattern(std::size_t n, std::uint32_t seed) {
  std::vector<std::uint8_t> v(n);
  std::uint32_t x = seed * 2654435761u + 1;
  for (auto& b : v) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = static_cast<std::uint8_t>(x);
  }
  return v;
}

/// The table rows of one `## section` of docs/FORMAT.md: each row's cells, trimmed of
/// spaces and of the backquotes around a name.
inline std::vector<std::vector<std::string>> format_md_table(const std::string& section) {
  std::string path = __FILE__;
  path = path.substr(0, path.rfind('/')) + "/../../docs/FORMAT.md";
  std::ifstream in(path);
  std::vector<std::vector<std::string>> rows;
  std::string line;
  bool in_section = false;
  while (std::getline(in, line)) {
    if (line.rfind("#", 0) == 0) in_section = line == "## " + section;
    if (!in_section || line.rfind("| ", 0) != 0) continue;
    std::vector<std::string> cells;
    std::stringstream ss(line.substr(1));
    std::string cell;
    while (std::getline(ss, cell, '|')) {
      auto b = cell.find_first_not_of(" `"), e = cell.find_last_not_of(" `");
      cells.push_back(b == std::string::npos ? "" : cell.substr(b, e - b + 1));
    }
    rows.push_back(std::move(cells));
  }
  return rows;
}

struct LayoutRow {
  std::size_t offset, size;
};

/// The `| offset | size | field | type | meaning |` rows of a docs/FORMAT.md section, by
/// field name. Absolute offsets ("8") and offsets relative to a slot ("+8") alike.
inline std::map<std::string, LayoutRow> format_md_rows(const std::string& section) {
  std::map<std::string, LayoutRow> rows;
  for (std::vector<std::string> cells : format_md_table(section)) {
    if (cells.size() < 5) continue;
    std::string offset = cells[0];
    if (!offset.empty() && offset[0] == '+') offset.erase(0, 1);
    if (offset.empty() || !std::isdigit(static_cast<unsigned char>(offset[0]))) continue;
    rows[cells[2]] = LayoutRow{std::stoul(offset), std::stoul(cells[1])};
  }
  return rows;
}

}  // namespace spshm_test
