// The runtime index (runtime_index.hpp). Linux: memfd regions are reached through
// /proc/<pid>/fd, which is what the index saves a worker from scanning. Elsewhere the
// index is off (named objects are found by name).
#include "runtime_index.hpp"

#include <cstring>
#include <mutex>

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

namespace {

std::mutex g_mutex;
int g_dirfd = -1;    // O_PATH descriptor of the directory (-1: not opened yet / off)
bool g_off = false;  // the directory is unusable: do not retry on every region
std::string g_path;

std::string configured_path() {
  const char* own = std::getenv("SNAKEPIT_SHM_RUNTIME_DIR");
  if (own != nullptr && own[0] == '/') return own;
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  if (xdg != nullptr && xdg[0] == '/') return std::string(xdg) + "/snakepit_shm";
  return "/dev/shm/snakepit_shm-" + std::to_string(::geteuid());
}

// Opens the directory (creating it 0700), and checks it through the descriptor: a real
// directory (O_NOFOLLOW: not a symlink to somewhere else), ours, no group/other bits.
int open_checked(const std::string& path) {
  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) return -1;
  int fd = ::open(path.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return -1;
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() ||
      (st.st_mode & 077) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// The directory's descriptor (lock held), opening it on first use or after `reopen`.
int dir_fd(bool reopen) {
  if (reopen && g_dirfd >= 0) {
    ::close(g_dirfd);
    g_dirfd = -1;
    g_off = false;
  }
  if (g_dirfd >= 0 || g_off) return g_dirfd;
  g_path = configured_path();
  g_dirfd = open_checked(g_path);
  g_off = g_dirfd < 0;
  return g_dirfd;
}

bool region_id_shaped(const char* name) {
  std::string id(name);
  return is_random_region_id(id) || is_named_region_id(id);
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
  // An arena: the object is shared by many regions; alive while it is one of ours.
  return fields[1] == "arena" && link.compare(0, 13, "/memfd:spshm_") == 0;
}

}  // namespace

std::string directory() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return dir_fd(false) >= 0 ? g_path : std::string();
}

bool publish(const std::string& region_id, const Entry& entry) noexcept {
  try {
    std::string text = format(entry);
    std::lock_guard<std::mutex> lock(g_mutex);
    for (int attempt = 0; attempt < 2; ++attempt) {
      int dir = dir_fd(attempt > 0);
      if (dir < 0) return false;
      if (::symlinkat(text.c_str(), dir, region_id.c_str()) == 0) return true;
      if (errno == EEXIST) {  // a stale entry of a dead VM (ids are unique while live)
        ::unlinkat(dir, region_id.c_str(), 0);
        if (::symlinkat(text.c_str(), dir, region_id.c_str()) == 0) return true;
        return false;
      }
      if (errno != ENOENT) return false;  // ENOENT: the directory was removed; recreate
    }
  } catch (...) {
  }
  return false;
}

void remove(const std::string& region_id) noexcept {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_dirfd >= 0) ::unlinkat(g_dirfd, region_id.c_str(), 0);
}

SweepResult sweep() noexcept {
  SweepResult result;
  try {
    int dir;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      dir = dir_fd(false);
      if (dir < 0) return result;
      dir = ::openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
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

std::string directory() { return {}; }
bool publish(const std::string&, const Entry&) noexcept { return false; }
void remove(const std::string&) noexcept {}
SweepResult sweep() noexcept { return {}; }

#endif

}  // namespace spshm::runtime_index
