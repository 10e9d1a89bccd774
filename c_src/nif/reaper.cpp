#include "reaper.hpp"

#include <erl_nif.h>

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <variant>

namespace spshm::nif {

namespace {

using Garbage = std::variant<std::unique_ptr<Region>, std::unique_ptr<Region::DetachedData>>;

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

void* reaper_main(void*) {
  std::unique_lock<std::mutex> lock(reaper.mutex);
  for (;;) {
    reaper.wake.wait(lock, [] { return reaper.stopping || !reaper.queue.empty(); });
    if (reaper.queue.empty() && reaper.stopping) return nullptr;
    Garbage item = std::move(reaper.queue.front());
    reaper.queue.pop_front();
    lock.unlock();
    item = Garbage{};  // munmap and close here, off every scheduler
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

void dispose(Region&& region) noexcept {
  if (region.capacity() < kReapThreshold) return;  // destroyed by the caller's scope
  try {
    auto boxed = std::make_unique<Region>(std::move(region));
    Garbage item{std::move(boxed)};
    if (!enqueue(std::move(item))) item = Garbage{};
  } catch (...) {
  }
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
