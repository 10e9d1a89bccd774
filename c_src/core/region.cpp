// Region: creation and everything done with a Region once it exists. OS-neutral: every
// system call goes through platform.hpp. Opening an existing region: region_open.cpp.
#include "region.hpp"
#include "guard.hpp"

#include <cerrno>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>

#include "crypto.hpp"
#include "header.hpp"
#include "ids.hpp"
#include "park.hpp"
#include "platform.hpp"
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
Result<void> fill_new_region(RegionFactory::Impl& impl, const CreateOptions& o, bool named) {
  if (o.lock_memory) {
    if (auto r = platform::lock_memory(impl.data, impl.capacity); !r) return r;
  }
  HeaderInit init;
  init.region_id = impl.id;
  init.backend = impl.backend;
  init.flags = (o.encrypted ? kFlagEncrypted : 0) | (named ? kFlagNamed : 0) |
               (impl.backend == BackendKind::memfd ? kFlagSplitData : 0) |
               (platform::has_ofd_locks() ? kFlagLivenessLocks : 0);
  init.security_level = o.security_level;
  init.data_size = o.size;
  init.data_capacity = impl.capacity;
  init.data_offset = impl.backend == BackendKind::memfd ? 0 : kHeaderSize;
  init.metadata_json = o.metadata_json;
  init.idle_timeout_ns = o.idle_timeout_ns;
  RegionHeader& h = impl.header();
  init_header(h, init);
  impl.adopt(h);
  if (o.encrypted) {
    auto key = crypto::Key::generate();
    if (!key) return key.error();
    impl.key = std::move(*key);
    if (auto r = crypto::initialise_chunks(impl.binding(), impl.key.data(), impl.data); !r)
      return r;
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
  auto data = platform::create_anonymous(impl->id + ".data", round_up_to_page(impl->capacity));
  if (!data) return data.error();
  impl->data_object = std::move(*data);
  auto header = platform::map(impl->control, 0, kHeaderSize, Access::read_write, Sharing::shared,
                              "the control memfd of " + impl->id);
  if (!header) return header.error();
  impl->header_map = std::move(*header);
  auto mapped = platform::map(impl->data_object, 0, impl->capacity, Access::read_write,
                              Sharing::shared, "the data memfd of " + impl->id);
  if (!mapped) return mapped.error();
  impl->data_map = std::move(*mapped);
  impl->data = impl->data_map.data();
  if (auto r = fill_new_region(*impl, o, false); !r) return r.error();
  return RegionFactory::make(std::move(impl));
}

Error needs_writable(const std::string& id, const char* action) {
  return Error{Errc::permission_denied, 0,
               std::string("cannot ") + action + " region " + id +
                   " through a read-only handle: open or map it read_write"};
}

}  // namespace

Result<Region> Region::create(const CreateOptions& options) {
  return guarded([&]() -> Result<Region> {
    if (auto r = check_create_options(options); !r) return r.error();
    if (auto r = crypto::init(); !r) return r.error();
    if (options.backend == BackendKind::memfd) return create_memfd(options);
    return create_posix(options);
  });
}

Region::Region(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
Region::Region(Region&&) noexcept = default;
Region& Region::operator=(Region&&) noexcept = default;
Region::~Region() = default;

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
  if (impl_->data_object.valid()) return platform::handle_path(impl_->control);
  return platform::named_path(impl_->id);
}

std::string Region::data_path() const {
  if (impl_->data_object.valid()) return platform::handle_path(impl_->data_object);
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
    if (auto r = crypto::decrypt(impl_->binding(), copy->data(), impl_->data, 0, &probe, 1); !r)
      return Error{r.error().code, 0,
                   "this key does not open region " + impl_->id + ": " + r.error().message};
    crypto::secure_zero(&probe, 1);
    std::unique_lock<std::shared_mutex> lock(impl_->crypt);
    impl_->key = std::move(*copy);
    return {};
  });
}

bool Region::sealed() const noexcept {
  return (impl_->header().state.load(std::memory_order_acquire) & kStateSealed) != 0;
}

Result<void> Region::seal() {
  return guarded([&]() -> Result<void> {
    if (!impl_->writable || !impl_->header_shared) return needs_writable(impl_->id, "seal");
    RegionHeader& h = impl_->header();
    // Dekker with hold() (holders.cpp): set the bit first, then look for writable holders.
    std::uint32_t before = h.state.fetch_or(kStateSealed, std::memory_order_seq_cst);
    bool set_by_us = (before & kStateSealed) == 0;
    auto undo = [&] {
      if (set_by_us) h.state.fetch_and(~kStateSealed, std::memory_order_seq_cst);
    };
    if (before & kStateDeallocated) {
      undo();
      return Error{Errc::deallocated, 0,
                   "cannot seal region " + impl_->id + ": it was deallocated"};
    }
    if (set_by_us) {
      if (std::uint32_t pid = other_writable_holder(h, platform::current_pid(), &impl_->control)) {
        undo();
        return Error{Errc::busy, 0,
                     "cannot seal region " + impl_->id + ": process " + std::to_string(pid) +
                         " holds it read-write; have it unmap (or remap read_only) and retry"};
      }
    }
    if (auto r = platform::seal_object(impl_->data_handle(), impl_->backend); !r) {
      undo();
      return r;
    }
    return {};
  });
}

Result<void> Region::deallocate(bool zero) {
  return guarded([&]() -> Result<void> {
    if (!impl_->header_shared || (zero && !impl_->writable))
      return needs_writable(impl_->id, zero ? "zero and deallocate" : "deallocate");
    impl_->header().state.fetch_or(kStateDeallocated, std::memory_order_seq_cst);
    if (zero) {
      std::unique_lock<std::shared_mutex> lock(impl_->crypt);
      crypto::secure_zero(impl_->data, impl_->capacity);
    }
    return unlink();
  });
}

Result<void> Region::hold(std::uint32_t pid, std::uint64_t start_time, bool writable) {
  if (!impl_->header_shared)
    return Error{Errc::permission_denied, 0,
                 "region " + impl_->id + " is seen through a private copy of its header"};
  std::lock_guard<std::mutex> lock(impl_->slot_mutex);
  return hold_on(impl_->header(), impl_->control, impl_->slot, pid, start_time, writable);
}

Result<void> Region::release() {
  std::lock_guard<std::mutex> lock(impl_->slot_mutex);
  return release_on(impl_->header(), impl_->control, impl_->slot);
}

std::uint32_t Region::reap_dead_holders() {
  if (!impl_->header_shared) return 0;
  std::lock_guard<std::mutex> lock(impl_->slot_mutex);
  return reap_dead_slots(impl_->header(), impl_->control, impl_->slot);
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

Result<void> Region::unlink() {
  return guarded([&]() -> Result<void> {
    if (impl_->data_object.valid()) return {};  // memfd: no name to remove
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

void touch_header(RegionFactory::Impl& impl) noexcept {
  if (impl.header_shared)
    impl.header().last_access_ns.store(platform::realtime_ns(), std::memory_order_relaxed);
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

}  // namespace

Result<void> Region::write(std::uint64_t offset, const std::uint8_t* src, std::size_t length,
                           bool wait) {
  return guarded([&]() -> Result<void> {
    if (!impl_->writable) return needs_writable(impl_->id, "write to");
    std::uint32_t state = impl_->header().state.load(std::memory_order_acquire);
    if (state & kStateDeallocated)
      return Error{Errc::deallocated, 0, "region " + impl_->id + " has been deallocated"};
    if (state & kStateSealed)
      return Error{Errc::sealed, 0, "region " + impl_->id + " is sealed: it can only be read"};
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
      if (auto r = crypto::encrypt(impl_->binding(), impl_->key.data(), impl_->data, offset, src,
                                   length);
          !r)
        return r;
    } else if (length > 0) {
      std::memcpy(impl_->data + offset, src, length);
    }
    touch();
    return {};
  });
}

Result<void> Region::read(std::uint64_t offset, std::uint8_t* dst, std::size_t length,
                          bool wait) const {
  return guarded([&]() -> Result<void> {
    std::uint32_t state = impl_->header().state.load(std::memory_order_acquire);
    if (state & kStateDeallocated)
      return Error{Errc::deallocated, 0, "region " + impl_->id + " has been deallocated"};
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
      if (auto r = crypto::decrypt(impl_->binding(), impl_->key.data(), impl_->data, offset, dst,
                                   length);
          !r)
        return r;
    } else if (length > 0) {
      std::memcpy(dst, impl_->data + offset, length);
    }
    touch_header(*impl_);
    return {};
  });
}

void Region::touch() noexcept { touch_header(*impl_); }

}  // namespace spshm
