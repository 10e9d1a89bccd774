// The seal lock (docs/FORMAT.md, "Locks" and "Sealing"): what tells a sealer killed
// mid-seal from a live one.
//
// A sealer takes byte kSealLockByte of the control object exclusively (an open file
// description lock, without waiting) BEFORE it sets kStateSealing and drops it only AFTER
// it has cleared the bit (or set kStateSealed). The kernel drops the lock the instant its
// open goes, SIGKILL included. So whoever finds kStateSealing set and obtains the seal
// lock itself knows the bit's setter is gone (no live sealer can hold the bit without the
// lock, and no new sealer can set it while we hold the lock): it clears the bit under the
// lock, then releases the lock. There is no window in which a live sealer's bit is
// cleared: the sealer's bit lives strictly inside its lock.
//
// One caveat the caller owns: a lock taken through the sealer's own open succeeds (OFD
// locks conflict between opens, not within one), so a caller must never try this through
// an open a seal of its own process may be using at that moment (Region serialises that
// with its seal mutex).
//
// Where the OS has no open file description locks (macOS, Windows) nothing can vouch for
// a sealer's death: a stale bit stays until a seal by a holder of the region commits or
// fails (it clears the bit either way), as before.
#include <atomic>

#include "format.hpp"
#include "header.hpp"
#include "platform.hpp"
#include "region.hpp"

namespace spshm {

namespace {
std::atomic<std::uint64_t> stale_seals{0};
}  // namespace

std::uint64_t stale_seals_cleared_total() noexcept {
  return stale_seals.load(std::memory_order_relaxed);
}

Result<bool> take_seal_lock(const platform::Handle& control, std::uint64_t lock_base) {
  if (!platform::has_ofd_locks()) return true;
  return platform::try_lock_exclusive(control, lock_base + kSealLockByte);
}

void drop_seal_lock(const platform::Handle& control, std::uint64_t lock_base) noexcept {
  if (platform::has_ofd_locks()) platform::unlock(control, lock_base + kSealLockByte);
}

bool clear_stale_sealing(RegionHeader& header, const platform::Handle& control,
                         std::uint64_t lock_base) noexcept {
  if ((header.state.load(std::memory_order_seq_cst) & kStateSealing) == 0) return true;
  if (!platform::has_ofd_locks() || !control.valid()) return false;
  try {
    auto got = platform::try_lock_exclusive(control, lock_base + kSealLockByte);
    if (!got || !*got) return false;  // a live sealer holds it (or we cannot tell)
    // Ours now: no sealer is alive that set the bit, and none can set it until we unlock.
    std::uint32_t before = header.state.fetch_and(~kStateSealing, std::memory_order_seq_cst);
    platform::unlock(control, lock_base + kSealLockByte);
    if (before & kStateSealing) stale_seals.fetch_add(1, std::memory_order_relaxed);
    return true;
  } catch (...) {
    return false;
  }
}

}  // namespace spshm
