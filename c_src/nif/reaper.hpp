// The reaper: a thread of the NIF that destroys what takes time to destroy (munmap and
// close of large regions: about 0.1 s per GiB, page by page), so that no scheduler does
// it. A resource destructor runs on whatever scheduler garbage collects the last
// reference, usually a normal one, where it must not stall; deallocate_plain/2 runs on a
// normal scheduler too. Small things are destroyed in place (queueing costs more).
#pragma once

#include <cstddef>
#include <cstdint>

#include "region.hpp"

namespace spshm::nif {

/// Regions (or detached data areas) at least this large go to the reaper thread.
inline constexpr std::uint64_t kReapThreshold = std::uint64_t{1} << 20;

/// The reaper unmaps a large data area this many bytes at a time (~1-2 ms of munmap
/// when its pages were touched), and sleeps kReapPauseNs each time it has spent
/// kReapWorkNs of CPU since its last pause (pieces and items alike; see paced()).
inline constexpr std::size_t kReapPiece = std::size_t{16} << 20;
inline constexpr std::uint64_t kReapPauseNs = 1'000'000;
inline constexpr std::uint64_t kReapWorkNs = 1'000'000;

/// What the reaper did since the library was loaded (tests, bench): pieces of mappings
/// unmapped, pieces of data objects whose pages it freed, the pause it takes after
/// each kReapWorkNs of CPU.
struct ReaperCounts {
  std::uint64_t pieces_unmapped = 0;
  std::uint64_t pieces_released = 0;
  std::uint64_t pause_ns = 0;
  std::uint64_t pauses = 0;  ///< pauses taken (one per kReapWorkNs of CPU, roughly)
};
ReaperCounts reaper_counts() noexcept;

/// Starts the thread (load/upgrade). False if it cannot: everything is then destroyed
/// in place, as before.
bool start_reaper();
/// Drains the queue and joins the thread (unload).
void stop_reaper();

/// Destroys `region` here if small, on the reaper thread otherwise.
void dispose(Region&& region) noexcept;
/// A region marked deallocated whose zeroing stopped at `zero_from` (its caller died):
/// zeroes the rest in slices, removes its name, then destroys it (on the reaper thread,
/// or here if the thread is not running).
void dispose_zeroing(Region&& region, std::uint64_t zero_from) noexcept;
/// dispose_zeroing, then the name removed only if no other open holds the region when
/// `unless_held` (a creation never registered: another VM may have opened the name).
void dispose_unlinking(Region&& region, std::uint64_t zero_from, bool unless_held) noexcept;
/// Bytes one slice of zeroing covers (deallocate in slices; ~1 ms of memset).
inline constexpr std::uint64_t kZeroSlice = std::uint64_t{16} << 20;

/// Runs `fn(arg)` on the reaper thread (here if it is not running): work that opens a
/// path, asked for from a resource destructor.
void run_on_reaper(void (*fn)(void*), void* arg) noexcept;

/// The same for a detached data area (Region::detach_data()).
void dispose(Region::DetachedData&& data) noexcept;

}  // namespace spshm::nif
