// The status board (board.hpp): seqlock slots in a region's data area.
//
// Seqlock protocol (one writer per slot, any number of readers, all fields std::atomic
// so that racing accesses are well defined):
//   writer: w = (seq | 1) + ... odd; seq.store(w, relaxed); fence(release);
//           field stores (relaxed); seq.store(w + 1, release)
//   reader: s1 = seq.load(acquire); odd -> retry; field loads (relaxed);
//           fence(acquire); s2 = seq.load(relaxed); s1 != s2 -> retry
// The release fence after the odd store keeps the field stores from becoming visible
// before it; the acquire fence before the second load keeps the field loads before it.
// A writer starts from whatever sequence it finds, forced odd, so a peer that left the
// sequence odd (a hostile write, a writer killed mid-update) cannot make a torn copy
// look consistent to readers: they give up on that slot after kReadRetries attempts.
#include "board.hpp"

#ifdef _WIN32
#include <windows.h>
#else
#include <time.h>
#endif
#if defined(__linux__)
#include <fcntl.h>
#include <cerrno>
#endif

#include <algorithm>
#include <cstring>
#include <string_view>

namespace spshm::board {

namespace {

constexpr std::uint64_t kStateMask = 0xffffffffu;
constexpr std::uint64_t kFutureSlackNs = 1'000'000'000;  // 1 s: clocks of one host agree
// Total extra seqlock attempts one scan may spend on slots that keep changing (or are
// stuck odd): bounds a least_loaded call over a hostile 65 536-slot board to a few
// hundred microseconds.
constexpr std::uint32_t kScanRetryBudget = 4096;

inline std::uint32_t owner_state(std::uint64_t owner) noexcept {
  return static_cast<std::uint32_t>(owner & kStateMask);
}
inline std::uint64_t owner_word(std::uint32_t incarnation, std::uint32_t state) noexcept {
  return (std::uint64_t{incarnation} << 32) | state;
}
inline std::uint32_t owner_incarnation(std::uint64_t owner) noexcept {
  return static_cast<std::uint32_t>(owner >> 32);
}

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

constexpr auto R = std::memory_order_relaxed;

// Seqlock write section of one slot.
class WriteSection {
 public:
  explicit WriteSection(BoardSlot& s) noexcept : s_(s) {
    std::uint64_t q = s_.seq.load(R);
    w_ = (q + 1) | 1;  // odd, and past whatever was there
    s_.seq.store(w_, R);
    std::atomic_thread_fence(std::memory_order_release);
  }
  ~WriteSection() { s_.seq.store(w_ + 1, std::memory_order_release); }

 private:
  BoardSlot& s_;
  std::uint64_t w_;
};

void store_values(BoardSlot& s, const Values& v, std::uint64_t now) noexcept {
  s.state.store(v.state, R);
  s.queue.store(v.queue, R);
  s.in_flight.store(v.in_flight, R);
  s.memory.store(v.memory, R);
  s.processed.store(v.processed, R);
  s.errors.store(v.errors, R);
  for (std::uint32_t g = 0; g < kGaugeCount; ++g) s.gauges[g].store(v.gauges[g], R);
  s.updated_ns.store(now, R);
}

bool is_stale(std::uint64_t updated, std::uint64_t now, std::uint64_t stale_after_ms) noexcept {
  if (updated > now) return updated - now > kFutureSlackNs;  // dated in the future: hostile
  std::uint64_t age = now - updated;
  return stale_after_ms < UINT64_MAX / 1'000'000 && age > stale_after_ms * 1'000'000;
}

// Indices of equally good entries: on the stack for the usual pool, on the heap beyond.
class TieList {
 public:
  void clear() noexcept {
    if (size_ > kInline) heap_.clear();
    size_ = 0;
  }
  void push(std::uint32_t index) {
    if (size_ < kInline) {
      inline_[size_] = index;
    } else {
      if (heap_.empty()) heap_.assign(inline_, inline_ + kInline);
      heap_.push_back(index);
    }
    ++size_;
  }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  std::uint32_t operator[](std::size_t k) const noexcept {
    return size_ <= kInline ? inline_[k] : heap_[k];
  }

 private:
  static constexpr std::size_t kInline = 128;
  std::uint32_t inline_[kInline];
  std::vector<std::uint32_t> heap_;
  std::size_t size_ = 0;
};

}  // namespace

std::uint64_t monotonic_ns() noexcept {
#ifdef _WIN32
  LARGE_INTEGER counter, frequency;
  ::QueryPerformanceCounter(&counter);
  ::QueryPerformanceFrequency(&frequency);
  return static_cast<std::uint64_t>(counter.QuadPart / frequency.QuadPart * 1'000'000'000u +
                                    counter.QuadPart % frequency.QuadPart * 1'000'000'000u /
                                        frequency.QuadPart);
#else
  struct timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000u +
         static_cast<std::uint64_t>(ts.tv_nsec);
#endif
}

std::uint64_t monotonic_coarse_ns() noexcept {
#ifdef CLOCK_MONOTONIC_COARSE
  struct timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000u +
         static_cast<std::uint64_t>(ts.tv_nsec);
#else
  return monotonic_ns();
#endif
}

const char* state_name(std::uint32_t state) noexcept {
  switch (state) {
    case 0:
      return "starting";
    case 1:
      return "idle";
    case 2:
      return "busy";
    case 3:
      return "draining";
    case 4:
      return "shutdown";
    default:
      return "unknown";
  }
}

ViewStatus View::make(void* data, std::uint64_t bytes, View* out) noexcept {
  if (data == nullptr || bytes < kBoardHeaderSize) return ViewStatus::too_small;
  auto* h = static_cast<BoardHeader*>(data);
  // Copy the immutable facts once; never read them from shared memory again.
  char magic[8];
  std::memcpy(magic, h->magic, sizeof magic);
  std::uint32_t version = h->version, header_size = h->header_size, slot_size = h->slot_size;
  std::uint32_t capacity = h->capacity;
  std::uint64_t stale_after = h->stale_after_ms;
  if (std::memcmp(magic, kBoardMagic, sizeof magic) != 0) return ViewStatus::bad_magic;
  if (version != kBoardVersion) return ViewStatus::bad_version;
  if (header_size != kBoardHeaderSize || slot_size != kSlotSize || capacity == 0 ||
      capacity > kMaxCapacity || board_bytes(capacity) > bytes || stale_after == 0)
    return ViewStatus::bad_geometry;
  View v;
  v.header_ = h;
  v.slots_ = reinterpret_cast<BoardSlot*>(static_cast<std::uint8_t*>(data) + kBoardHeaderSize);
  v.capacity_ = capacity;
  v.stale_after_ms_ = stale_after;
  try {
    for (std::uint32_t g = 0; g < kGaugeCount; ++g) {
      char name[kGaugeNameCapacity];
      std::memcpy(name, h->gauge_names[g], sizeof name);
      std::size_t n = 0;
      while (n < kGaugeNameCapacity - 1 && name[n] != '\0') ++n;
      v.gauge_names_.emplace_back(name, n);
    }
    *out = std::move(v);
  } catch (...) {
    return ViewStatus::too_small;
  }
  return ViewStatus::ok;
}

bool View::init(void* data, std::uint64_t bytes, std::uint32_t capacity,
                std::uint64_t stale_after_ms, const std::vector<std::string>& gauge_names) {
  if (data == nullptr || capacity == 0 || capacity > kMaxCapacity ||
      board_bytes(capacity) > bytes || stale_after_ms == 0 || gauge_names.size() > kGaugeCount)
    return false;
  for (const auto& n : gauge_names)
    if (n.size() >= kGaugeNameCapacity || n.find('\0') != std::string::npos) return false;
  std::memset(data, 0, board_bytes(capacity));
  auto* h = static_cast<BoardHeader*>(data);
  h->version = kBoardVersion;
  h->header_size = kBoardHeaderSize;
  h->slot_size = kSlotSize;
  h->capacity = capacity;
  h->stale_after_ms = stale_after_ms;
  for (std::size_t g = 0; g < gauge_names.size(); ++g)
    std::memcpy(h->gauge_names[g], gauge_names[g].data(), gauge_names[g].size());
  h->created_ns = monotonic_ns();
  h->generation.store(0, R);
  std::atomic_thread_fence(std::memory_order_release);
  std::memcpy(h->magic, kBoardMagic, sizeof kBoardMagic);  // last: a board with a magic is whole
  return true;
}

std::uint64_t View::generation() const noexcept {
  return header_->generation.load(std::memory_order_acquire);
}

// ---- slot locks ----

#if defined(__linux__)
namespace {
int slot_lock(int fd, int cmd, short type, std::uint32_t index, short* found = nullptr) noexcept {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(kSlotLockBase + index);
  fl.l_len = 1;
  if (::fcntl(fd, cmd, &fl) != 0) return errno == EAGAIN || errno == EACCES ? 0 : -1;
  if (found != nullptr) *found = fl.l_type;
  return 1;
}
}  // namespace

int SlotLocks::try_lock(std::uint32_t index) const noexcept {
  return fd_ < 0 ? -1 : slot_lock(fd_, F_OFD_SETLK, F_WRLCK, index);
}
void SlotLocks::unlock(std::uint32_t index) const noexcept {
  if (fd_ >= 0) (void)slot_lock(fd_, F_OFD_SETLK, F_UNLCK, index);
}
int SlotLocks::held(std::uint32_t index) const noexcept {
  short found = F_UNLCK;
  if (fd_ < 0 || slot_lock(fd_, F_OFD_GETLK, F_WRLCK, index, &found) != 1) return -1;
  return found != F_UNLCK ? 1 : 0;
}
#else
int SlotLocks::try_lock(std::uint32_t) const noexcept { return -1; }
void SlotLocks::unlock(std::uint32_t) const noexcept {}
int SlotLocks::held(std::uint32_t) const noexcept { return -1; }
#endif

bool View::join(const std::string& worker_id, std::uint32_t pid, std::uint64_t start_time,
                std::uint32_t* index, std::uint64_t* owner) noexcept {
  return join_locked(worker_id, pid, start_time, SlotLocks(-1), false, 0, index, owner);
}

int View::owner_alive(std::uint32_t index, const SlotLocks& locks) const noexcept {
  if (index >= capacity_) return 0;
  return locks.held(index);
}

bool View::recover_dead(std::uint32_t index, const SlotLocks& locks) noexcept {
  if (index >= capacity_) return false;
  BoardSlot& s = slots_[index];
  std::uint64_t o = s.owner.load(std::memory_order_acquire);
  if (owner_state(o) == kSlotFree) return false;
  if (locks.try_lock(index) != 1) return false;  // alive (or unknown): leave it alone
  // Ours now: nobody else can claim or recover it until we unlock.
  std::uint32_t incarnation = owner_incarnation(o) + 1;
  bool freed = s.owner.compare_exchange_strong(o, owner_word(incarnation, kSlotBusy));
  if (freed) {
    {
      WriteSection w(s);
      s.state.store(static_cast<std::uint32_t>(WorkerState::shutdown), R);
    }
    locks.unlock(index);
    std::uint64_t busy = owner_word(incarnation, kSlotBusy);
    s.owner.compare_exchange_strong(busy, owner_word(incarnation, kSlotFree));
    header_->generation.fetch_add(1);
  } else {
    locks.unlock(index);
  }
  return freed;
}

bool View::join_locked(const std::string& worker_id, std::uint32_t pid, std::uint64_t start_time,
                       const SlotLocks& locks, bool recover, std::uint32_t self_pid,
                       std::uint32_t* index, std::uint64_t* owner) noexcept {
  if (worker_id.empty() || worker_id.size() > kWorkerIdCapacity) return false;
  std::uint64_t words[kWorkerIdCapacity / 8] = {};
  std::memcpy(words, worker_id.data(), worker_id.size());
  const bool locking = locks.fd() >= 0;
  for (std::uint32_t i = 0; i < capacity_; ++i) {
    BoardSlot& s = slots_[i];
    std::uint64_t o = s.owner.load(std::memory_order_acquire);
    if (owner_state(o) != kSlotFree) {
      // Taken, unless its owner died (its lock is free): then it is ours to recover.
      if (!locking || !recover || s.pid.load(R) == self_pid) continue;
    }
    // The lock first: a joiner killed after it never leaves a slot nobody can recover.
    if (locking && locks.try_lock(i) != 1) continue;
    std::uint32_t incarnation = owner_incarnation(o) + 1;
    if (!s.owner.compare_exchange_strong(o, owner_word(incarnation, kSlotBusy))) {
      if (locking) locks.unlock(i);
      continue;
    }
    std::uint64_t now = monotonic_ns();
    {
      WriteSection w(s);
      s.pid.store(pid, R);
      s.start_time.store(start_time, R);
      s.id_length.store(static_cast<std::uint32_t>(worker_id.size()), R);
      s.reserved0.store(0, R);
      for (std::uint32_t k = 0; k < kWorkerIdCapacity / 8; ++k) s.worker_id[k].store(words[k], R);
      s.joined_ns.store(now, R);
      store_values(s, Values{}, now);  // state starting, every count 0
    }
    std::uint64_t live = owner_word(incarnation, kSlotLive);
    s.owner.store(live, std::memory_order_release);
    header_->generation.fetch_add(1);
    *index = i;
    *owner = live;
    return true;
  }
  return false;
}

bool update_slot(BoardSlot& s, std::uint64_t owner, const Values& v) noexcept {
  if (s.owner.load(R) != owner) return false;
  std::uint64_t now = monotonic_ns();
  WriteSection w(s);
  store_values(s, v, now);
  return true;
}

Values own_values(const BoardSlot& s) noexcept {
  Values v;
  v.state = s.state.load(R);
  v.queue = s.queue.load(R);
  v.in_flight = s.in_flight.load(R);
  v.memory = s.memory.load(R);
  v.processed = s.processed.load(R);
  v.errors = s.errors.load(R);
  for (std::uint32_t g = 0; g < kGaugeCount; ++g) v.gauges[g] = s.gauges[g].load(R);
  return v;
}

bool View::update(std::uint32_t index, std::uint64_t owner, const Values& v) noexcept {
  if (index >= capacity_) return false;
  return update_slot(slots_[index], owner, v);
}

bool View::leave(std::uint32_t index, std::uint64_t owner, const SlotLocks* locks) noexcept {
  if (index >= capacity_ || owner_state(owner) != kSlotLive) return false;
  BoardSlot& s = slots_[index];
  std::uint64_t expected = owner;
  std::uint32_t incarnation = owner_incarnation(owner);
  if (!s.owner.compare_exchange_strong(expected, owner_word(incarnation, kSlotBusy))) return false;
  {
    WriteSection w(s);
    s.state.store(static_cast<std::uint32_t>(WorkerState::shutdown), R);
  }
  // Unlocked while still busy (never a free slot whose lock a leaver still holds); a
  // joiner may recover the busy slot meanwhile, which the compare-and-swap below sees.
  if (locks != nullptr) locks->unlock(index);
  std::uint64_t busy = owner_word(incarnation, kSlotBusy);
  s.owner.compare_exchange_strong(busy, owner_word(incarnation, kSlotFree),
                                  std::memory_order_release);
  header_->generation.fetch_add(1);
  return true;
}

std::vector<std::pair<std::uint32_t, std::uint64_t>> View::owners() const {
  std::vector<std::pair<std::uint32_t, std::uint64_t>> out;
  for (std::uint32_t i = 0; i < capacity_; ++i) {
    const BoardSlot& s = slots_[i];
    if (owner_state(s.owner.load(std::memory_order_acquire)) != kSlotLive) continue;
    out.emplace_back(s.pid.load(R), s.start_time.load(R));
  }
  // Distinct owners in O(n log n) (a linear search per slot held a normal scheduler for
  // tens of ms on a big board); a pool's workers are few, a hostile board cannot grow
  // the answer past 4096.
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  if (out.size() > 4096) out.resize(4096);
  return out;
}

std::uint32_t View::reclaim(std::uint32_t pid, std::uint64_t start_time) noexcept {
  std::uint32_t freed = 0;
  for (std::uint32_t i = 0; i < capacity_; ++i) {
    BoardSlot& s = slots_[i];
    std::uint64_t o = s.owner.load(std::memory_order_acquire);
    if (owner_state(o) != kSlotLive) continue;
    // pid and start_time only change while the slot is busy (claim): read them, then
    // make sure the owner word (with its incarnation) did not move meanwhile.
    std::uint32_t p = s.pid.load(R);
    std::uint64_t t = s.start_time.load(R);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (s.owner.load(R) != o || p != pid || t != start_time) continue;
    if (leave(i, o)) ++freed;
  }
  return freed;
}

ReadStatus View::read(std::uint32_t index, std::uint64_t now_ns, Entry* out,
                      std::uint32_t* budget) const noexcept {
  if (index >= capacity_) return ReadStatus::free;
  const BoardSlot& s = slots_[index];
  for (std::uint32_t attempt = 0; attempt < kReadRetries; ++attempt) {
    if (attempt > 0) {
      if (budget != nullptr) {
        if (*budget == 0) break;
        --*budget;
      }
      cpu_relax();
    }
    std::uint64_t o1 = s.owner.load(std::memory_order_acquire);
    if (owner_state(o1) != kSlotLive) return ReadStatus::free;
    std::uint64_t s1 = s.seq.load(std::memory_order_acquire);
    if (s1 & 1) continue;
    std::uint64_t words[kWorkerIdCapacity / 8];
    Entry e;
    e.pid = s.pid.load(R);
    e.values.state = s.state.load(R);
    e.start_time = s.start_time.load(R);
    e.updated_ns = s.updated_ns.load(R);
    e.values.queue = s.queue.load(R);
    e.values.in_flight = s.in_flight.load(R);
    e.values.memory = s.memory.load(R);
    e.values.processed = s.processed.load(R);
    e.values.errors = s.errors.load(R);
    for (std::uint32_t g = 0; g < kGaugeCount; ++g) e.values.gauges[g] = s.gauges[g].load(R);
    std::uint32_t length = s.id_length.load(R);
    for (std::uint32_t k = 0; k < kWorkerIdCapacity / 8; ++k) words[k] = s.worker_id[k].load(R);
    e.joined_ns = s.joined_ns.load(R);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (s.seq.load(R) != s1 || s.owner.load(R) != o1) continue;
    e.index = index;
    e.owner = o1;
    length = std::min(length, kWorkerIdCapacity);  // hostile lengths are clamped
    try {
      e.worker_id.assign(reinterpret_cast<const char*>(words), length);
    } catch (...) {
      return ReadStatus::unreadable;
    }
    e.stale = is_stale(e.updated_ns, now_ns, stale_after_ms_);
    *out = std::move(e);
    return ReadStatus::ok;
  }
  return ReadStatus::unreadable;
}

// The routing pass without :exclude (a router's hot path): reads only what the key
// needs (owner word once, sequence twice, four fields), no worker id until the pick,
// and no allocation. A slot caught mid-write takes the general scan's bounded retries.
// Re-reading the owner word is not needed for a consistent copy: every claim and
// release of a slot also moves its sequence (a write section), and the id of the pick
// is read again, consistently, from the slot it names.
View::Pick View::least_loaded_all(std::uint64_t now_ns, std::uint64_t rotation) const {
  Pick pick;
  constexpr std::uint64_t kLoadMask = (std::uint64_t{1} << 62) - 1;
  const std::uint64_t stale_ns =
      stale_after_ms_ < UINT64_MAX / 1'000'000 ? stale_after_ms_ * 1'000'000 : UINT64_MAX;
  const std::uint64_t oldest = now_ns > stale_ns ? now_ns - stale_ns : 0;
  const std::uint64_t newest = now_ns + kFutureSlackNs;
  constexpr auto idle = static_cast<std::uint32_t>(WorkerState::idle);
  constexpr auto busy = static_cast<std::uint32_t>(WorkerState::busy);
  std::uint32_t budget = kScanRetryBudget;
  std::uint64_t best = UINT64_MAX;
  TieList ties;
  for (std::uint32_t i = 0; i < capacity_; ++i) {
    const BoardSlot& s = slots_[i];
    if (owner_state(s.owner.load(std::memory_order_acquire)) != kSlotLive) continue;
    std::uint64_t s1 = s.seq.load(std::memory_order_acquire);
    std::uint32_t state = s.state.load(R);
    std::uint64_t updated = s.updated_ns.load(R);
    std::uint64_t queue = s.queue.load(R);
    std::uint64_t in_flight = s.in_flight.load(R);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (__builtin_expect((s1 & 1) != 0 || s.seq.load(R) != s1, 0)) {
      // caught mid-write: bounded retries, for this slot only
      bool live = true, consistent = false;
      for (std::uint32_t attempt = 1; attempt < kReadRetries && budget > 0; ++attempt) {
        --budget;
        cpu_relax();
        if (owner_state(s.owner.load(std::memory_order_acquire)) != kSlotLive) {
          live = false;
          break;
        }
        s1 = s.seq.load(std::memory_order_acquire);
        if (s1 & 1) continue;
        state = s.state.load(R);
        updated = s.updated_ns.load(R);
        queue = s.queue.load(R);
        in_flight = s.in_flight.load(R);
        std::atomic_thread_fence(std::memory_order_acquire);
        if (s.seq.load(R) == s1) {
          consistent = true;
          break;
        }
      }
      if (!live) continue;
      if (!consistent) {
        ++pick.unreadable;
        continue;
      }
    }
    if ((state != idle && state != busy) || updated < oldest || updated > newest) continue;
    ++pick.candidates;
    std::uint64_t load = queue + in_flight;
    if (load < queue || load > kLoadMask) load = kLoadMask;  // saturate hostile values
    std::uint64_t key = (std::uint64_t{state == busy} << 62) | load;
    if (key < best) {
      best = key;
      ties.clear();
      ties.push(i);
    } else if (key == best) {
      ties.push(i);
    }
  }
  // The chosen tie; if it changed since the scan, the next ones (bounded by ties.size()).
  std::size_t n = ties.size();
  for (std::size_t k = 0; k < n; ++k) {
    std::uint32_t index = ties[(rotation + k) % n];
    if (read_id_into(index, pick.id, &pick.id_length)) {
      pick.found = true;
      pick.index = index;
      return pick;
    }
  }
  return pick;
}

View::Pick View::least_loaded(std::uint64_t now_ns, std::uint64_t rotation,
                              const std::vector<std::string>& exclude) const {
  if (exclude.empty()) {
    Pick pick = least_loaded_all(now_ns, rotation);
    if (pick.found) pick.worker_id.assign(pick.id, pick.id_length);
    return pick;
  }
  Pick pick;
  // One 64-bit key per entry, lower is better: rank (idle 0, busy 1) in bit 62, then
  // queue + in_flight saturated to 62 bits.
  constexpr std::uint64_t kLoadMask = (std::uint64_t{1} << 62) - 1;
  std::uint64_t best = UINT64_MAX;
  TieList ties;
  std::uint32_t budget = kScanRetryBudget;
  const bool check_ids = !exclude.empty();
  // Sorted once, searched per entry: O(capacity log |exclude|), not O(capacity * |exclude|)
  // (65 536 slots and 4 096 excluded ids would hold a normal scheduler for half a second).
  std::vector<std::string_view> excluded(exclude.begin(), exclude.end());
  std::sort(excluded.begin(), excluded.end());
  // Fresh: updated in [oldest, newest] (later than one second ahead: hostile).
  const std::uint64_t stale_ns =
      stale_after_ms_ < UINT64_MAX / 1'000'000 ? stale_after_ms_ * 1'000'000 : UINT64_MAX;
  const std::uint64_t oldest = now_ns > stale_ns ? now_ns - stale_ns : 0;
  const std::uint64_t newest = now_ns + kFutureSlackNs;
  constexpr auto idle = static_cast<std::uint32_t>(WorkerState::idle);
  constexpr auto busy = static_cast<std::uint32_t>(WorkerState::busy);
  for (std::uint32_t i = 0; i < capacity_; ++i) {
    const BoardSlot& s = slots_[i];
    std::uint32_t state = 0, length = 0;
    std::uint64_t updated = 0, queue = 0, in_flight = 0;
    std::uint64_t words[kWorkerIdCapacity / 8];
    bool live = true, consistent = false;
    for (std::uint32_t attempt = 0;; ++attempt) {
      std::uint64_t o1 = s.owner.load(std::memory_order_acquire);
      if (owner_state(o1) != kSlotLive) {
        live = false;
        break;
      }
      std::uint64_t s1 = s.seq.load(std::memory_order_acquire);
      if (!(s1 & 1)) {
        state = s.state.load(R);
        updated = s.updated_ns.load(R);
        queue = s.queue.load(R);
        in_flight = s.in_flight.load(R);
        if (check_ids) {
          length = s.id_length.load(R);
          for (std::uint32_t k = 0; k < kWorkerIdCapacity / 8; ++k)
            words[k] = s.worker_id[k].load(R);
        }
        std::atomic_thread_fence(std::memory_order_acquire);
        if (s.seq.load(R) == s1 && s.owner.load(R) == o1) {
          consistent = true;
          break;
        }
      }
      if (attempt + 1 >= kReadRetries || budget == 0) break;
      --budget;
      cpu_relax();
    }
    if (!live) continue;
    if (!consistent) {
      ++pick.unreadable;
      continue;
    }
    if ((state != idle && state != busy) || updated < oldest || updated > newest) continue;
    if (check_ids) {
      length = std::min(length, kWorkerIdCapacity);
      std::string_view id(reinterpret_cast<const char*>(words), length);
      if (std::binary_search(excluded.begin(), excluded.end(), id)) continue;
    }
    ++pick.candidates;
    std::uint64_t load = queue + in_flight;
    if (load < queue || load > kLoadMask) load = kLoadMask;  // saturate hostile values
    std::uint64_t key = (std::uint64_t{state == busy} << 62) | load;
    if (key < best) {
      best = key;
      ties.clear();
      ties.push(i);
    } else if (key == best) {
      ties.push(i);
    }
  }
  if (ties.empty()) return pick;
  // The chosen tie; if it changed since the scan, the next ones (bounded by ties.size()).
  std::size_t n = ties.size();
  for (std::size_t k = 0; k < n; ++k) {
    std::uint32_t index = ties[(rotation + k) % n];
    if (read_id(index, &pick.worker_id)) {
      pick.found = true;
      pick.index = index;
      return pick;
    }
  }
  return pick;
}

bool View::read_id(std::uint32_t index, std::string* out) const {
  char id[kWorkerIdCapacity];
  std::uint32_t length = 0;
  if (!read_id_into(index, id, &length)) return false;
  out->assign(id, length);
  return true;
}

bool View::read_id_into(std::uint32_t index, char* out, std::uint32_t* out_length) const noexcept {
  if (index >= capacity_) return false;
  const BoardSlot& s = slots_[index];
  for (std::uint32_t attempt = 0; attempt < kReadRetries; ++attempt) {
    std::uint64_t o1 = s.owner.load(std::memory_order_acquire);
    if (owner_state(o1) != kSlotLive) return false;
    std::uint64_t s1 = s.seq.load(std::memory_order_acquire);
    if (s1 & 1) {
      cpu_relax();
      continue;
    }
    std::uint64_t words[kWorkerIdCapacity / 8];
    std::uint32_t length = s.id_length.load(R);
    for (std::uint32_t k = 0; k < kWorkerIdCapacity / 8; ++k) words[k] = s.worker_id[k].load(R);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (s.seq.load(R) != s1 || s.owner.load(R) != o1) {
      cpu_relax();
      continue;
    }
    *out_length = std::min(length, kWorkerIdCapacity);
    std::memcpy(out, words, *out_length);
    return true;
  }
  return false;
}

// ---- layout description ----

namespace {

struct Field {
  const char* name;
  std::size_t offset, size;
};

#define BOARD_HEADER_FIELD(f) \
  Field { #f, offsetof(BoardHeader, f), sizeof(BoardHeader::f) }
#define BOARD_SLOT_FIELD(f) \
  Field { #f, offsetof(BoardSlot, f), sizeof(BoardSlot::f) }

void append_fields(std::string& out, const char* key, const Field* fields, std::size_t n) {
  out += "\"";
  out += key;
  out += "\":{";
  for (std::size_t i = 0; i < n; ++i) {
    if (i) out += ",";
    out += "\"" + std::string(fields[i].name) +
           "\":{\"offset\":" + std::to_string(fields[i].offset) +
           ",\"size\":" + std::to_string(fields[i].size) + "}";
  }
  out += "}";
}

}  // namespace

std::string board_layout_description() {
  static const Field header_fields[] = {
      BOARD_HEADER_FIELD(magic),       BOARD_HEADER_FIELD(version),
      BOARD_HEADER_FIELD(header_size), BOARD_HEADER_FIELD(slot_size),
      BOARD_HEADER_FIELD(capacity),    BOARD_HEADER_FIELD(stale_after_ms),
      BOARD_HEADER_FIELD(gauge_names), BOARD_HEADER_FIELD(created_ns),
      BOARD_HEADER_FIELD(generation),  BOARD_HEADER_FIELD(reserved),
  };
  static const Field slot_fields[] = {
      BOARD_SLOT_FIELD(owner),     BOARD_SLOT_FIELD(seq),        BOARD_SLOT_FIELD(pid),
      BOARD_SLOT_FIELD(state),     BOARD_SLOT_FIELD(start_time), BOARD_SLOT_FIELD(updated_ns),
      BOARD_SLOT_FIELD(queue),     BOARD_SLOT_FIELD(in_flight),  BOARD_SLOT_FIELD(memory),
      BOARD_SLOT_FIELD(processed), BOARD_SLOT_FIELD(errors),     BOARD_SLOT_FIELD(gauges),
      BOARD_SLOT_FIELD(id_length), BOARD_SLOT_FIELD(reserved0),  BOARD_SLOT_FIELD(worker_id),
      BOARD_SLOT_FIELD(joined_ns),
  };
  std::string out = "{\"magic\":\"" + std::string(kBoardMagic, sizeof kBoardMagic) + "\"";
  out += ",\"version\":" + std::to_string(kBoardVersion);
  out += ",\"header_size\":" + std::to_string(kBoardHeaderSize);
  out += ",\"slot_size\":" + std::to_string(kSlotSize);
  out += ",\"max_capacity\":" + std::to_string(kMaxCapacity);
  out += ",\"gauge_count\":" + std::to_string(kGaugeCount);
  out += ",\"gauge_name_capacity\":" + std::to_string(kGaugeNameCapacity);
  out += ",\"worker_id_capacity\":" + std::to_string(kWorkerIdCapacity);
  out += ",\"read_retries\":" + std::to_string(kReadRetries);
  out += ",\"slot_free\":" + std::to_string(kSlotFree);
  out += ",\"slot_busy\":" + std::to_string(kSlotBusy);
  out += ",\"slot_live\":" + std::to_string(kSlotLive);
  out += ",\"states\":{";
  for (std::uint32_t st = 0; st < kStateCount; ++st) {
    if (st) out += ",";
    out += "\"" + std::string(state_name(st)) + "\":" + std::to_string(st);
  }
  out += "},";
  append_fields(out, "header_fields", header_fields, std::size(header_fields));
  out += ",";
  append_fields(out, "slot_fields", slot_fields, std::size(slot_fields));
  out += "}";
  return out;
}

}  // namespace spshm::board
