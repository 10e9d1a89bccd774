// Issue 14, "a facade that costs little": the NIF's kept slot lock (release_on keep_lock),
// the cached pid (pthread_atfork reset) and the count of reaped holds.
#include <sys/wait.h>
#include <unistd.h>

#include "helpers.hpp"
#include "platform.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

std::uint64_t self_start() { return process_start_time(self_pid()).value(); }

/// Index of the live slot of `pid`, or -1.
int live_slot_of(const RegionHeader& h, std::uint32_t pid) {
  for (std::uint32_t i = 0; i < kHolderCapacity; ++i)
    if (h.holders[i].slot_state.load() == kSlotLive && h.holders[i].pid == pid)
      return static_cast<int>(i);
  return -1;
}

}  // namespace

TEST_CASE("a Region keeps its free slot's lock across 0 -> 1 -> 0 and takes the slot back",
          "[facade][linux]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  RegionHeader& h = r.header();
  REQUIRE_OK(r.hold(self_pid(), self_start(), true));
  int mine = live_slot_of(h, self_pid());
  REQUIRE(mine >= 0);
  REQUIRE_OK(r.release());
  // At zero the slot is free and counts nothing: readers see no holder...
  REQUIRE(reference_count(h) == 0);
  REQUIRE(h.refcount.load() == 0);
  REQUIRE(holders(h).empty());
  REQUIRE(h.holders[mine].slot_state.load() == kSlotFree);
  REQUIRE((h.holders[mine].flags.load() & kHolderWritable) == 0);
  // ... but its lock is still this open's: another open claims another slot.
  auto other = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
  REQUIRE(other.ok());
  REQUIRE_OK(other->hold(self_pid(), self_start(), false));
  REQUIRE(h.holders[mine].slot_state.load() == kSlotFree);
  REQUIRE(holders(h).size() == 1);
  // Nobody reaps a free slot, kept or not.
  REQUIRE(other->reap_dead_holders() == 0);
  // The next hold takes the same slot back.
  REQUIRE_OK(r.hold(self_pid(), self_start(), false));
  REQUIRE(h.holders[mine].slot_state.load() == kSlotLive);
  REQUIRE(reference_count(h) == 2);
  REQUIRE_OK(r.release());
  REQUIRE_OK(other->release());
  REQUIRE(reference_count(h) == 0);
  for (int round = 0; round < 1000; ++round) {
    REQUIRE_OK(r.hold(self_pid(), self_start(), round % 2 == 0));
    REQUIRE_OK(r.release());
  }
  REQUIRE(h.holders_generation.load() > 2000);
  REQUIRE(reference_count(h) == 0);
  REQUIRE(h.refcount.load() == 0);
}

TEST_CASE("a kept slot lock dies with its open: the slot can be claimed again", "[facade][linux]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  int kept = -1;
  {
    auto other = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
    REQUIRE(other.ok());
    REQUIRE_OK(other->hold(self_pid(), self_start(), false));
    kept = live_slot_of(r.header(), self_pid());
    REQUIRE_OK(other->release());
  }  // closed: its kept lock is gone
  // Free slots are claimed lowest first: the kept one (the lowest, 0) is claimable again.
  REQUIRE(kept == 0);
  REQUIRE_OK(r.hold(self_pid(), self_start(), false));
  REQUIRE(live_slot_of(r.header(), self_pid()) == kept);
  REQUIRE_OK(r.release());
}

TEST_CASE("the cached pid is this process's, also in a forked child", "[facade]") {
  std::uint32_t parent = platform::current_pid();
  REQUIRE(parent == static_cast<std::uint32_t>(getpid()));
  REQUIRE(platform::current_pid() == parent);  // cached
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    std::uint32_t seen = platform::current_pid();
    _exit(seen == static_cast<std::uint32_t>(getpid()) && seen != parent ? 0 : 1);
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  REQUIRE(platform::current_pid() == parent);
}

TEST_CASE("every reaped hold is counted in reaped_holds_total", "[facade][linux]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  {
    auto other = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
    REQUIRE(other.ok());
    REQUIRE_OK(other->hold(self_pid(), self_start(), true));
    REQUIRE_OK(other->hold(self_pid(), self_start(), true));
  }  // dropped without release
  std::uint64_t before = reaped_holds_total();
  REQUIRE(r.reap_dead_holders() == 2);
  REQUIRE(reaped_holds_total() - before == 2);
  REQUIRE(r.reap_dead_holders() == 0);
  REQUIRE(reaped_holds_total() - before == 2);

  // A dead slot taken over by a claimer is counted too.
  {
    auto other = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
    REQUIRE(other.ok());
    REQUIRE_OK(other->hold(self_pid(), self_start(), true));
  }
  // Fill the free slots so that the next claim must take the dead one over.
  std::vector<Region> opens;
  for (std::uint32_t i = 0; i + 1 < kHolderCapacity; ++i) {
    auto o = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
    REQUIRE(o.ok());
    REQUIRE_OK(o->hold(self_pid(), self_start(), false));
    opens.push_back(std::move(*o));
  }
  before = reaped_holds_total();
  REQUIRE_OK(r.hold(self_pid(), self_start(), false));
  REQUIRE(reaped_holds_total() - before == 1);
  REQUIRE(reference_count(r.header()) == kHolderCapacity);
  REQUIRE_OK(r.release());
  for (Region& o : opens) REQUIRE_OK(o.release());
}

TEST_CASE("a kept free slot claimed meanwhile by a pid-keyed holder is never added to",
          "[facade][linux]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  RegionHeader& h = r.header();
  REQUIRE_OK(r.hold(self_pid(), self_start(), false));
  int kept = live_slot_of(h, self_pid());
  REQUIRE_OK(r.release());
  // The pid-keyed functions take no lock: the lowest free slot, the kept one, is theirs.
  REQUIRE_OK(hold(h, 4242, 1, false));
  REQUIRE(live_slot_of(h, 4242) == kept);
  REQUIRE_OK(r.hold(self_pid(), self_start(), true));
  int mine = live_slot_of(h, self_pid());
  REQUIRE(mine >= 0);
  REQUIRE(mine != kept);
  for (const HolderInfo& info : holders(h)) REQUIRE(info.count == 1);
  REQUIRE(reference_count(h) == 2);
  REQUIRE_OK(r.release());
  REQUIRE_OK(release(h, 4242, 1));
  REQUIRE(reference_count(h) == 0);
  REQUIRE(h.refcount.load() == 0);
}
