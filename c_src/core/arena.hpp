// Arenas: small regions carved out of a few large memfds (docs/FORMAT.md, "Arenas").
//
// An arena is one memfd of a fixed size, sealed F_SEAL_SHRINK | F_SEAL_GROW at creation
// (so no SIGBUS can ever come from it), mapped once read-write by its creator. A small
// region is a *chunk* of it: one page holding a RegionHeader (the control block, the
// same layout and meaning as a dedicated region's header) followed by the data, page
// aligned. Locks of the region (liveness, holder slots) lie at the chunk's offset
// within the arena (byte chunk + 0, chunk + 256 + i), so every user of a chunk holds
// exactly what it would hold on a dedicated control object, shifted.
//
// The allocator's bookkeeping lives in this process's private memory, never in the
// arena: a worker that can write the arena cannot corrupt what the VM allocates with
// (see ARCHITECTURE.md, "Arenas", for why this is not a Boost segment manager).
// Only the process that created an arena allocates in it, under the ArenaSet's mutex.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "error.hpp"
#include "platform.hpp"
#include "region.hpp"

namespace spshm {

class Arena;

/// One region's place in an arena: handed out by ArenaSet::allocate, given back by
/// ArenaSet::retire (exactly once).
struct ArenaChunk {
  std::shared_ptr<Arena> arena;
  std::uint64_t offset = 0;  ///< of the control block in the arena (page aligned)
  std::uint64_t length = 0;  ///< control block + data, page aligned
};

class Arena {
 public:
  Arena(platform::Handle fd, platform::Mapping map, std::string name) noexcept;
  ~Arena();
  const platform::Handle& handle() const noexcept { return fd_; }
  std::uint8_t* base() const noexcept { return map_.data(); }
  std::uint64_t size() const noexcept { return map_.size(); }
  const std::string& name() const noexcept { return name_; }

 private:
  friend class ArenaSet;
  platform::Handle fd_;
  platform::Mapping map_;
  std::string name_;
  std::map<std::uint64_t, std::uint64_t> free_;                   ///< offset -> length of free runs
  std::vector<std::pair<std::uint64_t, std::uint64_t>> pending_;  ///< retired, still opened
  std::uint64_t live_ = 0;                                        ///< chunks handed out
  std::chrono::steady_clock::time_point empty_since_{};
};

/// What `stats` and the tests read.
struct ArenaStats {
  std::uint64_t arenas = 0;          ///< arenas mapped now
  std::uint64_t arena_bytes = 0;     ///< their total size
  std::uint64_t live_chunks = 0;     ///< regions carved out now
  std::uint64_t pending_chunks = 0;  ///< freed, still opened by a worker: not reusable yet
  std::uint64_t created = 0;         ///< arenas ever created
  std::uint64_t returned = 0;        ///< arenas ever returned to the OS
};

class ArenaSet {
 public:
  /// `arena_bytes`: size of each new arena (rounded up to a page, at least 1 MiB);
  /// `grace`: how long an empty arena is kept before it is returned to the OS.
  void configure(std::uint64_t arena_bytes, std::chrono::milliseconds grace);

  /// A chunk of `length` bytes (page multiple, at most the arena size), zero filled. Adds
  /// an arena when none has room (growth never resizes a mapped arena).
  Result<ArenaChunk> allocate(std::uint64_t length);

  /// Gives back a chunk whose region this process no longer uses. The caller has dropped
  /// its slot lock and still holds its shared liveness lock (through the arena's open),
  /// which this converts or drops. The chunk is reusable once no other open of the arena
  /// (a worker) holds a lock on its liveness byte: checked now, and again later for the
  /// chunks that were still in use (`pending`).
  void retire(ArenaChunk chunk) noexcept;

  /// retire() for a chunk on which this process holds no lock any more (its Region gave
  /// them back at deallocation: Region::release_arena_locks): one F_OFD_GETLK says
  /// whether another open still holds its liveness byte, instead of an exclusive lock
  /// and its unlock.
  void retire_unlocked(ArenaChunk chunk) noexcept;

  /// Reclaims pending chunks whose workers have gone, and returns arenas empty for longer
  /// than the grace period to the OS. Cheap when nothing changed; call it periodically.
  /// Returns the number of arenas returned.
  std::uint32_t maintain();

  ArenaStats stats();

  std::uint64_t arena_bytes();

 private:
  bool reclaim(Arena& arena, std::uint64_t offset, std::uint64_t length) noexcept;
  void give_back(Arena& arena, std::uint64_t offset, std::uint64_t length) noexcept;
  void insert_free(Arena& arena, std::uint64_t offset, std::uint64_t length) noexcept;
  void reclaim_pending_locked(Arena& arena) noexcept;
  std::uint32_t drop_empty_locked(bool force_all_but_one);

  std::mutex mutex_;
  std::vector<std::shared_ptr<Arena>> arenas_;
  std::uint64_t arena_bytes_ = 2u << 20;  // the :arena_size default (config.ex)
  std::chrono::milliseconds grace_{30000};
  std::uint64_t created_ = 0, returned_ = 0;
};

/// One region found in an arena by inspect_arena.
struct ArenaEntry {
  std::uint64_t control_offset = 0;
  HeaderSnapshot snapshot;
};

/// Offline inspection of an arena (the mix tasks, another VM): opens `path` read-only
/// (a /proc/<pid>/fd/<n> link to a memfd named spshm_arena_*), checks it is ours, walks
/// its chunks with pread (a published control block names its capacity and the next
/// chunk follows it; anything else is skipped a page at a time) and returns every valid
/// control block, deallocated ones included. `in_use` says whether some open holds the
/// chunk's liveness lock. Never maps, never modifies anything.
Result<std::vector<ArenaEntry>> inspect_arena(const std::string& path);

/// The ArenaSet of this process (the VM's: only the NIF creates arena regions).
ArenaSet& process_arenas();

/// Size of the chunk of a region whose data area is `capacity` bytes: one page of control
/// block plus the data rounded up to a page.
std::uint64_t arena_chunk_length(std::uint64_t capacity) noexcept;

/// True where arenas work: Linux (memfd, OFD locks) with 4 KiB pages (the control block
/// is exactly one page, so the data starts on a page boundary).
bool arenas_supported() noexcept;

}  // namespace spshm
