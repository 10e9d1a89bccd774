// holders.cpp: the lock-free holder table in the header.
#include <thread>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

std::uint32_t sum_of_counts(const RegionHeader& h) {
  std::uint32_t sum = 0;
  for (const HolderInfo& info : holders(h)) sum += info.count;
  return sum;
}

std::uint64_t self_start_time() {
  auto t = process_start_time(self_pid());
  REQUIRE(t.ok());
  return *t;
}

}  // namespace

TEST_CASE("hold and release count per process and in the refcount", "[holders]") {
  Region r = create_ok(options(BackendKind::memfd, 64));
  RegionHeader& h = r.header();
  REQUIRE(h.refcount.load() == 0);  // creating does not hold
  REQUIRE(holders(h).empty());
  std::uint32_t gen = h.holders_generation.load();

  REQUIRE_OK(hold(h, 100, 7, false));
  REQUIRE_OK(hold(h, 100, 7, false));
  REQUIRE_OK(hold(h, 200, 9, true));
  REQUIRE(h.holders_generation.load() > gen);
  REQUIRE(h.refcount.load() == 3);
  auto list = holders(h);
  REQUIRE(list.size() == 2);
  for (const HolderInfo& info : list) {
    if (info.pid == 100) {
      REQUIRE(info.count == 2);
      REQUIRE(info.start_time == 7);
      REQUIRE_FALSE(info.writable);
    } else {
      REQUIRE(info.pid == 200);
      REQUIRE(info.count == 1);
      REQUIRE(info.writable);
    }
  }
  // Same pid, other start time: another process (pid reuse) with its own slot.
  REQUIRE_ERR(release(h, 100, 8), Errc::not_found);
  REQUIRE_OK(release(h, 100, 7));
  REQUIRE_OK(release(h, 100, 7));
  REQUIRE_ERR(release(h, 100, 7), Errc::not_found);
  REQUIRE_OK(release(h, 200, 9));
  REQUIRE(h.refcount.load() == 0);
  REQUIRE(holders(h).empty());
  for (const HolderSlot& s : h.holders) {
    REQUIRE(s.slot_state.load() == kSlotFree);
    REQUIRE((s.flags.load() & kHolderWritable) == 0);
  }
}

TEST_CASE("a reclaimed slot gets a new incarnation", "[holders]") {
  // The incarnation (flags bits 8-31) makes a stale compare-and-swap on a slot that was
  // freed and claimed again fail, instead of moving another process's count.
  Region r = create_ok(options(BackendKind::memfd, 64));
  HolderSlot& s = r.header().holders[0];
  REQUIRE_OK(hold(r.header(), 10, 1, false));
  std::uint32_t first = s.flags.load() & ~kHolderWritable;
  REQUIRE(first != 0);
  REQUIRE_OK(release(r.header(), 10, 1));
  REQUIRE(s.slot_state.load() == kSlotFree);
  REQUIRE((s.flags.load() & ~kHolderWritable) == first);  // kept while free
  REQUIRE_OK(hold(r.header(), 11, 1, true));
  REQUIRE(s.pid == 11);
  REQUIRE((s.flags.load() & ~kHolderWritable) != first);
  REQUIRE(s.flags.load() & kHolderWritable);
  REQUIRE_OK(release(r.header(), 11, 1));
}

TEST_CASE("pid 0 cannot hold", "[holders]") {
  Region r = create_ok(options(BackendKind::memfd, 64));
  REQUIRE_ERR(hold(r.header(), 0, 1, false), Errc::invalid_argument);
}

TEST_CASE("the table holds 64 processes, then holder_table_full", "[holders]") {
  Region r = create_ok(options(BackendKind::memfd, 64));
  RegionHeader& h = r.header();
  for (std::uint32_t pid = 1; pid <= kHolderCapacity; ++pid) REQUIRE_OK(hold(h, pid, 1, false));
  REQUIRE_ERR(hold(h, 9999, 1, false), Errc::holder_table_full);
  REQUIRE(h.refcount.load() == kHolderCapacity);
  REQUIRE_OK(hold(h, 5, 1, false));  // an existing holder can still add
  REQUIRE_OK(release(h, 7, 1));
  REQUIRE_OK(hold(h, 9999, 1, false));  // the freed slot is reused
  REQUIRE(sum_of_counts(h) == h.refcount.load());
}

// Attack run 5 (E1): a control block zeroed (or scribbled) by another process left no
// slot to claim, and every hold answered holder_table_full ("in use by live processes:
// ... retry"). holder_capacity is written once at creation: any other value is corrupt.
TEST_CASE("an overwritten holder_capacity is corrupt, not a full table", "[holders]") {
  Region r = create_ok(options(BackendKind::memfd, 64));
  RegionHeader& h = r.header();
  for (std::uint32_t bad : {0u, 1u, 63u, 65u, 0xffffffffu}) {
    h.holder_capacity = bad;
    auto pid_keyed = hold(h, 100, 7, false);
    REQUIRE_ERR(pid_keyed, Errc::corrupt);
    REQUIRE(pid_keyed.error().message.find("overwritten") != std::string::npos);
    auto by_region = r.hold(100, 7, false);
    REQUIRE_ERR(by_region, Errc::corrupt);
    REQUIRE(by_region.error().message.find("region " + r.id() + ": ") == 0);
    REQUIRE(h.refcount.load() == 0);
  }
  h.holder_capacity = kHolderCapacity;
  REQUIRE_OK(r.hold(100, 7, false));
}

TEST_CASE("concurrent hold/release keep refcount equal to the sum of counts", "[holders]") {
  Region r = create_ok(options(BackendKind::memfd, 64));
  RegionHeader& h = r.header();
  constexpr int kThreads = 4;
  constexpr int kRounds = 20000;
  std::atomic<int> failures{0};
  std::atomic<int> parked{0};
  std::atomic<bool> resume{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Half the threads share one pid (same slot, count CAS); the others have their own.
      std::uint32_t pid = t % 2 == 0 ? 4000 : 5000 + t;
      for (int i = 0; i < kRounds; ++i) {
        bool writable = (i % 3) == 0;
        if (!hold(h, pid, 1, writable)) ++failures;
        if (i % 2 == 0 && !hold(h, pid, 1, false)) ++failures;
        if (!release(h, pid, 1)) ++failures;
        if (i % 2 == 0 && !release(h, pid, 1)) ++failures;
      }
      // Park holding 3, so the main thread can check the sum at a quiet moment.
      for (int k = 0; k < 3; ++k)
        if (!hold(h, pid, 1, false)) ++failures;
      ++parked;
      while (!resume.load()) std::this_thread::yield();
      for (int k = 0; k < 3; ++k)
        if (!release(h, pid, 1)) ++failures;
    });
  }
  while (parked.load() < kThreads) std::this_thread::yield();
  REQUIRE(h.refcount.load() == 3u * kThreads);
  REQUIRE(sum_of_counts(h) == 3u * kThreads);
  resume = true;
  for (auto& th : threads) th.join();
  REQUIRE(failures.load() == 0);
  REQUIRE(h.refcount.load() == 0);
  REQUIRE(holders(h).empty());
  for (const HolderSlot& s : h.holders) REQUIRE(s.slot_state.load() == kSlotFree);
}

TEST_CASE("release_all frees every hold of a dead child", "[holders]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  REQUIRE_OK(hold(r.header(), self_pid(), self_start_time(), true));
  int pipe_fds[2];
  REQUIRE(pipe(pipe_fds) == 0);
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The child opens the region as any worker would and holds it three times.
    auto opened = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, false);
    std::uint64_t start = 0;
    if (opened) {
      start = process_start_time(self_pid()).value();
      for (int i = 0; i < 3; ++i)
        if (!hold(opened->header(), self_pid(), start, false)) start = 0;
    }
    (void)!write(pipe_fds[1], &start, sizeof start);
    _exit(0);  // dies without releasing
  }
  std::uint64_t child_start = 0;
  REQUIRE(read(pipe_fds[0], &child_start, sizeof child_start) == sizeof child_start);
  close(pipe_fds[0]);
  close(pipe_fds[1]);
  int status;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(child_start != 0);

  RegionHeader& h = r.header();
  REQUIRE(h.refcount.load() == 4);
  REQUIRE_FALSE(process_alive(static_cast<std::uint32_t>(child), child_start));
  REQUIRE(process_alive(self_pid(), self_start_time()));
  REQUIRE(release_all(h, static_cast<std::uint32_t>(child), child_start) == 3);
  REQUIRE(release_all(h, static_cast<std::uint32_t>(child), child_start) == 0);
  REQUIRE(h.refcount.load() == 1);
  auto list = holders(h);
  REQUIRE(list.size() == 1);
  REQUIRE(list[0].pid == self_pid());
  REQUIRE_OK(release(h, self_pid(), self_start_time()));
}

TEST_CASE("holds respect the region state", "[holders]") {
  Region r = create_ok(options(BackendKind::memfd, 4096));
  RegionHeader& h = r.header();
  REQUIRE_OK(r.seal());
  REQUIRE_ERR(hold(h, 123, 1, true), Errc::sealed);
  REQUIRE(h.refcount.load() == 0);
  REQUIRE_OK(hold(h, 123, 1, false));
  REQUIRE_OK(r.deallocate(false));
  REQUIRE_ERR(hold(h, 123, 1, false), Errc::deallocated);
  REQUIRE_OK(release(h, 123, 1));  // existing holds can always be released
  REQUIRE(h.refcount.load() == 0);
}
