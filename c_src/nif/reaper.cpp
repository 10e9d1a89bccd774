#include "reaper.hpp"

#include <erl_nif.h>

#include <time.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <variant>

#include "format.hpp"
#include "platform.hpp"

namespace spshm::nif {

namespace {

/// A region whose zeroing must be finished from `from` on before it is destroyed.
struct Zeroing {
  std::unique_ptr<Region> region;
  std::uint64_t from = 0;
  bool unless_held = false;  ///< remove the name only if no other open holds the region
};

/// A function to run off every scheduler (run_on_reaper).
struct Task {
  void (*fn)(void*) = nullptr;
  void* arg = nullptr;
};

using Garbage = std::variant<std::unique_ptr<Region>, std::unique_ptr<Region::DetachedData>,
                             std::unique_ptr<Zeroing>, Task>;

struct Reaper {
  std::mutex mutex;
  std::condition_variable wake;
  std::deque<Garbage> queue;
  bool running = false;
  bool stopping = false;
  ErlNifTid tid{};
};

// Never destroyed: at exit the thread may still wait on its condition variable, and
// destroying one with a waiter blocks (glibc), which would hang the VM's exit.
Reaper& reaper = *new Reaper;

std::atomic<std::uint64_t> pieces_unmapped{0};
std::atomic<std::uint64_t> pieces_released{0};
std::atomic<std::uint64_t> pause_ns{kReapPauseNs};
std::atomic<std::uint64_t> pauses{0};

// Sleeps pause_ns: the core goes back to whoever waits for it (a normal scheduler
// preempted in its busy wait, see bench/FINDINGS.md §7).
void pause_now() noexcept {
  std::uint64_t ns = pause_ns.load(std::memory_order_relaxed);
  if (ns == 0) return;
  struct timespec t {
    static_cast<time_t>(ns / 1000000000u), static_cast<long>(ns % 1000000000u)
  };
  ::nanosleep(&t, nullptr);
}

thread_local bool on_reaper_thread = false;
thread_local std::uint64_t cpu_at_last_pause = 0;
thread_local std::uint64_t cpu_at_last_piece = 0;

std::uint64_t thread_cpu_ns() noexcept {
  struct timespec t {};
  if (::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t) != 0) return 0;
  return static_cast<std::uint64_t>(t.tv_sec) * 1000000000u + static_cast<std::uint64_t>(t.tv_nsec);
}

// Called after each piece of work: the reaper thread pauses before its CPU since its
// last pause would pass kReapWorkNs if the next piece cost what the last one did. A
// piece that costs a millisecond (16 MiB of touched pages) is followed by a pause, as
// is each stretch of cheaper pieces that adds up to one: the thread never keeps a core
// much longer than a piece or a millisecond (what delays an idle normal scheduler's
// timers, bench/FINDINGS.md §7), and takes no more pauses than its work needs. A pause
// per piece or per item would make it crawl through a sparse 4 GiB mapping or a stream
// of small regions (1000 a second) while the memory and names behind the queue stay
// held. Destructions done in place (the thread not running) never pause: they run on a
// scheduler.
void paced() noexcept {
  if (!on_reaper_thread) return;
  std::uint64_t now = thread_cpu_ns();
  std::uint64_t piece = now - cpu_at_last_piece;
  cpu_at_last_piece = now;
  if (now - cpu_at_last_pause + piece < kReapWorkNs) return;
  pauses.fetch_add(1, std::memory_order_relaxed);
  pause_now();
  cpu_at_last_pause = cpu_at_last_piece = thread_cpu_ns();
}

// Unmaps `mapping` kReapPiece bytes at a time from its start (the first piece drops its
// registration with the SIGBUS guard), pausing between pieces: one munmap of a GiB keeps
// a core busy for ~0.1 s, during which the VM's normal schedulers can lose the CPU.
void unmap_in_pieces(platform::Mapping& mapping) noexcept {
#ifndef _WIN32
  while (mapping.valid() && mapping.size() > kReapPiece) {
    platform::Mapping rest = mapping.split_at(kReapPiece);
    mapping = std::move(rest);  // unmaps the piece [0, kReapPiece)
    pieces_unmapped.fetch_add(1, std::memory_order_relaxed);
    paced();
  }
#endif
  if (!mapping.valid()) return;
  pieces_unmapped.fetch_add(1, std::memory_order_relaxed);
  mapping.reset();
  paced();
}

// A memfd data object that no other open uses any more (no other open of it holds its
// liveness byte: a worker's attachment, its mapping, a forked child's descriptor, another
// Region of this VM; what the warm pool checks too) would free all its pages at once in
// its last close: they are freed kReapPiece bytes at a time first. Objects with a write
// seal (sealed regions) cannot be punched and are closed whole.
void release_object_in_pieces(platform::Handle& object) noexcept {
#ifndef _WIN32
  try {
    if (!object.valid() || platform::any_write_seal(object)) return;
    if (platform::anonymous_name(object).rfind("spshm_arena", 0) == 0) return;  // shared
    auto info = platform::stat(object, "a data object being freed");
    if (!info || info->size < kReapThreshold) return;
    auto alone = platform::try_lock_exclusive(object, kLivenessLockByte);
    if (!alone || !*alone) return;
    for (std::uint64_t at = 0; at < info->size; at += kReapPiece) {
      std::uint64_t length = std::min<std::uint64_t>(kReapPiece, info->size - at);
      if (!platform::release_pages(object, at, length)) return;
      pieces_released.fetch_add(1, std::memory_order_relaxed);
      paced();
    }
  } catch (...) {
  }
#else
  (void)object;
#endif
}

// Zeroes what is left of a region whose caller died mid-deallocation, slice by slice
// (paced like the unmapping), then removes its name.
void finish_zeroing(Region& region, std::uint64_t from, bool unless_held) noexcept {
  std::uint64_t at = from;
  for (int busy = 0; at < region.capacity() && busy < 300;) {
    auto next = region.zero_slice(at, kZeroSlice);
    if (!next.ok()) {
      if (next.error().code != Errc::busy) break;
      ++busy;  // a seal is being committed: zero_slice waited 100 ms for it
      continue;
    }
    at = next.value();
    paced();
  }
  if (unless_held)
    (void)region.unlink_unless_held();
  else
    (void)region.unlink();
}

void destroy(Garbage& item) noexcept {
  if (auto* zeroing = std::get_if<std::unique_ptr<Zeroing>>(&item)) {
    if (*zeroing && (*zeroing)->region) {
      finish_zeroing(*(*zeroing)->region, (*zeroing)->from, (*zeroing)->unless_held);
      Region::DetachedData data = (*zeroing)->region->detach_data();
      unmap_in_pieces(data.mapping);
      release_object_in_pieces(data.object);
    }
  } else if (auto* region = std::get_if<std::unique_ptr<Region>>(&item)) {
    if (*region) {
      // Nobody uses it any more (its resource is gone): its data goes first, in pieces.
      Region::DetachedData data = (*region)->detach_data();
      unmap_in_pieces(data.mapping);
      release_object_in_pieces(data.object);
    }
  } else if (auto* task = std::get_if<Task>(&item)) {
    if (task->fn != nullptr) task->fn(task->arg);
  } else if (auto* data = std::get_if<std::unique_ptr<Region::DetachedData>>(&item)) {
    if (*data) {
      unmap_in_pieces((*data)->mapping);
      release_object_in_pieces((*data)->object);
    }
  }
  item = Garbage{};  // what is left: the header's munmap, the closes
}

void* reaper_main(void*) {
  on_reaper_thread = true;
  cpu_at_last_pause = cpu_at_last_piece = thread_cpu_ns();
  std::unique_lock<std::mutex> lock(reaper.mutex);
  for (;;) {
    reaper.wake.wait(lock, [] { return reaper.stopping || !reaper.queue.empty(); });
    if (reaper.queue.empty() && reaper.stopping) return nullptr;
    Garbage item = std::move(reaper.queue.front());
    reaper.queue.pop_front();
    lock.unlock();
    destroy(item);  // munmap and close here, off every scheduler
    lock.lock();
  }
}

/// Queues `item`; false if the reaper is not running (the caller destroys it).
bool enqueue(Garbage&& item) noexcept {
  try {
    std::lock_guard<std::mutex> lock(reaper.mutex);
    if (!reaper.running || reaper.stopping) return false;
    reaper.queue.push_back(std::move(item));
  } catch (...) {
    return false;  // out of memory: destroy in place
  }
  reaper.wake.notify_one();
  return true;
}

}  // namespace

bool start_reaper() {
  std::lock_guard<std::mutex> lock(reaper.mutex);
  if (reaper.running) return true;
  reaper.stopping = false;
  char name[] = "spshm_reaper";
  if (enif_thread_create(name, &reaper.tid, reaper_main, nullptr, nullptr) != 0) return false;
  reaper.running = true;
  return true;
}

void stop_reaper() {
  {
    std::lock_guard<std::mutex> lock(reaper.mutex);
    if (!reaper.running) return;
    reaper.stopping = true;
  }
  reaper.wake.notify_one();
  enif_thread_join(reaper.tid, nullptr);
  std::lock_guard<std::mutex> lock(reaper.mutex);
  reaper.running = false;
}

ReaperCounts reaper_counts() noexcept {
  return {pieces_unmapped.load(std::memory_order_relaxed),
          pieces_released.load(std::memory_order_relaxed), pause_ns.load(std::memory_order_relaxed),
          pauses.load(std::memory_order_relaxed)};
}

void dispose(Region&& region) noexcept {
  if (region.capacity() < kReapThreshold) return;  // destroyed by the caller's scope
  try {
    auto boxed = std::make_unique<Region>(std::move(region));
    Garbage item{std::move(boxed)};
    if (!enqueue(std::move(item))) item = Garbage{};
  } catch (...) {
  }
}

void dispose_zeroing(Region&& region, std::uint64_t zero_from) noexcept {
  dispose_unlinking(std::move(region), zero_from, false);
}

void dispose_unlinking(Region&& region, std::uint64_t zero_from, bool unless_held) noexcept {
  try {
    auto boxed = std::make_unique<Zeroing>();
    boxed->region = std::make_unique<Region>(std::move(region));
    boxed->from = zero_from;
    boxed->unless_held = unless_held;
    Garbage item{std::move(boxed)};
    if (!enqueue(std::move(item))) destroy(item);  // no reaper: here, as one call did
  } catch (...) {
  }
}

void run_on_reaper(void (*fn)(void*), void* arg) noexcept {
  Garbage item{Task{fn, arg}};
  if (!enqueue(std::move(item))) fn(arg);  // no reaper: here
}

void dispose(Region::DetachedData&& data) noexcept {
  if (data.bytes < kReapThreshold) {
    Region::DetachedData local = std::move(data);  // destroyed here
    return;
  }
  try {
    auto boxed = std::make_unique<Region::DetachedData>(std::move(data));
    Garbage item{std::move(boxed)};
    if (!enqueue(std::move(item))) item = Garbage{};
  } catch (...) {
  }
}

}  // namespace spshm::nif
