// Two processes, one region: this process creates, a child (core_tests.exe started again
// with CreateProcessW, see child.cpp) opens by id, and the exit code says what it found.
#include <algorithm>

#include "win_test.hpp"

using namespace spshm;
using namespace spshm_test;
using namespace spshm_wintest;

TEST_CASE("a child process reads what the parent wrote", "[windows][two_process]") {
  std::uint64_t size = 300000;  // several 64 KiB granules and a partial page
  Region r = create_ok(windows_options(size));
  auto bytes = pattern(size, 42);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  REQUIRE(run_child({"verify", r.id(), std::to_string(size), "42"}) == 0);
  // The check can fail: a different seed is a different pattern.
  REQUIRE(run_child({"--quiet", "verify", r.id(), std::to_string(size), "43"}) == 4);
}

TEST_CASE("a named region: the child writes, the parent sees it", "[windows][two_process]") {
  CreateOptions o = windows_options(200000);
  o.name = unique_name("pair");
  Region r = create_ok(o);
  REQUIRE(run_child({"write", r.id(), "70000", "5000", "7"}) == 0);
  auto expected = pattern(5000, 7);
  std::vector<std::uint8_t> seen(5000);
  REQUIRE_OK(r.read(70000, seen.data(), seen.size()));
  REQUIRE(seen == expected);
  std::uint8_t before = 1;
  REQUIRE_OK(r.read(69999, &before, 1));
  REQUIRE(before == 0);
}

TEST_CASE("a sealed region is read-only for another process", "[windows][two_process]") {
  Region r = create_ok(windows_options(4096));
  auto bytes = pattern(4096, 3);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  REQUIRE_OK(r.seal());
  REQUIRE(run_child({"sealed", r.id()}) == 0);
  REQUIRE(run_child({"verify", r.id(), "4096", "3"}) == 0);
}

TEST_CASE("a dead child's hold is found and released", "[windows][two_process]") {
  Region r = create_ok(windows_options(4096));
  REQUIRE(run_child({"hold", r.id()}) == 0);
  auto list = holders(r.header());
  REQUIRE(list.size() == 1);
  HolderInfo dead = list[0];
  REQUIRE(dead.pid != self_pid());
  REQUIRE(dead.writable);
  REQUIRE(r.header().refcount.load() == 1);
  REQUIRE_FALSE(process_alive(dead.pid, dead.start_time));
  REQUIRE(release_all(r.header(), dead.pid, dead.start_time) == 1);
  REQUIRE(holders(r.header()).empty());
  REQUIRE(r.header().refcount.load() == 0);
}

TEST_CASE("the memory is freed when the creator closes the last handle", "[windows][two_process]") {
  std::string id;
  {
    Region r = create_ok(windows_options(4096));
    id = r.id();
    REQUIRE(run_child({"--quiet", "missing", id}) == 4);  // the child finds it while we hold it
  }
  REQUIRE(run_child({"missing", id}) == 0);
  auto ids = list_segments();
  REQUIRE(std::find(ids.begin(), ids.end(), id) == ids.end());
}
