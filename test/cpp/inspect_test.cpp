// inspect, snapshot, unlink_segment: offline reading and removal of segments.
#include <fcntl.h>
#include <sys/stat.h>

#include <fstream>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

std::string temp_path(const std::string& tag) {
  return "/tmp/spshm_core_test_" + std::to_string(getpid()) + "_" + tag;
}

void write_file(const std::string& path, const void* data, std::size_t length) {
  int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, data, length) == static_cast<ssize_t>(length));
  close(fd);
}

bool exists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

}  // namespace

TEST_CASE("inspect reads a posix segment without changing it", "[inspect]") {
  CreateOptions o = options(BackendKind::posix, 12345);
  o.metadata_json = "{\"shape\":[3,4]}";
  o.security_level = 2;
  o.idle_timeout_ns = 5000000000ull;
  o.mode = 0640;
  Region r = create_ok(o);
  SegmentCleanup cleanup{r.id()};
  REQUIRE_OK(hold(r.header(), self_pid(), process_start_time(self_pid()).value(), true));
  std::vector<std::uint8_t> before(reinterpret_cast<std::uint8_t*>(&r.header()),
                                   reinterpret_cast<std::uint8_t*>(&r.header()) + kHeaderSize);

  auto snap = inspect(r.control_path());
  REQUIRE_OK(snap);
  REQUIRE(snap->region_id == r.id());
  REQUIRE(snap->backend == BackendKind::posix);
  REQUIRE(snap->format_version == kFormatVersion);
  REQUIRE(snap->data_size == 12345);
  REQUIRE(snap->data_capacity == 12345);
  REQUIRE(snap->data_offset == kHeaderSize);
  REQUIRE(snap->security_level == 2);
  REQUIRE(snap->metadata_json == o.metadata_json);
  REQUIRE(snap->idle_timeout_ns == 5000000000ull);
  REQUIRE(snap->creator_pid == self_pid());
  REQUIRE(snap->creator_start_time == process_start_time(self_pid()).value());
  REQUIRE(snap->boot_id == boot_id());
  REQUIRE(snap->creator_alive);
  REQUIRE(snap->refcount == 1);
  REQUIRE(snap->holders.size() == 1);
  REQUIRE(snap->holders[0].pid == self_pid());
  REQUIRE(snap->holders[0].writable);
  REQUIRE(std::memcmp(before.data(), &r.header(), kHeaderSize) == 0);
  REQUIRE_OK(r.deallocate(false));
}

TEST_CASE("inspect reads a memfd control object through /proc", "[inspect]") {
  Region r = create_ok(options(BackendKind::memfd, 777));
  auto snap = inspect(r.control_path());
  REQUIRE_OK(snap);
  REQUIRE(snap->region_id == r.id());
  REQUIRE(snap->backend == BackendKind::memfd);
  REQUIRE(snap->flags == (kFlagSplitData | kFlagLivenessLocks));
  // The data memfd has no header.
  REQUIRE_ERR(inspect(r.data_path()), Errc::corrupt);
}

TEST_CASE("snapshot reports a creator that is gone", "[inspect]") {
  Region r = create_ok(options(BackendKind::memfd, 100));
  struct {
    alignas(RegionHeader) unsigned char bytes[sizeof(RegionHeader)];
  } copy;
  std::memcpy(copy.bytes, &r.header(), sizeof copy.bytes);
  auto& h = *reinterpret_cast<RegionHeader*>(copy.bytes);
  REQUIRE(snapshot(h).creator_alive);
  h.creator_start_time += 1;  // same pid, another process
  REQUIRE_FALSE(snapshot(h).creator_alive);
  h.creator_start_time -= 1;
  h.boot_id[0] ^= 0xFF;  // another boot
  REQUIRE_FALSE(snapshot(h).creator_alive);
}

TEST_CASE("inspect refuses symlinks, non-regular files and foreign files", "[inspect]") {
  Region r = create_ok(options(BackendKind::posix, 100));
  SegmentCleanup cleanup{r.id()};
  std::string link = temp_path("link");
  REQUIRE(symlink(r.control_path().c_str(), link.c_str()) == 0);
  REQUIRE_ERR(inspect(link), Errc::not_ours);
  unlink(link.c_str());

  REQUIRE_ERR(inspect("/tmp"), Errc::not_ours);
  std::string fifo = temp_path("fifo");
  REQUIRE(mkfifo(fifo.c_str(), 0600) == 0);
  REQUIRE_ERR(inspect(fifo), Errc::not_ours);  // and does not hang waiting for a writer
  unlink(fifo.c_str());
  REQUIRE_ERR(inspect("/dev/null"), Errc::not_ours);
  REQUIRE_ERR(inspect(temp_path("missing")), Errc::not_found);

  // A /proc/self/fd link is only followed to a memfd of ours.
  int fd = open("/etc/hostname", O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE_ERR(inspect("/proc/self/fd/" + std::to_string(fd)), Errc::not_ours);
  close(fd);

  if (geteuid() == 0) {  // a file of another user
    std::string foreign = temp_path("foreign");
    write_file(foreign, &r.header(), kHeaderSize);
    REQUIRE(chown(foreign.c_str(), 65534, 65534) == 0);
    auto res = inspect(foreign);
    REQUIRE_ERR(res, Errc::not_ours);
    REQUIRE(res.error().message.find("65534") != std::string::npos);
    unlink(foreign.c_str());
  }
  REQUIRE_OK(r.deallocate(false));
}

TEST_CASE("inspect finds truncated and foreign content corrupt", "[inspect]") {
  Region r = create_ok(options(BackendKind::posix, 100000));
  SegmentCleanup cleanup{r.id()};
  std::string path = temp_path("truncated");
  write_file(path, &r.header(), 2000);  // shorter than a header
  REQUIRE_ERR(inspect(path), Errc::corrupt);
  write_file(path, &r.header(), kHeaderSize);  // a header, but the data is missing
  auto res = inspect(path);
  REQUIRE_ERR(res, Errc::corrupt);
  REQUIRE(res.error().message.find("truncated") != std::string::npos);
  std::vector<char> junk(8192, 'j');
  write_file(path, junk.data(), junk.size());
  REQUIRE_ERR(inspect(path), Errc::corrupt);
  unlink(path.c_str());
  REQUIRE_OK(r.deallocate(false));
}

TEST_CASE("unlink_segment removes only well-formed segments of ours", "[inspect][unlink]") {
  for (const std::string& bad : std::vector<std::string>{
           "../etc/passwd", "spshm_n_a/b", "spshm_n_..", "spshm_ABCDEFGHIJKLMNOPQRST", "x", ""}) {
    INFO(bad);
    REQUIRE_ERR(unlink_segment(bad), Errc::invalid_argument);
  }
  REQUIRE_ERR(unlink_segment(named_region_id(unique_name("none"))), Errc::not_found);

  Region r = create_ok(options(BackendKind::posix, 100));
  SegmentCleanup cleanup{r.id()};
  REQUIRE(exists(r.control_path()));
  REQUIRE_OK(unlink_segment(r.id()));
  REQUIRE_FALSE(exists(r.control_path()));
  std::uint8_t b = 9;
  REQUIRE_OK(r.write(0, &b, 1));  // our mapping survives the name
}

TEST_CASE("unlink_segment leaves damaged or young incomplete segments alone", "[inspect][unlink]") {
  std::string id = named_region_id(unique_name("junk"));
  SegmentCleanup cleanup{id};
  std::string path = "/dev/shm/" + id;
  std::vector<char> junk(kHeaderSize, 'j');
  write_file(path, junk.data(), junk.size());
  auto res = unlink_segment(id);
  REQUIRE_ERR(res, Errc::corrupt);
  REQUIRE(res.error().message.find("not removed") != std::string::npos);
  REQUIRE(exists(path));

  // Empty (a creator died before writing the header) and recent: maybe still in progress.
  write_file(path, nullptr, 0);
  REQUIRE_ERR(unlink_segment(id), Errc::corrupt);
  REQUIRE(exists(path));
  // The same, untouched for a minute: an orphan of a failed creation, removed.
  struct timespec old[2];
  clock_gettime(CLOCK_REALTIME, &old[0]);
  old[0].tv_sec -= 60;
  old[1] = old[0];
  REQUIRE(utimensat(AT_FDCWD, path.c_str(), old, 0) == 0);
  REQUIRE_OK(unlink_segment(id));
  REQUIRE_FALSE(exists(path));
}

TEST_CASE("unlink_segment refuses symlinks and other users' segments", "[inspect][unlink]") {
  std::string id = named_region_id(unique_name("lnk"));
  SegmentCleanup cleanup{id};
  std::string path = "/dev/shm/" + id;
  std::string target = temp_path("target");
  write_file(target, "x", 1);
  REQUIRE(symlink(target.c_str(), path.c_str()) == 0);
  REQUIRE_ERR(unlink_segment(id), Errc::not_ours);
  REQUIRE(exists(path));
  unlink(path.c_str());
  if (geteuid() == 0) {
    Region r = create_ok(options(BackendKind::posix, 100));
    SegmentCleanup cleanup2{r.id()};
    REQUIRE(chown(r.control_path().c_str(), 65534, 65534) == 0);
    REQUIRE_ERR(unlink_segment(r.id()), Errc::not_ours);
    REQUIRE(exists(r.control_path()));
  }
  unlink(target.c_str());
}

TEST_CASE("list_segments lists the posix segments of ours", "[inspect]") {
  Region r = create_ok(options(BackendKind::posix, 100));
  SegmentCleanup cleanup{r.id()};
  auto ids = list_segments();
  REQUIRE(std::find(ids.begin(), ids.end(), r.id()) != ids.end());
  for (const auto& id : ids) REQUIRE(id.rfind("spshm_", 0) == 0);
  REQUIRE_OK(r.deallocate(false));
  ids = list_segments();
  REQUIRE(std::find(ids.begin(), ids.end(), r.id()) == ids.end());
}
