// The runtime index (runtime_index.hpp): one entry per created memfd region, removed
// with it; the sweep removes stale entries and leaves what is not an entry.
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <string>

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
