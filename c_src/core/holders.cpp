// The holder table: lock-free, shared between processes through the header.
//
// Each slot's `count` (+16) and `flags` (+20) form one aligned 64-bit word, changed only
// by 64-bit compare-and-swap. `flags` carries the writable bit (bit 0) and, in bits 8-31,
// the slot's incarnation, bumped every time the slot is claimed. A CAS on the word thus
// fails if the slot was freed and claimed again since it was read (the ABA problem: without
// the incarnation, a hold could land on the slot of another process that reused it).
//
//   claim:    slot_state free -> busy (CAS); write pid, start_time; word = (1, next
//             incarnation | writable); slot_state = live.
//   add:      read the word, then check the slot is live and is (pid, start_time), then
//             CAS word (c, f) -> (c + 1, f | writable), only while c > 0 (a count that
//             reached 0 belongs to a releaser freeing the slot).
//   remove:   the same with (c, f) -> (c - 1, f); whoever takes the count to 0 moves the
//             slot live -> busy, clears it (keeping the incarnation) and sets it free.
// The header refcount moves by the same amounts right after, so at rest it equals the sum
// of all counts. A process that registers from several threads at once may end up with
// more than one slot; its counts add up and release()/release_all() handle every slot.
//
// Sealing (region.cpp) and writable holds exclude each other Dekker-style: hold() first
// publishes the writable bit, then reads the state; seal() first sets kStateSealing, then
// reads every slot's flags. With seq_cst on both sides at least one of them sees the
// other, so a writable hold never coexists with a seal.
#include <atomic>
#include <cstddef>

#include "guard.hpp"
#include "header.hpp"
#include "park.hpp"
#include "platform.hpp"
#include "region.hpp"

namespace spshm {

namespace {
/// Holds of dead holders released by this process (reap_dead_slots, dead slots taken
/// over by claim_locked): the one place every such release passes through.
std::atomic<std::uint64_t> reaped_total{0};
}  // namespace

std::uint64_t reaped_holds_total() noexcept { return reaped_total.load(std::memory_order_relaxed); }

namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the header is little-endian");
static_assert(offsetof(HolderSlot, count) % 8 == 0, "count+flags must be one aligned word");
static_assert(offsetof(HolderSlot, flags) == offsetof(HolderSlot, count) + 4);

constexpr auto kOrder = std::memory_order_seq_cst;
constexpr std::uint32_t kIncarnationShift = 8;
constexpr std::uint32_t kIncarnationMask = 0xFFFFFF00u;

struct Word {
  std::uint32_t count;
  std::uint32_t flags;
  std::uint64_t raw() const noexcept { return std::uint64_t{flags} << 32 | count; }
  static Word of(std::uint64_t raw) noexcept {
    return Word{static_cast<std::uint32_t>(raw), static_cast<std::uint32_t>(raw >> 32)};
  }
};

// count and flags are std::atomic<uint32_t> in the struct (what other readers see); the
// holder protocol updates both at once through the 64-bit word they form.
std::uint64_t* word_address(const HolderSlot& s) noexcept {
  return reinterpret_cast<std::uint64_t*>(const_cast<std::atomic<std::uint32_t>*>(&s.count));
}
Word load_word(const HolderSlot& s) noexcept {
  return Word::of(__atomic_load_n(word_address(s), __ATOMIC_SEQ_CST));
}
bool cas_word(HolderSlot& s, Word& expected, Word desired) noexcept {
  std::uint64_t raw = expected.raw();
  bool done = __atomic_compare_exchange_n(word_address(s), &raw, desired.raw(), false,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  if (!done) expected = Word::of(raw);
  return done;
}
void store_word(HolderSlot& s, Word w) noexcept {
  __atomic_store_n(word_address(s), w.raw(), __ATOMIC_SEQ_CST);
}

std::uint32_t slot_count(const RegionHeader& h) noexcept {
  return h.holder_capacity < kHolderCapacity ? h.holder_capacity : kHolderCapacity;
}

/// holder_capacity is written once, before the header is published, and never changed:
/// any other value means that another process overwrote the control block (a raw write
/// past a neighbour's end in an arena, a scribble), and its holder table means nothing.
/// Said as such: with no slot to claim, the caller would otherwise be told that 64 live
/// processes hold the region and to retry, which never helps.
Result<void> check_holder_table(const RegionHeader& h) {
  if (h.holder_capacity == kHolderCapacity) return {};
  return Error{Errc::corrupt, 0,
               "its control block was overwritten by another process (holder_capacity is " +
                   std::to_string(h.holder_capacity) + ", written " +
                   std::to_string(kHolderCapacity) +
                   " at creation and never changed): its holder table cannot be used and "
                   "retrying will not help. Deallocate the region (its data may be damaged "
                   "too) and find the process that writes into memory that is not its own"};
}

std::uint32_t load_pid(const HolderSlot& s) noexcept {
  return __atomic_load_n(&s.pid, __ATOMIC_ACQUIRE);
}
std::uint64_t load_start(const HolderSlot& s) noexcept {
  return __atomic_load_n(&s.start_time, __ATOMIC_ACQUIRE);
}

bool belongs_to(const HolderSlot& s, std::uint32_t pid, std::uint64_t start_time) noexcept {
  return s.slot_state.load(kOrder) == kSlotLive && load_pid(s) == pid &&
         load_start(s) == start_time;
}

void changed(RegionHeader& h) noexcept { h.holders_generation.fetch_add(1, kOrder); }

/// Subtracts from the refcount without wrapping below zero (a damaged header must not
/// turn into a huge count).
void refcount_sub(RegionHeader& h, std::uint32_t n) noexcept {
  std::uint32_t current = h.refcount.load(kOrder);
  std::uint32_t next;
  do {
    next = current > n ? current - n : 0;
  } while (!h.refcount.compare_exchange_weak(current, next, kOrder));
}

/// Frees a live slot whose count was just taken to zero (by this caller).
void free_slot(HolderSlot& s) noexcept {
  std::uint32_t live = kSlotLive;
  if (!s.slot_state.compare_exchange_strong(live, kSlotBusy, kOrder)) return;
  Word w = load_word(s);
  store_word(s, Word{0, w.flags & kIncarnationMask});
  __atomic_store_n(&s.pid, 0u, __ATOMIC_RELEASE);
  __atomic_store_n(&s.start_time, std::uint64_t{0}, __ATOMIC_RELEASE);
  s.slot_state.store(kSlotFree, kOrder);
}

/// Changes the count of a live slot of (pid, start_time) by `delta` (+1 or -1) while it
/// is positive. Returns the new count, or -1 if the slot is not (or no longer) theirs.
long change_count(HolderSlot& s, std::uint32_t pid, std::uint64_t start_time, int delta,
                  std::uint32_t add_flags) noexcept {
  Word w = load_word(s);  // first the word, then the identity: see the ABA note above
  if (!belongs_to(s, pid, start_time)) return -1;
  for (;;) {
    if (w.count == 0) return -1;  // being freed
    Word next{w.count + static_cast<std::uint32_t>(delta), w.flags | add_flags};
    if (cas_word(s, w, next)) return next.count;
    // The word changed. Same incarnation: just retry; another one: not ours any more.
    if (!belongs_to(s, pid, start_time)) return -1;
  }
}

/// Adds one hold to an existing live slot of the process; false if there is none.
bool add_to_existing(RegionHeader& h, std::uint32_t pid, std::uint64_t start_time,
                     bool writable) noexcept {
  std::uint32_t add = writable ? kHolderWritable : 0;
  for (std::uint32_t i = 0; i < slot_count(h); ++i)
    if (change_count(h.holders[i], pid, start_time, +1, add) > 0) return true;
  return false;
}

bool claim_free(RegionHeader& h, std::uint32_t pid, std::uint64_t start_time,
                bool writable) noexcept {
  for (std::uint32_t i = 0; i < slot_count(h); ++i) {
    HolderSlot& s = h.holders[i];
    std::uint32_t expected = kSlotFree;
    if (s.slot_state.load(kOrder) != kSlotFree ||
        !s.slot_state.compare_exchange_strong(expected, kSlotBusy, kOrder))
      continue;
    __atomic_store_n(&s.pid, pid, __ATOMIC_RELEASE);
    __atomic_store_n(&s.start_time, start_time, __ATOMIC_RELEASE);
    std::uint32_t incarnation = (load_word(s).flags + (1u << kIncarnationShift)) & kIncarnationMask;
    store_word(s, Word{1, incarnation | (writable ? kHolderWritable : 0)});
    s.slot_state.store(kSlotLive, kOrder);
    return true;
  }
  return false;
}

/// Removes one hold; false if the process has none.
bool remove_one(RegionHeader& h, std::uint32_t pid, std::uint64_t start_time) noexcept {
  for (std::uint32_t i = 0; i < slot_count(h); ++i) {
    HolderSlot& s = h.holders[i];
    long left = change_count(s, pid, start_time, -1, 0);
    if (left < 0) continue;
    if (left == 0) free_slot(s);
    return true;
  }
  return false;
}

}  // namespace

Result<void> hold(RegionHeader& header, std::uint32_t pid, std::uint64_t start_time,
                  bool writable) {
  return guarded([&]() -> Result<void> {
    if (pid == 0) return Error{Errc::invalid_argument, 0, "holder pid must not be 0"};
    if (auto r = check_holder_table(header); !r) return r.error();
    std::uint32_t state = header.state.load(kOrder);
    if (state & kStateDeallocated)
      return Error{Errc::deallocated, 0, "cannot hold a region that has been deallocated"};
    if (writable && (state & (kStateSealed | kStateSealing)))
      return Error{Errc::sealed, 0,
                   (state & kStateSealed) ? "the region is sealed: map it read_only"
                                          : "the region is being sealed: map it read_only"};

    if (!add_to_existing(header, pid, start_time, writable) &&
        !claim_free(header, pid, start_time, writable))
      return Error{Errc::holder_table_full, 0,
                   "all " + std::to_string(kHolderCapacity) +
                       " holder slots of the region are in use: unmap it in other processes "
                       "(or have the manager release dead holders) and retry"};
    header.refcount.fetch_add(1, kOrder);
    changed(header);

    // Second look, after our hold is published (see the Dekker note above).
    state = header.state.load(kOrder);
    if ((state & kStateDeallocated) || (writable && (state & (kStateSealed | kStateSealing)))) {
      (void)release(header, pid, start_time);
      if (state & kStateDeallocated)
        return Error{Errc::deallocated, 0, "the region was deallocated while mapping it"};
      return Error{Errc::sealed, 0, "the region was sealed while mapping it: map it read_only"};
    }
    return {};
  });
}

Result<void> release(RegionHeader& header, std::uint32_t pid, std::uint64_t start_time) {
  return guarded([&]() -> Result<void> {
    if (!remove_one(header, pid, start_time))
      return Error{Errc::not_found, 0,
                   "process " + std::to_string(pid) + " holds no reference to this region"};
    refcount_sub(header, 1);
    changed(header);
    return {};
  });
}

std::uint32_t release_all(RegionHeader& header, std::uint32_t pid, std::uint64_t start_time) {
  std::uint32_t released = 0;
  bool any = false;
  for (std::uint32_t i = 0; i < slot_count(header); ++i) {
    HolderSlot& s = header.holders[i];
    Word w = load_word(s);
    if (!belongs_to(s, pid, start_time)) continue;
    while (w.count > 0 && !cas_word(s, w, Word{0, w.flags})) {
    }
    released += w.count;
    any = true;
    // Frees the slot also when its count was already 0: a releaser of this (dead)
    // process died between taking the count to 0 and freeing the slot.
    free_slot(s);
  }
  if (released > 0) refcount_sub(header, released);
  // Only a real change of the table bumps the generation: generation > 0 means "held at
  // least once", which frees :reference_counted regions whose count is back to zero.
  if (any) changed(header);
  return released;
}

// ---- slots owned by an open file description ----
//
// The functions above key a slot by (pid, start time): a process killed between two
// steps of a transition leaves the slot `busy`, or a count that no live process will
// ever take back, and only a PID says whether its owner lives. The functions below are
// what the NIF and the Python client use: each open file description of the control
// object (one Region, one attach) owns at most one slot and holds that slot's lock byte
// (kSlotLockBase + i, shifted by the arena chunk offset) exclusively from before it touches the
// slot until after it freed it. Whoever takes a slot's lock owns the slot, whatever state the
// previous owner left it in: the kernel drops the lock of a dead process at once, so a slot can
// never stay busy or counted after its owner died, and no PID is trusted (PID namespaces, reuse).

namespace {

/// Makes slot i, whose lock this open now holds, ours with one hold. Returns the count a
/// dead owner left in it (recovered), or -1 if the slot could not be taken (a claimer of
/// the pid-keyed functions, which take no locks, got it first).
long take_locked_slot(RegionHeader& h, std::uint32_t i, std::uint32_t pid, std::uint64_t start_time,
                      bool writable) noexcept {
  HolderSlot& s = h.holders[i];
  long recovered = 0;
  std::uint32_t state = kSlotFree;
  if (!s.slot_state.compare_exchange_strong(state, kSlotBusy, kOrder)) {
    // Left busy or live by an owner whose lock is gone: it is dead, the slot is ours.
    s.slot_state.store(kSlotBusy, kOrder);
    recovered = load_word(s).count;
  }
  __atomic_store_n(&s.pid, pid, __ATOMIC_RELEASE);
  __atomic_store_n(&s.start_time, start_time, __ATOMIC_RELEASE);
  std::uint32_t incarnation = (load_word(s).flags + (1u << kIncarnationShift)) & kIncarnationMask;
  store_word(s, Word{1, incarnation | (writable ? kHolderWritable : 0)});
  test_park("claim");  // busy, counted, writable flag set: the worst instant to die
  s.slot_state.store(kSlotLive, kOrder);
  return recovered;
}

/// Clears slot i (its lock held by the caller) and makes it free; returns its count.
std::uint32_t clear_locked_slot(HolderSlot& s) noexcept {
  s.slot_state.store(kSlotBusy, kOrder);
  Word w = load_word(s);
  store_word(s, Word{0, w.flags & kIncarnationMask});
  __atomic_store_n(&s.pid, 0u, __ATOMIC_RELEASE);
  __atomic_store_n(&s.start_time, std::uint64_t{0}, __ATOMIC_RELEASE);
  s.slot_state.store(kSlotFree, kOrder);
  return w.count;
}

/// Claims a slot for this open: free slots first, then dead ones. Returns its index.
Result<int> claim_locked(RegionHeader& h, const platform::Handle& lock, std::uint32_t pid,
                         std::uint64_t start_time, bool writable, std::uint64_t lock_base,
                         std::uint32_t first_slot) {
  bool ofd = platform::has_ofd_locks();
  const std::uint32_t count = slot_count(h);
  for (int pass = 0; pass < (ofd ? 2 : 1); ++pass) {
    for (std::uint32_t k = 0; k < count; ++k) {
      const std::uint32_t i = (first_slot + k) % count;
      bool free = h.holders[i].slot_state.load(kOrder) == kSlotFree;
      if (free != (pass == 0)) continue;
      auto got = platform::try_lock_exclusive(lock, lock_base + kSlotLockBase + i);
      if (!got) return got.error();
      if (!*got) continue;  // a live open owns it
      long recovered = take_locked_slot(h, i, pid, start_time, writable);
      if (recovered < 0) {
        platform::unlock(lock, lock_base + kSlotLockBase + i);
        continue;
      }
      if (recovered > 0) {
        refcount_sub(h, static_cast<std::uint32_t>(recovered));
        reaped_total.fetch_add(static_cast<std::uint64_t>(recovered), std::memory_order_relaxed);
      }
      return static_cast<int>(i);
    }
  }
  return Error{Errc::holder_table_full, 0,
               "all " + std::to_string(kHolderCapacity) +
                   " holder slots of the region are in use by live processes: unmap it in "
                   "some of them and retry"};
}

/// Takes back slot i, free and still locked by this open since its last release with
/// keep_lock (no lock system call). False if the slot is not free any more (a claimer of
/// the pid-keyed functions, which take no locks, got it).
bool retake_kept_slot(RegionHeader& h, std::uint32_t i, std::uint32_t pid, std::uint64_t start_time,
                      bool writable) noexcept {
  HolderSlot& s = h.holders[i];
  std::uint32_t state = kSlotFree;
  if (!s.slot_state.compare_exchange_strong(state, kSlotBusy, kOrder)) return false;
  __atomic_store_n(&s.pid, pid, __ATOMIC_RELEASE);
  __atomic_store_n(&s.start_time, start_time, __ATOMIC_RELEASE);
  std::uint32_t incarnation = (load_word(s).flags + (1u << kIncarnationShift)) & kIncarnationMask;
  store_word(s, Word{1, incarnation | (writable ? kHolderWritable : 0)});
  s.slot_state.store(kSlotLive, kOrder);
  return true;
}

bool owns_live_slot(const RegionHeader& h, int slot) noexcept {
  if (slot < 0 || static_cast<std::uint32_t>(slot) >= slot_count(h)) return false;
  const HolderSlot& s = h.holders[slot];
  return s.slot_state.load(kOrder) == kSlotLive && load_word(s).count > 0;
}

}  // namespace

Result<void> hold_on(RegionHeader& header, const platform::Handle& lock, int& slot,
                     std::uint32_t pid, std::uint64_t start_time, bool writable,
                     std::uint64_t lock_base, std::uint32_t first_slot) {
  return guarded([&]() -> Result<void> {
    if (pid == 0) return Error{Errc::invalid_argument, 0, "holder pid must not be 0"};
    if (auto r = check_holder_table(header); !r) return r.error();
    std::uint32_t state = header.state.load(kOrder);
    if (state & kStateDeallocated)
      return Error{Errc::deallocated, 0, "cannot hold a region that has been deallocated"};
    if (writable && (state & kStateSealed))
      return Error{Errc::sealed, 0, "the region is sealed: map it read_only"};

    // Live, counted and (pid, start time)'s: a slot this open kept free (keep_lock) may
    // have been claimed meanwhile by a caller of the pid-keyed functions, which take no
    // lock; never add to theirs.
    if (owns_live_slot(header, slot) && belongs_to(header.holders[slot], pid, start_time)) {
      HolderSlot& s = header.holders[slot];
      Word w = load_word(s);
      std::uint32_t add = writable ? kHolderWritable : 0;
      while (!cas_word(s, w, Word{w.count + 1, w.flags | add})) {
      }
    } else if (slot < 0 || static_cast<std::uint32_t>(slot) >= slot_count(header) ||
               !retake_kept_slot(header, static_cast<std::uint32_t>(slot), pid, start_time,
                                 writable)) {
      if (slot >= 0) {
        // Our kept slot was taken (a pid-keyed claimer) or is not free: give its lock back.
        platform::unlock(lock, lock_base + kSlotLockBase + static_cast<std::uint64_t>(slot));
        slot = -1;
      }
      auto claimed = claim_locked(header, lock, pid, start_time, writable, lock_base, first_slot);
      if (!claimed) return claimed.error();
      slot = *claimed;
    }
    header.refcount.fetch_add(1, kOrder);
    changed(header);

    state = header.state.load(kOrder);
    if ((state & kStateDeallocated) || (writable && (state & kStateSealed))) {
      (void)release_on(header, lock, slot, lock_base);
      if (state & kStateDeallocated)
        return Error{Errc::deallocated, 0, "the region was deallocated while mapping it"};
      return Error{Errc::sealed, 0, "the region was sealed while mapping it: map it read_only"};
    }
    return {};
  });
}

Result<void> release_on(RegionHeader& header, const platform::Handle& lock, int& slot,
                        std::uint64_t lock_base, bool keep_lock) {
  return guarded([&]() -> Result<void> {
    if (!owns_live_slot(header, slot)) {
      if (slot >= 0)
        platform::unlock(lock, lock_base + kSlotLockBase + static_cast<std::uint64_t>(slot));
      slot = -1;
      return Error{Errc::not_found, 0, "this process holds no reference to this region"};
    }
    HolderSlot& s = header.holders[slot];
    Word w = load_word(s);
    while (w.count > 0 && !cas_word(s, w, Word{w.count - 1, w.flags})) {
    }
    if (w.count == 0) return Error{Errc::not_found, 0, "no hold left to release"};
    refcount_sub(header, 1);
    if (w.count == 1) {
      test_park("release");
      clear_locked_slot(s);
      if (!keep_lock) {
        platform::unlock(lock, lock_base + kSlotLockBase + static_cast<std::uint64_t>(slot));
        slot = -1;
      }
    }
    changed(header);
    return {};
  });
}

bool kept_slot_is_free(const RegionHeader& header, int slot) noexcept {
  return slot < 0 || !owns_live_slot(header, slot);
}

std::uint32_t reap_dead_slots(RegionHeader& header, const platform::Handle& lock, int own_slot,
                              std::uint64_t lock_base) {
  if (!platform::has_ofd_locks()) return 0;
  std::uint32_t released = 0;
  bool any = false;
  for (std::uint32_t i = 0; i < slot_count(header); ++i) {
    if (static_cast<int>(i) == own_slot) continue;
    HolderSlot& s = header.holders[i];
    if (s.slot_state.load(kOrder) == kSlotFree) continue;
    auto got = platform::try_lock_exclusive(lock, lock_base + kSlotLockBase + i);
    if (!got || !*got) continue;  // its owner lives (or we cannot tell: keep it)
    if (s.slot_state.load(kOrder) != kSlotFree) {
      released += clear_locked_slot(s);
      any = true;
    }
    platform::unlock(lock, lock_base + kSlotLockBase + i);
  }
  if (released > 0) {
    refcount_sub(header, released);
    reaped_total.fetch_add(released, std::memory_order_relaxed);
  }
  if (any) changed(header);
  return released;
}

std::uint32_t reference_count(const RegionHeader& header) {
  std::uint32_t total = 0;
  for (std::uint32_t i = 0; i < slot_count(header); ++i) {
    const HolderSlot& s = header.holders[i];
    if (s.slot_state.load(kOrder) != kSlotFree) total += load_word(s).count;
  }
  return total;
}

std::uint32_t other_writable_holder(const RegionHeader& h, std::uint32_t self,
                                    const platform::Handle* lock, std::uint64_t lock_base) {
  for (std::uint32_t i = 0; i < slot_count(h); ++i) {
    const HolderSlot& s = h.holders[i];
    std::uint32_t state = s.slot_state.load(kOrder);
    if (state == kSlotFree) continue;
    // A busy slot is being claimed (its flags may already say writable: count it) or
    // freed (pid already 0, or flags already cleared).
    if (!(load_word(s).flags & kHolderWritable)) continue;
    std::uint32_t pid = load_pid(s);
    if (pid == 0 || pid == self) continue;
    if (state == kSlotLive && !process_alive(pid, load_start(s))) continue;  // died holding
    // Left busy by a claimer killed mid-claim: its slot lock is gone (pid-keyed claimers,
    // which take no lock, are mid-claim for a few stores and re-check the seal after).
    if (state == kSlotBusy && lock != nullptr && platform::has_ofd_locks()) {
      auto held = platform::lock_is_held(*lock, lock_base + kSlotLockBase + i);
      if (held && !*held) continue;
    }
    return pid;
  }
  return 0;
}

std::vector<HolderInfo> holders(const RegionHeader& header) {
  std::vector<HolderInfo> out;
  for (std::uint32_t i = 0; i < slot_count(header); ++i) {
    const HolderSlot& s = header.holders[i];
    if (s.slot_state.load(kOrder) != kSlotLive) continue;
    Word w = load_word(s);
    HolderInfo info{load_pid(s), load_start(s), w.count, (w.flags & kHolderWritable) != 0};
    if (info.count > 0) out.push_back(info);
  }
  return out;
}

}  // namespace spshm
