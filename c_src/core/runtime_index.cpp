// The runtime index (runtime_index.hpp). Linux: memfd regions are reached through
// /proc/<pid>/fd, which is what the index saves a worker from scanning. Elsewhere the
// index is off (named objects are found by name).
#include "runtime_index.hpp"

#include <atomic>
#include <cstring>
#include <mutex>

#include "format.hpp"
#include "ids.hpp"

#if defined(__linux__)
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#endif

namespace spshm::runtime_index {

std::string format(const Entry& e) {
  return "spshm1 " + e.kind + " " + e.control_path + " " + e.data_path + " " +
         std::to_string(e.offset) + " " + std::to_string(e.size);
}

void Published::publish(const std::string& region_id, const Entry& entry) noexcept {
  if (region_id.size() >= sizeof id_) return;
  if (!runtime_index::publish(region_id, entry)) return;
  std::memcpy(id_, region_id.c_str(), region_id.size() + 1);
}

void Published::remove() noexcept {
  if (id_[0] == '\0') return;
  try {
    runtime_index::remove(std::string(id_));
  } catch (...) {
  }
  id_[0] = '\0';
}

#if defined(__linux__)

std::string base_directory() {
  const char* own = std::getenv("SNAKEPIT_SHM_RUNTIME_DIR");
  if (own != nullptr && own[0] == '/') return own;
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  if (xdg != nullptr && xdg[0] == '/') return std::string(xdg) + "/snakepit_shm";
  return "/dev/shm/snakepit_shm-" + std::to_string(::geteuid());
}

std::string namespace_dir_name_of(const std::string& link) {
  // "pid:[4026531836]" -> "pidns-4026531836"
  if (link.size() < 7 || link.compare(0, 5, "pid:[") != 0 || link.back() != ']') return {};
  std::string digits = link.substr(5, link.size() - 6);
  if (digits.empty() || digits.size() > 20 ||
      digits.find_first_not_of("0123456789") != std::string::npos)
    return {};
  return "pidns-" + digits;
}

std::string namespace_dir_name() {
  char target[64];
  ssize_t n = ::readlink("/proc/self/ns/pid", target, sizeof target - 1);
  if (n <= 0) return {};
  return namespace_dir_name_of(std::string(target, static_cast<std::size_t>(n)));
}

namespace {

// Opening (and reopening) the directory is serialised; entries are written and removed
// without a lock (a system call on a tmpfs, never under a mutex: a resource destructor on
// a normal scheduler must not wait behind another thread's call).
std::mutex g_mutex;
std::atomic<int> g_dirfd{-1};  // O_PATH descriptor of the directory (-1: not open / off)
bool g_off = false;            // the directory is unusable: do not retry on every region
std::string g_path;

// A directory descriptor we may use: a real directory (O_NOFOLLOW: not a symlink to
// somewhere else), ours, no group/other bits. Closes `fd` and says -1 otherwise.
int checked(int fd) {
  if (fd < 0) return -1;
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() ||
      (st.st_mode & 077) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Opens the base directory (creating it 0700), then this PID namespace's subdirectory in
// it (creating it 0700), each checked through its descriptor. -1 if either is unusable
// or the namespace cannot be named.
int open_checked(const std::string& base, const std::string& sub) {
  if (sub.empty()) return -1;
  if (::mkdir(base.c_str(), 0700) != 0 && errno != EEXIST) return -1;
  int parent = checked(::open(base.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (parent < 0) return -1;
  int fd = -1;
  if (::mkdirat(parent, sub.c_str(), 0700) == 0 || errno == EEXIST)
    fd = checked(::openat(parent, sub.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  ::close(parent);
  return fd;
}

// The directory's descriptor, opening it on first use, or again when `stale` (the
// descriptor that failed with ENOENT: the directory was removed). A replaced descriptor
// is left open (another thread may be using it): one per removal of the directory.
int dir_fd(int stale = -1) {
  int fd = g_dirfd.load(std::memory_order_acquire);
  if (fd >= 0 && fd != stale) return fd;
  std::lock_guard<std::mutex> lock(g_mutex);
  fd = g_dirfd.load(std::memory_order_acquire);
  if (fd >= 0 && fd != stale) return fd;
  if (fd < 0 && g_off && stale < 0) return -1;
  std::string base = base_directory();
  std::string sub = namespace_dir_name();
  g_path = base + "/" + sub;
  fd = open_checked(base, sub);
  g_off = fd < 0;
  g_dirfd.store(fd, std::memory_order_release);
  return fd;
}

bool region_id_shaped(const char* name) {
  std::string id(name);
  return is_random_region_id(id) || is_named_region_id(id);
}

// True while the control block at `offset_text` of the arena at `path` is a published
// header of region `id` that is not deallocated (pread: nothing is mapped or changed).
bool arena_chunk_holds(const std::string& path, const std::string& offset_text,
                       const std::string& id) {
  if (offset_text.empty() || offset_text.size() > 15 ||
      offset_text.find_first_not_of("0123456789") != std::string::npos)
    return false;
  off_t offset = static_cast<off_t>(std::stoull(offset_text));
  if (offset % kHeaderSize != 0) return false;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return false;
  char magic[sizeof kMagic];
  char stored[sizeof(RegionHeader::region_id) + 1] = {};
  std::uint32_t state = 0;
  bool ok = ::pread(fd, magic, sizeof magic, offset + offsetof(RegionHeader, magic)) ==
                static_cast<ssize_t>(sizeof magic) &&
            ::pread(fd, stored, sizeof stored - 1, offset + offsetof(RegionHeader, region_id)) ==
                static_cast<ssize_t>(sizeof stored - 1) &&
            ::pread(fd, &state, sizeof state, offset + offsetof(RegionHeader, state)) ==
                static_cast<ssize_t>(sizeof state);
  ::close(fd);
  return ok && std::memcmp(magic, kMagic, sizeof magic) == 0 && id == stored &&
         (state & kStateDeallocated) == 0;
}

// True while `entry` (a symlink's text) names a memfd of `id` that still exists.
bool entry_alive(const std::string& id, const std::string& entry) {
  // "spshm1 <kind> <control> <data> <offset> <size>"
  std::string fields[6];
  std::size_t start = 0;
  for (int i = 0; i < 6; ++i) {
    std::size_t end = entry.find(' ', start);
    if ((end == std::string::npos) != (i == 5)) return false;
    fields[i] = entry.substr(start, end == std::string::npos ? std::string::npos : end - start);
    start = end + 1;
  }
  if (fields[0] != "spshm1") return false;
  char target[256];
  ssize_t n = ::readlink(fields[2].c_str(), target, sizeof target - 1);
  if (n <= 0) return false;
  std::string link(target, static_cast<std::size_t>(n));
  if (fields[1] == "memfd") return link == "/memfd:" + id + " (deleted)";
  // An arena: the object is shared by many regions; alive while it is one of ours and
  // the control block at the offset still holds this region, not deallocated (its VM may
  // have freed it without removing the entry, and reused the chunk).
  return fields[1] == "arena" && link.compare(0, 19, "/memfd:spshm_arena_") == 0 &&
         arena_chunk_holds(fields[2], fields[4], id);
}

}  // namespace

std::string directory() {
  if (dir_fd() < 0) return {};
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_path;
}

bool publish(const std::string& region_id, const Entry& entry) noexcept {
  try {
    std::string text = format(entry);
    int stale = -1;
    for (int attempt = 0; attempt < 2; ++attempt) {
      int dir = dir_fd(stale);
      if (dir < 0) return false;
      if (::symlinkat(text.c_str(), dir, region_id.c_str()) == 0) return true;
      if (errno == EEXIST) {  // a stale entry of a dead VM (ids are unique while live)
        ::unlinkat(dir, region_id.c_str(), 0);
        return ::symlinkat(text.c_str(), dir, region_id.c_str()) == 0;
      }
      if (errno != ENOENT) return false;  // ENOENT: the directory was removed; recreate
      stale = dir;
    }
  } catch (...) {
  }
  return false;
}

void remove(const std::string& region_id) noexcept {
  int dir = g_dirfd.load(std::memory_order_acquire);
  if (dir >= 0) ::unlinkat(dir, region_id.c_str(), 0);
}

SweepResult sweep() noexcept {
  SweepResult result;
  try {
    int dir = dir_fd();
    if (dir < 0) return result;
    dir = ::openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) return result;
    DIR* listing = ::fdopendir(dir);
    if (listing == nullptr) {
      ::close(dir);
      return result;
    }
    while (dirent* d = ::readdir(listing)) {
      if (!region_id_shaped(d->d_name)) continue;  // not an entry: not ours to judge
      char text[512];
      ssize_t n = ::readlinkat(dir, d->d_name, text, sizeof text - 1);
      bool alive = n > 0 && entry_alive(d->d_name, std::string(text, static_cast<std::size_t>(n)));
      if (alive) {
        ++result.kept;
      } else if (::unlinkat(dir, d->d_name, 0) == 0) {
        ++result.removed;
      }
    }
    ::closedir(listing);
  } catch (...) {
  }
  return result;
}

#else  // no runtime index: named objects are found by name

std::string base_directory() { return {}; }
std::string namespace_dir_name_of(const std::string&) { return {}; }
std::string namespace_dir_name() { return {}; }
std::string directory() { return {}; }
bool publish(const std::string&, const Entry&) noexcept { return false; }
void remove(const std::string&) noexcept {}
SweepResult sweep() noexcept { return {}; }

#endif

}  // namespace spshm::runtime_index
