// The status board: a region's data area holding one seqlock slot per worker.
//
// Layout (single source of truth; docs/FORMAT.md § status board writes it out, the
// Python client mirrors it in snakepit_shm/_board_format.py, and tests on the C++,
// Elixir and Python sides compare all three against board_layout_description()):
//
//   data offset 0            BoardHeader (512 bytes)
//   data offset 512 + 192*i  BoardSlot i, for i in [0, capacity)
//
// Every slot has exactly one writer at a time: the process that claimed it (join).
// Writers never take a lock and make no system call: an update is a seqlock write
// (sequence odd while writing). Readers never block writers: they copy the slot and
// retry if the sequence moved, at most kReadRetries times, then report the slot as
// unreadable. Everything read from the segment is treated as hostile: lengths are
// clamped, enums checked, and no loop depends on a value read from shared memory.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace spshm::board {

inline constexpr char kBoardMagic[8] = {'S', 'P', 'S', 'H', 'M', 'B', 'R', 'D'};
inline constexpr std::uint32_t kBoardVersion = 1;
inline constexpr std::uint32_t kBoardHeaderSize = 512;
inline constexpr std::uint32_t kSlotSize = 192;
inline constexpr std::uint32_t kMaxCapacity = 65536;
inline constexpr std::uint32_t kGaugeCount = 4;
inline constexpr std::uint32_t kGaugeNameCapacity = 32;  // bytes, NUL padded, <= 31 used
inline constexpr std::uint32_t kWorkerIdCapacity = 64;   // bytes, length stored separately
inline constexpr std::uint32_t kReadRetries = 64;        // seqlock read attempts per slot

// Slot ownership (low 32 bits of BoardSlot::owner; the high 32 bits are the incarnation,
// incremented on every claim, so a compare-and-swap on the whole word is ABA-safe).
inline constexpr std::uint32_t kSlotFree = 0;
inline constexpr std::uint32_t kSlotBusy = 1;  // being claimed or released
inline constexpr std::uint32_t kSlotLive = 2;

// Worker states published in BoardSlot::state.
enum class WorkerState : std::uint32_t {
  starting = 0,
  idle = 1,
  busy = 2,
  draining = 3,
  shutdown = 4,
};
inline constexpr std::uint32_t kStateCount = 5;

struct BoardHeader {
  char magic[8];                                      // 0   "SPSHMBRD"
  std::uint32_t version;                              // 8   kBoardVersion
  std::uint32_t header_size;                          // 12  kBoardHeaderSize
  std::uint32_t slot_size;                            // 16  kSlotSize
  std::uint32_t capacity;                             // 20  slots, 1..65536
  std::uint64_t stale_after_ms;                       // 24  entries older than this are stale
  char gauge_names[kGaugeCount][kGaugeNameCapacity];  // 32  NUL padded
  std::uint64_t created_ns;                           // 160 CLOCK_MONOTONIC at creation
  std::atomic<std::uint64_t> generation;              // 168 bumped on every join/leave/reclaim
  std::uint8_t reserved[336];                         // 176 zero
};

struct BoardSlot {
  std::atomic<std::uint64_t> owner;               // 0   state | incarnation << 32
  std::atomic<std::uint64_t> seq;                 // 8   seqlock sequence: odd while writing
  std::atomic<std::uint32_t> pid;                 // 16  OS pid of the writer
  std::atomic<std::uint32_t> state;               // 20  WorkerState
  std::atomic<std::uint64_t> start_time;          // 24  /proc/<pid>/stat field 22
  std::atomic<std::uint64_t> updated_ns;          // 32  CLOCK_MONOTONIC of the last update
  std::atomic<std::uint64_t> queue;               // 40  queued requests
  std::atomic<std::uint64_t> in_flight;           // 48  requests being processed
  std::atomic<std::uint64_t> memory;              // 56  bytes
  std::atomic<std::uint64_t> processed;           // 64  requests completed
  std::atomic<std::uint64_t> errors;              // 72  requests failed
  std::atomic<std::int64_t> gauges[kGaugeCount];  // 80 user gauges
  std::atomic<std::uint32_t> id_length;           // 112 bytes of worker_id in use, <= 64
  std::atomic<std::uint32_t> reserved0;           // 116 zero
  std::atomic<std::uint64_t> worker_id[kWorkerIdCapacity / 8];  // 120 bytes, zero padded
  std::atomic<std::uint64_t> joined_ns;                         // 184 CLOCK_MONOTONIC of the join
};

static_assert(sizeof(BoardHeader) == kBoardHeaderSize);
static_assert(offsetof(BoardHeader, version) == 8);
static_assert(offsetof(BoardHeader, header_size) == 12);
static_assert(offsetof(BoardHeader, slot_size) == 16);
static_assert(offsetof(BoardHeader, capacity) == 20);
static_assert(offsetof(BoardHeader, stale_after_ms) == 24);
static_assert(offsetof(BoardHeader, gauge_names) == 32);
static_assert(offsetof(BoardHeader, created_ns) == 160);
static_assert(offsetof(BoardHeader, generation) == 168);
static_assert(offsetof(BoardHeader, reserved) == 176);
static_assert(sizeof(BoardSlot) == kSlotSize);
static_assert(offsetof(BoardSlot, seq) == 8);
static_assert(offsetof(BoardSlot, pid) == 16);
static_assert(offsetof(BoardSlot, state) == 20);
static_assert(offsetof(BoardSlot, start_time) == 24);
static_assert(offsetof(BoardSlot, updated_ns) == 32);
static_assert(offsetof(BoardSlot, queue) == 40);
static_assert(offsetof(BoardSlot, in_flight) == 48);
static_assert(offsetof(BoardSlot, memory) == 56);
static_assert(offsetof(BoardSlot, processed) == 64);
static_assert(offsetof(BoardSlot, errors) == 72);
static_assert(offsetof(BoardSlot, gauges) == 80);
static_assert(offsetof(BoardSlot, id_length) == 112);
static_assert(offsetof(BoardSlot, worker_id) == 120);
static_assert(offsetof(BoardSlot, joined_ns) == 184);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

/// Bytes of data area a board of `capacity` slots needs.
constexpr std::uint64_t board_bytes(std::uint32_t capacity) noexcept {
  return kBoardHeaderSize + std::uint64_t{kSlotSize} * capacity;
}

/// CLOCK_MONOTONIC nanoseconds (comparable between processes of one host; a vDSO call,
/// no system call).
std::uint64_t monotonic_ns() noexcept;
/// The same clock at tick resolution (a few ms, CLOCK_MONOTONIC_COARSE where available):
/// cheaper, and precise enough for a reader's staleness decisions.
std::uint64_t monotonic_coarse_ns() noexcept;

// ---- liveness of slot owners (Linux open file description locks) ----
//
// Whoever claims slot i holds an exclusive OFD lock of byte kSlotLockBase + i of the
// board's segment (its own open of it) for as long as it owns the slot: the kernel drops
// the lock the instant the last descriptor of that open closes, which a SIGKILL does.
// A slot that is not free while nobody holds its lock has a dead owner (killed while
// claiming, publishing or leaving): anyone may take the lock and recover the slot. The
// byte lies far beyond the segment's end (locks never touch the bytes) and clear of the
// region's own lock bytes (docs/FORMAT.md "Locks").
inline constexpr std::uint64_t kSlotLockBase = std::uint64_t{1} << 40;

/// An open of the board's segment through which this process takes slot locks (a file
/// descriptor it owns; -1: no locks, as on platforms without OFD locks).
class SlotLocks {
 public:
  explicit SlotLocks(int fd) noexcept : fd_(fd) {}
  int fd() const noexcept { return fd_; }
  /// Exclusive lock of slot `index`'s byte, without waiting: 1 taken (or already ours
  /// through this open), 0 held by another open, -1 error (or no locks here).
  int try_lock(std::uint32_t index) const noexcept;
  void unlock(std::uint32_t index) const noexcept;
  /// Whether an open other than this one holds slot `index`'s lock: 1 yes, 0 no,
  /// -1 unknown (error, or no locks on this platform: callers then take it as held).
  int held(std::uint32_t index) const noexcept;

 private:
  int fd_;
};

/// The values a writer publishes (everything but identity and time).
struct Values {
  std::uint32_t state = 0;  ///< WorkerState
  std::uint64_t queue = 0, in_flight = 0, memory = 0, processed = 0, errors = 0;
  std::int64_t gauges[kGaugeCount] = {0, 0, 0, 0};
};

/// One decoded, consistent copy of a live slot.
struct Entry {
  std::uint32_t index = 0;
  std::uint64_t owner = 0;  ///< the owner word (incarnation) the copy belongs to
  std::string worker_id;
  std::uint32_t pid = 0;
  std::uint64_t start_time = 0;
  std::uint64_t updated_ns = 0, joined_ns = 0;
  Values values;
  bool stale = false;  ///< older than stale_after (or dated in the future)
};

enum class ReadStatus { ok, free, unreadable };

/// Why a board view could not be made over a data area.
enum class ViewStatus { ok, too_small, bad_magic, bad_version, bad_geometry };

/// A board over `bytes` bytes of mapped data area. Validates the header once and copies
/// its immutable facts (capacity, stale_after, gauge names), so no later operation trusts
/// a value a peer could rewrite. Cheap to copy; does not own the memory.
class View {
 public:
  static ViewStatus make(void* data, std::uint64_t bytes, View* out) noexcept;

  /// Writes a fresh header and zeroes the slots (the creator, before anyone sees it).
  static bool init(void* data, std::uint64_t bytes, std::uint32_t capacity,
                   std::uint64_t stale_after_ms, const std::vector<std::string>& gauge_names);

  std::uint32_t capacity() const noexcept { return capacity_; }
  std::uint64_t stale_after_ms() const noexcept { return stale_after_ms_; }
  const std::vector<std::string>& gauge_names() const noexcept { return gauge_names_; }
  std::uint64_t generation() const noexcept;
  BoardSlot* slot(std::uint32_t index) const noexcept {
    return index < capacity_ ? &slots_[index] : nullptr;
  }

  // ---- writer side (no lock, no system call) ----

  /// Claims a free slot for (worker_id, pid, start_time) and publishes state starting.
  /// Returns the slot index and the owner word to pass to update/leave, or false if every
  /// slot is taken (board full). worker_id is cut to 64 bytes by the caller's checks.
  bool join(const std::string& worker_id, std::uint32_t pid, std::uint64_t start_time,
            std::uint32_t* index, std::uint64_t* owner) noexcept;
  /// join() that first takes the slot's lock through `locks` (kept until leave or
  /// death), so that the kernel can tell when this owner dies. With `recover`, a slot
  /// that is not free but whose lock nobody holds (its owner died, even mid-claim) is
  /// taken over, except slots of `self_pid` (a process's own slots are its business).
  bool join_locked(const std::string& worker_id, std::uint32_t pid, std::uint64_t start_time,
                   const SlotLocks& locks, bool recover, std::uint32_t self_pid,
                   std::uint32_t* index, std::uint64_t* owner) noexcept;
  /// Whether the owner of live slot `index` is alive as far as the kernel knows (its
  /// lock is held by another open): 1 alive, 0 dead, -1 unknown.
  int owner_alive(std::uint32_t index, const SlotLocks& locks) const noexcept;
  /// Frees slot `index` if it is not free and its owner is dead by its lock (taken
  /// through `locks`, then released). True if this call freed it.
  bool recover_dead(std::uint32_t index, const SlotLocks& locks) noexcept;
  /// Publishes `v` (seqlock write). False if the slot is no longer ours (reclaimed).
  bool update(std::uint32_t index, std::uint64_t owner, const Values& v) noexcept;
  /// Frees our slot. False if it was no longer ours. With `locks`, drops the slot's
  /// lock too (after the slot stops being live, before it becomes free).
  bool leave(std::uint32_t index, std::uint64_t owner, const SlotLocks* locks = nullptr) noexcept;
  /// (pid, start_time) of every live slot, for the manager's death watches. Bounded by
  /// capacity; values are as a peer wrote them (the watcher checks them with the kernel).
  std::vector<std::pair<std::uint32_t, std::uint64_t>> owners() const;
  /// Frees every live slot of a (dead) process; returns how many.
  std::uint32_t reclaim(std::uint32_t pid, std::uint64_t start_time) noexcept;

  // ---- reader side (never blocks a writer, bounded) ----

  /// A consistent copy of slot `index`, `now_ns` deciding staleness. At most
  /// kReadRetries attempts; with `budget`, every retry also spends one unit of it and
  /// only one attempt is made once it is 0 (bounds a scan of many hostile slots).
  ReadStatus read(std::uint32_t index, std::uint64_t now_ns, Entry* out,
                  std::uint32_t* budget = nullptr) const noexcept;

  struct Pick {
    bool found = false;
    std::uint32_t index = 0;
    std::string worker_id;
    std::uint32_t candidates = 0;  ///< fresh, routable entries seen
    std::uint32_t unreadable = 0;  ///< slots given up after kReadRetries
    char id[kWorkerIdCapacity];    ///< the picked worker id (id_length bytes), no allocation
    std::uint32_t id_length = 0;
  };
  /// The seed's routing, in one O(capacity) pass: skip free, unreadable, stale, excluded
  /// and non-routable (starting, draining, shutdown) entries; prefer idle over busy,
  /// then the lowest queue + in_flight; among equal best entries take the
  /// (rotation mod count)-th, so that a rotation counter shares ties evenly.
  Pick least_loaded(std::uint64_t now_ns, std::uint64_t rotation,
                    const std::vector<std::string>& exclude) const;
  /// least_loaded() without exclusions, the router's hot path: fills id/id_length only
  /// (no allocation, no branch per consistent slot).
  Pick least_loaded_all(std::uint64_t now_ns, std::uint64_t rotation) const;
  /// The worker id of a live slot (consistent copy, bounded retries); false otherwise.
  bool read_id(std::uint32_t index, std::string* out) const;
  /// The same into `out` (kWorkerIdCapacity bytes), no allocation.
  bool read_id_into(std::uint32_t index, char* out, std::uint32_t* length) const noexcept;

 private:
  BoardHeader* header_ = nullptr;
  BoardSlot* slots_ = nullptr;
  std::uint32_t capacity_ = 0;
  std::uint64_t stale_after_ms_ = 0;
  std::vector<std::string> gauge_names_;
};

const char* state_name(std::uint32_t state) noexcept;  ///< "idle", ... or "unknown"

/// The writer's fast path, without a View (the C ABI's update): publishes `v` in `slot`
/// if its owner word is still `owner`. No lock, no system call (the clock is the vDSO).
bool update_slot(BoardSlot& slot, std::uint64_t owner, const Values& v) noexcept;
/// The writer's own last published values (only the slot's writer may call it: it is
/// the only one that changes them, so plain loads are consistent).
Values own_values(const BoardSlot& slot) noexcept;

/// JSON naming every constant, offset and size above (for the Elixir and Python tests).
std::string board_layout_description();

}  // namespace spshm::board
