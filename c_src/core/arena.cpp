// Arenas for small regions (arena.hpp, docs/FORMAT.md "Arenas").
#include "arena.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "format.hpp"
#include "header.hpp"
#include "region.hpp"
#include "region_impl.hpp"

#ifdef __linux__
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#endif

namespace spshm {

namespace {

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kMinArena = 1u << 20;

std::uint64_t round_page(std::uint64_t n) noexcept { return (n + kPage - 1) & ~(kPage - 1); }

#ifdef __linux__
/// The core's errno mapping, as for every other object: EMFILE is "too many open files"
/// (io_error, raise ulimit -n), not a full filesystem; ENOMEM is no_space.
Error os_failure(const std::string& what, int err) { return os_error(what, err); }

/// A new arena: memfd (size sealed at once, owner-only), mapped read-write. Its pages
/// are not allocated up front: creating an arena costs a few system calls, never a
/// fallocate of megabytes (it happens on the scheduler of a small create). A memfd
/// lives on the kernel's internal shmem mount, which has no size limit, so a touched
/// page can never fail with SIGBUS; memory pressure is the memory cgroup's.
Result<std::shared_ptr<Arena>> make_arena(std::uint64_t bytes) {
  std::string name = "spshm_arena_" + random_region_id().substr(6);
  int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return os_failure("cannot create arena memfd " + name, errno);
  platform::Handle handle(fd);
  if (auto limit = platform::check_file_size_limit("arena " + name, bytes); !limit.ok())
    return limit.error();
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0)
    return os_failure("cannot size arena " + name, errno);
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0)
    return os_failure("cannot seal the size of arena " + name, errno);
  if (::fchmod(fd, 0600) != 0) return os_failure("cannot set the permissions of " + name, errno);
  void* address = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (address == MAP_FAILED) return os_failure("cannot map arena " + name, errno);
  platform::Mapping map(address, bytes);
  return std::make_shared<Arena>(std::move(handle), std::move(map), std::move(name));
}
#else
Result<std::shared_ptr<Arena>> make_arena(std::uint64_t) {
  return Error{Errc::unsupported, 0, "arenas need Linux (memfd and OFD locks)"};
}
#endif

/// The object is a memfd named spshm_arena_* (its /proc link target says so).
bool is_arena_object(const platform::Handle& handle) {
#ifdef __linux__
  std::string link = "/proc/self/fd/" + std::to_string(handle.native());
  char target[256];
  ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
  if (n <= 0) return false;
  static const char kPrefix[] = "/memfd:spshm_arena_";
  return static_cast<std::size_t>(n) > sizeof kPrefix - 1 &&
         std::memcmp(target, kPrefix, sizeof kPrefix - 1) == 0;
#else
  (void)handle;
  return false;
#endif
}

}  // namespace

Arena::Arena(platform::Handle fd, platform::Mapping map, std::string name) noexcept
    : fd_(std::move(fd)), map_(std::move(map)), name_(std::move(name)) {
  free_.emplace(0, map_.size());
}

Arena::~Arena() = default;

std::uint64_t arena_chunk_length(std::uint64_t capacity) noexcept {
  return kHeaderSize + round_page(capacity);
}

bool arenas_supported() noexcept {
#ifdef __linux__
  return platform::page_size() == kPage && kHeaderSize == kPage;
#else
  return false;
#endif
}

void ArenaSet::configure(std::uint64_t arena_bytes, std::chrono::milliseconds grace) {
  std::lock_guard<std::mutex> lock(mutex_);
  arena_bytes_ = std::max(kMinArena, round_page(arena_bytes));
  grace_ = grace;
}

std::uint64_t ArenaSet::arena_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return arena_bytes_;
}

void ArenaSet::insert_free(Arena& a, std::uint64_t offset, std::uint64_t length) noexcept {
  try {
    auto next = a.free_.lower_bound(offset);
    if (next != a.free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == offset) {
        offset = prev->first;
        length += prev->second;
        a.free_.erase(prev);
      }
    }
    if (next != a.free_.end() && offset + length == next->first) {
      length += next->second;
      a.free_.erase(next);
    }
    a.free_.emplace(offset, length);
  } catch (...) {
    // Out of memory for the free list: the chunk is lost to this arena until it is
    // returned as a whole (it never is: live_ would never reach 0). Nothing unsafe.
  }
}

/// The chunk is reusable if no open other than the arena's holds a lock on its liveness
/// byte: the exclusive lock (converting the arena open's own shared lock, if it still
/// holds one) is granted only then. The bytes are zeroed before anyone gets them again.
bool ArenaSet::reclaim(Arena& a, std::uint64_t offset, std::uint64_t length) noexcept {
  auto got = platform::try_lock_exclusive(a.fd_, offset + kLivenessLockByte);
  if (!got || !*got) return false;
  platform::unlock(a.fd_, offset + kLivenessLockByte);
  give_back(a, offset, length);
  return true;
}

void ArenaSet::give_back(Arena& a, std::uint64_t offset, std::uint64_t length) noexcept {
  // An opener that took its lock after ours was released sees this header: zero magic
  // means "being created" for a dedicated object, so it must not see a torn one. Clear
  // the magic first, then the rest.
  std::memset(a.base() + offset, 0, 8);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  std::memset(a.base() + offset + 8, 0, length - 8);
  insert_free(a, offset, length);
  --a.live_;
  if (a.live_ == 0) a.empty_since_ = std::chrono::steady_clock::now();
}

void ArenaSet::reclaim_pending_locked(Arena& a) noexcept {
  auto& p = a.pending_;
  p.erase(std::remove_if(p.begin(), p.end(),
                         [&](const std::pair<std::uint64_t, std::uint64_t>& c) {
                           return reclaim(a, c.first, c.second);
                         }),
          p.end());
}

Result<ArenaChunk> ArenaSet::allocate(std::uint64_t length) {
  if (!arenas_supported()) return Error{Errc::unsupported, 0, "arenas are not supported here"};
  length = round_page(length);
  std::lock_guard<std::mutex> lock(mutex_);
  if (length > arena_bytes_)
    return Error{Errc::invalid_argument, 0,
                 "a chunk of " + std::to_string(length) + " bytes does not fit an arena of " +
                     std::to_string(arena_bytes_) + " bytes"};
  for (int pass = 0; pass < 2; ++pass) {
    for (auto& a : arenas_) {
      if (pass == 1) reclaim_pending_locked(*a);
      for (auto it = a->free_.begin(); it != a->free_.end(); ++it) {
        if (it->second < length) continue;
        std::uint64_t offset = it->first, rest = it->second - length;
        a->free_.erase(it);
        if (rest != 0) a->free_.emplace(offset + length, rest);
        ++a->live_;
        return ArenaChunk{a, offset, length};
      }
    }
  }
  auto made = make_arena(arena_bytes_);
  if (!made) return made.error();
  std::shared_ptr<Arena> a = std::move(*made);
  arenas_.push_back(a);
  ++created_;
  auto it = a->free_.begin();
  std::uint64_t rest = it->second - length;
  a->free_.erase(it);
  if (rest != 0) a->free_.emplace(length, rest);
  ++a->live_;
  return ArenaChunk{a, 0, length};
}

void ArenaSet::retire(ArenaChunk chunk) noexcept {
  if (!chunk.arena) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Arena& a = *chunk.arena;
  // The caller's shared liveness lock is still held by the arena's open: reclaim's
  // exclusive lock converts it (one fcntl) when nobody else holds the byte.
  if (!reclaim(a, chunk.offset, chunk.length)) {
    platform::unlock(a.fd_, chunk.offset + kLivenessLockByte);
    try {
      a.pending_.emplace_back(chunk.offset, chunk.length);
    } catch (...) {
      // Lost to this arena (see insert_free).
    }
  }
}

void ArenaSet::retire_unlocked(ArenaChunk chunk) noexcept {
  if (!chunk.arena) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Arena& a = *chunk.arena;
  // Same window as reclaim()'s: an opener locking the byte after this probe reads a
  // deallocated (or zeroed) header and lets go.
  auto held = platform::lock_is_held(a.fd_, chunk.offset + kLivenessLockByte);
  if (held && !*held) {
    give_back(a, chunk.offset, chunk.length);
    return;
  }
  try {
    a.pending_.emplace_back(chunk.offset, chunk.length);
  } catch (...) {
    // Lost to this arena (see insert_free).
  }
}

std::uint32_t ArenaSet::drop_empty_locked(bool) {
  auto now = std::chrono::steady_clock::now();
  std::uint32_t dropped = 0;
  // Destroying an Arena unmaps and closes it; Regions still using it hold a shared_ptr,
  // so only an arena nobody uses goes (live_ == 0 means no Region of ours is in it).
  arenas_.erase(std::remove_if(arenas_.begin(), arenas_.end(),
                               [&](const std::shared_ptr<Arena>& a) {
                                 bool drop = a->live_ == 0 && a->pending_.empty() &&
                                             now - a->empty_since_ >= grace_;
                                 if (drop) ++dropped;
                                 return drop;
                               }),
                arenas_.end());
  returned_ += dropped;
  return dropped;
}

std::uint32_t ArenaSet::maintain() {
  std::vector<std::shared_ptr<Arena>> keep_alive;  // destroyed (munmap) outside the lock
  std::uint32_t dropped = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& a : arenas_) {
      if (!a->pending_.empty()) reclaim_pending_locked(*a);
    }
    keep_alive = arenas_;
    dropped = drop_empty_locked(false);
  }
  return dropped;
}

ArenaStats ArenaSet::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  ArenaStats s;
  s.arenas = arenas_.size();
  for (auto& a : arenas_) {
    s.arena_bytes += a->size();
    s.live_chunks += a->live_ - a->pending_.size();
    s.pending_chunks += a->pending_.size();
  }
  s.created = created_;
  s.returned = returned_;
  return s;
}

Result<std::vector<ArenaEntry>> inspect_arena(const std::string& path) {
  try {
    auto handle = platform::open_path(path, platform::Access::read_only);
    if (!handle) return handle.error();
    if (!is_arena_object(*handle))
      return Error{Errc::not_ours, 0, path + " is not an arena (a memfd named spshm_arena_*)"};
    auto info = check_our_object(*handle, path);
    if (!info) return info.error();
    std::vector<ArenaEntry> out;
    std::uint64_t offset = 0;
    HeaderCopy copy;
    while (offset + kHeaderSize <= info->size) {
      std::uint64_t step = kHeaderSize;
      if (auto r = platform::read_at(*handle, offset, copy.bytes, sizeof copy.bytes, path); !r)
        return r.error();
      const RegionHeader& h = copy.get();
      if (header_published(h) && (h.flags & kFlagArena) != 0 &&
          validate_header(h, info->size - offset)) {
        ArenaEntry e;
        e.control_offset = offset;
        e.snapshot = snapshot(h);
        auto held = platform::lock_is_held(*handle, offset + kLivenessLockByte);
        e.snapshot.in_use = !held || *held;
        out.push_back(std::move(e));
        step += round_page(h.data_capacity);
      }
      offset += step;
    }
    return out;
  } catch (const std::bad_alloc&) {
    return Error{Errc::no_space, ENOMEM, "out of memory inspecting arena " + path};
  }
}

ArenaSet& process_arenas() {
  static ArenaSet* set = new ArenaSet();  // never destroyed: Regions may outlive statics
  return *set;
}

}  // namespace spshm
