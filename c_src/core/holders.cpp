// The holder table: lock-free, shared between processes through the header.
//
// Slot protocol (every step an atomic on the shared header, seq_cst):
//   claim:    slot_state free -> busy (CAS); write pid, start_time, count = 1, flags;
//             slot_state = live.
//   add:      on a live slot of the same (pid, start_time): count c -> c + 1 by CAS, only
//             while c > 0 (a count that reached 0 belongs to a releaser freeing the slot).
//   remove:   count c -> c - 1 by CAS; whoever takes it to 0 moves the slot live -> busy,
//             clears it, and sets it free.
// The header refcount moves by the same amounts right after, so at rest it equals the sum
// of all counts. A process that registers from several threads at once may end up with
// more than one slot; its counts add up and release()/release_all() handle every slot.
//
// Sealing (region.cpp) and writable holds exclude each other Dekker-style: hold() first
// publishes kHolderWritable, then reads the state; seal() first sets kStateSealed, then
// reads every slot's flags. With seq_cst on both sides at least one of them sees the
// other, so a writable hold never coexists with a seal.
#include <atomic>

#include "region.hpp"

namespace spshm {

namespace {

constexpr auto kOrder = std::memory_order_seq_cst;

std::uint32_t slot_count(const RegionHeader& h) noexcept {
  return h.holder_capacity < kHolderCapacity ? h.holder_capacity : kHolderCapacity;
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

/// Frees a slot whose count this caller took to zero.
void free_slot(HolderSlot& s) noexcept {
  std::uint32_t live = kSlotLive;
  if (!s.slot_state.compare_exchange_strong(live, kSlotBusy, kOrder)) return;
  s.flags.store(0, kOrder);
  __atomic_store_n(&s.pid, 0u, __ATOMIC_RELEASE);
  __atomic_store_n(&s.start_time, std::uint64_t{0}, __ATOMIC_RELEASE);
  s.slot_state.store(kSlotFree, kOrder);
}

/// Adds one hold to an existing live slot of the process; false if there is none.
bool add_to_existing(RegionHeader& h, std::uint32_t pid, std::uint64_t start_time,
                     bool writable) noexcept {
  for (std::uint32_t i = 0; i < slot_count(h); ++i) {
    HolderSlot& s = h.holders[i];
    if (!belongs_to(s, pid, start_time)) continue;
    std::uint32_t c = s.count.load(kOrder);
    while (c > 0 && !s.count.compare_exchange_weak(c, c + 1, kOrder)) {
    }
    if (c == 0) continue;  // being released: look further or claim a new slot
    if (writable) s.flags.fetch_or(kHolderWritable, kOrder);
    return true;
  }
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
    s.count.store(1, kOrder);
    s.flags.store(writable ? kHolderWritable : 0, kOrder);
    s.slot_state.store(kSlotLive, kOrder);
    return true;
  }
  return false;
}

/// Removes one hold; false if the process has none.
bool remove_one(RegionHeader& h, std::uint32_t pid, std::uint64_t start_time) noexcept {
  for (std::uint32_t i = 0; i < slot_count(h); ++i) {
    HolderSlot& s = h.holders[i];
    if (!belongs_to(s, pid, start_time)) continue;
    std::uint32_t c = s.count.load(kOrder);
    while (c > 0 && !s.count.compare_exchange_weak(c, c - 1, kOrder)) {
    }
    if (c == 0) continue;
    if (c == 1) free_slot(s);
    return true;
  }
  return false;
}

}  // namespace

Result<void> hold(RegionHeader& header, std::uint32_t pid, std::uint64_t start_time,
                  bool writable) {
  if (pid == 0) return Error{Errc::invalid_argument, 0, "holder pid must not be 0"};
  std::uint32_t state = header.state.load(kOrder);
  if (state & kStateDeallocated)
    return Error{Errc::deallocated, 0, "cannot hold a region that has been deallocated"};
  if (writable && (state & kStateSealed))
    return Error{Errc::sealed, 0, "the region is sealed: map it read_only"};

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
  if ((state & kStateDeallocated) || (writable && (state & kStateSealed))) {
    (void)release(header, pid, start_time);
    if (state & kStateDeallocated)
      return Error{Errc::deallocated, 0, "the region was deallocated while mapping it"};
    return Error{Errc::sealed, 0, "the region was sealed while mapping it: map it read_only"};
  }
  return {};
}

Result<void> release(RegionHeader& header, std::uint32_t pid, std::uint64_t start_time) {
  if (!remove_one(header, pid, start_time))
    return Error{Errc::not_found, 0,
                 "process " + std::to_string(pid) + " holds no reference to this region"};
  refcount_sub(header, 1);
  changed(header);
  return {};
}

std::uint32_t release_all(RegionHeader& header, std::uint32_t pid, std::uint64_t start_time) {
  std::uint32_t released = 0;
  for (std::uint32_t i = 0; i < slot_count(header); ++i) {
    HolderSlot& s = header.holders[i];
    if (!belongs_to(s, pid, start_time)) continue;
    std::uint32_t c = s.count.exchange(0, kOrder);
    released += c;
    free_slot(s);
  }
  if (released > 0) refcount_sub(header, released);
  changed(header);
  return released;
}

std::vector<HolderInfo> holders(const RegionHeader& header) {
  std::vector<HolderInfo> out;
  for (std::uint32_t i = 0; i < slot_count(header); ++i) {
    const HolderSlot& s = header.holders[i];
    if (s.slot_state.load(kOrder) != kSlotLive) continue;
    HolderInfo info{load_pid(s), load_start(s), s.count.load(kOrder),
                    (s.flags.load(kOrder) & kHolderWritable) != 0};
    if (info.count > 0) out.push_back(info);
  }
  return out;
}

}  // namespace spshm
