// Region: create, open, read, write on both Linux backends.
#include <fcntl.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include <algorithm>
#include <chrono>
#include <thread>

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
  // By path too, as export_ref hands it out (control and data path are the same object).
  auto by_path = Region::open(OpenTarget{"", r.control_path(), r.data_path()}, true);
  REQUIRE_OK(by_path);
  REQUIRE(by_path->id() == r.id());
  REQUIRE(by_path->writable());
  REQUIRE_OK(by_path->write(1, bytes.data(), 1));
  REQUIRE_ERR(Region::open(OpenTarget{random_region_id(), r.control_path(), ""}, false),
              Errc::invalid_argument);  // the path holds another id
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

TEST_CASE("the header records who created the region and how", "[region]") {
  CreateOptions o = options(BackendKind::memfd, 1000);
  o.security_level = 1;
  o.metadata_json = "{\"k\":\"v\"}";
  o.idle_timeout_ns = 42;
  auto before = std::chrono::system_clock::now().time_since_epoch();
  Region r = create_ok(o);
  const RegionHeader& h = r.header();
  REQUIRE(std::memcmp(h.magic, "SPSHMHDR", 8) == 0);
  REQUIRE(h.format_version == kFormatVersion);
  REQUIRE(h.header_size == kHeaderSize);
  REQUIRE(h.creator_pid == static_cast<std::uint32_t>(getpid()));
  REQUIRE(h.creator_start_time == process_start_time(self_pid()).value());
  REQUIRE(h.creator_start_time > 0);
  auto id = boot_id();
  REQUIRE(std::memcmp(h.boot_id, id.data(), 16) == 0);
  REQUIRE(id != decltype(id){});
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(before).count();
  REQUIRE(h.created_at_ns >= static_cast<std::uint64_t>(ns));
  REQUIRE(h.backend == static_cast<std::uint32_t>(BackendKind::memfd));
  REQUIRE(h.security_level == 1);
  REQUIRE(std::string(h.region_id) == r.id());
  REQUIRE(std::string(h.metadata, h.metadata_length) == o.metadata_json);
  REQUIRE(h.idle_timeout_ns.load() == 42);
  REQUIRE(h.holder_capacity == kHolderCapacity);
  REQUIRE(h.state.load() == 0);
  REQUIRE(h.refcount.load() == 0);
}

TEST_CASE("create refuses bad options", "[region]") {
  auto o = options(BackendKind::memfd, 0);
  REQUIRE_ERR(Region::create(o), Errc::invalid_argument);
  o.size = std::uint64_t{1} << 62;
  REQUIRE_ERR(Region::create(o), Errc::too_large);
  o.size = 10;
  o.metadata_json.assign(kMetadataCapacity + 1, 'x');
  REQUIRE_ERR(Region::create(o), Errc::invalid_argument);
  o.metadata_json.assign(kMetadataCapacity, 'x');  // exactly full is fine
  REQUIRE_OK(Region::create(o));
  o.metadata_json.clear();
  o.security_level = 3;
  REQUIRE_ERR(Region::create(o), Errc::invalid_argument);
  o.security_level = 0;
  o.name = "not-with-memfd";
  REQUIRE_ERR(Region::create(o), Errc::invalid_argument);
  o.name.clear();
  o.mode = 0640;  // group access needs posix
  REQUIRE_ERR(Region::create(o), Errc::invalid_argument);
  o.backend = BackendKind::posix;
  o.mode = 04600;
  REQUIRE_ERR(Region::create(o), Errc::invalid_argument);
  o.mode = 0600;
  for (const std::string& bad :
       std::vector<std::string>{"a/b", "..", "Upper", std::string(22, 'a')}) {
    o.name = bad;
    INFO(bad);
    REQUIRE_ERR(Region::create(o), Errc::invalid_argument);
  }
  o.name.clear();
  o.backend = BackendKind::windows;
  REQUIRE_ERR(Region::create(o), Errc::unsupported);
}

TEST_CASE("reads and writes are bounds-checked", "[region]") {
  Region r = create_ok(options(BackendKind::memfd, 100));
  std::uint8_t buf[200] = {};
  REQUIRE_OK(r.write(100, buf, 0));
  REQUIRE_OK(r.read(0, buf, 100));
  REQUIRE_ERR(r.write(101, buf, 0), Errc::out_of_bounds);
  REQUIRE_ERR(r.write(0, buf, 101), Errc::out_of_bounds);
  REQUIRE_ERR(r.read(99, buf, 2), Errc::out_of_bounds);
  REQUIRE_ERR(r.read(1, buf, SIZE_MAX), Errc::out_of_bounds);
  REQUIRE_ERR(r.write(UINT64_MAX, buf, 2), Errc::out_of_bounds);
}

TEST_CASE("a read-only handle cannot write", "[region]") {
  Region r = create_ok(options(BackendKind::memfd, 100));
  auto ro = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, false);
  REQUIRE_OK(ro);
  std::uint8_t b = 1;
  REQUIRE_ERR(ro->write(0, &b, 1), Errc::permission_denied);
  REQUIRE_ERR(ro->deallocate(true), Errc::permission_denied);
}

TEST_CASE("open refuses what is not there or does not match", "[region]") {
  REQUIRE_ERR(Region::open(OpenTarget{random_region_id(), "", ""}, false), Errc::not_found);
  REQUIRE_ERR(Region::open(OpenTarget{"../etc/passwd", "", ""}, false), Errc::invalid_argument);
  REQUIRE_ERR(Region::open(OpenTarget{}, false), Errc::invalid_argument);
  Region a = create_ok(options(BackendKind::memfd, 100));
  Region b = create_ok(options(BackendKind::memfd, 100));
  // Control of one region with the data of another.
  REQUIRE_ERR(Region::open(OpenTarget{"", a.control_path(), b.data_path()}, false),
              Errc::invalid_argument);
  // A control memfd without its data path.
  REQUIRE_ERR(Region::open(OpenTarget{"", a.control_path(), ""}, false), Errc::invalid_argument);
  // The id must match what the paths hold.
  REQUIRE_ERR(Region::open(OpenTarget{b.id(), a.control_path(), a.data_path()}, false),
              Errc::invalid_argument);
  REQUIRE_OK(Region::open(OpenTarget{"", a.control_path(), a.data_path()}, false));
}

TEST_CASE("a peer cannot resize a memfd region", "[region][memfd]") {
  Region r = create_ok(options(BackendKind::memfd, 8192));
  std::string data = r.data_path(), control = r.control_path();
  REQUIRE(in_child([&] {
            for (const std::string& path : {data, control}) {
              int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
              if (fd < 0) return 1;
              if (ftruncate(fd, 0) == 0 || errno != EPERM) return 2;
              if (ftruncate(fd, 1 << 20) == 0 || errno != EPERM) return 3;
              if (fallocate(fd, 0, 0, 1 << 20) == 0 || errno != EPERM) return 4;
              close(fd);
            }
            return 0;
          }) == 0);
  std::uint8_t b = 7;
  REQUIRE_OK(r.write(8191, &b, 1));  // still fully usable
}

TEST_CASE("a named region never opens a pre-existing object (O_EXCL)", "[region][posix]") {
  std::string name = unique_name("excl");
  std::string id = named_region_id(name);
  SegmentCleanup cleanup{id};
  std::string path = "/dev/shm/" + id;
  int fd = open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0666);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, "squatter", 8) == 8);
  close(fd);
  CreateOptions o = options(BackendKind::posix, 100);
  o.name = name;
  REQUIRE_ERR(Region::create(o), Errc::already_exists);
  // A planted file is not a region: opening it refuses, and so does create_or_open.
  o.open_mode = OpenMode::create_or_open;
  REQUIRE_ERR(Region::create(o), Errc::corrupt);
  char buf[8];
  fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(read(fd, buf, 8) == 8);
  close(fd);
  REQUIRE(std::memcmp(buf, "squatter", 8) == 0);  // untouched
}

TEST_CASE("a named region never follows a planted symlink", "[region][posix]") {
  std::string name = unique_name("link");
  std::string id = named_region_id(name);
  SegmentCleanup cleanup{id};
  std::string target = "/tmp/spshm_core_test_target_" + std::to_string(getpid());
  int fd = open(target.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  close(fd);
  REQUIRE(symlink(target.c_str(), ("/dev/shm/" + id).c_str()) == 0);
  CreateOptions o = options(BackendKind::posix, 100);
  o.name = name;
  REQUIRE_ERR(Region::create(o), Errc::already_exists);
  o.open_mode = OpenMode::open_only;
  REQUIRE_ERR(Region::create(o), Errc::not_ours);
  struct stat st;
  REQUIRE(stat(target.c_str(), &st) == 0);
  REQUIRE(st.st_size == 0);  // nothing was written through the link
  unlink(target.c_str());
}

TEST_CASE("permissions are exactly the mode asked for, whatever the umask", "[region][posix]") {
  mode_t old = umask(0);
  struct Case {
    mode_t umask_value;
    std::uint32_t mode;
  };
  for (Case c : {Case{0, 0600}, Case{077, 0640}, Case{0777, 0600}, Case{022, 0666}}) {
    umask(c.umask_value);
    CreateOptions o = options(BackendKind::posix, 100);
    o.mode = c.mode;
    Region r = create_ok(o);
    SegmentCleanup cleanup{r.id()};
    struct stat st;
    REQUIRE(stat(r.control_path().c_str(), &st) == 0);
    INFO("umask " << c.umask_value << " mode " << c.mode);
    REQUIRE((st.st_mode & 07777) == c.mode);
    REQUIRE(S_ISREG(st.st_mode));
    REQUIRE_OK(r.deallocate(false));
  }
  umask(old);
}

TEST_CASE("open modes of named regions", "[region][posix]") {
  std::string name = unique_name("mode");
  std::string id = named_region_id(name);
  SegmentCleanup cleanup{id};
  CreateOptions o = options(BackendKind::posix, 4096);
  o.name = name;

  o.open_mode = OpenMode::open_only;
  REQUIRE_ERR(Region::create(o), Errc::not_found);

  o.open_mode = OpenMode::create_or_open;
  Region first = create_ok(o);
  REQUIRE(first.role() == Role::created);
  REQUIRE(first.id() == id);
  REQUIRE(first.header().flags & kFlagNamed);
  std::uint8_t b = 42;
  REQUIRE_OK(first.write(10, &b, 1));

  Region second = create_ok(o);
  REQUIRE(second.role() == Role::opened);
  REQUIRE(second.id() == id);
  std::uint8_t got = 0;
  REQUIRE_OK(second.read(10, &got, 1));
  REQUIRE(got == 42);

  o.open_mode = OpenMode::open_only;
  Region third = create_ok(o);
  REQUIRE(third.role() == Role::opened);

  o.open_mode = OpenMode::create;
  REQUIRE_ERR(Region::create(o), Errc::already_exists);

  o.open_mode = OpenMode::remove_and_create;
  Region fresh = create_ok(o);
  REQUIRE(fresh.role() == Role::created);
  REQUIRE_OK(fresh.read(10, &got, 1));
  REQUIRE(got == 0);  // a new segment, not the old one
  REQUIRE_OK(first.read(10, &got, 1));
  REQUIRE(got == 42);  // the old mapping lives on, unlinked
  // Freeing the old region through its handle must not remove the new one's name.
  REQUIRE_OK(first.deallocate(false));
  o.open_mode = OpenMode::open_only;
  Region again = create_ok(o);
  REQUIRE_OK(again.read(10, &got, 1));
  REQUIRE(got == 0);
  REQUIRE_OK(fresh.deallocate(false));
  REQUIRE_ERR(Region::create(o), Errc::not_found);
}

TEST_CASE("deallocate(zero) wipes the data for every mapping", "[region]") {
  auto backend = GENERATE(BackendKind::memfd, BackendKind::posix);
  CreateOptions o = options(backend, 3 * 4096 + 11);
  Region r = create_ok(o);
  SegmentCleanup cleanup{backend == BackendKind::posix ? r.id() : ""};
  auto bytes = pattern(r.size(), 9);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  // A second, independent view of the same memory, kept open across deallocate.
  int fd = open(r.data_path().c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  off_t offset = backend == BackendKind::posix ? kHeaderSize : 0;
  auto* view =
      static_cast<std::uint8_t*>(mmap(nullptr, r.capacity(), PROT_READ, MAP_SHARED, fd, offset));
  REQUIRE(view != MAP_FAILED);
  REQUIRE(std::memcmp(view, bytes.data(), bytes.size()) == 0);

  REQUIRE_OK(r.deallocate(true));
  REQUIRE(r.header().state.load() & kStateDeallocated);
  std::vector<std::uint8_t> zeros(r.capacity(), 0);
  REQUIRE(std::memcmp(view, zeros.data(), zeros.size()) == 0);
  if (backend == BackendKind::posix) {
    struct stat st;
    REQUIRE(stat(("/dev/shm/" + r.id()).c_str(), &st) != 0);  // the name is gone
    REQUIRE_ERR(Region::open(OpenTarget{r.id(), "", ""}, false), Errc::not_found);
  } else {
    REQUIRE_ERR(Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, false),
                Errc::deallocated);
  }
  std::uint8_t b = 0;
  REQUIRE_ERR(r.write(0, &b, 1), Errc::deallocated);
  REQUIRE_ERR(r.read(0, &b, 1), Errc::deallocated);
  REQUIRE_OK(r.deallocate(true));  // idempotent
  munmap(view, r.capacity());
  close(fd);
}

TEST_CASE("lock_memory beyond RLIMIT_MEMLOCK fails with mlock_failed", "[region][mlock]") {
  CreateOptions small = options(BackendKind::memfd, 4096);
  small.lock_memory = true;
  REQUIRE_OK(Region::create(small));  // within the default limit

  // In a child: drop CAP_IPC_LOCK (root bypasses the limit with it), lower the limit.
  int rc = in_child([] {
    if (!drop_capabilities({CAP_IPC_LOCK})) return 11;
    struct rlimit limit {
      64 * 1024, 64 * 1024
    };
    if (setrlimit(RLIMIT_MEMLOCK, &limit) != 0) return 12;
    CreateOptions o = options(BackendKind::memfd, 1 << 20);
    o.lock_memory = true;
    auto r = Region::create(o);
    if (r) return 1;
    if (r.error().code != Errc::mlock_failed) return 2;
    const std::string& m = r.error().message;
    if (m.find("RLIMIT_MEMLOCK") == std::string::npos) return 3;
    if (m.find("65536") == std::string::npos) return 4;  // names the current limit
    if (m.find("ulimit -l") == std::string::npos || m.find("CAP_IPC_LOCK") == std::string::npos)
      return 5;
    CreateOptions p = o;  // a posix region that cannot be locked leaves no name behind
    p.backend = BackendKind::posix;
    auto before = list_segments();
    if (Region::create(p).ok()) return 6;
    for (const std::string& id : list_segments()) {
      if (std::find(before.begin(), before.end(), id) != before.end()) continue;
      auto snap = inspect("/dev/shm/" + id);  // new, but maybe another program's
      if (!snap || snap->creator_pid == self_pid()) return 7;
    }
    return 0;
  });
  REQUIRE(rc == 0);
}

TEST_CASE("a region larger than memory fails cleanly with no_space", "[region]") {
  auto backend = GENERATE(BackendKind::memfd, BackendKind::posix);
  auto before = list_segments();
  auto r = Region::create(options(backend, std::uint64_t{1} << 50));  // 1 PiB
  REQUIRE_ERR(r, Errc::no_space);
  INFO(r.error().message);
  REQUIRE(r.error().message.find("cannot allocate 11258999068") != std::string::npos);
  REQUIRE(r.error().message.find(backend == BackendKind::posix ? "bytes free" : "MemAvailable") !=
          std::string::npos);
  for (const std::string& id : list_segments()) {  // nothing of ours left behind
    if (std::find(before.begin(), before.end(), id) != before.end()) continue;
    auto snap = inspect("/dev/shm/" + id);
    REQUIRE_FALSE((!snap || snap->creator_pid == self_pid()));
  }
}

TEST_CASE("opening a named region waits for its creator to publish the header", "[region][posix]") {
  // A template header of a real region, re-targeted at another name.
  std::string name = unique_name("wait");
  std::string id = named_region_id(name);
  SegmentCleanup cleanup{id};
  CreateOptions o = options(BackendKind::posix, 4096);
  o.name = unique_name("tmpl");
  Region tmpl = create_ok(o);
  SegmentCleanup tmpl_cleanup{tmpl.id()};
  std::vector<std::uint8_t> header(kHeaderSize);
  std::memcpy(header.data(), &tmpl.header(), kHeaderSize);
  auto& h = *reinterpret_cast<RegionHeader*>(header.data());
  std::memset(h.region_id, 0, kRegionIdCapacity);
  std::memcpy(h.region_id, id.data(), id.size());
  h.header_crc32 = header_crc(h);
  REQUIRE_OK(tmpl.deallocate(false));

  // A creator in slow motion: the object exists, sized, with everything but the magic.
  int fd = shm_open(("/" + id).c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  REQUIRE(fd >= 0);
  REQUIRE(ftruncate(fd, 2 * kHeaderSize) == 0);
  std::vector<std::uint8_t> unpublished = header;
  std::memset(unpublished.data(), 0, sizeof h.magic);
  REQUIRE(pwrite(fd, unpublished.data(), kHeaderSize, 0) == kHeaderSize);
  std::thread creator([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    (void)!pwrite(fd, header.data(), sizeof h.magic, 0);  // publish: the magic, last
  });
  CreateOptions open = options(BackendKind::posix, 4096);
  open.name = name;
  open.open_mode = OpenMode::open_only;
  auto opened = Region::create(open);
  creator.join();
  REQUIRE_OK(opened);
  REQUIRE(opened->id() == id);

  // No header while another process holds the segment (its liveness lock: here the
  // opener above; in life the creator, still creating it): busy, never "remove it".
  std::memset(header.data(), 0, sizeof h.magic);
  REQUIRE(pwrite(fd, header.data(), sizeof h.magic, 0) == sizeof h.magic);
  auto held = Region::create(open);
  REQUIRE_ERR(held, Errc::busy);
  { Region gone = std::move(*opened); }

  // A creator that never finishes (nobody holds it): after a second, corrupt with advice.
  auto stuck = Region::create(open);
  REQUIRE_ERR(stuck, Errc::corrupt);
  REQUIRE(stuck.error().message.find("cleanup") != std::string::npos);
  close(fd);
}
