// Read-only inspection of segments, orphan removal, and process identity.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <new>

#include "guard.hpp"
#include "header.hpp"
#include "ids.hpp"
#include "platform.hpp"
#include "region_impl.hpp"

namespace spshm {

namespace {

/// A segment whose header was never completed is removed by unlink_segment only once it
/// is this old: younger ones may still be being created by a live process.
constexpr std::uint64_t kStaleCreationNs = 10ull * 1000 * 1000 * 1000;

/// An unlocked header-less segment younger than this is left alone: a creator takes the
/// liveness lock a few system calls after its O_EXCL create, and a creator of an older
/// version (no locks) may still be sizing it.
constexpr std::uint64_t kCreationGraceNs = kStaleCreationNs;

/// Reads the header of an opened object into `copy`; corrupt if it is too small.
Result<void> read_header(const platform::Handle& handle, const platform::ObjectInfo& info,
                         const std::string& what, HeaderCopy& copy) {
  if (info.size < kHeaderSize)
    return Error{Errc::corrupt, 0,
                 what + " is " + std::to_string(info.size) + " bytes, smaller than a " +
                     std::to_string(kHeaderSize) + "-byte header (truncated?)"};
  return platform::read_at(handle, 0, copy.bytes, sizeof copy.bytes, what);
}

// A creator sizes the object first and writes the magic last, so what a creator that
// died leaves is empty or has a zero magic. A shorter object that has (part of) a magic
// was truncated after creation: damaged, not incomplete. `header` holds the bytes the
// object has (zero beyond them).
bool is_incomplete(const RegionHeader* header) noexcept {
  for (char c : header->magic)
    if (c != 0) return false;
  return true;
}

Error too_short(const std::string& what, std::uint64_t size) {
  return Error{Errc::corrupt, 0,
               what + " is " + std::to_string(size) + " bytes, smaller than a " +
                   std::to_string(kHeaderSize) +
                   "-byte header, yet has a magic: damaged (not removed: check it and delete "
                   "it by hand if it is garbage)"};
}

}  // namespace

HeaderSnapshot snapshot(const RegionHeader& h) {
  HeaderSnapshot s;
  s.region_id.assign(h.region_id, strnlen(h.region_id, kRegionIdCapacity));
  s.backend = static_cast<BackendKind>(h.backend);
  s.format_version = h.format_version;
  s.data_size = h.data_size;
  s.data_capacity = h.data_capacity;
  s.data_offset = h.data_offset;
  s.flags = h.flags;
  s.state = h.state.load(std::memory_order_acquire);
  s.security_level = h.security_level;
  s.refcount = reference_count(h);
  s.creator_pid = h.creator_pid;
  s.creator_start_time = h.creator_start_time;
  std::memcpy(s.boot_id.data(), h.boot_id, s.boot_id.size());
  s.created_at_ns = h.created_at_ns;
  s.last_access_ns = h.last_access_ns.load(std::memory_order_relaxed);
  s.idle_timeout_ns = h.idle_timeout_ns.load(std::memory_order_relaxed);
  std::uint32_t length =
      h.metadata_length < kMetadataCapacity ? h.metadata_length : kMetadataCapacity;
  s.metadata_json.assign(h.metadata, length);
  s.data_name.assign(h.data_name, strnlen(h.data_name, kDataNameCapacity));
  s.holders = holders(h);
  s.creator_alive =
      s.boot_id == platform::boot_id() && process_alive(s.creator_pid, s.creator_start_time);
  return s;
}

Result<HeaderSnapshot> inspect(const std::string& path) {
  try {
    auto handle = platform::open_path(path, platform::Access::read_only);
    if (!handle) return handle.error();
    auto info = check_our_object(*handle, path);
    if (!info) return info.error();
    HeaderCopy copy;
    if (auto r = read_header(*handle, *info, path, copy); !r) return r.error();
    const RegionHeader& h = copy.get();
    // A memfd control object holds only the header; its data object is elsewhere, so
    // only the header's own consistency can be checked here.
    bool split = (h.flags & kFlagSplitData) != 0;
    std::uint64_t object_size = split ? std::numeric_limits<std::uint64_t>::max() : info->size;
    if (auto r = validate_header(h, object_size, path); !r) return r.error();
    HeaderSnapshot snap = snapshot(h);
    auto held = platform::lock_is_held(*handle, kLivenessLockByte);
    snap.in_use = !held || *held;
    // A region written without liveness locks: its users take none; its creator decides.
    if (!(h.flags & kFlagLivenessLocks)) snap.in_use = snap.in_use || snap.creator_alive;
    return snap;
  } catch (const std::bad_alloc&) {
    return Error{Errc::no_space, ENOMEM, "out of memory inspecting " + path};
  }
}

// Removal policy: a segment is removed if its id is well formed, it is a regular object
// of our uid, and either its header is valid, or it never got a header (smaller than
// one, or magic still zero) and has not been modified for kStaleCreationNs (a creator
// that died half-way). A segment with a damaged header is left alone (corrupt): it may
// be somebody's data under a name of ours, and the operator decides.
Result<void> unlink_segment(const std::string& region_id) {
  try {
    if (auto r = validate_region_id(region_id); !r) return r;
    auto handle = platform::open_named(region_id, platform::Access::read_only);
    if (!handle) return handle.error();
    std::string what = "segment " + region_id;
    auto info = check_our_object(*handle, what);
    if (!info) return info.error();
    HeaderCopy copy;
    std::memset(copy.bytes, 0, sizeof copy.bytes);
    Result<void> valid = read_header(*handle, *info, what, copy);
    if (valid) {
      valid = validate_header(copy.get(), info->size, what);
    } else if (info->size > 0 && info->size < kHeaderSize) {
      // Too short for a header: read what there is, to tell damage from a creation cut short.
      auto prefix = std::min<std::uint64_t>(info->size, sizeof copy.get().magic);
      if (auto r = platform::read_at(*handle, 0, copy.bytes, prefix, what); !r) return r;
    }
    if (valid) {
      std::string id(copy.get().region_id, strnlen(copy.get().region_id, kRegionIdCapacity));
      if (id != region_id)
        return Error{Errc::corrupt, 0,
                     what + " holds the header of " + id + ": not removed (remove it by hand)"};
    } else {
      std::uint64_t now = platform::realtime_ns();
      bool stale = now > info->modified_ns && now - info->modified_ns > kStaleCreationNs;
      if (!is_incomplete(&copy.get()) || !stale) {
        Error e = std::move(valid).error();
        e.message += is_incomplete(&copy.get())
                         ? " (it may still be being created: not removed, retry later)"
                         : " (not removed: check it and delete it by hand if it is garbage)";
        return e;
      }
    }
    return platform::unlink_named(region_id);
  } catch (const std::bad_alloc&) {
    return Error{Errc::no_space, ENOMEM, "out of memory removing " + region_id};
  }
}

Result<SweepOutcome> sweep_segment(const std::string& region_id, bool dry_run) {
  return sweep_segment_keeping(region_id, dry_run, nullptr);
}

Result<SweepOutcome> sweep_segment_keeping(const std::string& region_id, bool dry_run,
                                           platform::Handle* keep) {
  return guarded([&]() -> Result<SweepOutcome> {
    if (auto r = validate_region_id(region_id); !r) return r.error();
    std::string what = "segment " + region_id;
    bool exclusive = true;
    auto handle = platform::open_named(region_id, platform::Access::read_write);
    if (!handle && handle.error().code == Errc::permission_denied) {
      exclusive = false;  // mode 0400 (sealed): no write open, hence no F_WRLCK
      handle = platform::open_named(region_id, platform::Access::read_only);
    }
    if (!handle) return std::move(handle).error();
    auto info = check_our_object(*handle, what);
    if (!info) return info.error();
    if (exclusive) {
      auto got = platform::try_lock_exclusive(*handle, kLivenessLockByte);
      if (!got) return got.error();
      if (!*got) return SweepOutcome::in_use;
    } else {
      auto held = platform::lock_is_held(*handle, kLivenessLockByte);
      if (!held) return held.error();
      if (*held) return SweepOutcome::in_use;
    }
    if (!platform::has_ofd_locks()) return SweepOutcome::in_use;  // nobody to ask
    HeaderCopy copy;
    std::memset(copy.bytes, 0, sizeof copy.bytes);
    std::uint64_t readable = std::min<std::uint64_t>(info->size, sizeof copy.bytes);
    if (readable > 0) {
      if (auto r = platform::read_at(*handle, 0, copy.bytes, readable, what); !r) return r.error();
    }
    bool incomplete = is_incomplete(&copy.get());
    if (incomplete) {
      std::uint64_t now = platform::realtime_ns();
      if (now <= info->modified_ns || now - info->modified_ns < kCreationGraceNs)
        return SweepOutcome::young;
    } else {
      if (info->size < kHeaderSize) return too_short(what, info->size);
      if (auto r = validate_header(copy.get(), info->size, what); !r) {
        Error e = std::move(r).error();
        e.message += " (not removed: check it and delete it by hand if it is garbage)";
        return e;
      }
      std::string id(copy.get().region_id, strnlen(copy.get().region_id, kRegionIdCapacity));
      if (id != region_id)
        return Error{Errc::corrupt, 0,
                     what + " holds the header of " + id + ": not removed (remove it by hand)"};
      // Written by a version without liveness locks: its users hold none, so the lock
      // proves nothing; judge by its creator, as that version did.
      const RegionHeader& h = copy.get();
      if (!(h.flags & kFlagLivenessLocks)) {
        std::array<std::uint8_t, 16> boot{};
        std::memcpy(boot.data(), h.boot_id, boot.size());
        if (boot == platform::boot_id() && process_alive(h.creator_pid, h.creator_start_time))
          return SweepOutcome::in_use;
      }
    }
    // The name may have been given to a new object since we opened it (remove_and_create).
    if (!names_our_object(region_id, *handle)) return SweepOutcome::in_use;
    if (!dry_run) {
      if (auto r = platform::unlink_named(region_id); !r && r.error().code != Errc::not_found)
        return r.error();
      // Its pages may be freed piece by piece by the caller: we hold the liveness byte
      // exclusively (nobody who takes locks uses it), and the holders of an older format,
      // which take none, are only known dead when the header says so (checked above).
      if (keep != nullptr && exclusive && (incomplete || (copy.get().flags & kFlagLivenessLocks)))
        *keep = std::move(*handle);
    }
    return incomplete ? SweepOutcome::removed_incomplete : SweepOutcome::removed;
  });
}

Result<std::uint64_t> release_unlinked_pages(platform::Handle& object, std::uint64_t max_bytes,
                                             std::uint64_t& released) {
  return guarded([&]() -> Result<std::uint64_t> {
    if (!object.valid()) return std::uint64_t{0};
    auto info = platform::stat(object, "an unlinked segment");
    if (!info) return info.error();
    // Holes, not ftruncate: a racing reader that mapped it before the removal reads
    // zeros rather than taking SIGBUS.
    std::uint64_t from = std::min(released, info->size);
    std::uint64_t length = std::min(max_bytes, info->size - from);
    if (auto r = platform::release_pages(object, from, length); !r) return r.error();
    released = from + length;
    if (released >= info->size) {
      object.reset();  // nothing left to free: the close is cheap now
      return std::uint64_t{0};
    }
    return info->size - released;
  });
}

std::vector<std::string> list_segments() { return platform::list_named(); }

std::string segment_dir() { return platform::named_dir(); }

Result<void> set_segment_dir(const std::string& dir) { return platform::set_named_dir(dir); }

Result<FilesystemSpace> filesystem_space(const std::string& path) {
  auto space = platform::fs_space(path);
  if (!space.ok()) return std::move(space).error();
  FilesystemSpace out;
  out.total = space.value().total;
  out.free = space.value().free;
  out.available = space.value().available;
  out.tmpfs = space.value().tmpfs;
  return out;
}

// ---- processes ----

std::uint32_t self_pid() noexcept { return platform::current_pid(); }

namespace {

/// This process's start time, read once per pid (a forked child reads its own): reading
/// /proc costs ~10 us and every create, map and attach needs it. Every writer of one
/// process stores the same value, start time before pid, so a reader that sees its own
/// pid (acquire) sees its start time.
std::uint64_t own_start_time(std::uint32_t pid) {
  static std::atomic<std::uint64_t> cached_start{0};
  static std::atomic<std::uint32_t> cached_pid{0};
  if (cached_pid.load(std::memory_order_acquire) == pid)
    return cached_start.load(std::memory_order_relaxed);
  auto st = platform::process_stat(pid);
  if (!st) return 0;
  cached_start.store(st->start_time, std::memory_order_relaxed);
  cached_pid.store(pid, std::memory_order_release);
  return st->start_time;
}

}  // namespace

Result<std::uint64_t> process_start_time(std::uint32_t pid) {
  return guarded([&]() -> Result<std::uint64_t> {
    if (pid != 0 && pid == platform::current_pid()) {
      if (std::uint64_t start = own_start_time(pid)) return start;
    }
    auto st = platform::process_stat(pid);
    if (!st) return st.error();
    return st->start_time;
  });
}

std::array<std::uint8_t, 16> boot_id() { return platform::boot_id(); }

bool process_alive(std::uint32_t pid, std::uint64_t start_time) {
  if (pid == 0) return false;
  if (pid == platform::current_pid()) return own_start_time(pid) == start_time;
  auto st = platform::process_stat(pid);
  return st && st->running && st->start_time == start_time;
}

}  // namespace spshm
