// The seal lock (seal_lock.cpp, docs/FORMAT.md "Locks" and "Sealing"): a sealer killed
// between setting and clearing the `sealing` state bit no longer leaves the region
// unwritable for good, and a live sealer's bit is never cleared by anyone else.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

bool sealing(const Region& r) { return (r.header().state.load() & kStateSealing) != 0; }

/// Waits (up to 60 s: a loaded machine) until the header says sealing.
bool wait_for_sealing(const Region& r) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (sealing(r)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

/// Forks a child that opens `r` through its own open and seals it, parked (the core's
/// test hook) with the bit set and the seal lock held. Returns the child's pid.
pid_t parked_sealer(const Region& r) {
  OpenTarget target{r.id(), r.control_path(), r.data_path()};
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    setenv("SNAKEPIT_SHM_TEST_PARK", "seal=120000", 1);
    auto opened = Region::open(target, true);
    if (!opened) _exit(3);
    (void)opened->seal();
    _exit(4);  // never reached while parked
  }
  return child;
}

void kill_and_reap(pid_t child) {
  kill(child, SIGKILL);
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFSIGNALED(status));
}

Errc write_code(Region& r) {
  const std::uint8_t byte = 7;
  auto w = r.write(0, &byte, 1);
  return w ? Errc{} : w.error().code;
}

}  // namespace

TEST_CASE("a sealer SIGKILLed mid-seal: its bit lives while it lives, then the owner writes",
          "[seal][seal_lock]") {
  for (BackendKind backend : {BackendKind::memfd, BackendKind::posix}) {
    INFO((backend == BackendKind::memfd ? "memfd" : "posix"));
    Region r = create_ok(options(backend, 8192));
    pid_t child = parked_sealer(r);
    REQUIRE(wait_for_sealing(r));

    // Alive (parked with the lock): its bit stands, every way of clearing it refuses.
    REQUIRE(write_code(r) == Errc::busy);
    REQUIRE_FALSE(r.clear_stale_sealing());
    {
      auto other = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
      REQUIRE(other.ok());
      auto second_seal = other->seal();
      REQUIRE_FALSE(second_seal);
      REQUIRE(second_seal.error().code == Errc::busy);
      REQUIRE(second_seal.error().message.find("another process is sealing") != std::string::npos);
      REQUIRE(write_code(*other) == Errc::busy);
    }
    REQUIRE(sealing(r));  // neither the refused seal nor the writes cleared the live bit

    // Killed with the bit set: the kernel drops its seal lock, the owner's write clears it.
    kill_and_reap(child);
    REQUIRE(sealing(r));
    std::uint64_t before = stale_seals_cleared_total();
    REQUIRE(write_code(r) == Errc{});
    REQUIRE_FALSE(sealing(r));
    REQUIRE((r.header().state.load() & kStateSealed) == 0);
    REQUIRE(stale_seals_cleared_total() == before + 1);
    std::uint8_t back = 0;
    REQUIRE_OK(r.read(0, &back, 1));
    REQUIRE(back == 7);

    // And the region can still be sealed for real.
    REQUIRE_OK(r.seal());
    REQUIRE(r.sealed());
    REQUIRE_FALSE(sealing(r));
    REQUIRE_OK(r.unlink());
  }
}

TEST_CASE("a new sealer takes over a dead sealer's bit and clears it", "[seal][seal_lock]") {
  Region r = create_ok(options(BackendKind::memfd, 8192));
  pid_t child = parked_sealer(r);
  REQUIRE(wait_for_sealing(r));
  kill_and_reap(child);
  REQUIRE(sealing(r));
  REQUIRE_OK(r.seal());
  REQUIRE(r.sealed());
  REQUIRE(r.immutable());
  REQUIRE_FALSE(sealing(r));
}

TEST_CASE("a bit is cleared only by whoever gets the seal lock", "[seal][seal_lock]") {
  Region r = create_ok(options(BackendKind::posix, 4096));
  // Another open holds the seal lock (a live sealer) and has set the bit.
  auto sealer = platform::open_path(r.control_path(), platform::Access::read_write);
  REQUIRE(sealer.ok());
  auto locked = take_seal_lock(*sealer);
  REQUIRE(locked.ok());
  REQUIRE(*locked);
  r.header().state.fetch_or(kStateSealing);

  REQUIRE(write_code(r) == Errc::busy);
  REQUIRE_FALSE(r.clear_stale_sealing());
  // Any other open is refused while the sealer holds the lock...
  auto third = platform::open_path(r.control_path(), platform::Access::read_write);
  REQUIRE(third.ok());
  REQUIRE_FALSE(clear_stale_sealing(r.header(), *third));
  REQUIRE(sealing(r));
  // ...and a read-only open cannot take an exclusive lock: it never clears anything.
  auto ro = platform::open_path(r.control_path(), platform::Access::read_only);
  REQUIRE(ro.ok());
  drop_seal_lock(*sealer);
  REQUIRE_FALSE(clear_stale_sealing(r.header(), *ro));
  REQUIRE(sealing(r));

  // The sealer let go without clearing (as if killed): the next writer clears it.
  REQUIRE(write_code(r) == Errc{});
  REQUIRE_FALSE(sealing(r));
  // A clear bit stays clear and costs nothing.
  REQUIRE(clear_stale_sealing(r.header(), *third));
  REQUIRE_OK(r.unlink());
}

TEST_CASE("a failed seal releases the seal lock and clears its bit", "[seal][seal_lock]") {
  Region r = create_ok(options(BackendKind::memfd, 8192));
  auto worker = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
  REQUIRE(worker.ok());
  // The kernel refuses F_SEAL_WRITE while the worker maps the data writable.
  auto refused = r.seal();
  REQUIRE_FALSE(refused);
  REQUIRE(refused.error().code == Errc::busy);
  REQUIRE_FALSE(sealing(r));
  // The lock went with the failed seal: another open takes it at once.
  auto probe = platform::open_path(r.control_path(), platform::Access::read_write);
  REQUIRE(probe.ok());
  auto got = take_seal_lock(*probe);
  REQUIRE(got.ok());
  REQUIRE(*got);
  drop_seal_lock(*probe);
}
