// Issue 11: seals the kernel enforces, guarded access to POSIX segments a peer truncates,
// one writer at a time for encrypted regions.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "helpers.hpp"
#include "platform.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

/// A raw mapping of a region's data through its path, as any process of our uid can.
struct RawMap {
  void* address = MAP_FAILED;
  std::size_t length = 0;
  RawMap(const std::string& path, std::size_t n, int open_flags, int prot) : length(n) {
    int fd = open(path.c_str(), open_flags | O_CLOEXEC);
    REQUIRE(fd >= 0);
    address = mmap(nullptr, n, prot, MAP_SHARED, fd, 0);
    close(fd);
    REQUIRE(address != MAP_FAILED);
  }
  ~RawMap() {
    if (address != MAP_FAILED) munmap(address, length);
  }
  void unmap() {
    munmap(address, length);
    address = MAP_FAILED;
  }
};

int ofd_lock(int fd, short type, off_t at) {
  struct flock l {};
  l.l_type = type;
  l.l_whence = SEEK_SET;
  l.l_start = at;
  l.l_len = 1;
  return fcntl(fd, F_OFD_SETLK, &l);
}

}  // namespace

TEST_CASE("a writable mapping made before the seal makes the kernel refuse it", "[seal][kernel]") {
  Region r = create_ok(options(BackendKind::memfd, 8192));
  RawMap raw(r.data_path(), 8192, O_RDWR, PROT_READ | PROT_WRITE);
  auto refused = r.seal();
  REQUIRE_ERR(refused, Errc::busy);
  REQUIRE(refused.error().message.find("F_SEAL_WRITE") != std::string::npos);
  // Nothing changed: not sealed, not sealing, still writable by us.
  REQUIRE_FALSE(r.sealed());
  REQUIRE_FALSE(r.immutable());
  REQUIRE((r.header().state.load() & kStateSealing) == 0);
  std::uint8_t b = 5;
  REQUIRE_OK(r.write(0, &b, 1));
  REQUIRE(static_cast<std::uint8_t*>(raw.address)[0] == 5);
  raw.unmap();
  REQUIRE_OK(r.seal());
  REQUIRE(r.sealed());
  REQUIRE(r.immutable());
}

TEST_CASE("a forked child's inherited writable mapping blocks the seal until it exits",
          "[seal][kernel]") {
  Region r = create_ok(options(BackendKind::memfd, 8192));
  int go[2];
  REQUIRE(pipe(go) == 0);
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    char c;
    (void)!read(go[0], &c, 1);
    r.data()[0] = 'X';  // the inherited mapping of the parent's Region
    _exit(0);
  }
  REQUIRE_ERR(r.seal(), Errc::busy);
  REQUIRE(write(go[1], "x", 1) == 1);
  int status;
  REQUIRE(waitpid(child, &status, 0) == child);
  close(go[0]);
  close(go[1]);
  REQUIRE(r.data()[0] == 'X');
  REQUIRE_OK(r.seal());
  REQUIRE(r.immutable());
}

TEST_CASE("a read-only mapping of an O_RDWR open made before the seal cannot become writable",
          "[seal][kernel]") {
  Region r = create_ok(options(BackendKind::memfd, 8192));
  RawMap raw(r.data_path(), 8192, O_RDWR, PROT_READ);
  auto sealed = r.seal();
  int rc = mprotect(raw.address, 8192, PROT_READ | PROT_WRITE);
  // Either the kernel refused the seal (the mapping may still write: nothing was
  // promised), or it sealed and the old mapping can never write.
  if (sealed.ok()) {
    REQUIRE(rc != 0);
  } else {
    REQUIRE(sealed.error().code == Errc::busy);
  }
}

TEST_CASE("after the seal the sealer's own view cannot be made writable", "[seal][kernel]") {
  Region r = create_ok(options(BackendKind::memfd, 8192));
  REQUIRE_OK(r.seal());
  auto page = reinterpret_cast<std::uintptr_t>(r.data()) & ~std::uintptr_t{4095};
  REQUIRE(mprotect(reinterpret_cast<void*>(page), 4096, PROT_READ | PROT_WRITE) != 0);
  // And neither the fd nor a new open can write or punch holes.
  int fd = open(r.data_path().c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(pwrite(fd, "x", 1, 0) < 0);
  REQUIRE(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096) != 0);
  REQUIRE(errno == EPERM);
  close(fd);
  // Deallocating with zeroing must not write through the read-only view (no SIGSEGV).
  REQUIRE_OK(r.deallocate(true));
}

TEST_CASE("writes running when seal() starts finish before it commits", "[seal][race]") {
  constexpr std::size_t kSize = 32 << 20;
  for (int trial = 0; trial < 4; ++trial) {
    Region r = create_ok(options(BackendKind::memfd, kSize));
    std::vector<std::uint8_t> payload(kSize, static_cast<std::uint8_t>(trial + 1));
    std::atomic<bool> started{false};
    Result<void> written;
    std::thread writer([&] {
      started.store(true);
      written = r.write(0, payload.data(), payload.size());
    });
    while (!started.load()) {
    }
    auto sealed = r.seal();
    REQUIRE_OK(sealed);
    // Sealed: from here on the bytes are fixed. Take a snapshot, let the writer end.
    std::vector<std::uint8_t> snapshot(r.data(), r.data() + kSize);
    writer.join();
    if (!written.ok()) {
      INFO(written.error().message);
      REQUIRE((written.error().code == Errc::busy || written.error().code == Errc::sealed));
    }
    REQUIRE(std::memcmp(snapshot.data(), r.data(), kSize) == 0);
  }
}

TEST_CASE("readers of another open see the kernel seal, not the header", "[seal][kernel]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  OpenTarget target{r.id(), r.control_path(), r.data_path()};
  auto ro = Region::open(target, false);
  REQUIRE_OK(ro);
  // A forged header bit alone does not make a region immutable.
  r.header().state.fetch_or(kStateSealed);
  REQUIRE(ro->sealed());
  REQUIRE_FALSE(ro->immutable());
  r.header().state.fetch_and(~kStateSealed);
  // The reader's read-only mapping (O_RDONLY open) does not block the seal.
  REQUIRE_OK(r.seal());
  REQUIRE(ro->immutable());
}

TEST_CASE("posix regions are never immutable, even sealed", "[seal][posix]") {
  Region r = create_ok(options(BackendKind::posix, 4096));
  SegmentCleanup cleanup{r.id()};
  REQUIRE_OK(r.seal());
  REQUIRE(r.sealed());
  REQUIRE_FALSE(r.immutable());
  REQUIRE_OK(r.deallocate(false));
}

TEST_CASE("a posix segment truncated by a peer gives truncated, not SIGBUS", "[posix][sigbus]") {
  REQUIRE(platform::install_fault_guard());
  constexpr std::size_t kSize = 1 << 20;
  for (bool encrypted : {false, true}) {
    auto o = options(BackendKind::posix, kSize);
    o.encrypted = encrypted;
    Region r = create_ok(o);
    SegmentCleanup cleanup{r.id()};
    std::vector<std::uint8_t> buffer(kSize, 1);
    REQUIRE_OK(r.write(0, buffer.data(), 4096));
    int fd = open(r.control_path().c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    // Keep the header, drop the data: the header stays readable, the data faults.
    REQUIRE(ftruncate(fd, kHeaderSize) == 0);
    close(fd);
    REQUIRE_ERR(r.read(0, buffer.data(), kSize), Errc::truncated);
    REQUIRE(r.damaged());
    REQUIRE_ERR(r.write(0, buffer.data(), 10), Errc::truncated);
    REQUIRE_ERR(r.read(0, buffer.data(), 1), Errc::truncated);
    REQUIRE_OK(r.deallocate(false));
  }
}

TEST_CASE("an unguarded fault in one of our segments is repaired, others are not touched",
          "[posix][sigbus]") {
  REQUIRE(platform::install_fault_guard());
  Region r = create_ok(options(BackendKind::posix, 1 << 16));
  SegmentCleanup cleanup{r.id()};
  int fd = open(r.control_path().c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(ftruncate(fd, 0) == 0);
  close(fd);
  auto before = platform::fault_repairs();
  // A header read outside any guarded copy: repaired (a private zero page), no crash.
  std::uint32_t state = r.header().state.load();
  REQUIRE(state == 0);
  REQUIRE(platform::fault_repairs() == before + 1);
  REQUIRE(r.damaged());
  std::uint8_t b;
  REQUIRE_ERR(r.read(0, &b, 1), Errc::truncated);
  // A fault elsewhere (a truncated file of another kind) still kills, as before.
  int code = in_child([] {
    char path[] = "/tmp/spshm_sigbus_XXXXXX";
    int f = mkstemp(path);
    if (f < 0 || ftruncate(f, 4096) != 0) return 1;
    auto* p =
        static_cast<volatile char*>(mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0));
    unlink(path);
    if (ftruncate(f, 0) != 0) return 2;
    return static_cast<int>(p[0]);  // SIGBUS: whatever handled it before ours decides
  });
  // Repaired, the read would see a zero page and the child exit 0. Chained, it dies of
  // SIGBUS (128 + 7), or exits 1 under a sanitizer whose handler was there first.
  REQUIRE(code != 0);
}

TEST_CASE("encrypted regions admit one writer at a time across opens", "[crypto][lock]") {
  for (BackendKind backend : {BackendKind::memfd, BackendKind::posix}) {
    auto o = options(backend, 70000);
    o.encrypted = true;
    Region r = create_ok(o);
    SegmentCleanup cleanup{backend == BackendKind::posix ? r.id() : std::string()};
    // Another open file description of the control object, as another process has.
    int other = open(r.control_path().c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(other >= 0);
    std::uint8_t b = 3;
    REQUIRE(ofd_lock(other, F_WRLCK, kDataLockByte) == 0);  // a writer elsewhere
    REQUIRE_ERR(r.write(0, &b, 1), Errc::busy);
    REQUIRE_ERR(r.read(0, &b, 1), Errc::busy);
    REQUIRE(ofd_lock(other, F_RDLCK, kDataLockByte) == 0);  // now a reader elsewhere
    REQUIRE_ERR(r.write(0, &b, 1), Errc::busy);
    REQUIRE_OK(r.read(0, &b, 1));
    REQUIRE(ofd_lock(other, F_UNLCK, kDataLockByte) == 0);
    REQUIRE_OK(r.write(0, &b, 1));
    // Our lock is dropped after each access: the other open can take it.
    REQUIRE(ofd_lock(other, F_WRLCK, kDataLockByte) == 0);
    close(other);  // a dead holder's lock goes with its descriptor
    REQUIRE_OK(r.write(1, &b, 1));
    if (backend == BackendKind::posix) REQUIRE_OK(r.deallocate(false));
  }
}
