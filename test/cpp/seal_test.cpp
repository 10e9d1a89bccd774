// Sealing: what peers can and cannot do afterwards, and who may seal.
#include <fcntl.h>
#include <sys/stat.h>

#include <atomic>
#include <thread>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

/// Child exit codes of try_to_write_through_reopen: 0 = every write path refused.
enum WriteAttempt {
  kAllRefused = 0,
  kOpenedForWrite = 1,
  kMappedWritable = 2,
  kWrote = 3,
  kMprotected = 4,
  kSetupFailed = 5
};

/// Run in a child: tries every way to write the data object through its path.
int try_to_write_through_reopen(const std::string& path, std::size_t length) {
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd >= 0) {
    void* p = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p != MAP_FAILED) return kMappedWritable;
    char byte = 'X';
    if (pwrite(fd, &byte, 1, 0) == 1) return kWrote;
    close(fd);
  }
  int ro = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (ro < 0) return kSetupFailed;
  void* p = mmap(nullptr, length, PROT_READ, MAP_SHARED, ro, 0);
  if (p == MAP_FAILED) return kSetupFailed;
  if (mprotect(p, length, PROT_READ | PROT_WRITE) == 0) return kMprotected;
  return kAllRefused;
}

}  // namespace

TEST_CASE("before sealing a peer can write a memfd region through its path", "[seal]") {
  // The control experiment: proves the checks below would notice a missing seal.
  Region r = create_ok(options(BackendKind::memfd, 8192));
  std::string path = r.data_path();
  REQUIRE(in_child([&] { return try_to_write_through_reopen(path, 8192); }) == kMappedWritable);
}

TEST_CASE("after sealing a peer cannot write a memfd region in any way", "[seal]") {
  Region r = create_ok(options(BackendKind::memfd, 8192));
  auto bytes = pattern(8192, 1);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  REQUIRE_OK(r.seal());
  REQUIRE(r.sealed());
  REQUIRE(r.header().state.load() & kStateSealed);
  std::string path = r.data_path();
  REQUIRE(in_child([&] { return try_to_write_through_reopen(path, 8192); }) == kAllRefused);
  // Nor through the core: read-write opens are refused, read-only ones work.
  OpenTarget target{r.id(), r.control_path(), r.data_path()};
  REQUIRE(in_child([&] {
            auto rw = Region::open(target, true);
            if (rw || rw.error().code != Errc::sealed) return 1;
            auto ro = Region::open(target, false);
            if (!ro) return 2;
            std::uint8_t b = 0;
            if (ro->read(8191, &b, 1).ok() == false || b != bytes[8191]) return 3;
            return ro->write(0, &b, 1).ok() ? 4 : 0;
          }) == 0);
  // The data is unchanged, and writes through the API are refused here too.
  REQUIRE(std::memcmp(r.data(), bytes.data(), bytes.size()) == 0);
  REQUIRE_ERR(r.write(0, bytes.data(), 1), Errc::sealed);
  // Holders can still register read-only holds in the (unsealed) control memfd.
  REQUIRE_OK(hold(r.header(), 4242, 1, false));
  REQUIRE_OK(release(r.header(), 4242, 1));
}

TEST_CASE("seal is idempotent", "[seal]") {
  Region r = create_ok(options(BackendKind::memfd, 100));
  REQUIRE_OK(r.seal());
  REQUIRE_OK(r.seal());
  REQUIRE(r.sealed());
}

TEST_CASE("sealing a posix region makes its mode 0400", "[seal][posix]") {
  Region r = create_ok(options(BackendKind::posix, 100));
  SegmentCleanup cleanup{r.id()};
  REQUIRE_OK(r.seal());
  struct stat st;
  REQUIRE(stat(r.control_path().c_str(), &st) == 0);
  REQUIRE((st.st_mode & 0777) == 0400);
  REQUIRE_ERR(Region::open(OpenTarget{r.id(), "", ""}, true), Errc::sealed);
  auto ro = Region::open(OpenTarget{r.id(), "", ""}, false);
  REQUIRE_OK(ro);
  REQUIRE(ro->sealed());
  REQUIRE_OK(r.deallocate(false));
}

TEST_CASE("a sealed posix region still opens read-only for a non-root peer", "[seal][posix]") {
  Region r = create_ok(options(BackendKind::posix, 4096));
  SegmentCleanup cleanup{r.id()};
  std::uint8_t b = 77;
  REQUIRE_OK(r.write(100, &b, 1));
  REQUIRE_OK(r.seal());
  std::string id = r.id();
  int rc = in_child([&] {
    // Without these root ignores mode 0400; with them gone it is any owner process.
    if (!drop_capabilities({CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER})) return 10;
    auto rw = Region::open(OpenTarget{id, "", ""}, true);
    if (rw || rw.error().code != Errc::permission_denied) return 1;
    auto ro = Region::open(OpenTarget{id, "", ""}, false);
    if (!ro) return 2;
    if (ro->header_writable()) return 3;  // a private view: holds would not be shared
    std::uint8_t got = 0;
    if (!ro->read(100, &got, 1) || got != 77) return 4;
    return 0;
  });
  REQUIRE(rc == 0);
  REQUIRE(r.header_writable());
  REQUIRE_OK(r.deallocate(false));
}

TEST_CASE("a read-only handle cannot seal", "[seal]") {
  Region r = create_ok(options(BackendKind::memfd, 100));
  auto ro = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, false);
  REQUIRE_OK(ro);
  REQUIRE_ERR(ro->seal(), Errc::permission_denied);
  REQUIRE_FALSE(r.sealed());
}

TEST_CASE("seal refuses while another live process holds the region writable", "[seal]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  // Our own writable hold does not block the seal (the owner is the one sealing).
  auto self_start = process_start_time(self_pid());
  REQUIRE_OK(self_start);
  REQUIRE_OK(hold(r.header(), self_pid(), *self_start, true));

  int ready[2], go[2];
  REQUIRE(pipe(ready) == 0);
  REQUIRE(pipe(go) == 0);
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    char status = 'F';
    auto opened = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
    if (opened) {
      std::uint64_t start = process_start_time(self_pid()).value();
      if (hold(opened->header(), self_pid(), start, true)) status = 'K';
    }
    (void)!write(ready[1], &status, 1);
    char c;
    (void)!read(go[0], &c, 1);  // wait for the parent, then die holding the region
    _exit(0);
  }
  char status = 0;
  REQUIRE(read(ready[0], &status, 1) == 1);
  REQUIRE(status == 'K');

  auto refused = r.seal();
  REQUIRE_ERR(refused, Errc::busy);
  REQUIRE(refused.error().message.find(std::to_string(child)) != std::string::npos);
  REQUIRE_FALSE(r.sealed());  // the bit was taken back
  std::uint8_t b = 1;
  REQUIRE_OK(r.write(0, &b, 1));

  REQUIRE(write(go[1], "x", 1) == 1);
  int wstatus;
  REQUIRE(waitpid(child, &wstatus, 0) == child);
  for (int fd : {ready[0], ready[1], go[0], go[1]}) close(fd);
  // The child died holding it: a dead holder does not block sealing.
  REQUIRE_OK(r.seal());
  REQUIRE_OK(release(r.header(), self_pid(), *self_start));
}

TEST_CASE("a writable hold racing a seal is turned away", "[seal]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  REQUIRE_OK(r.seal());
  REQUIRE_ERR(hold(r.header(), 777, 1, true), Errc::sealed);
  REQUIRE(r.header().refcount.load() == 0);
  REQUIRE(holders(r.header()).empty());
}

TEST_CASE("a deallocated region cannot be sealed", "[seal]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  REQUIRE_OK(r.deallocate(false));
  REQUIRE_ERR(r.seal(), Errc::deallocated);
  REQUIRE_FALSE(r.sealed());
}

TEST_CASE("seal never succeeds while a racing writable hold is in place", "[seal][race]") {
  // pid 1 stands in for another live process (the sealer ignores its own pid and dead
  // ones). A thread keeps taking and dropping writable holds while the main thread seals;
  // a seal that succeeds while that thread holds would break the exclusion.
  auto init_start = process_start_time(1);
  REQUIRE_OK(init_start);
  int sealed_ok = 0, refused = 0, violations = 0;
  for (int trial = 0; trial < 120; ++trial) {
    Region r = create_ok(options(BackendKind::memfd, 4096));
    RegionHeader& h = r.header();
    std::atomic<bool> holding{false}, stop{false}, started{false};
    std::thread racer([&] {
      while (!stop.load()) {
        if (hold(h, 1, *init_start, true).ok()) {
          holding.store(true);
          started.store(true);
          holding.store(false);
          (void)release(h, 1, *init_start);
        } else {
          started.store(true);
        }
      }
    });
    while (!started.load()) {
    }
    // Busy-wait a varying while (yielding would hand the core away for milliseconds).
    for (volatile int spin = 0; spin < (trial % 50) * 200; ++spin) {
    }
    auto result = r.seal();
    if (result) {
      ++sealed_ok;
      if (holding.load()) ++violations;
    } else {
      REQUIRE(result.error().code == Errc::busy);
      ++refused;
    }
    stop.store(true);
    racer.join();
    if (result) REQUIRE_ERR(hold(h, 1, *init_start, true), Errc::sealed);
    REQUIRE(h.refcount.load() == 0);
  }
  INFO("sealed " << sealed_ok << ", refused " << refused);
  REQUIRE(violations == 0);
  REQUIRE(sealed_ok + refused == 120);
}
