// The reaper: a thread of the NIF that destroys what takes time to destroy (munmap and
// close of large regions: about 0.1 s per GiB, page by page), so that no scheduler does
// it. A resource destructor runs on whatever scheduler garbage collects the last
// reference, usually a normal one, where it must not stall; deallocate_plain/2 runs on a
// normal scheduler too. Small things are destroyed in place (queueing costs more).
#pragma once

#include <cstdint>

#include "region.hpp"

namespace spshm::nif {

/// Regions (or detached data areas) at least this large go to the reaper thread.
inline constexpr std::uint64_t kReapThreshold = std::uint64_t{1} << 20;

/// Starts the thread (load/upgrade). False if it cannot: everything is then destroyed
/// in place, as before.
bool start_reaper();
/// Drains the queue and joins the thread (unload).
void stop_reaper();

/// Destroys `region` here if small, on the reaper thread otherwise.
void dispose(Region&& region) noexcept;
/// The same for a detached data area (Region::detach_data()).
void dispose(Region::DetachedData&& data) noexcept;

}  // namespace spshm::nif
