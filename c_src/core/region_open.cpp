// Opening existing regions: by id or path (single object) or by memfd paths (split).
//
// Every open checks, in order: a regular file or shm object (not_ours otherwise), owned
// by our uid (not_ours), at least a header long (corrupt), a valid header (validate_header,
// on a private copy so a peer cannot change it between check and use), the expected id
// and backend, and the state (deallocated; sealed when asking for write access). Sizes
// are taken from that copy once and never re-read from the shared header.
#include <chrono>
#include <cstring>
#include <new>
#include <thread>

#include "guard.hpp"
#include "header.hpp"
#include "ids.hpp"
#include "region_impl.hpp"

namespace spshm {

using platform::Access;
using platform::Sharing;

namespace {

/// How long an open waits for a named segment's creator to publish its header.
constexpr auto kPublishWait = std::chrono::milliseconds(1000);

Result<platform::ObjectInfo> check_object(const platform::Handle& handle, const std::string& what) {
  return check_our_object(handle, what);
}

}  // namespace

Result<platform::ObjectInfo> check_our_object(const platform::Handle& handle,
                                              const std::string& what) {
  auto info = platform::stat(handle, what);
  if (!info) return info.error();
  if (!info->regular)
    return Error{Errc::not_ours, 0,
                 what +
                     " is not a regular file or shared memory object: not a snakepit_shm "
                     "segment"};
  if (!info->owned_by_us)
    return Error{Errc::not_ours, 0,
                 what + " belongs to another user (uid " + std::to_string(info->owner) +
                     "): refusing to use it"};
  return info;
}

Result<void> take_liveness_lock(const platform::Handle& handle, const std::string& what) {
  // A sweeper holds the byte exclusively only for the few system calls that check and
  // remove a segment: wait that long, no more.
  for (int attempt = 0;; ++attempt) {
    auto r = platform::lock_shared(handle, kLivenessLockByte);
    if (r || r.error().code != Errc::busy || attempt >= 200) {
      if (!r) return Error{r.error().code, r.error().sys_errno, what + ": " + r.error().message};
      return r;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

bool names_our_object(const std::string& region_id, const platform::Handle& ours) {
  auto current = platform::open_named(region_id, Access::read_only);
  if (!current) return current.error().code != Errc::not_found;
  auto a = platform::stat(ours, region_id);
  auto b = platform::stat(current.value(), region_id);
  if (!a || !b) return true;
  return a->device == b->device && a->inode == b->inode;
}

namespace {

Error too_small(const std::string& what, std::uint64_t size) {
  return Error{Errc::corrupt, 0,
               what + " is " + std::to_string(size) + " bytes, smaller than a " +
                   std::to_string(kHeaderSize) +
                   "-byte header (truncated, or its creator died while creating it): remove it "
                   "with `mix snakepit.shm.cleanup`"};
}

/// check_object + a complete header, waiting (up to kPublishWait) for a creator that is
/// still writing it: a named segment is visible from shm_open until publish_header.
Result<platform::ObjectInfo> wait_for_header(const platform::Handle& handle,
                                             const std::string& what, bool wait) {
  auto deadline = std::chrono::steady_clock::now() + kPublishWait;
  auto pause = std::chrono::microseconds(500);
  for (;;) {
    auto info = check_object(handle, what);
    if (!info) return info;
    bool complete = false;
    if (info->size >= kHeaderSize) {
      char magic[sizeof kMagic];
      if (auto r = platform::read_at(handle, 0, magic, sizeof magic, what); !r) return r.error();
      for (char c : magic) complete = complete || c != 0;
    }
    if (complete) return info;
    if (!wait || std::chrono::steady_clock::now() >= deadline) {
      // A live creator holds the liveness lock from the segment's creation on: it is
      // still sizing it or writing it (an encrypted region's chunks are encrypted in
      // slices before the header is published, which can take seconds). Not corrupt.
      auto held = platform::lock_is_held(handle, kLivenessLockByte);
      if (held && *held)
        return Error{Errc::busy, 0,
                     what +
                         " has no header yet while a process holds it: its creator is "
                         "still creating it (a large encrypted region takes a while); "
                         "retry in a moment"};
      if (info->size < kHeaderSize) return too_small(what, info->size);
      return Error{Errc::corrupt, 0,
                   what +
                       " has no header (its creator died while creating it?): remove it "
                       "with `mix snakepit.shm.cleanup`"};
    }
    std::this_thread::sleep_for(pause);
    if (pause < std::chrono::milliseconds(16)) pause *= 2;
  }
}

Result<void> check_identity(const RegionHeader& h, const std::string& expected_id, bool split,
                            const std::string& what) {
  std::string id(h.region_id, strnlen(h.region_id, kRegionIdCapacity));
  if (!expected_id.empty() && id != expected_id)
    return Error{Errc::invalid_argument, 0, what + " holds region " + id + ", not " + expected_id};
  bool is_split = (h.flags & kFlagSplitData) != 0;
  if (is_split != split)
    return Error{Errc::invalid_argument, 0,
                 is_split ? what + " is the control memfd of " + id +
                                ": open it with both its control and data paths"
                          : what + " holds its data itself: open it without a data path"};
  return {};
}

Result<void> check_state(const RegionHeader& live, const std::string& id, bool writable) {
  std::uint32_t state = live.state.load(std::memory_order_acquire);
  if (state & kStateDeallocated)
    return Error{Errc::deallocated, 0, "region " + id + " has been deallocated"};
  if (writable && (state & kStateSealed))
    return Error{Errc::sealed, 0, "region " + id + " is sealed: open it read-only"};
  return {};
}

Result<platform::Mapping> map_header(const platform::Handle& handle, bool shared,
                                     const std::string& what) {
  return platform::map(handle, 0, kHeaderSize, Access::read_write,
                       shared ? Sharing::shared : Sharing::private_copy, what);
}

/// Maps the header of `impl.control`, validates a private copy and adopts it.
Result<HeaderCopy> map_and_copy_header(RegionFactory::Impl& impl, const std::string& what) {
  auto header = map_header(impl.control, impl.header_shared, what);
  if (!header) return header.error();
  impl.header_map = std::move(*header);
  HeaderCopy copy;
  std::memcpy(copy.bytes, impl.header_map.data(), sizeof copy.bytes);
  return copy;
}

Result<Region> open_single(platform::Handle handle, bool header_shared, const std::string& what,
                           const std::string& expected_id, bool writable, bool wait, bool by_name) {
  if (auto r = check_object(handle, what); !r) return r.error();
  if (auto r = take_liveness_lock(handle, what); !r) return r.error();
  // Opened by name: a sweeper may have removed that name between our open and our lock
  // (it found the segment unused). Then this object is on its way out: not found.
  if (by_name && !names_our_object(expected_id, handle))
    return Error{
        Errc::not_found, 0,
        "no region " + expected_id + " in shared memory (it was removed while opening it)"};
  auto info = wait_for_header(handle, what, wait);
  if (!info) return info.error();
  auto impl = std::make_unique<RegionFactory::Impl>();
  impl->control = std::move(handle);
  impl->role = Role::opened;
  impl->writable = writable;
  impl->header_shared = header_shared;
  auto copy = map_and_copy_header(*impl, what);
  if (!copy) return copy.error();
  const RegionHeader& h = copy->get();
  if (auto r = validate_header(h, info->size, what); !r) return r.error();
  if (auto r = check_identity(h, expected_id, false, what); !r) return r.error();
  impl->adopt(h);
  if (auto r = check_state(impl->header(), impl->id, writable); !r) return r.error();
  Access header_access = Access::read_write;
  Sharing header_sharing = header_shared ? Sharing::shared : Sharing::private_copy;
  if (auto r = RegionFactory::map_single_object(*impl, header_access, header_sharing); !r)
    return r.error();
  return RegionFactory::make(std::move(impl));
}

/// Opens read-write (holders live in the header); a reader that may not write the object
/// falls back to a read-only handle and a private view of the header.
template <class Opener>
Result<Region> open_with_fallback(Opener&& opener, const std::string& what,
                                  const std::string& expected_id, bool writable, bool wait,
                                  bool by_name) {
  auto handle = opener(Access::read_write);
  bool header_shared = true;
  if (!handle && !writable && handle.error().code == Errc::permission_denied) {
    handle = opener(Access::read_only);
    header_shared = false;
  }
  if (!handle) return handle.error();
  return open_single(std::move(*handle), header_shared, what, expected_id, writable, wait, by_name);
}

}  // namespace

Result<void> RegionFactory::map_single_object(Impl& impl, Access header_access,
                                              Sharing header_sharing) {
  std::string what = "segment " + impl.id;
  // One mapping covers header and data when both are writable (the common case: one
  // mmap and munmap fewer), or when pages are larger than the header so the data cannot
  // be mapped on its own. A read-only data area gets its own read-only mapping.
  bool writable_header = header_access == Access::read_write && header_sharing == Sharing::shared;
  bool page_aligned = kHeaderSize % platform::page_size() == 0;
  if ((impl.writable && writable_header) || !page_aligned) {
    if (header_sharing != Sharing::shared)
      return Error{Errc::unsupported, 0,
                   "cannot open " + what + " read-only on a system with pages larger than 4 KiB"};
    auto whole = platform::map(impl.control, 0, kHeaderSize + impl.capacity, header_access,
                               Sharing::shared, what);
    if (!whole) return whole.error();
    impl.header_map = std::move(*whole);
    impl.data = impl.header_map.data() + kHeaderSize;
    return {};
  }
  if (!impl.header_map.valid()) {
    auto header = platform::map(impl.control, 0, kHeaderSize, header_access, header_sharing, what);
    if (!header) return header.error();
    impl.header_map = std::move(*header);
  }
  auto data =
      platform::map(impl.control, kHeaderSize, impl.capacity,
                    impl.writable ? Access::read_write : Access::read_only, Sharing::shared, what);
  if (!data) return data.error();
  impl.data_map = std::move(*data);
  impl.data = impl.data_map.data();
  return {};
}

Result<Region> RegionFactory::open_named(const std::string& region_id, bool writable, Role role) {
  if (auto r = validate_region_id(region_id); !r) return r.error();
  auto opener = [&](Access access) { return platform::open_named(region_id, access); };
  auto region = open_with_fallback(opener, "segment " + region_id, region_id, writable,
                                   is_named_region_id(region_id), true);
  if (region) region->impl_->role = role;
  return region;
}

Result<Region> RegionFactory::open_single_path(const std::string& path,
                                               const std::string& expected_id, bool writable) {
  auto opener = [&](Access access) { return platform::open_path(path, access); };
  return open_with_fallback(opener, path, expected_id, writable, false, false);
}

Result<Region> RegionFactory::open_split(const OpenTarget& t, bool writable) {
  if (t.control_path.empty())
    return Error{Errc::invalid_argument, 0, "a memfd region needs its control path too"};
  auto impl = std::make_unique<Impl>();
  impl->role = Role::opened;
  impl->writable = writable;
  auto control = platform::open_path(t.control_path, Access::read_write);
  if (!control && !writable && control.error().code == Errc::permission_denied) {
    control = platform::open_path(t.control_path, Access::read_only);
    impl->header_shared = false;
  }
  if (!control) return control.error();
  impl->control = std::move(*control);
  auto control_info = check_object(impl->control, t.control_path);
  if (!control_info) return control_info.error();
  if (auto r = take_liveness_lock(impl->control, t.control_path); !r) return r.error();
  if (control_info->size < kHeaderSize) return too_small(t.control_path, control_info->size);
  auto copy = map_and_copy_header(*impl, t.control_path);
  if (!copy) return copy.error();
  const RegionHeader& h = copy->get();
  if (auto r = validate_header_fields(h); !r) return r.error();
  if (auto r = check_identity(h, t.region_id, true, t.control_path); !r) return r.error();

  auto data = platform::open_path(t.data_path, writable ? Access::read_write : Access::read_only);
  if (!data) return data.error();
  impl->data_object = std::move(*data);
  auto data_info = check_object(impl->data_object, t.data_path);
  if (!data_info) return data_info.error();
  // The data object's liveness lock: while this open (or a mapping of it) lives, the
  // creator's warm pool never takes the object back (pool.hpp).
  if (auto r = lock_data_object(impl->data_object, t.data_path); !r) return r.error();
  if (auto r = validate_header(h, data_info->size, t.control_path); !r) return r.error();
  impl->adopt(h);
  if (platform::anonymous_name(impl->control) != impl->id ||
      platform::anonymous_name(impl->data_object) != data_object_name(h))
    return Error{Errc::invalid_argument, 0,
                 t.control_path + " and " + t.data_path +
                     " are not the control and data memfds of one region (" + impl->id + ")"};
  if (auto r = check_state(impl->header(), impl->id, writable); !r) return r.error();
  // Huge pages: a mapping must cover whole huge pages (munmap refuses other lengths).
  std::uint64_t map_length = (h.flags & kFlagHugePages) ? data_info->size : impl->capacity;
  auto mapped = platform::map(impl->data_object, 0, map_length,
                              writable ? Access::read_write : Access::read_only, Sharing::shared,
                              t.data_path);
  if (!mapped) return mapped.error();
  impl->data_map = std::move(*mapped);
  impl->data = impl->data_map.data();
  return make(std::move(impl));
}

Result<Region> Region::open(const OpenTarget& target, bool writable) {
  return guarded([&]() -> Result<Region> {
    if (!target.data_path.empty() && target.data_path != target.control_path)
      return RegionFactory::open_split(target, writable);
    if (!target.control_path.empty())
      return RegionFactory::open_single_path(target.control_path, target.region_id, writable);
    if (!target.region_id.empty())
      return RegionFactory::open_named(target.region_id, writable, Role::opened);
    return Error{Errc::invalid_argument, 0, "open needs a region id or the paths of a region"};
  });
}

}  // namespace spshm
