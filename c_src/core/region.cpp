// Region: creation and everything done with a Region once it exists. OS-neutral: every
// system call goes through platform.hpp. Opening an existing region: region_open.cpp.
#include "region.hpp"
#include "guard.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <type_traits>

#include "crypto.hpp"
#include "header.hpp"
#include "ids.hpp"
#include "park.hpp"
#include "platform.hpp"
#include "pool.hpp"
#include "region_impl.hpp"

namespace spshm {

using platform::Access;
using platform::Sharing;

namespace {

constexpr int kCreateAttempts = 8;

std::uint64_t round_up_to_page(std::uint64_t n) noexcept {
  std::uint64_t page = platform::page_size();
  return (n + page - 1) / page * page;
}

Result<void> check_create_options(const CreateOptions& o) {
  if (o.size == 0) return Error{Errc::invalid_argument, 0, "region size must be at least 1 byte"};
  if (o.size > kMaxDataSize)
    return Error{Errc::too_large, 0,
                 "region size " + std::to_string(o.size) + " exceeds the maximum of " +
                     std::to_string(kMaxDataSize) + " bytes"};
  if (o.metadata_json.size() > kMetadataCapacity)
    return Error{Errc::invalid_argument, 0,
                 "metadata is " + std::to_string(o.metadata_json.size()) +
                     " bytes of JSON, more than the " + std::to_string(kMetadataCapacity) +
                     " the header holds: store large metadata in the region itself"};
  if (o.security_level > 2)
    return Error{Errc::invalid_argument, 0,
                 "security_level must be 0 (standard), 1 (high) or 2 (maximum), got " +
                     std::to_string(o.security_level)};
  if (o.mode & ~0777u)
    return Error{Errc::invalid_argument, 0,
                 "mode may only hold permission bits (0777), got 0" + std::to_string(o.mode)};
  if ((o.mode & 0400u) == 0)
    return Error{Errc::invalid_argument, 0,
                 "mode must let the owner read the region (0400 at least)"};
  bool named = !o.name.empty();
  if (named) {
    if (auto r = validate_name(o.name); !r) return r;
  }
  if (o.huge_pages == HugePages::on && o.backend != BackendKind::memfd)
    return Error{Errc::invalid_argument, 0,
                 "huge_pages: true needs backend :memfd (a huge-page memfd); POSIX segments "
                 "live on /dev/shm, which has no huge pages"};
  switch (o.backend) {
    case BackendKind::posix:
    case BackendKind::windows:
      if (o.backend != platform::named_backend())
        return Error{Errc::unsupported, 0,
                     std::string("backend :") +
                         (o.backend == BackendKind::posix ? "posix" : "windows") +
                         " is not available on this OS: use backend :" +
                         (o.backend == BackendKind::posix ? "windows" : "posix")};
      return {};
    case BackendKind::memfd:
      if (o.huge_pages == HugePages::on && (o.lock_memory || o.encrypted))
        return Error{Errc::invalid_argument, 0,
                     "huge_pages: true is for :standard (unencrypted) regions only"};
      if (named)
        return Error{Errc::invalid_argument, 0,
                     "named regions need backend :posix (a memfd has no name others can find)"};
      if (o.mode & 0077u)
        return Error{Errc::invalid_argument, 0,
                     "group/other permissions need backend :posix (memfd regions are "
                     "owner-only)"};
      return {};
  }
  return Error{Errc::invalid_argument, 0, "unknown backend"};
}

std::uint64_t capacity_for(const CreateOptions& o) noexcept {
  return o.encrypted ? encrypted_capacity(o.size) : o.size;
}

/// Bytes of the single object of a named region: header, then the data in whole pages.
std::uint64_t named_object_size(const CreateOptions& o) noexcept {
  return kHeaderSize + round_up_to_page(capacity_for(o));
}

/// Removes a half-created named segment unless creation completes (dismiss()).
class NameGuard {
 public:
  explicit NameGuard(std::string id) : id_(std::move(id)) {}
  ~NameGuard() {
    if (armed_) (void)platform::unlink_named(id_);
  }
  NameGuard(const NameGuard&) = delete;
  NameGuard& operator=(const NameGuard&) = delete;
  void dismiss() noexcept { armed_ = false; }

 private:
  std::string id_;
  bool armed_ = true;
};

/// Writes header (and encrypted chunks) into a freshly mapped region, then publishes it.
Result<void> fill_new_region(RegionFactory::Impl& impl, const CreateOptions& o, bool named,
                             const std::string& data_name = {}, bool huge = false) {
  if (o.lock_memory) {
    if (auto r = platform::lock_memory(impl.data, impl.capacity); !r) return r;
    impl.memory_locked = true;
  }
  HeaderInit init;
  init.region_id = impl.id;
  init.backend = impl.backend;
  bool split = impl.backend == BackendKind::memfd && !impl.arena;
  init.flags = (o.encrypted ? kFlagEncrypted : 0) | (named ? kFlagNamed : 0) |
               (split ? kFlagSplitData : 0) | (impl.arena ? kFlagArena : 0) |
               (o.worker_output ? kFlagWorkerOutput : 0) |
               (platform::has_ofd_locks() ? kFlagLivenessLocks : 0) | (huge ? kFlagHugePages : 0);
  init.security_level = o.security_level;
  init.data_size = o.size;
  init.data_capacity = impl.capacity;
  init.data_offset = split ? 0 : kHeaderSize;
  init.metadata_json = o.metadata_json;
  init.idle_timeout_ns = o.idle_timeout_ns;
  init.data_name = data_name;
  RegionHeader& h = impl.header();
  init_header(h, init);
  impl.adopt(h);
  if (o.encrypted) {
    auto key = crypto::Key::generate();
    if (!key) return key.error();
    impl.key = std::move(*key);
    if (o.defer_chunks) {  // initialise_chunks() in slices, then publish()
      impl.unpublished.store(true);
      return {};
    }
    if (auto r = crypto::initialise_chunks(impl.binding(), impl.key.data(), impl.data); !r)
      return r;
  }
  if (impl.allocation_deferred) {  // allocate_range() in slices, then publish()
    impl.unpublished.store(true);
    return {};
  }
  publish_header(h);
  return {};
}

Result<Region> build_posix(platform::Handle handle, const std::string& id, const CreateOptions& o) {
  NameGuard guard(id);
  auto impl = std::make_unique<RegionFactory::Impl>();
  impl->id = id;
  impl->backend = platform::named_backend();
  impl->role = Role::created;
  impl->writable = true;
  impl->capacity = capacity_for(o);
  impl->control = std::move(handle);
  std::uint64_t object_size = named_object_size(o);
  if (auto r = platform::allocate(impl->control, object_size, "segment " + id); !r)
    return r.error();
  if (auto r = RegionFactory::map_single_object(*impl, Access::read_write, Sharing::shared); !r)
    return r.error();
  if (auto r = fill_new_region(*impl, o, !o.name.empty()); !r) return r.error();
  guard.dismiss();
  return RegionFactory::make(std::move(impl));
}

/// remove_and_create: removes an existing segment of ours with that id, if any.
Result<void> remove_existing(const std::string& id) {
  auto r = unlink_segment(id);
  if (!r && r.error().code != Errc::not_found) return r;
  return {};
}

Result<Region> create_posix(const CreateOptions& o) {
  bool named = !o.name.empty();
  std::string id = named ? named_region_id(o.name) : random_region_id();
  if (named && !may_create(o.open_mode)) return RegionFactory::open_named(id, true, Role::opened);
  if (named && removes_first(o.open_mode)) {
    if (auto r = remove_existing(id); !r) return r.error();
  }
  for (int attempt = 0; attempt < kCreateAttempts; ++attempt) {
    auto handle = platform::create_named(id, o.mode, named_object_size(o));
    if (handle) {
      // The liveness lock first, before sizing: from here until this Region is gone the
      // segment is in use for every sweeper, header or not (a slow fallocate included).
      if (auto r = take_liveness_lock(*handle, "segment " + id); !r) {
        (void)platform::unlink_named(id);
        return r.error();
      }
      test_park("create_" + std::to_string(o.size));
      return build_posix(std::move(*handle), id, o);
    }
    if (handle.error().code != Errc::already_exists) return std::move(handle).error();
    if (!named) {
      id = random_region_id();  // 100 random bits collided, or someone squats: next one
      continue;
    }
    if (may_open_existing(o.open_mode)) {
      auto opened = RegionFactory::open_named(id, true, Role::opened);
      if (opened || opened.error().code != Errc::not_found) return opened;
    } else if (removes_first(o.open_mode)) {
      if (auto r = remove_existing(id); !r) return r.error();
    } else {
      return std::move(handle).error();
    }
  }
  return Error{Errc::busy, 0,
               "could not create " + id + " in " + std::to_string(kCreateAttempts) +
                   " attempts: other processes keep creating and removing that name"};
}

// One readlink lets a worker find this region by bare id (runtime_index.hpp).
void publish_in_index(RegionFactory::Impl& impl) {
  impl.index_entry.publish(
      impl.id, runtime_index::Entry{"memfd", platform::handle_path(impl.control),
                                    platform::handle_path(impl.data_object), 0, impl.size});
}

Result<Region> create_memfd(const CreateOptions& o) {
  auto impl = std::make_unique<RegionFactory::Impl>();
  impl->id = random_region_id();
  impl->backend = BackendKind::memfd;
  impl->role = Role::created;
  impl->writable = true;
  impl->capacity = capacity_for(o);
  auto control = platform::create_anonymous(impl->id, kHeaderSize);
  if (!control) return control.error();
  impl->control = std::move(*control);
  if (auto r = take_liveness_lock(impl->control, "memfd " + impl->id); !r) return r.error();
  // From the warm pool, on huge pages, or fresh (pool.cpp).
  auto data = obtain_data_object(impl->id, o, impl->capacity);
  if (!data) return data.error();
  impl->data_object = std::move(data->object);
  auto header = platform::map(impl->control, 0, kHeaderSize, Access::read_write, Sharing::shared,
                              "the control memfd of " + impl->id);
  if (!header) return header.error();
  impl->header_map = std::move(*header);
  impl->data_map = std::move(data->mapping);
  impl->data = impl->data_map.data();
  impl->allocation_deferred = data->unallocated;
  impl->object_size = data->object_size;
  if (auto r = fill_new_region(*impl, o, false, data->pooled ? data->data_name : std::string(),
                               data->huge);
      !r)
    return r.error();
  // The header names the object now: openers may lock it (and map it) from here on.
  if (data->pooled) pool::release_lock(impl->data_object);
  publish_in_index(*impl);
  return RegionFactory::make(std::move(impl));
}

/// A small region carved out of this process's arenas (arena.hpp): one page-aligned
/// chunk, control block then data. Costs one fcntl (the liveness lock at the chunk's
/// offset) when an arena has room: no memfd, no mapping.
Result<Region> create_arena(const CreateOptions& o) {
  std::uint64_t capacity = capacity_for(o);
  auto chunk = process_arenas().allocate(arena_chunk_length(capacity));
  if (!chunk) return chunk.error();
  auto impl = std::make_unique<RegionFactory::Impl>();
  impl->id = random_region_id();
  impl->backend = BackendKind::memfd;
  impl->role = Role::created;
  impl->writable = true;
  impl->capacity = capacity;
  impl->arena = chunk->arena;
  impl->base = chunk->offset;
  impl->chunk_length = chunk->length;
  impl->control = platform::Handle(chunk->arena->handle().native());  // borrowed (~Impl)
  impl->arena_chunk = true;
  std::uint8_t* at = chunk->arena->base() + chunk->offset;
  if (auto r = platform::lock_shared(impl->control, impl->base + kLivenessLockByte); !r)
    return r.error();  // ~Impl gives the chunk back
  impl->arena_header = reinterpret_cast<RegionHeader*>(at);
  impl->data = at + kHeaderSize;
  if (auto r = fill_new_region(*impl, o, false); !r) return r.error();
  // Written by the index's own thread: no system call on this path.
  runtime_index::publish_arena_later(impl->id, chunk->arena->handle().native(), impl->base,
                                     impl->size);
  return RegionFactory::make(std::move(impl));
}

Error needs_writable(const std::string& id, const char* action) {
  return Error{Errc::permission_denied, 0,
               std::string("cannot ") + action + " region " + id +
                   " through a read-only handle: open or map it read_write"};
}

/// Runs `body`, which touches the data mapping. POSIX segments can be truncated by a
/// peer (a memfd cannot: F_SEAL_SHRINK), so there the body runs guarded: a SIGBUS
/// becomes `false` and marks the region damaged.
template <class Body>
bool access_data(RegionFactory::Impl& impl, Body&& body) {
  // POSIX segments can be truncated under us; huge-page memfds can lose pages to a
  // peer's PUNCH_HOLE that only a free huge page can back again (SIGBUS otherwise).
  if (impl.backend != BackendKind::posix && !impl.huge) {
    body();
    return true;
  }
  using B = std::remove_reference_t<Body>;
  bool ok = platform::run_guarded([](void* b) { (*static_cast<B*>(b))(); }, &body, impl.data,
                                  impl.capacity);
  if (!ok) impl.damaged.store(true, std::memory_order_release);
  return ok;
}

Error truncated(const RegionFactory::Impl& impl) {
  if (impl.huge && impl.backend != BackendKind::posix)
    return Error{Errc::truncated, EFAULT,
                 "region " + impl.id +
                     " lost its memory: another process freed pages of its huge-page data "
                     "object (fallocate PUNCH_HOLE) and the host's hugetlb pool has no free "
                     "page to back them again; its data is gone. Deallocate it"};
  return Error{Errc::truncated, EFAULT,
               "region " + impl.id +
                   " lost its memory: another process truncated the segment (ftruncate or "
                   "shm_unlink + recreate); its data is gone. Deallocate it"};
}

/// A zeroing that faulted on a huge-page memfd (a peer freed some of its pages and no
/// free huge page can back them): frees the range's pages instead, which leaves zeros
/// without touching them. False where that is impossible (POSIX: truncated for real).
bool zero_by_freeing(RegionFactory::Impl& impl, std::uint64_t offset, std::uint64_t length) {
  if (!impl.huge || !impl.data_object.valid()) return false;
  auto unit = platform::huge_page_info().page_size;
  if (unit == 0) return false;
  std::uint64_t first = offset / unit * unit;
  std::uint64_t end = (offset + length + unit - 1) / unit * unit;
  return platform::release_pages(impl.data_object, first, end - first).ok();
}

}  // namespace

Result<Region> Region::create(const CreateOptions& options) {
  return guarded([&]() -> Result<Region> {
    if (auto r = check_create_options(options); !r) return r.error();
    if (auto r = crypto::init(); !r) return r.error();
    if (arena_eligible(options) && arenas_supported()) {
      auto carved = create_arena(options);
      if (carved || carved.error().code != Errc::unsupported) return carved;
    }
    if (options.backend == BackendKind::memfd) return create_memfd(options);
    return create_posix(options);
  });
}

Region::Region(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {
  impl_->view_writable = impl_->writable;  // every constructor maps the data read-write iff so
}
Region::Region(Region&&) noexcept = default;
Region& Region::operator=(Region&&) noexcept = default;
Region::~Region() {
  // A region created with defer_chunks that was never published was never usable by
  // anyone (opens wait for its header, reads and writes answer busy): its creator gave
  // it up (the creating Erlang process was killed between two slices). Its name would
  // otherwise stay in /dev/shm, headerless, until someone runs the cleanup task.
  if (impl_ && impl_->role == Role::created && impl_->unpublished.load()) (void)unlink();
}

RegionFactory::Impl::~Impl() {
  if (!arena) return;
  // The region ends here for this process: no hold of ours stays (the slot dies with
  // its lock, as it would with a closed control object), the header says deallocated
  // (an attached worker sees it, as after deallocate), and the chunk goes back to the
  // arena, which reuses it only once no worker holds it open any more.
  if (slot >= 0) platform::unlock(control, base + kSlotLockBase + static_cast<std::uint64_t>(slot));
  if (arena_header != nullptr)
    arena_header->state.fetch_or(kStateDeallocated, std::memory_order_seq_cst);
  // Our shared liveness lock stays (unless release_arena_locks dropped it at the
  // deallocation): retire() converts it to an exclusive one in a single fcntl (granted
  // only if no other open holds the byte), or drops it.
  (void)control.release();  // the arena's descriptor: closed with the arena
  // Before the chunk can be reused; once is enough (a deallocation queued it already).
  if (!id.empty() && !index_removal_queued.load()) runtime_index::remove_later(id);
  if (arena_locks_released)
    process_arenas().retire_unlocked(ArenaChunk{std::move(arena), base, chunk_length});
  else
    process_arenas().retire(ArenaChunk{std::move(arena), base, chunk_length});
}

void Region::release_arena_locks() noexcept {
  Impl& impl = *impl_;
  if (!impl.arena || impl.arena_header == nullptr) return;  // not a chunk of our arena set
  std::lock_guard<std::mutex> lock(impl.slot_mutex);
  if (impl.arena_locks_released) return;
  if (!(impl.arena_header->state.load(std::memory_order_seq_cst) & kStateDeallocated)) return;
  impl.arena_locks_released = true;
  if (kept_slot_is_free(*impl.arena_header, impl.slot)) {
    // The liveness byte, the reserved bytes (no lock of ours: arena regions are never
    // encrypted) and the slot bytes up to ours: one system call. Other opens' locks stay.
    std::uint64_t end =
        impl.slot < 0 ? 1 : kSlotLockBase + static_cast<std::uint64_t>(impl.slot) + 1;
    platform::unlock_range(impl.control, impl.base + kLivenessLockByte, end);
    impl.slot = -1;
  } else {
    platform::unlock(impl.control, impl.base + kLivenessLockByte);
  }
}

bool arena_eligible(const CreateOptions& o) noexcept {
  return o.arena && o.backend == BackendKind::memfd && o.name.empty() &&
         o.open_mode == OpenMode::create && o.security_level == 0 && !o.encrypted &&
         !o.lock_memory && !o.worker_output && o.mode == 0600 && o.size > 0 &&
         arena_chunk_length(o.size) <= process_arenas().arena_bytes();
}

std::uint64_t Region::control_offset() const noexcept { return impl_->base; }
bool Region::in_arena() const noexcept { return impl_->arena_chunk; }

Result<Region> open_arena_region(const std::string& path, std::uint64_t offset,
                                 const std::string& expected_id, bool writable) {
  return guarded([&]() -> Result<Region> {
    using platform::Access;
    using platform::Sharing;
    Access access = writable ? Access::read_write : Access::read_only;
    auto handle = platform::open_path(path, access);
    if (!handle) return handle.error();
    auto info = check_our_object(*handle, path);
    if (!info) return info.error();
    if (offset % kHeaderSize != 0 || offset + kHeaderSize > info->size)
      return Error{Errc::invalid_argument, 0,
                   "control_offset " + std::to_string(offset) + " is not a page of the arena " +
                       path + " (" + std::to_string(info->size) + " bytes)"};
    if (auto r = platform::lock_shared(*handle, offset + kLivenessLockByte); !r) {
      if (r.error().code == Errc::busy)
        return Error{Errc::not_found, 0, "the region at " + path + " was freed"};
      return r.error();
    }
    HeaderCopy copy;
    if (auto r = platform::read_at(*handle, offset, copy.bytes, sizeof copy.bytes, path); !r)
      return r.error();
    const RegionHeader& h = copy.get();
    if (!header_published(h) || (h.flags & kFlagArena) == 0)
      return Error{Errc::not_found, 0,
                   "no region at offset " + std::to_string(offset) + " of " + path};
    if (auto r = validate_header(h, info->size - offset, path); !r) return r.error();
    std::string id(h.region_id, strnlen(h.region_id, kRegionIdCapacity));
    if (!expected_id.empty() && id != expected_id)
      return Error{Errc::not_found, 0,
                   "region " + expected_id + " is gone: its place in the arena now holds " + id};
    if (h.state.load() & kStateDeallocated)
      return Error{Errc::deallocated, 0, "region " + id + " has been deallocated"};
    auto impl = std::make_unique<RegionFactory::Impl>();
    impl->adopt(h);
    impl->role = Role::opened;
    impl->writable = writable;
    impl->base = offset;
    impl->arena_chunk = true;
    impl->control = std::move(*handle);
    auto header = platform::map(impl->control, offset, kHeaderSize, access, Sharing::shared,
                                "the control block of " + id);
    if (!header) return header.error();
    impl->header_map = std::move(*header);
    auto mapped = platform::map(impl->control, offset + kHeaderSize, impl->capacity, access,
                                Sharing::shared, "the data of " + id);
    if (!mapped) return mapped.error();
    impl->data_map = std::move(*mapped);
    impl->data = impl->data_map.data();
    return RegionFactory::make(std::move(impl));
  });
}

const std::string& Region::id() const noexcept { return impl_->id; }
BackendKind Region::backend() const noexcept { return impl_->backend; }
Role Region::role() const noexcept { return impl_->role; }
bool Region::writable() const noexcept { return impl_->writable; }
bool Region::encrypted() const noexcept { return impl_->encrypted; }
std::uint64_t Region::size() const noexcept { return impl_->size; }
std::uint64_t Region::capacity() const noexcept { return impl_->capacity; }
RegionHeader& Region::header() noexcept { return impl_->header(); }
const RegionHeader& Region::header() const noexcept { return impl_->header(); }
std::uint8_t* Region::data() noexcept { return impl_->data; }
const std::uint8_t* Region::data() const noexcept { return impl_->data; }
bool Region::header_writable() const noexcept { return impl_->header_shared; }

std::string Region::control_path() const {
  if (impl_->data_object.valid() || impl_->arena_chunk)
    return platform::handle_path(impl_->control);
  return platform::named_path(impl_->id);
}

std::string Region::data_path() const {
  if (impl_->data_object.valid()) {
    test_park("data_path");  // checked valid, not read yet: a free must not retire it here
    return platform::handle_path(impl_->data_object);
  }
  if (impl_->arena_chunk) return platform::handle_path(impl_->control);
  return platform::named_path(impl_->id);
}

const std::uint8_t* Region::key() const noexcept {
  return impl_->key.empty() ? nullptr : impl_->key.data();
}

Result<void> Region::use_key(const std::uint8_t* key) {
  return guarded([&]() -> Result<void> {
    if (!impl_->encrypted)
      return Error{Errc::invalid_argument, 0, "region " + impl_->id + " is not encrypted"};
    if (key == nullptr) return Error{Errc::invalid_argument, 0, "the key must be 32 bytes"};
    auto copy = crypto::Key::copy_of(key);
    if (!copy) return copy.error();
    std::uint8_t probe;
    Result<void> opened;
    if (!access_data(*impl_, [&] {
          opened = crypto::decrypt(impl_->binding(), copy->data(), impl_->data, 0, &probe, 1);
        }))
      return truncated(*impl_);
    if (!opened)
      return Error{opened.error().code, 0,
                   "this key does not open region " + impl_->id + ": " + opened.error().message};
    crypto::secure_zero(&probe, 1);
    std::unique_lock<std::shared_mutex> lock(impl_->crypt);
    impl_->key = std::move(*copy);
    return {};
  });
}

bool Region::sealed() const noexcept {
  return (impl_->header().state.load(std::memory_order_acquire) & kStateSealed) != 0;
}

bool Region::immutable() const noexcept {
  if (impl_->immutable.load(std::memory_order_acquire)) return true;
  // Asked of the kernel, never of the header (which any process of our uid can write).
  if (impl_->backend != BackendKind::memfd || !impl_->data_object.valid()) return false;
  if (!platform::writes_sealed(impl_->data_object)) return false;
  impl_->immutable.store(true, std::memory_order_release);
  return true;
}

bool Region::damaged() const noexcept {
  if (impl_->damaged.load(std::memory_order_acquire)) return true;
  // Only after the SIGBUS handler repaired a page somewhere in this process: is our
  // segment shorter than what we mapped? (One fstat; nothing otherwise.)
  if (impl_->backend != BackendKind::posix || platform::fault_repairs() == 0) return false;
  auto info = platform::stat(impl_->control, impl_->id);
  if (!info || info->size >= kHeaderSize + impl_->capacity) return false;
  impl_->damaged.store(true, std::memory_order_release);
  return true;
}

namespace {

/// How long seal() waits for this process's in-flight writes (a 1 GiB copy: ~0.3 s).
constexpr auto kSealWait = std::chrono::seconds(30);

Result<void> seal_refused(RegionFactory::Impl& impl, const Error& why) {
  return Error{
      why.code, why.sys_errno,
      "cannot seal region " + impl.id + ": " + why.message +
          (why.code == Errc::busy ? "; have it close that mapping (or exit) and retry" : "")};
}

/// The memfd part of a seal, with this process's writes drained: no writable mapping
/// of ours left, then F_SEAL_WRITE, which the kernel grants only if no process anywhere
/// maps the data writable. On refusal our view is made writable again.
Result<void> seal_kernel(RegionFactory::Impl& impl) {
  const platform::Handle& data = impl.data_handle();
  if (impl.view_writable) {
    if (auto r = platform::downgrade_view(data, impl.data_map, 0); !r)
      return seal_refused(impl, r.error());
    impl.view_writable = false;
    if (impl.memory_locked) (void)platform::lock_memory(impl.data, impl.capacity);
  }
  auto sealed = platform::seal_writes(data);
  if (sealed) {
    impl.immutable.store(true, std::memory_order_release);
    return {};
  }
  if (impl.writable && platform::upgrade_view(data, impl.data_map, 0)) {
    impl.view_writable = true;
    if (impl.memory_locked) (void)platform::lock_memory(impl.data, impl.capacity);
  }
  return seal_refused(impl, sealed.error());
}

}  // namespace

Result<void> Region::seal() {
  return guarded([&]() -> Result<void> {
    if (!impl_->writable || !impl_->header_shared) return needs_writable(impl_->id, "seal");
    std::lock_guard<std::mutex> one_at_a_time(impl_->seal_mutex);
    RegionHeader& h = impl_->header();
    // An arena region shares its memfd with others: no kernel seal of its own. Its seal
    // is the header's word (writers that honour it refuse), and reads keep copying.
    bool kernel = impl_->backend == BackendKind::memfd && !impl_->arena_chunk;
    std::uint32_t state = h.state.load(std::memory_order_seq_cst);
    if (state & kStateDeallocated)
      return Error{Errc::deallocated, 0,
                   "cannot seal region " + impl_->id + ": it was deallocated"};
    if ((state & kStateSealed) && (!kernel || immutable())) return {};  // idempotent
    // Not while its creator still initialises it (deferred chunks or pages): a seal would
    // make the view read-only under initialise_chunks(), whose next write then faults.
    if (impl_->unpublished.load())
      return Error{Errc::busy, 0,
                   "cannot seal region " + impl_->id +
                       ": it is still being initialised by its creator; seal it once published"};

    // The seal lock first (seal_lock.cpp): held from before the bit is set until after
    // it is cleared, so that a sealer killed in between leaves a bit anyone can tell
    // stale (the kernel drops the lock with the dead sealer's open).
    auto locked = take_seal_lock(impl_->control, impl_->base);
    if (!locked) return seal_refused(*impl_, locked.error());
    if (!*locked)
      return Error{Errc::busy, 0,
                   "cannot seal region " + impl_->id +
                       ": another process is sealing it right now; retry once it is done"};
    struct SealLock {
      const platform::Handle& control;
      std::uint64_t base;
      ~SealLock() { drop_seal_lock(control, base); }
    } seal_lock{impl_->control, impl_->base};

    // Phase 1, sealing: writers that honour the header (this VM, Python workers) stop.
    // Dekker with hold() (holders.cpp): set the bit first, then look for writable holders.
    std::uint32_t before = h.state.fetch_or(kStateSealing, std::memory_order_seq_cst);
    // With the seal lock ours, a bit already set was left by a sealer that died mid-seal:
    // ours to clear too. Without OFD locks only our own bit is ours.
    bool set_by_us = (before & kStateSealing) == 0 || platform::has_ofd_locks();
    auto undo = [&] {
      if (set_by_us) h.state.fetch_and(~kStateSealing, std::memory_order_seq_cst);
    };
    test_park("seal");  // bit set, seal lock held: the worst instant to die
    if (std::uint32_t pid =
            other_writable_holder(h, platform::current_pid(), &impl_->control, impl_->base)) {
      undo();
      return Error{Errc::busy, 0,
                   "cannot seal region " + impl_->id + ": process " + std::to_string(pid) +
                       " holds it read-write; have it unmap (or remap read_only) and retry"};
    }
    // In-flight writes of this process finish first; new ones see the bit and refuse.
    std::unique_lock<std::shared_timed_mutex> writes(impl_->gate, std::defer_lock);
    if (!writes.try_lock_for(kSealWait)) {
      undo();
      return Error{Errc::busy, 0,
                   "cannot seal region " + impl_->id +
                       ": writes of this process are still running after 30 s; retry"};
    }
    test_park("seal_commit");  // the gate held: a zeroing deallocation must wait
    // Phase 2, commit: the kernel seal (memfd) or the object's mode (POSIX, Windows:
    // not enforced against the owner, so read/3 keeps copying).
    Result<void> committed = impl_->arena_chunk ? Result<void>{}
                             : kernel           ? seal_kernel(*impl_)
                                      : platform::seal_object(impl_->data_handle(), impl_->backend);
    if (!committed) {
      undo();
      return committed;
    }
    // Only now does the header say sealed, and it never goes back.
    h.state.fetch_or(kStateSealed, std::memory_order_seq_cst);
    h.state.fetch_and(~kStateSealing, std::memory_order_seq_cst);
    return {};
  });
}

bool Region::await_seal_commit(std::chrono::milliseconds wait) const {
  std::shared_lock<std::shared_timed_mutex> gate(impl_->gate, std::defer_lock);
  return gate.try_lock_for(wait);
}

bool Region::clear_stale_sealing() const noexcept {
  // Never through an open a seal of ours is using (its lock would be ours to take).
  std::unique_lock<std::mutex> no_seal_of_ours(impl_->seal_mutex, std::try_to_lock);
  if (!no_seal_of_ours.owns_lock() || !impl_->header_shared) return false;
  return spshm::clear_stale_sealing(impl_->header(), impl_->control, impl_->base);
}

Result<void> Region::deallocate(bool zero) {
  return guarded([&]() -> Result<void> {
    if (!impl_->header_shared || (zero && !impl_->writable))
      return needs_writable(impl_->id, zero ? "zero and deallocate" : "deallocate");
    // Not while a seal remaps the view (the gate): zeroing then could hit a read-only page.
    std::shared_lock<std::shared_timed_mutex> gate(impl_->gate, std::try_to_lock);
    if (zero && !gate.owns_lock())
      return Error{Errc::busy, 0,
                   "region " + impl_->id +
                       " is being sealed: it cannot be zeroed now; deallocate it without "
                       "zeroing or retry"};
    impl_->header().state.fetch_or(kStateDeallocated, std::memory_order_seq_cst);
    // A kernel-sealed memfd cannot be written by anyone, us included: its pages go back
    // to the kernel (which clears them before reuse) when the last descriptor and
    // mapping anywhere are gone; an encrypted one holds only ciphertext whose key is
    // wiped with the handle.
    if (zero && impl_->view_writable) {
      std::unique_lock<std::shared_mutex> lock(impl_->crypt);
      if (!access_data(*impl_, [&] { crypto::secure_zero(impl_->data, impl_->capacity); }) &&
          !zero_by_freeing(*impl_, 0, impl_->capacity)) {
        (void)unlink();
        return truncated(*impl_);
      }
    }
    return unlink();
  });
}

Result<void> Region::mark_deallocated(bool zero) {
  return guarded([&]() -> Result<void> {
    if (!impl_->header_shared || (zero && !impl_->writable))
      return needs_writable(impl_->id, zero ? "zero and deallocate" : "deallocate");
    std::shared_lock<std::shared_timed_mutex> gate(impl_->gate, std::try_to_lock);
    if (zero && !gate.owns_lock())
      return Error{Errc::busy, 0,
                   "region " + impl_->id +
                       " is being sealed: it cannot be zeroed now; deallocate it without "
                       "zeroing or retry"};
    impl_->header().state.fetch_or(kStateDeallocated, std::memory_order_seq_cst);
    return {};
  });
}

Result<std::uint64_t> Region::zero_slice(std::uint64_t offset, std::uint64_t max_bytes) {
  return guarded([&]() -> Result<std::uint64_t> {
    if (!(impl_->header().state.load() & kStateDeallocated))
      return Error{Errc::invalid_argument, 0,
                   "region " + impl_->id + " is not being deallocated: mark it first"};
    if (!impl_->writable) return needs_writable(impl_->id, "zero");
    std::uint64_t capacity = impl_->capacity;
    if (offset >= capacity || impl_->data == nullptr) return capacity;
    // Not while a seal remaps the view (the gate): zeroing then could hit a read-only page.
    // Its commit is short: wait for it here (woken by its unlock) rather than polling.
    std::shared_lock<std::shared_timed_mutex> gate(impl_->gate, std::defer_lock);
    if (!gate.try_lock_for(std::chrono::milliseconds(100)))
      return Error{Errc::busy, 0, "region " + impl_->id + " is being sealed: retry the zeroing"};
    if (!impl_->view_writable) return capacity;  // a kernel seal: nobody can write it, us neither
    std::uint64_t length = std::min(max_bytes, capacity - offset);
    std::unique_lock<std::shared_mutex> lock(impl_->crypt);
    if (!access_data(*impl_, [&] { crypto::secure_zero(impl_->data + offset, length); }) &&
        !zero_by_freeing(*impl_, offset, length))
      return truncated(*impl_);
    return offset + length;
  });
}

Result<void> Region::hold(std::uint32_t pid, std::uint64_t start_time, bool writable) {
  if (!impl_->header_shared)
    return Error{Errc::permission_denied, 0,
                 "region " + impl_->id + " is seen through a private copy of its header"};
  std::lock_guard<std::mutex> lock(impl_->slot_mutex);
  auto held =
      hold_on(impl_->header(), impl_->control, impl_->slot, pid, start_time, writable, impl_->base);
  if (!held && held.error().code == Errc::corrupt)
    return Error{Errc::corrupt, 0, "region " + impl_->id + ": " + held.error().message};
  return held;
}

Result<void> Region::release() {
  std::lock_guard<std::mutex> lock(impl_->slot_mutex);
  return release_on(impl_->header(), impl_->control, impl_->slot, impl_->base,
                    /*keep_lock=*/true);
}

std::uint32_t Region::reap_dead_holders() {
  if (!impl_->header_shared) return 0;
  std::lock_guard<std::mutex> lock(impl_->slot_mutex);
  return reap_dead_slots(impl_->header(), impl_->control, impl_->slot, impl_->base);
}

Region::DetachedData Region::detach_data() noexcept {
  DetachedData out;
  Impl& impl = *impl_;
  out.bytes = impl.capacity;
  if (impl.data_map.valid()) {
    out.mapping = std::move(impl.data_map);
  } else if (platform::named_backend() == BackendKind::posix &&
             impl.header_map.size() > kHeaderSize) {
    out.mapping = impl.header_map.split_at(kHeaderSize);  // header and data in one mapping
  }
  if (impl.data_object.valid()) out.object = std::move(impl.data_object);  // memfd
  if (out.mapping.valid()) impl.data = nullptr;
  return out;
}

Result<void> Region::unlink_unless_held() {
  if (!impl_->data_object.valid() && !impl_->arena) {  // a named object: others may hold it
    auto held = guarded([&]() -> Result<bool> {
      return platform::lock_is_held(impl_->control, kLivenessLockByte);
    });
    if (!held) return held.error();
    if (*held) return {};
  }
  return unlink();
}

Result<void> Region::unlink() {
  return guarded([&]() -> Result<void> {
    if (impl_->data_object.valid()) {  // memfd: no name to remove, only the index entry
      impl_->index_entry.remove();
      return {};
    }
    if (impl_->arena) {  // a created arena region: no name, only its (queued) entry
      if (!impl_->index_removal_queued.exchange(true)) runtime_index::remove_later(impl_->id);
      return {};
    }
    // Remove the name only while it still names our object: after a :remove_and_create
    // elsewhere it may already belong to a newer region, which must survive.
    if (!names_our_object(impl_->id, impl_->control)) return {};
    auto r = platform::unlink_named(impl_->id);
    if (!r && r.error().code != Errc::not_found) return r;
    return {};
  });
}

namespace {

Result<void> check_range(const std::string& id, std::uint64_t size, std::uint64_t offset,
                         std::uint64_t length) {
  if (offset > size || length > size - offset)
    return Error{Errc::out_of_bounds, 0,
                 "offset " + std::to_string(offset) + " + length " + std::to_string(length) +
                     " is outside region " + id + " of " + std::to_string(size) + " bytes"};
  return {};
}

Error still_initialising(const RegionFactory::Impl& impl) {
  return Error{Errc::busy, 0,
               "region " + impl.id + " is still being initialised by its creator: retry"};
}

void touch_header(RegionFactory::Impl& impl) noexcept {
  if (impl.header_shared)
    impl.header().last_access_ns.store(platform::realtime_ns(), std::memory_order_relaxed);
}

Error data_busy(const RegionFactory::Impl& impl, const Error& why) {
  if (why.code != Errc::busy) return why;
  return Error{Errc::busy, why.sys_errno,
               "encrypted region " + impl.id + " is in use: " + why.message +
                   " (one writer at a time, enforced across processes); retry"};
}

Error no_key(const std::string& id) {
  return Error{Errc::permission_denied, 0,
               "region " + id +
                   " is encrypted and this handle has no key: open it with the key "
                   "(export_ref include_key: true) or use the handle that created it"};
}

}  // namespace

namespace {

Error lock_busy(const std::string& id) {
  return Error{Errc::busy, 0,
               "region " + id + " is being encrypted or decrypted by another call right now"};
}

/// Cross-process lock of an encrypted region's data (kDataLockByte of the control
/// object): writers exclusive, readers shared, never waiting. Readers of this process
/// share one lock (one open file description): the first takes it, the last drops it.
Result<void> lock_data(RegionFactory::Impl& impl, bool exclusive) {
  if (exclusive) {
    auto r = platform::try_lock_byte(impl.control, kDataLockByte, true);
    if (!r) return data_busy(impl, r.error());
    return {};
  }
  std::lock_guard<std::mutex> lock(impl.data_lock_mutex);
  if (impl.data_lock_readers == 0) {
    auto r = platform::try_lock_byte(impl.control, kDataLockByte, false);
    if (!r) return data_busy(impl, r.error());
  }
  ++impl.data_lock_readers;
  return {};
}

void unlock_data(RegionFactory::Impl& impl, bool exclusive) noexcept {
  if (exclusive) {
    platform::unlock_byte(impl.control, kDataLockByte);
    return;
  }
  std::lock_guard<std::mutex> lock(impl.data_lock_mutex);
  if (--impl.data_lock_readers == 0) platform::unlock_byte(impl.control, kDataLockByte);
}

}  // namespace

Result<void> Region::write(std::uint64_t offset, const std::uint8_t* src, std::size_t length,
                           bool wait) {
  return guarded([&]() -> Result<void> {
    if (impl_->unpublished.load()) return still_initialising(*impl_);
    if (!impl_->writable) return needs_writable(impl_->id, "write to");
    // Shared with the other writes of this process, exclusive with seal(): taken without
    // waiting (a failure means a seal is draining writes right now).
    std::shared_lock<std::shared_timed_mutex> gate(impl_->gate, std::try_to_lock);
    std::uint32_t state = impl_->header().state.load(std::memory_order_seq_cst);
    if (state & kStateDeallocated)
      return Error{Errc::deallocated, 0, "region " + impl_->id + " has been deallocated"};
    if (state & kStateSealed)
      return Error{Errc::sealed, 0, "region " + impl_->id + " is sealed: it can only be read"};
    // A sealing bit whose seal lock nobody holds was left by a dead sealer: cleared here.
    if ((state & kStateSealing) && gate.owns_lock() && clear_stale_sealing())
      state = impl_->header().state.load(std::memory_order_seq_cst);
    if (state & kStateSealed)
      return Error{Errc::sealed, 0, "region " + impl_->id + " is sealed: it can only be read"};
    if ((state & kStateSealing) || !gate.owns_lock())
      return Error{
          Errc::busy, 0,
          "region " + impl_->id + " is being sealed: writes are refused (retry if the seal fails)"};
    if (!impl_->view_writable)  // read under the gate: seal() changes it exclusively
      return Error{Errc::sealed, 0, "region " + impl_->id + " is sealed: it can only be read"};
    if (damaged()) return truncated(*impl_);
    if (auto r = check_range(impl_->id, impl_->size, offset, length); !r) return r;
    if (length > 0 && src == nullptr)
      return Error{Errc::invalid_argument, 0, "write source must not be NULL"};
    if (impl_->encrypted) {
      std::unique_lock<std::shared_mutex> lock(impl_->crypt, std::defer_lock);
      if (wait)
        lock.lock();
      else if (!lock.try_lock())
        return lock_busy(impl_->id);
      if (impl_->key.empty()) return no_key(impl_->id);
      if (length == 0) return {};
      if (auto r = lock_data(*impl_, true); !r) return r;
      Result<void> done;
      bool ok = access_data(*impl_, [&] {
        done =
            crypto::encrypt(impl_->binding(), impl_->key.data(), impl_->data, offset, src, length);
      });
      unlock_data(*impl_, true);
      if (!ok) return truncated(*impl_);
      if (!done) return done;
    } else if (length > 0) {
      if (!access_data(*impl_, [&] { std::memcpy(impl_->data + offset, src, length); }))
        return truncated(*impl_);
    }
    touch();
    return {};
  });
}

Result<void> Region::read(std::uint64_t offset, std::uint8_t* dst, std::size_t length,
                          bool wait) const {
  return guarded([&]() -> Result<void> {
    if (impl_->unpublished.load()) return still_initialising(*impl_);
    std::uint32_t state = impl_->header().state.load(std::memory_order_acquire);
    if (state & kStateDeallocated)
      return Error{Errc::deallocated, 0, "region " + impl_->id + " has been deallocated"};
    if (damaged()) return truncated(*impl_);
    if (auto r = check_range(impl_->id, impl_->size, offset, length); !r) return r;
    if (length > 0 && dst == nullptr)
      return Error{Errc::invalid_argument, 0, "read destination must not be NULL"};
    if (impl_->encrypted) {
      std::shared_lock<std::shared_mutex> lock(impl_->crypt, std::defer_lock);
      if (wait)
        lock.lock();
      else if (!lock.try_lock())
        return lock_busy(impl_->id);
      if (impl_->key.empty()) return no_key(impl_->id);
      if (length == 0) return {};
      // A sealed region has no writer left: no lock needed.
      bool locking = !(state & kStateSealed);
      if (locking) {
        if (auto r = lock_data(*impl_, false); !r) return r;
      }
      Result<void> done;
      bool ok = access_data(*impl_, [&] {
        done =
            crypto::decrypt(impl_->binding(), impl_->key.data(), impl_->data, offset, dst, length);
      });
      if (locking) unlock_data(*impl_, false);
      if (!ok) return truncated(*impl_);
      if (!done) return done;
    } else if (length > 0) {
      if (!access_data(*impl_, [&] { std::memcpy(dst, impl_->data + offset, length); }))
        return truncated(*impl_);
    }
    touch_header(*impl_);
    return {};
  });
}

void Region::touch() noexcept { touch_header(*impl_); }

// --- Deferred initialisation of encrypted regions (issue 12) ----------------------------

Result<std::uint64_t> Region::initialise_chunks(std::uint64_t first, std::uint64_t count) {
  // Shared with writes, exclusive with seal() (which refuses unpublished regions anyway):
  // the view stays writable while we write into it.
  std::shared_lock<std::shared_timed_mutex> gate(impl_->gate);
  std::unique_lock<std::shared_mutex> lock(impl_->crypt);  // one initialiser at a time
  if (!impl_->view_writable)
    return Error{Errc::sealed, 0,
                 "region " + impl_->id + " is sealed: its chunks cannot be written"};
  if (!impl_->unpublished.load() || !impl_->encrypted)
    return Error{Errc::invalid_argument, 0,
                 "region " + impl_->id + " was not created with deferred chunks, or is published"};
  if (impl_->allocation_deferred && impl_->allocated < impl_->object_size)
    return Error{Errc::invalid_argument, 0,
                 "region " + impl_->id +
                     ": allocate every page (allocate_range) before initialising its chunks"};
  crypto::Binding b = impl_->binding();
  std::uint64_t total = crypto::chunk_count(b);
  if (first != impl_->chunks_initialised)
    return Error{Errc::invalid_argument, 0,
                 "region " + impl_->id + ": chunks are initialised in order, next is " +
                     std::to_string(impl_->chunks_initialised)};
  std::uint64_t n = std::min(count, total - first);
  if (auto r = crypto::initialise_chunk_range(b, impl_->key.data(), impl_->data, first, n); !r)
    return r.error();
  impl_->chunks_initialised = first + n;
  return total - impl_->chunks_initialised;
}

Result<void> Region::publish() {
  // Never waits (callers on normal schedulers): busy while chunks are being initialised.
  std::unique_lock<std::shared_mutex> lock(impl_->crypt, std::try_to_lock);
  if (!lock.owns_lock())
    return Error{Errc::busy, 0, "region " + impl_->id + " is being initialised right now"};
  if (!impl_->unpublished.load())
    return Error{Errc::invalid_argument, 0,
                 "region " + impl_->id + " was not created with deferred chunks, or is published"};
  if (impl_->encrypted && impl_->chunks_initialised != crypto::chunk_count(impl_->binding()))
    return Error{Errc::invalid_argument, 0,
                 "region " + impl_->id + ": initialise every chunk before publishing it"};
  if (impl_->allocation_deferred && impl_->allocated < impl_->object_size)
    return Error{
        Errc::invalid_argument, 0,
        "region " + impl_->id + ": allocate every page (allocate_range) before publishing it"};
  publish_header(impl_->header());
  impl_->unpublished.store(false);
  return {};
}

// --- Deferred allocation of large regions (issue 12) ------------------------------------

Result<std::uint64_t> Region::allocate_range(std::uint64_t offset, std::uint64_t max_bytes) {
  std::unique_lock<std::shared_mutex> lock(impl_->crypt);  // one allocator at a time
  if (!impl_->unpublished.load() || !impl_->allocation_deferred)
    return Error{
        Errc::invalid_argument, 0,
        "region " + impl_->id + " was not created with deferred allocation, or is published"};
  if (offset != impl_->allocated)
    return Error{Errc::invalid_argument, 0,
                 "region " + impl_->id + ": pages are allocated in order, next is " +
                     std::to_string(impl_->allocated)};
  std::uint64_t length = std::min(max_bytes, impl_->object_size - offset);
  if (auto r = platform::allocate_range(impl_->data_object, offset, length,
                                        "the data memfd of " + impl_->id);
      !r)
    return r.error();
  impl_->allocated = offset + length;
  return impl_->allocated;
}

}  // namespace spshm
