// The runtime index's background writer (runtime_index.hpp, "Arena regions"): entries of
// arena regions are written by one thread so that carving a region out of an arena (a
// few microseconds) never pays a symlinkat, nor its free an unlinkat.
//
// Creating a region queues its entry, freeing it queues the removal, or just forgets the
// entry when it was not written yet (a short-lived region costs the index nothing). The
// writer wakes when the queue stops being empty, waits kCoalesce so that a burst of
// creations and frees cancels out and costs one wake-up, then writes what is left. A
// lookup that comes before its entry falls back to the worker's scan: slower, as correct.
//
// Fork: only the process that started the writer queues anything (a forked child has no
// writer thread, and its copy of the mutex may be locked: it never touches them).
// Unload and exit join the thread (a thread running in an unloaded library would crash).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

#include "platform.hpp"
#include "runtime_index.hpp"

#if defined(__linux__)
#include <unistd.h>
#endif

namespace spshm::runtime_index {

#if defined(__linux__)

namespace {

constexpr auto kCoalesce = std::chrono::milliseconds(1);

struct Op {
  bool publish = false;  // false: remove the entry
  int fd = -1;           // the arena's descriptor (this process)
  std::uint64_t offset = 0, size = 0;
};

class Writer {
 public:
  void enqueue_publish(const std::string& id, int fd, std::uint64_t offset,
                       std::uint64_t size) noexcept {
    try {
      if (!ours()) return;
      std::unique_lock<std::mutex> lock(mutex_);
      if (!start_locked()) return;
      pending_[id] = Op{true, fd, offset, size};
      wake_idle_locked();
    } catch (...) {  // out of memory: the worker scans instead
    }
  }

  void enqueue_remove(const std::string& id) noexcept {
    try {
      if (!ours()) return;
      std::unique_lock<std::mutex> lock(mutex_);
      if (!thread_.joinable()) return;  // nothing was ever published
      auto it = pending_.find(id);
      if (it != pending_.end() && it->second.publish) {
        pending_.erase(it);  // not written yet (a batch being written is no longer here)
        return;
      }
      pending_[id] = Op{};
      wake_idle_locked();
    } catch (...) {
      remove(id);  // do it here rather than leave an entry behind
    }
  }

  bool flush(std::chrono::milliseconds timeout) noexcept {
    try {
      if (!ours()) return true;
      std::unique_lock<std::mutex> lock(mutex_);
      if (!thread_.joinable()) return true;
      flush_requested_ = true;
      wake_.notify_one();
      return idle_.wait_for(lock, timeout, [&] { return pending_.empty() && !busy_; });
    } catch (...) {
      return false;
    }
  }

  void stop() noexcept {
    try {
      if (!ours()) return;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!thread_.joinable()) return;
        stopping_ = true;
        wake_.notify_one();
      }
      thread_.join();
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = false;
    } catch (...) {
    }
  }

 private:
  // The cached pid (reset in a forked child by pthread_atfork): a getpid system call on
  // every create and free was ~3 of the ~11 system calls of an arena lifecycle cycle.
  bool ours() const noexcept {
    pid_t owner = owner_.load(std::memory_order_acquire);
    return owner == 0 || owner == static_cast<pid_t>(platform::current_pid());
  }

  // Wakes the writer only when it sleeps with nothing to do: while it coalesces it wakes
  // on its own within kCoalesce and takes whatever is queued then. A notify per create
  // (a futex wake and a context switch of the writer thread, which then went back to its
  // timed wait) cost every short-lived region a few microseconds. Under mutex_.
  void wake_idle_locked() noexcept {
    if (sleeping_) {
      sleeping_ = false;
      wake_.notify_one();
    }
  }

  bool start_locked() {
    if (thread_.joinable()) return true;
    if (stopping_) return false;
    owner_.store(static_cast<pid_t>(platform::current_pid()), std::memory_order_release);
    thread_ = std::thread([this] { run(); });
    return true;
  }

  void run() noexcept {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      sleeping_ = true;
      wake_.wait(lock, [&] { return stopping_ || !pending_.empty() || flush_requested_; });
      sleeping_ = false;
      if (stopping_) break;     // what is left is swept by the next VM
      if (!flush_requested_) {  // let a burst accumulate (and cancel out)
        wake_.wait_for(lock, kCoalesce, [&] { return stopping_ || flush_requested_; });
        if (stopping_) break;
      }
      flush_requested_ = false;
      std::unordered_map<std::string, Op> batch;
      batch.swap(pending_);
      busy_ = true;
      lock.unlock();
      write(batch);
      lock.lock();
      busy_ = false;
      if (pending_.empty()) idle_.notify_all();
    }
    busy_ = false;
    idle_.notify_all();
  }

  void write(const std::unordered_map<std::string, Op>& batch) noexcept {
    std::string proc = "/proc/" + std::to_string(platform::current_pid()) + "/fd/";
    for (const auto& [id, op] : batch) {
      if (!op.publish) {
        remove(id);
        continue;
      }
      std::string path = proc + std::to_string(op.fd);
      (void)publish(id, Entry{"arena", path, path, op.offset, op.size});
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, idle_;
  std::unordered_map<std::string, Op> pending_;
  std::thread thread_;
  std::atomic<pid_t> owner_{0};
  bool flush_requested_ = false, busy_ = false, stopping_ = false;
  bool sleeping_ = false;  ///< the writer waits for work (untimed): enqueuers must wake it
};

// Never destroyed (a NIF call racing the VM's exit must not find it gone, and a
// destroyed joinable std::thread would terminate the process); joined at exit and on
// unload instead (JoinAtExit runs at exit, or when the library is unloaded).
Writer& writer() {
  static Writer* instance = new Writer;
  return *instance;
}

struct JoinAtExit {
  ~JoinAtExit() { writer().stop(); }
} g_join_at_exit;

}  // namespace

void publish_arena_later(const std::string& region_id, int arena_fd, std::uint64_t offset,
                         std::uint64_t size) noexcept {
  writer().enqueue_publish(region_id, arena_fd, offset, size);
}

void remove_later(const std::string& region_id) noexcept { writer().enqueue_remove(region_id); }

bool flush(std::chrono::milliseconds timeout) noexcept { return writer().flush(timeout); }

void stop_writer() noexcept { writer().stop(); }

#else

void publish_arena_later(const std::string&, int, std::uint64_t, std::uint64_t) noexcept {}
void remove_later(const std::string&) noexcept {}
bool flush(std::chrono::milliseconds) noexcept { return true; }
void stop_writer() noexcept {}

#endif

}  // namespace spshm::runtime_index
