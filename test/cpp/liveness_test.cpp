// Liveness from the kernel (holders.cpp hold_on/release_on/reap_dead_slots, region.cpp and
// inspect.cpp sweep_segment): open file description locks, and processes killed at the
// worst instant of each holder transition (the SNAKEPIT_SHM_TEST_PARK hook, park.hpp).
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

std::string shm_path(const std::string& id) { return "/dev/shm/" + id; }

std::uint64_t self_start() { return process_start_time(self_pid()).value(); }

/// Forks a child that opens `r`, sets the park point and holds it (writable) once; the
/// parent waits for "parked at <point>" on the child's stderr, then SIGKILLs it.
void kill_parked_holder(const Region& r, const char* point, bool release_first) {
  int pipe_fds[2];
  REQUIRE(pipe(pipe_fds) == 0);
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    dup2(pipe_fds[1], 2);
    close(pipe_fds[0]);
    auto opened = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
    if (!opened) _exit(3);
    std::uint64_t start = process_start_time(self_pid()).value();
    if (release_first) {
      if (!opened->hold(self_pid(), start, true)) _exit(4);
      setenv("SNAKEPIT_SHM_TEST_PARK", (std::string(point) + "=60000").c_str(), 1);
      (void)opened->release();
    } else {
      setenv("SNAKEPIT_SHM_TEST_PARK", (std::string(point) + "=60000").c_str(), 1);
      (void)opened->hold(self_pid(), start, true);
    }
    _exit(5);  // not reached: killed while parked
  }
  close(pipe_fds[1]);
  std::string seen;
  char buf[256];
  while (seen.find("parked at") == std::string::npos) {
    ssize_t n = read(pipe_fds[0], buf, sizeof buf);
    if (n <= 0) break;
    seen.append(buf, static_cast<std::size_t>(n));
  }
  close(pipe_fds[0]);
  kill(child, SIGKILL);
  int status;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(seen.find(std::string("parked at ") + point) != std::string::npos);
}

std::uint32_t slots_in(const RegionHeader& h, std::uint32_t state) {
  std::uint32_t n = 0;
  for (const HolderSlot& s : h.holders) n += s.slot_state.load() == state;
  return n;
}

}  // namespace

TEST_CASE("a hold through a Region owns one slot and its lock; release frees both",
          "[liveness][linux]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  REQUIRE_OK(r.hold(self_pid(), self_start(), false));
  REQUIRE_OK(r.hold(self_pid(), self_start(), true));
  REQUIRE(reference_count(r.header()) == 2);
  REQUIRE(holders(r.header()).size() == 1);
  // Another open of the same process is another owner: its own slot.
  auto other = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, false);
  REQUIRE(other.ok());
  REQUIRE_OK(other->hold(self_pid(), self_start(), false));
  REQUIRE(holders(r.header()).size() == 2);
  // Live owners are never reaped.
  REQUIRE(r.reap_dead_holders() == 0);
  REQUIRE(other->reap_dead_holders() == 0);
  REQUIRE_OK(other->release());
  REQUIRE_ERR(other->release(), Errc::not_found);
  REQUIRE_OK(r.release());
  REQUIRE_OK(r.release());
  REQUIRE(reference_count(r.header()) == 0);
  REQUIRE(slots_in(r.header(), kSlotFree) == kHolderCapacity);
}

TEST_CASE("a holder dropped without release (its open closed) is reaped", "[liveness][linux]") {
  Region r = create_ok(options(BackendKind::posix, 4096));
  SegmentCleanup cleanup{r.id()};
  {
    auto other = Region::open(OpenTarget{r.id(), {}, {}}, true);
    REQUIRE(other.ok());
    REQUIRE_OK(other->hold(self_pid(), self_start(), true));
    REQUIRE_OK(other->hold(self_pid(), self_start(), true));
  }  // closed without releasing: the slot's lock is gone with the open
  REQUIRE(reference_count(r.header()) == 2);
  REQUIRE(r.reap_dead_holders() == 2);
  REQUIRE(reference_count(r.header()) == 0);
  REQUIRE(r.header().refcount.load() == 0);
  REQUIRE(slots_in(r.header(), kSlotFree) == kHolderCapacity);
}

TEST_CASE("processes killed between claiming a slot and making it live never block it",
          "[liveness][linux]") {
  Region r = create_ok(options(BackendKind::posix, 4096));
  SegmentCleanup cleanup{r.id()};
  // More kills than slots: each leaves a busy, counted, writable slot whose lock is gone.
  for (std::uint32_t i = 0; i < kHolderCapacity + 6; ++i) kill_parked_holder(r, "claim", false);
  REQUIRE(slots_in(r.header(), kSlotBusy) == kHolderCapacity);
  // A seal is not refused by the dead writers (78bae8e: busy for good).
  // A new holder still gets a slot (78bae8e: holder_table_full for good).
  REQUIRE_OK(r.hold(self_pid(), self_start(), false));
  REQUIRE(r.reap_dead_holders() == kHolderCapacity - 1);
  REQUIRE(reference_count(r.header()) == 1);
  REQUIRE_OK(r.release());
  REQUIRE_OK(r.seal());
}

TEST_CASE("a seal is not refused by a writer killed mid-claim", "[liveness][linux]") {
  Region r = create_ok(options(BackendKind::posix, 4096));
  SegmentCleanup cleanup{r.id()};
  kill_parked_holder(r, "claim", false);
  REQUIRE(slots_in(r.header(), kSlotBusy) == 1);
  REQUIRE_OK(r.seal());
}

TEST_CASE("a process killed inside the release of its last hold leaves no count",
          "[liveness][linux]") {
  Region r = create_ok(options(BackendKind::posix, 4096));
  SegmentCleanup cleanup{r.id()};
  kill_parked_holder(r, "release", true);
  // Whatever the header's hint says, the count is the slots' sum: zero.
  REQUIRE(reference_count(r.header()) == 0);
  (void)r.reap_dead_holders();
  REQUIRE(slots_in(r.header(), kSlotFree) == kHolderCapacity);
}

TEST_CASE("sweep_segment removes only segments nobody uses", "[liveness][posix]") {
  auto o = options(BackendKind::posix, 4096);
  Region live = create_ok(o);
  SegmentCleanup c1{live.id()};
  auto kept = sweep_segment(live.id());
  REQUIRE(kept.ok());
  REQUIRE(*kept == SweepOutcome::in_use);
  // Opened elsewhere (another open of this process stands for another VM): still in use
  // after the creator's Region is gone.
  std::string id;
  {
    Region gone = create_ok(o);
    id = gone.id();
  }
  SegmentCleanup c2{id};
  {
    auto opened = Region::open(OpenTarget{id, {}, {}}, false);
    REQUIRE(opened.ok());
    auto r = sweep_segment(id);
    REQUIRE(r.ok());
    REQUIRE(*r == SweepOutcome::in_use);
    auto dry = inspect(shm_path(id));
    REQUIRE(dry.ok());
    REQUIRE(dry->in_use);
  }
  auto dry = sweep_segment(id, true);
  REQUIRE(dry.ok());
  REQUIRE(*dry == SweepOutcome::removed);
  REQUIRE(access(shm_path(id).c_str(), F_OK) == 0);
  auto done = sweep_segment(id);
  REQUIRE(done.ok());
  REQUIRE(*done == SweepOutcome::removed);
  REQUIRE(access(shm_path(id).c_str(), F_OK) != 0);
}

TEST_CASE("sweep_segment refuses a FIFO at once and never blocks", "[liveness][posix]") {
  std::string id = "spshm_n_" + unique_name("fifo");
  std::string path = shm_path(id);
  REQUIRE(mkfifo(path.c_str(), 0666) == 0);
  auto r = sweep_segment(id);
  REQUIRE_FALSE(r.ok());
  REQUIRE(r.error().code == Errc::not_ours);
  auto opened = Region::open(OpenTarget{id, {}, {}}, true);
  REQUIRE_FALSE(opened.ok());
  REQUIRE(opened.error().code == Errc::not_ours);
  REQUIRE_ERR(unlink_segment(id), Errc::not_ours);
  unlink(path.c_str());
}
