// A region: the OS objects behind it, mapped once into this process.
//
// Region is move-only and owns the control object, the data object (the same object
// unless the backend splits them) and one mapping of each. It is plain C++: the NIF,
// the C ABI and the tests all use it. Policy (who may map, when to free) lives in the
// Elixir manager; this class only does what it is told, safely, and reports typed errors.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "error.hpp"
#include "format.hpp"
#include "platform.hpp"

namespace spshm {

/// How a well-known name is opened (from the bpftime refactoring): one enum, and role
/// queries instead of scattered comparisons.
enum class OpenMode {
  create,             ///< create; fail with already_exists if the name exists
  open_only,          ///< open an existing region; fail with not_found otherwise
  create_or_open,     ///< open if it exists, else create
  remove_and_create,  ///< unlink any existing segment of ours with that name, then create
};
bool may_create(OpenMode mode) noexcept;         ///< create, create_or_open, remove_and_create
bool may_open_existing(OpenMode mode) noexcept;  ///< open_only, create_or_open
bool removes_first(OpenMode mode) noexcept;      ///< remove_and_create

/// Huge pages for the data of a memfd region (MFD_HUGETLB, from the host's hugetlb pool).
enum class HugePages {
  off,        ///< ordinary pages
  automatic,  ///< huge pages when the host has enough free ones, else ordinary pages, silently
  on,         ///< huge pages or no_space / unsupported, saying why
};

/// What actually happened when a Region was obtained.
enum class Role { created, opened };

struct CreateOptions {
  BackendKind backend = BackendKind::memfd;
  std::string name;  ///< empty: random unguessable id; else a well-known name
  OpenMode open_mode = OpenMode::create;
  std::uint64_t size = 0;            ///< user bytes, > 0
  std::uint32_t mode = 0600;         ///< permission bits applied with fchmod (POSIX)
  std::uint32_t security_level = 0;  ///< 0 standard, 1 high, 2 maximum (recorded in the header)
  bool encrypted = false;            ///< chunked XChaCha20-Poly1305 layout, key generated here
  bool lock_memory = false;          ///< mlock + MADV_DONTDUMP; mlock_failed if it cannot
  std::string metadata_json;         ///< <= kMetadataCapacity bytes, stored verbatim
  std::uint64_t idle_timeout_ns = 0;
  bool worker_output = false;  ///< kFlagWorkerOutput: made by a worker for adopt_region/2
  /// Encrypted only: create() leaves the chunks uninitialised and the header unpublished;
  /// the creator calls initialise_chunks() in slices, then publish() (issue 12: no call
  /// keeps a core busy for the whole encryption of a large region).
  bool defer_chunks = false;
  /// Memfd regions without lock_memory (encrypted ones only with defer_chunks, whose
  /// chunks are then initialised once every page is allocated): create() sizes the data object but
  /// does not allocate its pages, and leaves the header unpublished; the creator calls
  /// allocate_range() in slices, then publish() (issue 12: one fallocate of a large
  /// object keeps a core busy for tens of milliseconds). Ignored elsewhere (and for a
  /// data object taken from the warm pool, already allocated: publish() at once).
  bool defer_allocate = false;
  /// Carve the region out of this process's arenas (arena.hpp) when it qualifies: memfd,
  /// unnamed, standard security (not encrypted, no lock_memory), mode 0600, and a chunk
  /// that fits an arena. Otherwise (or where arenas are unsupported) a dedicated region
  /// is made as if `arena` were false. The size threshold is the caller's policy.
  bool arena = false;
  HugePages huge_pages = HugePages::off;  ///< memfd only; sizes round up to the huge page size
};

/// True if create() would carve a region with these options out of an arena.
bool arena_eligible(const CreateOptions& options) noexcept;

/// Where to find an existing region.
struct OpenTarget {
  std::string region_id;     ///< POSIX/Windows: enough on its own
  std::string control_path;  ///< memfd: /proc/<pid>/fd/<n> of the control memfd (or a POSIX path)
  std::string data_path;     ///< memfd: /proc/<pid>/fd/<n> of the data memfd
};

/// A copy of a header taken at one instant (offline inspection, info, listing).
struct HolderInfo {
  std::uint32_t pid;
  std::uint64_t start_time;
  std::uint32_t count;
  bool writable;
};

struct HeaderSnapshot {
  std::string region_id;
  BackendKind backend;
  std::uint32_t format_version;
  std::uint64_t data_size, data_capacity, data_offset;
  std::uint32_t flags, state, security_level, refcount;
  std::uint32_t creator_pid;
  std::uint64_t creator_start_time;
  std::array<std::uint8_t, 16> boot_id;
  std::uint64_t created_at_ns, last_access_ns, idle_timeout_ns;
  std::string metadata_json;
  std::string data_name;  ///< the header's data_name ("" unless a pooled data memfd)
  std::vector<HolderInfo> holders;
  bool creator_alive;  ///< same boot, pid alive with the same start time (for display)
  /// Some open of the control object holds its liveness lock (inspect(): asked of the
  /// kernel; a snapshot of a mapped Region: true). What sweeps decide on.
  bool in_use = true;
};

class Region {
 public:
  /// Creates (or opens, per options.open_mode) a region: random id from the CSPRNG,
  /// O_CREAT|O_EXCL (retry on EEXIST), fchmod, posix_fallocate, header written and CRC'd,
  /// seals F_SEAL_SHRINK|F_SEAL_GROW on memfds, key generated and chunks initialised
  /// when encrypted. Runs in time proportional to size (fallocate, encryption): call it
  /// off any latency-sensitive thread for large sizes. Creating adds no hold. A memfd
  /// region larger than MemAvailable fails with no_space (rather than OOM later). When a
  /// named region is opened (open_only / create_or_open finding one), the existing
  /// region's own size, flags and metadata apply and options.size etc. are ignored;
  /// role() says which happened.
  static Result<Region> create(const CreateOptions& options);

  /// Opens an existing region of ours and validates its header. `writable` false maps
  /// read-only. Never follows symlinks (except /proc/<pid>/fd/<n> links to memfds named
  /// spshm_*); refuses objects owned by another uid (not_ours); deallocated if the header
  /// says so; sealed when asking to write a sealed region. Waits up to 1 s for a named
  /// region whose creator is still writing its header.
  static Result<Region> open(const OpenTarget& target, bool writable);

  Region(Region&&) noexcept;
  Region& operator=(Region&&) noexcept;
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  ~Region();  ///< munmap and close; never unlinks

  const std::string& id() const noexcept;
  BackendKind backend() const noexcept;
  Role role() const noexcept;
  bool writable() const noexcept;
  bool encrypted() const noexcept;
  /// A region created with defer_chunks: initialises chunks [first, first + count) (in
  /// order: `first` is the number already done), returns how many are left after them.
  /// invalid_argument when not deferred, already published, or out of order. Until
  /// publish(), reads and writes answer busy and other processes cannot open it.
  Result<std::uint64_t> initialise_chunks(std::uint64_t first, std::uint64_t count);
  /// A region created with defer_allocate: allocates the pages of its data object from
  /// `offset` (where the previous call ended) for at most `max_bytes`, and returns where
  /// the next call starts (the object's size once done: then publish()). no_space when
  /// memory runs out. invalid_argument when not deferred, published, or out of order.
  Result<std::uint64_t> allocate_range(std::uint64_t offset, std::uint64_t max_bytes);
  /// Publishes the header of a deferred region once every chunk is initialised (and,
  /// with defer_allocate, every page allocated).
  Result<void> publish();
  std::uint64_t size() const noexcept;      ///< user bytes (plaintext size)
  std::uint64_t capacity() const noexcept;  ///< bytes of the data area in use

  RegionHeader& header() noexcept;
  const RegionHeader& header() const noexcept;
  std::uint8_t* data() noexcept;  ///< start of the data area in this process
  const std::uint8_t* data() const noexcept;

  /// Paths another process of the same uid opens: "/dev/shm/spshm_x" for POSIX (both),
  /// "/proc/<pid>/fd/<n>" of each memfd.
  std::string control_path() const;
  std::string data_path() const;

  /// The 32-byte key of an encrypted region created (or given use_key) here, else nullptr.
  /// Lives in sodium_malloc'd memory; zeroed when the Region is destroyed.
  const std::uint8_t* key() const noexcept;
  /// Gives a Region opened by another process the 32-byte key of its encrypted region
  /// (invalid_argument if the region is not encrypted, tampered if the key does not
  /// authenticate chunk 0). The key is copied into sodium_malloc'd memory.
  Result<void> use_key(const std::uint8_t* key);

  /// False only for a POSIX region opened read-only whose object refuses writers (mode
  /// 0400 after seal, and we are not root): header() is then a private copy-on-write view,
  /// so hold()/release() on it would only change this process's copy. Check before holding.
  bool header_writable() const noexcept;

  /// Seals, in two phases. Sealing: sets kStateSealing (writers that honour the header
  /// refuse with busy), refuses with busy if another live process holds it writable, and
  /// waits (up to 30 s) for the writes of this process already running. Commit: memfd:
  /// remaps this process's view of the data read-only (from a read-only open), then
  /// F_SEAL_WRITE, which the kernel refuses (busy, and the view is made writable again)
  /// while any process maps the data writable; POSIX/Windows/macOS: mode 0400 (not
  /// enforced against processes of our uid). Only then kStateSealed, never cleared.
  /// Call it off latency-sensitive threads (it may wait). Idempotent. permission_denied
  /// through a read-only handle, deallocated after deallocate(), unsupported on kernels
  /// without memfd seals.
  Result<void> seal();
  /// Clears a kStateSealing bit left by a sealer that was killed mid-seal (another
  /// process, or another open): only if nobody holds the seal lock (seal_lock.cpp) and no
  /// seal of this Region is running. True if the bit is clear on return. Never blocks.
  /// write() calls it when it finds the bit; the warm pool and tests may too.
  bool clear_stale_sealing() const noexcept;
  /// Waits up to `wait` for a seal of this process being committed (it holds the view's
  /// gate while it remaps) to end, woken by its unlock: true once no commit runs. Blocks:
  /// call it off the normal schedulers. A zeroing deallocate() refused busy "being
  /// sealed" calls it and retries, instead of polling.
  bool await_seal_commit(std::chrono::milliseconds wait) const;
  /// The header says sealed (committed; for POSIX that is a promise, not a kernel fact).
  bool sealed() const noexcept;
  /// The kernel forbids every write to the data, by anyone (memfd F_SEAL_WRITE, asked of
  /// the kernel with F_GET_SEALS, never of the header): the only case where the bytes may
  /// be handed out without copying. Always false for POSIX, Windows and macOS regions.
  bool immutable() const noexcept;
  /// A guarded access faulted: a peer truncated the (POSIX) segment; every access fails
  /// with truncated from then on.
  bool damaged() const noexcept;

  /// Marks the header deallocated, zeroes the data with sodium_memzero when `zero`, and
  /// removes the name (POSIX shm_unlink; memfd: nothing to remove). Memory is returned
  /// to the OS when the last mapping or descriptor anywhere is gone. Idempotent. Zeroing
  /// needs a read-write handle (permission_denied otherwise).
  Result<void> deallocate(bool zero);

  /// deallocate(zero) in steps, so that no call zeroes more than a bounded amount:
  /// mark_deallocated() sets kStateDeallocated (every later read and write of any process
  /// is refused), zero_slice() zeroes up to `max_bytes` of the data area from `offset` and
  /// returns where the next slice starts (capacity() when done: also at once when a
  /// kernel seal forbids writing), unlink() removes the name. zero_slice waits up to
  /// 100 ms for a seal of this process being committed (call it off the normal
  /// schedulers), then answers busy (retry); it refuses a region not marked first.
  Result<void> mark_deallocated(bool zero);
  Result<std::uint64_t> zero_slice(std::uint64_t offset, std::uint64_t max_bytes);

  /// Removes only the name (remove_and_create, orphan cleanup through a live handle).
  Result<void> unlink();
  /// The same, unless another open holds the region (its liveness lock: another VM or a
  /// worker opened it meanwhile, a named region); then the name stays for a sweep to
  /// judge once they are gone. Where there are no OFD locks the name always stays.
  Result<void> unlink_unless_held();

  /// Bounds-checked copies in and out of the data area, decrypting/encrypting chunks of
  /// encrypted regions (tampered on a failed tag). Writes refuse sealed, and busy while a
  /// seal is being committed. Thread-safe; never wait. Encrypted regions: writes of one
  /// Region are serialised, and across processes each write holds the data lock
  /// (kDataLockByte) exclusively and each read of an unsealed region shared: busy on
  /// conflict (Linux). POSIX segments: the copy is guarded (platform::run_guarded), so a
  /// peer's truncation gives truncated instead of SIGBUS once the NIF installed the guard.
  /// With `wait` false, an encrypted region whose in-process lock another call holds
  /// answers busy at once instead of waiting (callers on threads that must not block
  /// retry elsewhere).
  Result<void> write(std::uint64_t offset, const std::uint8_t* src, std::size_t length,
                     bool wait = true);
  Result<void> read(std::uint64_t offset, std::uint8_t* dst, std::size_t length,
                    bool wait = true) const;

  /// One hold of process (pid, start_time) through this Region's own open of the control
  /// object (hold_on): its slot dies with this Region, also if the process is killed.
  Result<void> hold(std::uint32_t pid, std::uint64_t start_time, bool writable);
  /// Removes one hold taken with hold() (not_found if none is left).
  Result<void> release();
  /// Frees the slots of dead holders (reap_dead_slots); returns the holds released.
  std::uint32_t reap_dead_holders();

  /// The data area's memory in this process, detached from its Region by detach_data():
  /// destroying it unmaps (and for a memfd closes) it, which for a large region takes
  /// time (about 0.1 s per GiB): the NIF hands it to a reaper thread.
  struct DetachedData {
    platform::Mapping mapping;
    platform::Handle object;
    std::uint64_t bytes = 0;
  };
  /// Ends this process's use of the data area at once (after deallocate(): nobody here
  /// may read it any more), so that its memory goes back to the OS now rather than when
  /// the Region is destroyed. The header stays mapped (holds are released through it).
  /// data() is null afterwards; the caller guarantees no access is in flight.
  DetachedData detach_data() noexcept;

  /// Arena regions created by this process, once deallocated (the NIF calls it when it
  /// retires the data, no access in flight): gives back this open's locks on the chunk now
  /// instead of when the Region is destroyed at the next garbage collection. Every OFD
  /// lock operation on the arena walks all the lock records of the arena, so the records
  /// of freed regions waiting for a collection (two each: the liveness byte and the kept
  /// slot) slowed every create and map of the VM (bench/FINDINGS.md, section 3a). One
  /// fcntl drops the liveness lock and, if the slot holds no hold, the kept slot's lock.
  /// The chunk's bytes stay reserved until the Region is destroyed (a stale handle may
  /// still read them); it is given back then, once no other open holds its liveness byte
  /// (ArenaSet::retire, as before). Idempotent; no-op for other regions.
  void release_arena_locks() noexcept;

  /// Records the access time in the header (map/read/write).
  void touch() noexcept;

  /// Arena regions: the control block's offset in the arena (0 for a dedicated region),
  /// which a worker needs with control_path() to find the region.
  std::uint64_t control_offset() const noexcept;
  bool in_arena() const noexcept;

 private:
  struct Impl;
  friend class RegionFactory;  // internal (region_impl.hpp): builds Regions from an Impl
  explicit Region(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
};

/// Opens the region whose control block sits `control_offset` bytes into the arena at
/// `path` (a /proc/<pid>/fd/<n> link to a memfd named spshm_arena_*), as another VM or
/// the mix tasks do: its own open of the arena (the liveness lock at the chunk's offset
/// is taken before anything is read), the header page and the data pages mapped, the
/// header validated against what is left of the arena and, when `expected_id` is not
/// empty, its id checked (not_found otherwise: the chunk was reused).
Result<Region> open_arena_region(const std::string& path, std::uint64_t control_offset,
                                 const std::string& expected_id, bool writable);

// ---- holders (atomic, lock-free, safe between processes) ----

/// Adds one hold of process (pid, start_time): increments its slot count (claiming a
/// free slot if needed) and the header refcount. holder_table_full if no slot is free;
/// deallocated on a deallocated region; sealed for a writable hold on a sealed region,
/// also when the seal races this call (the hold is then taken back). Lock-free.
/// The header must be writable in this process (see Region::header_writable()).
Result<void> hold(RegionHeader& header, std::uint32_t pid, std::uint64_t start_time, bool writable);
/// Removes one hold; not_found if the process holds none.
Result<void> release(RegionHeader& header, std::uint32_t pid, std::uint64_t start_time);
/// Removes every hold of a (dead) process; returns how many holds were released.
std::uint32_t release_all(RegionHeader& header, std::uint32_t pid, std::uint64_t start_time);
std::vector<HolderInfo> holders(const RegionHeader& header);

// ---- the seal lock (seal_lock.cpp; docs/FORMAT.md "Locks", "Sealing") ----

/// Takes the seal lock (byte kSealLockByte + lock_base of the control object, exclusive,
/// without waiting) through the open `control`: false if another open holds it (a live
/// sealer). Always true where the OS has no open file description locks.
Result<bool> take_seal_lock(const platform::Handle& control, std::uint64_t lock_base = 0);
void drop_seal_lock(const platform::Handle& control, std::uint64_t lock_base = 0) noexcept;
/// Clears a kStateSealing bit left by a sealer that died mid-seal: if the bit is set and
/// the seal lock can be taken through `control` (a read-write open of the control object
/// that no seal of this process is using), nobody is sealing: the bit is cleared under the
/// lock. True if the bit is clear on return; false while a live sealer holds the lock,
/// where the OS has no OFD locks, or on error. Never blocks.
bool clear_stale_sealing(RegionHeader& header, const platform::Handle& control,
                         std::uint64_t lock_base = 0) noexcept;
/// Stale kStateSealing bits cleared by this process (clear_stale_sealing).
std::uint64_t stale_seals_cleared_total() noexcept;

// ---- holder slots owned by an open file description (what the NIF and Python use) ----

/// Adds one hold through `lock`, an open of the control object. `slot` is that open's
/// slot (-1: none yet): the first hold claims one (a free slot, else a dead one whose
/// lock nobody holds, recovered) and keeps the slot's lock byte (kSlotLockBase + i)
/// until its last hold is released, so the slot dies with the open. Needs a read-write
/// `lock` on Linux. Callers serialise hold_on/release_on of one open.
/// `first_slot`: where a claim starts looking (modulo the slot count): a worker starts
/// at one derived from its pid, so that it does not try (one lock system call each) the
/// slots the VM's own opens keep locked from slot 0 on.
Result<void> hold_on(RegionHeader& header, const platform::Handle& lock, int& slot,
                     std::uint32_t pid, std::uint64_t start_time, bool writable,
                     std::uint64_t lock_base = 0, std::uint32_t first_slot = 0);
/// Removes one hold of the open's slot; frees the slot at zero, and its lock too unless
/// `keep_lock`: then the open keeps the (free) slot's lock and `slot`, and its next
/// hold_on takes the same slot back without a lock system call (the NIF: every BEAM
/// mapping's 0 <-> 1 transition would otherwise cost two fcntl calls). A free slot whose
/// lock is kept is skipped by other claimers (their try-lock fails) and by reapers (it
/// is free); it is released with the open (close of the control object).
/// `lock_base`: where the control block starts in the object behind `lock` (an arena
/// chunk's offset; 0 for a dedicated control object): every lock byte is shifted by it.
Result<void> release_on(RegionHeader& header, const platform::Handle& lock, int& slot,
                        std::uint64_t lock_base = 0, bool keep_lock = false);
/// True if an open's `slot` (-1: none) holds no hold: a slot whose lock release_on kept
/// (keep_lock) may then be given up with its lock.
bool kept_slot_is_free(const RegionHeader& header, int slot) noexcept;
/// Frees every claimed slot other than `own_slot` whose lock nobody holds (its owner is
/// dead, killed at any instant). Returns the holds released. Linux only (0 elsewhere).
std::uint32_t reap_dead_slots(RegionHeader& header, const platform::Handle& lock, int own_slot,
                              std::uint64_t lock_base = 0);
/// The holds of dead holders this process released since it started: every release of
/// reap_dead_slots and every dead slot claim_locked took over (whoever called them).
std::uint64_t reaped_holds_total() noexcept;
/// The number of holds: the sum of the counts of every claimed slot (the header's
/// refcount field is only a hint kept for readers of format version 1).
std::uint32_t reference_count(const RegionHeader& header);

// ---- header validation and inspection ----

/// zlib CRC-32 (the same as Python's zlib.crc32).
std::uint32_t crc32(const void* data, std::size_t length, std::uint32_t seed = 0) noexcept;
std::uint32_t header_crc(const RegionHeader& header) noexcept;

/// Checks magic, version, header size, reserved bytes, CRC, and that the data fits in an
/// object of `data_object_size` bytes (pass the control object size for POSIX). With
/// `what` (the object's path or "segment <name>"), an error names it: the id field of a
/// header that failed its magic or version check cannot be trusted to.
Result<void> validate_header(const RegionHeader& header, std::uint64_t data_object_size,
                             const std::string& what = {});

/// Opens `path` read-only without following symlinks (except /proc/<pid>/fd/<n> links to
/// memfds named spshm_*), checks it is a regular file of our uid (not_ours otherwise),
/// reads its header without mapping it and validates it (a memfd control object: only
/// its own consistency, its data being elsewhere). Never modifies anything.
Result<HeaderSnapshot> inspect(const std::string& path);
HeaderSnapshot snapshot(const RegionHeader& header);

/// What sweep_segment() did.
enum class SweepOutcome {
  removed,             ///< ours, unused, with a valid header: the name was removed
  removed_incomplete,  ///< ours, unused, never got a header (creator died): removed
  in_use,              ///< some open holds its liveness lock (or the name now names another object)
  young,               ///< header-less and unused, but created less than kCreationGraceNs ago
};

/// Removes the POSIX segment `region_id` if, and only if, it is ours (well-formed id, a
/// regular file of our uid, a valid header naming that id, or no header yet) and no open
/// of it anywhere holds its liveness lock. The check and the removal run under this
/// call's exclusive lock of the liveness byte, so no opener can start using the segment
/// in between (an opener that opened the name before the removal sees it gone once it
/// has its lock). A segment mode 0400 (sealed) cannot be opened for writing: it is then
/// checked with F_OFD_GETLK, which leaves a window of a few system calls. A header
/// without kFlagLivenessLocks (an older writer, whose users take no locks) is in use
/// while its creator lives (pid, start time, boot id). A header-less segment is removed
/// only once unlocked and untouched for 10 s. Never blocks (FIFOs and other non-files
/// are refused: not_ours). A damaged header: corrupt.
/// With `dry_run`, says what it would do and removes nothing.
Result<SweepOutcome> sweep_segment(const std::string& region_id, bool dry_run = false);

/// sweep_segment(), which, when it removed the segment and held its liveness byte
/// exclusively, hands the open object over in `keep` instead of closing it (its last
/// close would free every page at once: 0.1 s per GiB in one call). Free its pages with
/// release_unlinked_pages(), or close it.
Result<SweepOutcome> sweep_segment_keeping(const std::string& region_id, bool dry_run,
                                           platform::Handle* keep);
/// Frees up to `max_bytes` of the pages of an object sweep_segment_keeping() handed over,
/// from byte `released` on (advanced), and returns the bytes left; at 0 the object is
/// closed. One call frees a bounded amount (~1 ms per 8 MiB).
Result<std::uint64_t> release_unlinked_pages(platform::Handle& object, std::uint64_t max_bytes,
                                             std::uint64_t& released);

/// Unlinks the POSIX segment `region_id` only if it is ours: a well-formed id, a regular
/// file of our uid, and a valid header naming that id, or no header at all (smaller than
/// one or zero magic) and untouched for 10 s (a creator that died half-way). A damaged
/// header is left alone (corrupt). Whether the region is still in use is the caller's
/// policy (orphan cleanup).
Result<void> unlink_segment(const std::string& region_id);

// ---- encryption (libsodium XChaCha20-Poly1305-IETF per chunk) ----

std::uint64_t encrypted_capacity(std::uint64_t plaintext_size) noexcept;

// ---- processes ----

std::uint32_t self_pid() noexcept;
/// Field 22 of /proc/<pid>/stat; not_found if the process does not exist.
Result<std::uint64_t> process_start_time(std::uint32_t pid);
std::array<std::uint8_t, 16> boot_id();
/// True if the process exists with this start time on this boot.
bool process_alive(std::uint32_t pid, std::uint64_t start_time);

// ---- ids and names ----

/// "spshm_" + 20 base32 characters (100 bits from the OS CSPRNG).
std::string random_region_id();
/// Checks a well-known name: 1..21 chars of [a-z0-9_-] (so "/spshm_n_" + name <= 30).
Result<void> validate_name(const std::string& name);
/// Region id of a named region: "spshm_n_" + name.
std::string named_region_id(const std::string& name);
/// Checks a region id: ^spshm_[a-z2-7]{20}$ or ^spshm_n_[a-z0-9_-]{1,21}$.
Result<void> validate_region_id(const std::string& region_id);
/// Ids of every POSIX segment of ours (name starting with kNamePrefix) in /dev/shm
/// (or the directory set by set_segment_dir()).
std::vector<std::string> list_segments();

// ---- where POSIX segments live (shm_path) ----

/// The directory of POSIX segments: "/dev/shm" unless set_segment_dir() moved it; ""
/// where segments are not files (macOS, Windows).
std::string segment_dir();
/// Moves POSIX segments of this process (create, open, unlink, list, paths in refs) to
/// `dir`, an existing absolute directory (normally a tmpfs). unsupported off Linux.
Result<void> set_segment_dir(const std::string& dir);
struct FilesystemSpace {
  std::uint64_t total = 0;      ///< bytes
  std::uint64_t free = 0;       ///< bytes free (for root)
  std::uint64_t available = 0;  ///< bytes free for unprivileged users
  bool tmpfs = false;           ///< memory-backed (Linux TMPFS_MAGIC)
};
/// Size and free space of the filesystem holding `path` (statvfs), and whether it is a
/// tmpfs. unsupported on Windows.
Result<FilesystemSpace> filesystem_space(const std::string& path);

}  // namespace spshm
