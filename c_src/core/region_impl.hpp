// Internal: what a Region owns, shared by region.cpp (create, use) and region_open.cpp.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>

#include "arena.hpp"
#include "crypto.hpp"
#include "platform.hpp"
#include "region.hpp"
#include "runtime_index.hpp"

namespace spshm {

struct Region::Impl {
  std::string id;
  char stored_id[kRegionIdCapacity] = {};  ///< region_id bytes as in the header (AAD)
  BackendKind backend = BackendKind::posix;
  Role role = Role::created;
  bool writable = false;      ///< the data is mapped read-write
  bool header_shared = true;  ///< false: private copy-on-write view of the header
  bool encrypted = false;
  /// The data object is a hugetlbfs memfd (kFlagHugePages): a peer can free its pages
  /// (fallocate PUNCH_HOLE needs no write seal), and touching such a page again faults
  /// with SIGBUS when the host's hugetlb pool has no free page: accesses are guarded.
  bool huge = false;
  std::uint64_t size = 0;      ///< plaintext bytes, captured once: never re-read from the header
  std::uint64_t capacity = 0;  ///< bytes of the data area in use

  platform::Handle control;      ///< the object holding the header
  platform::Handle data_object;  ///< invalid when the data lives in `control`
  platform::Mapping header_map;  ///< header (or, on > 4 KiB pages, the whole object)
  platform::Mapping data_map;    ///< data area (invalid when header_map covers it)
  std::uint8_t* data = nullptr;  ///< start of the data area in this process

  /// The holder slot this Region's open owns (-1: none), and what serialises its changes
  /// (held for a few atomic operations and at most two fcntl calls, never for I/O).
  int slot = -1;
  std::mutex slot_mutex;

  crypto::Key key;
  /// Encrypted writes are read-modify-write of whole chunks: exclusive. Reads: shared.
  mutable std::shared_mutex crypt;

  /// Writes of this process hold it shared; seal() takes it exclusively, so a write that
  /// started before a seal finishes before the seal commits (never after).
  mutable std::shared_timed_mutex gate;
  std::mutex seal_mutex;  ///< one seal() at a time
  /// data_map is a writable mapping (false once sealed: then it is a read-only mapping of
  /// a read-only open, and nothing may be written through `data`).
  bool view_writable = false;
  /// Created with defer_chunks and not yet published (issue 12); chunks done so far.
  std::atomic<bool> unpublished{false};
  std::uint64_t chunks_initialised = 0;
  /// Created with defer_allocate (issue 12): the data object's pages up to `allocated`
  /// of `object_size` are allocated; publish() waits for all of them.
  bool allocation_deferred = false;
  std::uint64_t allocated = 0;
  std::uint64_t object_size = 0;
  bool memory_locked = false;  ///< lock_memory applied to the data (re-applied after a remap)
  /// The kernel forbids every write to the data (F_SEAL_WRITE seen): never goes back.
  mutable std::atomic<bool> immutable{false};
  /// A guarded access faulted: a peer truncated the object. Every later access fails.
  mutable std::atomic<bool> damaged{false};
  /// Encrypted regions: readers of this process sharing the cross-process data lock
  /// (kDataLockByte of the control object), counted so the last one unlocks it.
  mutable std::mutex data_lock_mutex;
  mutable int data_lock_readers = 0;
  /// Created memfd regions: the entry of the runtime index that lets workers find the
  /// region by bare id (removed on deallocation, at the latest with the Region).
  runtime_index::Published index_entry;

  /// Arena regions (arena.hpp): the arena whose chunk [base, base + chunk_length) this
  /// region is. `control` then holds the arena's descriptor *borrowed* (released, never
  /// closed, by ~Impl), header_map and data_map stay empty, and every lock byte is
  /// shifted by `base`. The creator's Impl gives the chunk back when it is destroyed.
  std::shared_ptr<Arena> arena;
  std::uint64_t base = 0;
  std::uint64_t chunk_length = 0;
  RegionHeader* arena_header = nullptr;
  /// A chunk of an arena, created here (arena set) or opened (open_arena_region: then
  /// `control` is this Region's own open of the arena and the maps are its own).
  bool arena_chunk = false;
  /// The removal of this arena region's runtime index entry was queued (unlink on
  /// deallocation): ~Impl does not queue it a second time.
  std::atomic<bool> index_removal_queued{false};
  /// release_arena_locks() ran (under slot_mutex): this open holds no lock of the chunk.
  bool arena_locks_released = false;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl();

  RegionHeader& header() noexcept {
    return arena_header != nullptr ? *arena_header
                                   : *reinterpret_cast<RegionHeader*>(header_map.data());
  }
  const platform::Handle& data_handle() const noexcept {
    return data_object.valid() ? data_object : control;
  }
  crypto::Binding binding() const noexcept { return crypto::Binding{stored_id, size}; }

  /// Captures id, sizes and flags from a validated header.
  void adopt(const RegionHeader& h) {
    std::memcpy(stored_id, h.region_id, kRegionIdCapacity);
    id.assign(h.region_id, strnlen(h.region_id, kRegionIdCapacity));
    backend = static_cast<BackendKind>(h.backend);
    encrypted = (h.flags & kFlagEncrypted) != 0;
    huge = (h.flags & kFlagHugePages) != 0;
    size = h.data_size;
    capacity = h.data_capacity;
  }
};

/// Checks that an opened object can be ours: a regular file / shm object (not_ours
/// otherwise) owned by our uid (not_ours, naming the owner). Returns its size and times.
Result<platform::ObjectInfo> check_our_object(const platform::Handle& handle,
                                              const std::string& what);

/// Takes the shared liveness lock (kLivenessLockByte) on `handle`, retrying for a moment
/// while a sweeper holds it exclusively (busy if it still does).
Result<void> take_liveness_lock(const platform::Handle& handle, const std::string& what);

/// Takes the shared lock of byte 0 of a split region's data object (every opener of a
/// data memfd holds it while the open or a mapping of it lives). busy for a moment while
/// the creator's warm pool holds the object (pool.hpp): then the region is gone.
Result<void> lock_data_object(const platform::Handle& data, const std::string& what);

/// True if `region_id` currently names the object behind `ours` (same device and inode).
/// Where the OS gives no identity (Windows: no names to remove), it says true.
bool names_our_object(const std::string& region_id, const platform::Handle& ours);

/// A private copy of a header (for validation without trusting shared memory).
struct HeaderCopy {
  alignas(RegionHeader) unsigned char bytes[sizeof(RegionHeader)];
  const RegionHeader& get() const noexcept { return *reinterpret_cast<const RegionHeader*>(bytes); }
};

/// The internal constructors of Region (a friend of it).
class RegionFactory {
 public:
  using Impl = Region::Impl;

  static Region make(std::unique_ptr<Impl> impl) noexcept { return Region(std::move(impl)); }

  /// Maps header and data of a single-object (POSIX) region whose handle is impl.control.
  /// The data is mapped shared, read-write iff impl.writable.
  static Result<void> map_single_object(Impl& impl, platform::Access header_access,
                                        platform::Sharing header_sharing);

  /// Opens an existing POSIX region by id (Region::open and the named create modes).
  static Result<Region> open_named(const std::string& region_id, bool writable, Role role);
  /// Opens a single-object region by path ("/dev/shm/spshm_...").
  static Result<Region> open_single_path(const std::string& path, const std::string& expected_id,
                                         bool writable);
  /// Opens a memfd region by the paths of its control and data memfds.
  static Result<Region> open_split(const OpenTarget& target, bool writable);
};

}  // namespace spshm
