// set_segment_dir / segment_dir / filesystem_space: POSIX segments moved to another
// directory (config :snakepit_shm, shm_path), and the free space of their filesystem.
#include <sys/stat.h>

#include <algorithm>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

bool exists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

/// Puts the segment directory back to /dev/shm when the test ends, whatever happened.
struct RestoreDir {
  ~RestoreDir() { (void)set_segment_dir("/dev/shm"); }
};

}  // namespace

TEST_CASE("segments follow set_segment_dir: create, list, paths, unlink", "[segment_dir]") {
  REQUIRE(segment_dir() == "/dev/shm");
  std::string dir = "/dev/shm/core_test_dir_" + std::to_string(getpid());
  REQUIRE(mkdir(dir.c_str(), 0700) == 0);
  RestoreDir restore;
  REQUIRE_OK(set_segment_dir(dir + "/"));  // a trailing slash is dropped
  REQUIRE(segment_dir() == dir);

  CreateOptions o = options(BackendKind::posix, 4096);
  Region r = create_ok(o);
  std::string id = r.id();
  REQUIRE(exists(dir + "/" + id));
  REQUIRE_FALSE(exists("/dev/shm/" + id));
  REQUIRE(r.control_path() == dir + "/" + id);
  auto listed = list_segments();
  REQUIRE(std::find(listed.begin(), listed.end(), id) != listed.end());

  // Opening by id finds it there too.
  OpenTarget target;
  target.region_id = id;
  REQUIRE_OK(Region::open(target, false));

  REQUIRE_OK(r.deallocate(false));
  REQUIRE_FALSE(exists(dir + "/" + id));
  REQUIRE_OK(set_segment_dir("/dev/shm"));
  REQUIRE(rmdir(dir.c_str()) == 0);
}

TEST_CASE("set_segment_dir refuses what is not an absolute directory", "[segment_dir]") {
  RestoreDir restore;
  REQUIRE_ERR(set_segment_dir("relative"), Errc::invalid_argument);
  REQUIRE_ERR(set_segment_dir(""), Errc::invalid_argument);
  REQUIRE_ERR(set_segment_dir("/nonexistent/spshm"), Errc::not_found);
  REQUIRE_ERR(set_segment_dir("/etc/hostname"), Errc::invalid_argument);
  REQUIRE(segment_dir() == "/dev/shm");
}

TEST_CASE("filesystem_space measures a tmpfs", "[segment_dir]") {
  auto space = filesystem_space("/dev/shm");
  REQUIRE_OK(space);
  REQUIRE(space.value().tmpfs);
  REQUIRE(space.value().total > 0);
  REQUIRE(space.value().available <= space.value().total);
  auto root = filesystem_space("/");
  REQUIRE_OK(root);
  REQUIRE_FALSE(root.value().tmpfs);
  REQUIRE_ERR(filesystem_space("/nonexistent/spshm"), Errc::not_found);
}
