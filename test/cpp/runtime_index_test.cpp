// The runtime index (runtime_index.hpp): one entry per created memfd region, removed
// with it; the sweep removes stale entries and leaves what is not an entry.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <string>
#include <vector>

#include "helpers.hpp"
#include "runtime_index.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

std::string link_text(const std::string& path) {
  char buf[PATH_MAX];
  ssize_t n = ::readlink(path.c_str(), buf, sizeof buf);
  return n < 0 ? std::string() : std::string(buf, static_cast<std::size_t>(n));
}

}  // namespace

TEST_CASE("a memfd region is listed while it lives", "[runtime_index][memfd]") {
  Region r = create_ok(options(BackendKind::memfd, 10000));
  std::string dir = runtime_index::directory();
  REQUIRE(!dir.empty());
  struct stat st;
  REQUIRE(::lstat(dir.c_str(), &st) == 0);
  CHECK(S_ISDIR(st.st_mode));
  CHECK((st.st_mode & 0777) == 0700);
  CHECK(st.st_uid == ::geteuid());
  std::string entry = dir + "/" + r.id();
  CHECK(link_text(entry) == "spshm1 memfd " + r.control_path() + " " + r.data_path() + " 0 10000");
  REQUIRE(r.deallocate(false).ok());
  CHECK(link_text(entry).empty());
}

TEST_CASE("a dropped memfd region takes its entry with it", "[runtime_index][memfd]") {
  std::string entry;
  {
    Region r = create_ok(options(BackendKind::memfd, 4096));
    entry = runtime_index::directory() + "/" + r.id();
    REQUIRE(!link_text(entry).empty());
  }
  CHECK(link_text(entry).empty());
}

TEST_CASE("POSIX regions are not listed", "[runtime_index][posix]") {
  Region r = create_ok(options(BackendKind::posix, 4096));
  CHECK(link_text(runtime_index::directory() + "/" + r.id()).empty());
  REQUIRE(r.deallocate(false).ok());
}

TEST_CASE("the sweep removes stale entries only", "[runtime_index]") {
  Region live = create_ok(options(BackendKind::memfd, 4096));
  std::string dir = runtime_index::directory();
  std::string stale = dir + "/spshm_" + std::string(20, 'q');
  std::string named = dir + "/spshm_n_rt_index_test";
  std::string other = dir + "/not-an-entry";
  ::unlink(stale.c_str());
  ::unlink(named.c_str());
  ::unlink(other.c_str());
  // A dead VM's entry (its pid is gone), a live region's id pointing at the wrong fds.
  REQUIRE(::symlink("spshm1 memfd /proc/999999999/fd/3 /proc/999999999/fd/4 0 1", stale.c_str()) ==
          0);
  REQUIRE(::symlink(("spshm1 memfd " + live.data_path() + " " + live.data_path() + " 0 1").c_str(),
                    named.c_str()) == 0);
  REQUIRE(::symlink("anything", other.c_str()) == 0);
  auto result = runtime_index::sweep();
  CHECK(result.removed >= 2);
  CHECK(link_text(stale).empty());
  CHECK(link_text(named).empty());
  CHECK(link_text(other) == "anything");
  CHECK(!link_text(dir + "/" + live.id()).empty());
  ::unlink(other.c_str());
  REQUIRE(live.deallocate(false).ok());
}

TEST_CASE("publishing replaces a leftover entry of the same id", "[runtime_index]") {
  std::string id = "spshm_" + std::string(20, 'r');
  std::string path = runtime_index::directory() + "/" + id;
  ::unlink(path.c_str());
  REQUIRE(::symlink("spshm1 memfd /proc/1/fd/1 /proc/1/fd/2 0 1", path.c_str()) == 0);
  runtime_index::Entry e{"arena", "/proc/1/fd/7", "/proc/1/fd/7", 8192, 100};
  {
    runtime_index::Published p;
    p.publish(id, e);
    CHECK(link_text(path) == "spshm1 arena /proc/1/fd/7 /proc/1/fd/7 8192 100");
  }
  CHECK(link_text(path).empty());
}

namespace {

CreateOptions small_arena_options(std::uint64_t size) {
  CreateOptions o = options(BackendKind::memfd, size);
  o.arena = true;
  return o;
}

}  // namespace

TEST_CASE("an arena region's entry is written by the background writer, removed with it",
          "[runtime_index][arena]") {
  std::string entry;
  {
    Region r = create_ok(small_arena_options(5000));
    REQUIRE(r.in_arena());
    entry = runtime_index::directory() + "/" + r.id();
    REQUIRE(runtime_index::flush(std::chrono::seconds(5)));
    CHECK(link_text(entry) == "spshm1 arena " + r.control_path() + " " + r.control_path() + " " +
                                  std::to_string(r.control_offset()) + " 5000");
  }
  REQUIRE(runtime_index::flush(std::chrono::seconds(5)));
  CHECK(link_text(entry).empty());
}

TEST_CASE("an arena region freed before its entry is written never gets one",
          "[runtime_index][arena]") {
  std::vector<std::string> entries;
  for (int i = 0; i < 100; ++i) {
    Region r = create_ok(small_arena_options(4096));
    entries.push_back(runtime_index::directory() + "/" + r.id());
  }
  REQUIRE(runtime_index::flush(std::chrono::seconds(5)));
  for (const auto& e : entries) CHECK(link_text(e).empty());
}

TEST_CASE("the writer stops, restarts, and a forked child never touches it",
          "[runtime_index][arena]") {
  runtime_index::stop_writer();
  runtime_index::stop_writer();                     // twice: nothing to join
  Region r = create_ok(small_arena_options(4096));  // starts it again
  std::string entry = runtime_index::directory() + "/" + r.id();
  REQUIRE(runtime_index::flush(std::chrono::seconds(5)));
  CHECK(!link_text(entry).empty());
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The writer thread does not exist here: queueing, flushing and stopping are no-ops.
    runtime_index::publish_arena_later("spshm_" + std::string(20, 'z'), 0, 0, 1);
    runtime_index::remove_later(r.id());
    bool flushed = runtime_index::flush(std::chrono::milliseconds(10));
    runtime_index::stop_writer();
    ::_exit(flushed ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  CHECK(!link_text(entry).empty());  // the child removed nothing
  CHECK(link_text(runtime_index::directory() + "/spshm_" + std::string(20, 'z')).empty());
  REQUIRE(r.deallocate(false).ok());
  REQUIRE(runtime_index::flush(std::chrono::seconds(5)));
  CHECK(link_text(entry).empty());
}

TEST_CASE("entries live in this PID namespace's subdirectory of the base", "[runtime_index]") {
  // The naming rule (docs/FORMAT.md, "Runtime index"): pidns-<inode of /proc/self/ns/pid>.
  CHECK(runtime_index::namespace_dir_name_of("pid:[4026531836]") == "pidns-4026531836");
  for (const char* bad : {"", "pid:[]", "pid:[12a]", "net:[4026531836]", "pid:[1/..]",
                          "pid:[4026531836", "pid:[123456789012345678901]"}) {
    INFO(bad);
    CHECK(runtime_index::namespace_dir_name_of(bad).empty());
  }
  std::string ns = link_text("/proc/self/ns/pid");
  REQUIRE(!ns.empty());
  std::string name = runtime_index::namespace_dir_name();
  CHECK(name == "pidns-" + ns.substr(5, ns.size() - 6));
  std::string base = runtime_index::base_directory();
  CHECK(runtime_index::directory() == base + "/" + name);
  struct stat st;
  REQUIRE(::lstat(base.c_str(), &st) == 0);
  CHECK(S_ISDIR(st.st_mode));
  CHECK((st.st_mode & 0777) == 0700);
}

TEST_CASE("the sweep never touches the base nor another namespace's subdirectory",
          "[runtime_index]") {
  std::string base = runtime_index::base_directory();
  REQUIRE(!runtime_index::directory().empty());
  // What another PID namespace's VM listed (its pids mean nothing here), and an entry
  // of an older version at the base's top level: neither is ours to judge.
  std::string theirs_dir = base + "/pidns-1";
  ::mkdir(theirs_dir.c_str(), 0700);
  std::string theirs = theirs_dir + "/spshm_" + std::string(20, 'r');
  std::string top = base + "/spshm_" + std::string(20, 's');
  ::unlink(theirs.c_str());
  ::unlink(top.c_str());
  REQUIRE(::symlink("spshm1 memfd /proc/999999999/fd/3 /proc/999999999/fd/4 0 1", theirs.c_str()) ==
          0);
  REQUIRE(::symlink("spshm1 memfd /proc/999999999/fd/3 /proc/999999999/fd/4 0 1", top.c_str()) ==
          0);
  (void)runtime_index::sweep();
  CHECK(!link_text(theirs).empty());
  CHECK(!link_text(top).empty());
  ::unlink(theirs.c_str());
  ::unlink(top.c_str());
  ::rmdir(theirs_dir.c_str());
}
