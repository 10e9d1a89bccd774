// Linux part of the OS layer: memfd and seals, /proc, getrandom, boot id, /dev/shm.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "platform.hpp"

namespace spshm::platform {

namespace {

constexpr char kShmDir[] = "/dev/shm";
std::mutex named_dir_mutex;
std::string named_dir_value = kShmDir;  // guarded by named_dir_mutex
constexpr char kMemfdLinkPrefix[] = "/memfd:";
constexpr char kDeletedSuffix[] = " (deleted)";

int fd_of(const Handle& h) noexcept { return static_cast<int>(h.native()); }

std::string kernel_release() {
  struct utsname u;
  return ::uname(&u) == 0 ? std::string(u.release) : std::string("unknown");
}

bool all_digits(const std::string& s, std::size_t from, std::size_t to) noexcept {
  if (from >= to) return false;
  for (std::size_t i = from; i < to; ++i)
    if (s[i] < '0' || s[i] > '9') return false;
  return true;
}

/// MemAvailable of /proc/meminfo in bytes, 0 if unknown.
std::uint64_t available_memory() {
  std::string text;
  if (!read_small_file("/proc/meminfo", text)) return 0;
  std::size_t at = text.find("MemAvailable:");
  if (at == std::string::npos) return 0;
  return std::strtoull(text.c_str() + at + sizeof "MemAvailable:" - 1, nullptr, 10) * 1024;
}

}  // namespace

// ---- named objects ----

std::string named_dir() {
  std::lock_guard<std::mutex> lock(named_dir_mutex);
  return named_dir_value;
}

Result<void> set_named_dir(const std::string& dir) {
  if (dir.empty() || dir[0] != '/' || dir.find('\0') != std::string::npos)
    return Error{Errc::invalid_argument, 0,
                 "the shared memory directory must be an absolute path, got: " + dir};
  std::string clean = dir;
  while (clean.size() > 1 && clean.back() == '/') clean.pop_back();
  struct stat st;
  if (::stat(clean.c_str(), &st) != 0)
    return os_error("cannot use " + clean + " as the shared memory directory", errno);
  if (!S_ISDIR(st.st_mode))
    return Error{Errc::invalid_argument, ENOTDIR,
                 clean + " is not a directory: shm_path must name a directory (a tmpfs mount)"};
  std::lock_guard<std::mutex> lock(named_dir_mutex);
  named_dir_value = clean;
  set_fault_segment_dir(clean);
  return {};
}

std::string named_path(const std::string& region_id) { return named_dir() + "/" + region_id; }

std::vector<std::string> list_named() {
  std::vector<std::string> ids;
  DIR* dir = ::opendir(named_dir().c_str());
  if (dir == nullptr) return ids;
  while (struct dirent* entry = ::readdir(dir)) {
    if (std::strncmp(entry->d_name, kNamePrefix, sizeof kNamePrefix - 1) == 0)
      ids.emplace_back(entry->d_name);
  }
  ::closedir(dir);
  return ids;
}

// ---- anonymous objects ----

namespace {
Result<Handle> make_anonymous(const std::string& debug_name, std::uint64_t size, bool allocate);
}  // namespace

Result<Handle> create_anonymous(const std::string& debug_name, std::uint64_t size) {
  return make_anonymous(debug_name, size, true);
}

Result<Handle> create_anonymous_unallocated(const std::string& debug_name, std::uint64_t size) {
  return make_anonymous(debug_name, size, false);
}

namespace {
Result<Handle> make_anonymous(const std::string& debug_name, std::uint64_t size, bool allocate) {
  int fd = ::memfd_create(debug_name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) {
    int err = errno;
    if (err == ENOSYS || err == EINVAL)
      return Error{Errc::unsupported, err,
                   "memfd_create with sealing is not available on this kernel (" +
                       kernel_release() + "): use backend :posix"};
    return os_error("cannot create memfd " + debug_name, err);
  }
  Handle handle(fd);
  std::string what = "memfd " + debug_name;
  // A memfd is bounded by nothing but memory: allocating more than is available would
  // not fail cleanly, it would wake the OOM killer. Refuse up front instead.
  std::uint64_t available = size > page_size() ? available_memory() : 0;
  if (available != 0 && size > available)
    return Error{Errc::no_space, ENOMEM,
                 "cannot allocate " + std::to_string(size) + " bytes for " + what + ": only " +
                     std::to_string(available) +
                     " bytes of memory are available (MemAvailable in /proc/meminfo): free "
                     "memory or use a smaller region"};
  if (auto limit = check_file_size_limit(what, size); !limit.ok()) return limit.error();
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0)
    return os_error("cannot size " + what + " to " + std::to_string(size) + " bytes", errno);
  // From here on nobody (not even us) can change its size: a peer cannot make our
  // mappings raise SIGBUS by shrinking it.
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0)
    return os_error("cannot seal the size of " + what, errno);
  if (::fchmod(fd, 0600) != 0) return os_error("cannot set the permissions of " + what, errno);
  // Allocate every page now: out of memory fails here, not on first touch. (A single
  // page, the control memfd, is written at once by its creator: no need.)
  if (allocate && size > page_size()) {
    int err;
    do {
      err = ::posix_fallocate(fd, 0, static_cast<off_t>(size));
    } while (err == EINTR);
    if (err != 0)
      return os_error("cannot allocate " + std::to_string(size) + " bytes for " + what, err);
  }
  return handle;
}
}  // namespace

std::string handle_path(const Handle& handle) {
  return "/proc/" + std::to_string(current_pid()) + "/fd/" + std::to_string(fd_of(handle));
}

std::string anonymous_name(const Handle& handle) {
  std::string link = "/proc/self/fd/" + std::to_string(fd_of(handle));
  char target[512];
  ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
  if (n <= 0) return {};
  std::string name(target, static_cast<std::size_t>(n));
  constexpr std::size_t prefix = sizeof kMemfdLinkPrefix - 1;
  constexpr std::size_t suffix = sizeof kDeletedSuffix - 1;
  if (name.compare(0, prefix, kMemfdLinkPrefix) != 0) return {};
  name.erase(0, prefix);
  if (name.size() >= suffix && name.compare(name.size() - suffix, suffix, kDeletedSuffix) == 0)
    name.erase(name.size() - suffix);
  return name;
}

bool is_process_fd_link(const std::string& path) noexcept {
  // "/proc/" (<digits> | "self") "/fd/" <digits>
  constexpr char kProc[] = "/proc/";
  if (path.compare(0, sizeof kProc - 1, kProc) != 0) return false;
  std::size_t pid_start = sizeof kProc - 1;
  std::size_t fd_dir = path.find("/fd/", pid_start);
  if (fd_dir == std::string::npos) return false;
  bool pid_ok = all_digits(path, pid_start, fd_dir) ||
                path.compare(pid_start, fd_dir - pid_start, "self") == 0;
  return pid_ok && all_digits(path, fd_dir + 4, path.size());
}

Result<void> seal_object(const Handle& data_object, BackendKind backend) {
  if (backend == BackendKind::posix) return set_mode(data_object, 0400, "the sealed segment");
  if (backend != BackendKind::memfd)
    return Error{Errc::unsupported, 0, "this backend cannot be sealed on Linux"};
  if (::fcntl(fd_of(data_object), F_ADD_SEALS, F_SEAL_FUTURE_WRITE) != 0) {
    int err = errno;
    if (err == EINVAL)
      return Error{Errc::unsupported, err,
                   "F_SEAL_FUTURE_WRITE needs Linux 5.1 or newer (this is " + kernel_release() +
                       "): upgrade the kernel to seal memfd regions"};
    return os_error("cannot seal the data memfd (F_SEAL_FUTURE_WRITE)", err);
  }
  return {};
}

// ---- kernel-enforced immutability ----

namespace {

Result<void> remap_view(int fd, Mapping& view, std::uint64_t offset, int prot) {
  if (!view.valid()) return {};
  void* at = ::mmap(view.data(), view.size(), prot, MAP_SHARED | MAP_FIXED, fd,
                    static_cast<off_t>(offset));
  if (at == MAP_FAILED) return os_error("cannot remap the data of a region", errno);
  return {};
}

}  // namespace

Result<void> downgrade_view(const Handle& object, Mapping& view, std::uint64_t offset) {
  // A new open file description, read-only: a mapping of it has neither VM_WRITE nor
  // VM_MAYWRITE, so it never blocks F_SEAL_WRITE and mprotect(PROT_WRITE) fails on it.
  std::string self_link = "/proc/self/fd/" + std::to_string(fd_of(object));
  int ro = ::open(self_link.c_str(), O_RDONLY | O_CLOEXEC);
  if (ro < 0) return os_error("cannot reopen " + self_link + " read-only", errno);
  Handle guard(ro);
  // MAP_FIXED replaces the old mapping atomically (one mmap_lock hold): other threads
  // reading the view meanwhile see the same bytes through the new mapping.
  return remap_view(ro, view, offset, PROT_READ);
}

Result<void> upgrade_view(const Handle& object, Mapping& view, std::uint64_t offset) {
  return remap_view(fd_of(object), view, offset, PROT_READ | PROT_WRITE);
}

Result<void> seal_writes(const Handle& object) {
  if (::fcntl(fd_of(object), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) == 0) return {};
  int err = errno;
  // Kernels 3.17-5.0 know F_SEAL_WRITE but not F_SEAL_FUTURE_WRITE (redundant with it).
  if (err == EINVAL && ::fcntl(fd_of(object), F_ADD_SEALS, F_SEAL_WRITE) == 0) return {};
  if (err == EINVAL) err = errno;
  if (err == EBUSY)
    return Error{Errc::busy, err,
                 "the kernel refused F_SEAL_WRITE: a writable shared mapping of the data "
                 "exists in some process (a worker attached mode='rw', a forked child of "
                 "one, or a raw mmap of /proc/<pid>/fd/<n>)"};
  if (err == EINVAL)
    return Error{Errc::unsupported, err,
                 "this kernel (" + kernel_release() + ") cannot seal memfd writes"};
  return os_error("cannot seal the data memfd (F_SEAL_WRITE)", err);
}

bool writes_sealed(const Handle& object) noexcept {
  int seals = ::fcntl(fd_of(object), F_GET_SEALS);
  return seals >= 0 && (seals & F_SEAL_WRITE) != 0;
}

// ---- advisory byte locks ----

namespace {

int set_ofd_lock(int fd, std::uint64_t offset, short type) noexcept {
  struct flock lock {};
  lock.l_type = type;
  lock.l_whence = SEEK_SET;
  lock.l_start = static_cast<off_t>(offset);
  lock.l_len = 1;
  lock.l_pid = 0;  // required by F_OFD_*
  int rc;
  do {
    rc = ::fcntl(fd, F_OFD_SETLK, &lock);
  } while (rc != 0 && errno == EINTR);
  return rc;
}

}  // namespace

Result<void> try_lock_byte(const Handle& object, std::uint64_t offset, bool exclusive) {
  if (set_ofd_lock(fd_of(object), offset, exclusive ? F_WRLCK : F_RDLCK) == 0) return {};
  int err = errno;
  if (err == EAGAIN || err == EACCES)
    return Error{
        Errc::busy, err,
        exclusive ? "another process is reading or writing it" : "another process is writing it"};
  return os_error("cannot lock byte " + std::to_string(offset) + " (F_OFD_SETLK)", err);
}

void unlock_byte(const Handle& object, std::uint64_t offset) noexcept {
  (void)set_ofd_lock(fd_of(object), offset, F_UNLCK);
}

// ---- processes, time, randomness ----

Result<ProcessStat> process_stat(std::uint32_t pid) {
  std::string text;
  if (pid == 0 || !read_small_file("/proc/" + std::to_string(pid) + "/stat", text))
    return Error{Errc::not_found, ESRCH, "no process with pid " + std::to_string(pid)};
  // "pid (comm) S f4 f5 ...": comm may contain spaces and parentheses, so fields are
  // counted from the last ')'. Field 3 (state) follows it; field 22 is the start time.
  std::size_t close = text.rfind(')');
  if (close == std::string::npos)
    return Error{Errc::io_error, 0, "cannot parse /proc/" + std::to_string(pid) + "/stat"};
  const char* p = text.c_str() + close + 1;
  ProcessStat st;
  int field = 2;
  while (*p != '\0' && field < 22) {
    while (*p == ' ') ++p;
    ++field;
    if (field == 3) st.running = (*p != 'Z' && *p != 'X' && *p != 'x');
    if (field == 22) {
      char* end = nullptr;
      st.start_time = std::strtoull(p, &end, 10);
      if (end == p) break;
      return st;
    }
    while (*p != ' ' && *p != '\0') ++p;
  }
  return Error{Errc::io_error, 0, "cannot parse /proc/" + std::to_string(pid) + "/stat"};
}

std::array<std::uint8_t, 16> boot_id() {
  static std::once_flag once;
  static std::array<std::uint8_t, 16> id{};
  std::call_once(once, [] {
    std::string text;
    if (!read_small_file("/proc/sys/kernel/random/boot_id", text)) return;
    (void)parse_uuid(text, id);
  });
  return id;
}

Result<void> random_bytes(void* buffer, std::size_t length) {
  auto* out = static_cast<std::uint8_t*>(buffer);
  while (length > 0) {
    ssize_t n = ::getrandom(out, length, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return os_error("getrandom failed", errno);
    out += n;
    length -= static_cast<std::size_t>(n);
  }
  return {};
}

}  // namespace spshm::platform
