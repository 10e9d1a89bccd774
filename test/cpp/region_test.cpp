// Region: create, open, read, write on both Linux backends.
#include <sys/stat.h>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

TEST_CASE("a memfd region is created, written and read back", "[region][memfd]") {
  Region r = create_ok(options(BackendKind::memfd, 10000));
  REQUIRE(r.backend() == BackendKind::memfd);
  REQUIRE(r.role() == Role::created);
  REQUIRE(r.writable());
  REQUIRE(r.size() == 10000);
  REQUIRE(r.capacity() == 10000);
  REQUIRE(r.control_path().rfind("/proc/", 0) == 0);
  REQUIRE(r.data_path() != r.control_path());
  auto bytes = pattern(10000, 1);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  std::vector<std::uint8_t> back(10000);
  REQUIRE_OK(r.read(0, back.data(), back.size()));
  REQUIRE(back == bytes);
  REQUIRE(std::memcmp(r.data(), bytes.data(), bytes.size()) == 0);
  REQUIRE_OK(validate_header(r.header(), r.capacity()));
}

TEST_CASE("a posix region is created, written and read back", "[region][posix]") {
  Region r = create_ok(options(BackendKind::posix, 5000));
  SegmentCleanup cleanup{r.id()};
  REQUIRE(r.control_path() == "/dev/shm/" + r.id());
  struct stat st;
  REQUIRE(stat(r.control_path().c_str(), &st) == 0);
  REQUIRE((st.st_mode & 0777) == 0600);
  REQUIRE(st.st_size >= 4096 + 5000);
  auto bytes = pattern(5000, 2);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  auto opened = Region::open(OpenTarget{r.id(), "", ""}, false);
  REQUIRE_OK(opened);
  REQUIRE(opened->role() == Role::opened);
  REQUIRE_FALSE(opened->writable());
  std::vector<std::uint8_t> back(5000);
  REQUIRE_OK(opened->read(0, back.data(), back.size()));
  REQUIRE(back == bytes);
  REQUIRE_OK(r.deallocate(false));
}

TEST_CASE("a memfd region opens through its /proc paths", "[region][memfd]") {
  Region r = create_ok(options(BackendKind::memfd, 300000));
  auto bytes = pattern(300000, 3);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  auto opened = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
  REQUIRE_OK(opened);
  std::vector<std::uint8_t> back(300000);
  REQUIRE_OK(opened->read(0, back.data(), back.size()));
  REQUIRE(back == bytes);
  REQUIRE_OK(opened->write(7, bytes.data(), 10));
  REQUIRE(std::memcmp(r.data() + 7, bytes.data(), 10) == 0);
}
