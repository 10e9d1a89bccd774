// POSIX part of the OS layer (Linux and macOS): shm_open objects, files, mappings, mlock.
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#if defined(__linux__)
#include <linux/magic.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#endif
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>

#include "platform.hpp"

namespace spshm::platform {

namespace {

int fd_of(const Handle& h) noexcept { return static_cast<int>(h.native()); }

// The shared mappings this process made with map(), readable from the SIGBUS handler
// without a lock: a fault in one of them is ours to repair whatever the object is called
// now (a peer may rename the segment before truncating it, and /proc/self/maps then
// shows the new name). A slot is claimed by a CAS on its length, published by storing its
// start (release); the handler only trusts slots whose start is set. When the table is
// full, the handler falls back to the segment's name in /proc/self/maps.
constexpr std::size_t kMappedRanges = 8192;
struct MappedRange {
  std::atomic<std::uintptr_t> start{0};
  std::atomic<std::size_t> length{0};
};
MappedRange mapped_ranges[kMappedRanges];

void remember_mapping(void* address, std::size_t length) noexcept {
  if (address == nullptr || length == 0) return;
  for (auto& r : mapped_ranges) {
    std::size_t free = 0;
    if (r.length.load(std::memory_order_relaxed) != 0 ||
        !r.length.compare_exchange_strong(free, length, std::memory_order_acq_rel))
      continue;
    r.start.store(reinterpret_cast<std::uintptr_t>(address), std::memory_order_release);
    return;
  }
}

void forget_mapping(void* address) noexcept {
  auto at = reinterpret_cast<std::uintptr_t>(address);
  for (auto& r : mapped_ranges) {
    if (r.start.load(std::memory_order_acquire) != at) continue;
    r.start.store(0, std::memory_order_release);
    r.length.store(0, std::memory_order_release);
    return;
  }
}

[[maybe_unused]] bool in_our_mapping(std::uintptr_t address) noexcept {
  for (const auto& r : mapped_ranges) {
    std::uintptr_t start = r.start.load(std::memory_order_acquire);
    if (start == 0 || address < start) continue;
    if (address - start < r.length.load(std::memory_order_acquire)) return true;
  }
  return false;
}

Error errno_error(const std::string& what) { return os_error(what, errno); }

// Named objects. Linux: files of named_dir() (/dev/shm unless moved to another tmpfs),
// opened directly, which is what glibc's shm_open does for /dev/shm. Elsewhere: shm_open.
#if defined(__linux__)
int open_named_object(const std::string& region_id, int flags, mode_t mode) {
  return ::open(named_path(region_id).c_str(), flags | O_NOFOLLOW | O_CLOEXEC, mode);
}
int unlink_named_object(const std::string& region_id) {
  return ::unlink(named_path(region_id).c_str());
}
#else
std::string object_name(const std::string& region_id) { return "/" + region_id; }
int open_named_object(const std::string& region_id, int flags, mode_t mode) {
  return ::shm_open(object_name(region_id).c_str(), flags, mode);
}
int unlink_named_object(const std::string& region_id) {
  return ::shm_unlink(object_name(region_id).c_str());
}
#endif

}  // namespace

void Handle::reset() noexcept {
  if (native_ >= 0) ::close(static_cast<int>(native_));  // never retried: Linux frees the fd
  native_ = kInvalid;
}

void Mapping::reset() noexcept {
  if (address_ != nullptr) {
    forget_mapping(address_);
    ::munmap(address_, length_);
  }
  address_ = nullptr;
  length_ = 0;
}

// ---- named objects ----

BackendKind named_backend() noexcept { return BackendKind::posix; }

Result<Handle> create_named(const std::string& region_id, std::uint32_t mode,
                            std::uint64_t /*size: allocate() sets it*/) {
  // O_EXCL: never open somebody else's object; O_NOFOLLOW: never follow a planted link.
  int fd = open_named_object(region_id, O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    int err = errno;
    if (err == EEXIST)
      return Error{Errc::already_exists, err,
                   "a shared memory segment named " + region_id +
                       " already exists: open it (open_mode :open_only / :create_or_open), "
                       "remove it first (:remove_and_create), or pick another name"};
    return os_error("cannot create shared memory segment " + region_id, err);
  }
  Handle handle(fd);
  // The umask applied to shm_open's mode: fchmod sets exactly what was asked.
  if (::fchmod(fd, static_cast<mode_t>(mode)) != 0) {
    Error e = errno_error("cannot set the permissions of " + region_id);
    unlink_named_object(region_id);
    return e;
  }
  return handle;
}

Result<Handle> open_named(const std::string& region_id, Access access) {
  // O_NONBLOCK: a FIFO planted under one of our names (in a world-writable directory)
  // would otherwise block this thread until a writer appears. Callers fstat the object
  // (check_our_object) before using it; blocking mode is restored below.
  int flags =
      (access == Access::read_write ? O_RDWR : O_RDONLY) | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK;
  int fd = open_named_object(region_id, flags, 0);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT)
      return Error{
          Errc::not_found, err,
          "no region " + region_id + " in shared memory (deallocated, expired, or never created)"};
    if (err == ELOOP)
      return Error{Errc::not_ours, err,
                   "segment " + region_id + " is a symbolic link: refusing to follow it"};
    return os_error("cannot open shared memory segment " + region_id, err);
  }
  int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0) (void)::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  return Handle(fd);
}

Result<void> unlink_named(const std::string& region_id) {
  if (unlink_named_object(region_id) != 0) {
    int err = errno;
    if (err == ENOENT)
      return Error{Errc::not_found, err, "no shared memory segment named " + region_id};
    return os_error("cannot remove shared memory segment " + region_id, err);
  }
  return {};
}

// ---- any object ----

Result<Handle> open_path(const std::string& path, Access access) {
  bool fd_link = is_process_fd_link(path);
  int flags = (access == Access::read_write ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK |
              (fd_link ? 0 : O_NOFOLLOW);
  int fd = ::open(path.c_str(), flags);
  if (fd < 0) {
    int err = errno;
    if (err == ELOOP)
      return Error{Errc::not_ours, err,
                   path + " is a symbolic link: refusing to follow it (open the segment itself)"};
    if (err == ENOENT)
      return Error{Errc::not_found, err,
                   path + " does not exist (the region was deallocated or its creator exited)"};
    return os_error("cannot open " + path, err);
  }
  Handle handle(fd);
  if (fd_link) {
    std::string name = anonymous_name(handle);
    if (name.compare(0, sizeof kNamePrefix - 1, kNamePrefix) != 0)
      return Error{Errc::not_ours, 0,
                   path + " is not a snakepit_shm memfd (it leads to " +
                       (name.empty() ? std::string("something else") : "memfd " + name) + ")"};
  }
  // Back to blocking mode: non-blocking only served to never hang on a FIFO.
  int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0) (void)::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  return handle;
}

Result<ObjectInfo> stat(const Handle& handle, const std::string& what) {
  struct stat st;
  if (::fstat(fd_of(handle), &st) != 0) return errno_error("cannot stat " + what);
  ObjectInfo info;
  info.size = static_cast<std::uint64_t>(st.st_size);
  info.regular = S_ISREG(st.st_mode);
  info.owner = static_cast<std::uint32_t>(st.st_uid);
  info.owned_by_us = st.st_uid == ::geteuid();
  info.mode = static_cast<std::uint32_t>(st.st_mode & 07777);
  info.device = static_cast<std::uint64_t>(st.st_dev);
  info.inode = static_cast<std::uint64_t>(st.st_ino);
#if defined(__APPLE__)
  const struct timespec& m = st.st_mtimespec;
#else
  const struct timespec& m = st.st_mtim;
#endif
  info.modified_ns =
      static_cast<std::uint64_t>(m.tv_sec) * 1000000000ull + static_cast<std::uint64_t>(m.tv_nsec);
  return info;
}

Result<void> set_mode(const Handle& handle, std::uint32_t mode, const std::string& what) {
  if (::fchmod(fd_of(handle), static_cast<mode_t>(mode)) != 0)
    return errno_error("cannot change the permissions of " + what);
  return {};
}

Result<void> allocate_range(const Handle& handle, std::uint64_t offset, std::uint64_t length,
                            const std::string& what) {
#if defined(__APPLE__)
  (void)handle;
  (void)offset;
  (void)length;
  (void)what;
  return {};
#else
  if (length == 0) return {};
  int err;
  do {
    err = ::posix_fallocate(fd_of(handle), static_cast<off_t>(offset), static_cast<off_t>(length));
  } while (err == EINTR);
  if (err != 0)
    return os_error("cannot allocate " + std::to_string(length) + " bytes for " + what, err);
  return {};
#endif
}

Result<void> release_pages(const Handle& handle, std::uint64_t offset, std::uint64_t length) {
#if defined(__linux__)
  if (length == 0) return {};
  int rc;
  do {
    rc = ::fallocate(fd_of(handle), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     static_cast<off_t>(offset), static_cast<off_t>(length));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return errno_error("cannot free the pages of a shared memory object");
  return {};
#else
  (void)handle;
  (void)offset;
  (void)length;
  return Error{Errc::unsupported, 0, "freeing pages in place needs Linux"};
#endif
}

Result<void> check_file_size_limit(const std::string& what, std::uint64_t size) {
  struct rlimit rl;
  if (::getrlimit(RLIMIT_FSIZE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY ||
      size <= static_cast<std::uint64_t>(rl.rlim_cur))
    return {};
  return Error{Errc::too_large, EFBIG,
               what + " needs " + std::to_string(size) +
                   " bytes, above the file size limit of this process (RLIMIT_FSIZE " +
                   std::to_string(static_cast<std::uint64_t>(rl.rlim_cur)) +
                   " bytes): raise it (ulimit -f, systemd LimitFSIZE=) or use smaller regions"};
}

#if !defined(__APPLE__)
namespace {
/// ENOSPC while allocating: names the filesystem that is full. A segment of the shared
/// memory directory (named_dir(): /dev/shm, or the configured shm_path) gets that
/// directory in its message and remedies; anything else (a memfd on hugetlbfs, the
/// kernel's shmem mount) is memory of the host, its cgroup or its huge page pool.
Error no_space_error(const Handle& handle, std::uint64_t size, const std::string& what) {
  std::string message = "cannot allocate " + std::to_string(size) + " bytes for " + what;
  struct statvfs fs;
  bool have_fs = ::fstatvfs(fd_of(handle), &fs) == 0;
  std::string counts;
  if (have_fs)
    counts = std::to_string(std::uint64_t{fs.f_bavail} * fs.f_frsize) + " of " +
             std::to_string(std::uint64_t{fs.f_blocks} * fs.f_frsize) + " bytes free";
  const std::string dir = named_dir();
  struct stat object_st;
  struct stat dir_st;
  bool in_dir = !dir.empty() && ::fstat(fd_of(handle), &object_st) == 0 &&
                ::stat(dir.c_str(), &dir_st) == 0 && object_st.st_dev == dir_st.st_dev;
  if (in_dir) {
    message += ": the shared memory directory " + dir + " has too little space left";
    if (have_fs) message += " (" + counts + ")";
    message +=
        ": free regions (mix snakepit.shm.list; mix snakepit.shm.cleanup for orphans), "
        "enlarge it (df -h " +
        dir + "; mount -o remount,size=... " + dir +
        "; docker --shm-size), set shm_path to a larger tmpfs, or use backend :memfd "
        "for unnamed owner-only regions";
  } else {
    message += ": no memory left for it";
    if (have_fs) message += " (its filesystem has " + counts + ")";
    message +=
        ": free regions or memory (the memory cgroup's memory.max, the huge page "
        "pool), or use smaller regions";
  }
  return Error{Errc::no_space, ENOSPC, std::move(message)};
}
}  // namespace
#endif

Result<void> allocate(const Handle& handle, std::uint64_t size, const std::string& what) {
  if (auto limit = check_file_size_limit(what, size); !limit.ok()) return limit;
#if defined(__APPLE__)
  if (::ftruncate(fd_of(handle), static_cast<off_t>(size)) != 0)
    return errno_error("cannot size " + what + " to " + std::to_string(size) + " bytes");
#else
  int err;
  do {
    err = ::posix_fallocate(fd_of(handle), 0, static_cast<off_t>(size));
  } while (err == EINTR);
  if (err == ENOSPC) return no_space_error(handle, size, what);
  if (err != 0)
    return os_error("cannot allocate " + std::to_string(size) + " bytes for " + what, err);
#endif
  return {};
}

Result<void> read_at(const Handle& handle, std::uint64_t offset, void* buffer, std::size_t length,
                     const std::string& what) {
  auto* out = static_cast<char*>(buffer);
  while (length > 0) {
    ssize_t n = ::pread(fd_of(handle), out, length, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error("cannot read " + what);
    if (n == 0) return Error{Errc::corrupt, 0, what + " ended early (truncated while being read?)"};
    out += n;
    offset += static_cast<std::uint64_t>(n);
    length -= static_cast<std::size_t>(n);
  }
  return {};
}

Result<Mapping> map(const Handle& handle, std::uint64_t offset, std::size_t length, Access access,
                    Sharing sharing, const std::string& what) {
  int prot = PROT_READ;
  if (access == Access::read_write) prot |= PROT_WRITE;
  int flags = sharing == Sharing::shared ? MAP_SHARED : MAP_PRIVATE;
  void* address = ::mmap(nullptr, length, prot, flags, fd_of(handle), static_cast<off_t>(offset));
  if (address == MAP_FAILED) {
    int err = errno;
    if ((err == EPERM || err == EACCES) && access == Access::read_write)
      return Error{Errc::permission_denied, err,
                   "cannot map " + what +
                       " for writing: it is sealed or read-only for us (map it read_only)"};
    return os_error("cannot map " + std::to_string(length) + " bytes of " + what, err);
  }
  if (sharing == Sharing::shared) remember_mapping(address, length);
  return Mapping(address, length);
}

namespace {

int lock_pages(void* address, std::size_t length) noexcept {
#if defined(__linux__)
  // The raw system call: sanitizer runtimes replace mlock() with a no-op that always
  // succeeds, which would hide exactly the failure this function must report.
  return static_cast<int>(::syscall(SYS_mlock, address, length));
#else
  return ::mlock(address, length);
#endif
}

}  // namespace

Result<void> lock_memory(void* address, std::size_t length) {
  if (lock_pages(address, length) != 0) {
    int err = errno;
    struct rlimit limit {};
    std::string current = "unknown";
    if (::getrlimit(RLIMIT_MEMLOCK, &limit) == 0) {
      auto show = [](rlim_t v) {
        return v == RLIM_INFINITY ? std::string("unlimited") : std::to_string(v) + " bytes";
      };
      current = show(limit.rlim_cur) + " (hard limit " + show(limit.rlim_max) + ")";
    }
    return Error{Errc::mlock_failed, err,
                 "cannot lock " + std::to_string(length) + " bytes in memory (mlock: " +
                     std::strerror(err) + "): RLIMIT_MEMLOCK is " + current +
                     ", counting memory this process has locked already. Raise it with "
                     "`ulimit -l <KiB>` in the shell that starts the VM, LimitMEMLOCK= in its "
                     "systemd unit, or `--ulimit memlock=...` for docker; or grant the "
                     "CAP_IPC_LOCK capability; or create the region without lock_memory"};
  }
#if defined(MADV_DONTDUMP)
  if (::madvise(address, length, MADV_DONTDUMP) != 0) {
    int err = errno;
    ::munlock(address, length);
    return os_error("cannot exclude locked memory from core dumps (madvise MADV_DONTDUMP)", err);
  }
#endif
  return {};
}

Result<FsSpace> fs_space(const std::string& path) {
  struct statvfs fs;
  if (::statvfs(path.c_str(), &fs) != 0) return errno_error("cannot statvfs " + path);
  FsSpace space;
  space.total = std::uint64_t{fs.f_blocks} * fs.f_frsize;
  space.free = std::uint64_t{fs.f_bfree} * fs.f_frsize;
  space.available = std::uint64_t{fs.f_bavail} * fs.f_frsize;
#if defined(__linux__)
  struct statfs sf;
  space.tmpfs = ::statfs(path.c_str(), &sf) == 0 && sf.f_type == TMPFS_MAGIC;
#endif
  return space;
}

// ---- guarded access (SIGBUS) ----

namespace {

struct GuardFrame {
  sigjmp_buf jump;
  const char* first;
  std::size_t length;
};

// initial-exec: reading it in the signal handler never allocates (dynamic TLS could).
__attribute__((tls_model("initial-exec"))) thread_local GuardFrame* tls_frame = nullptr;
struct sigaction previous_bus {};
std::atomic<bool> guard_installed{false};
std::atomic<std::uint64_t> repairs{0};  // lock-free: updated in the handler
// "<segment dir>/spshm_", readable from the signal handler without a lock: written only
// by set_fault_segment_dir() (length 0 while it is rewritten).
char segment_prefix[4352] = "/dev/shm/spshm_";
std::atomic<std::size_t> segment_prefix_length{sizeof "/dev/shm/spshm_" - 1};

#if defined(__linux__)
/// Parses a hexadecimal number at *p (advancing it).
std::uintptr_t parse_hex(const char*& p, const char* end) noexcept {
  std::uintptr_t v = 0;
  for (; p < end; ++p) {
    char c = *p;
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) break;
    v = v << 4 | static_cast<std::uintptr_t>(d);
  }
  return v;
}

/// True if `line` (one /proc/self/maps line) maps `address` from one of our segments.
bool maps_our_segment(const char* line, const char* end, std::uintptr_t address) noexcept {
  const char* p = line;
  std::uintptr_t start = parse_hex(p, end);
  if (p >= end || *p != '-') return false;
  ++p;
  std::uintptr_t stop = parse_hex(p, end);
  if (address < start || address >= stop) return false;
  // "<segment dir>/spshm_": the directory set_named_dir() chose (shm_path), copied for
  // this handler by set_fault_segment_dir(). memfd mappings show as "/memfd:spshm_..."
  // and cannot be truncated (sealed), so they never match.
  std::size_t n = segment_prefix_length.load(std::memory_order_acquire);
  if (n == 0) return false;
  for (const char* q = p; q + n <= end; ++q)
    if (std::memcmp(q, segment_prefix, n) == 0) return true;
  return false;
}

/// In the SIGBUS handler (only async-signal-safe system calls): if `address` lies in a
/// mapping of a <segment dir>/spshm_* segment, replaces its page by a private zero page.
bool repair_our_page(void* address) noexcept {
  auto at = reinterpret_cast<std::uintptr_t>(address);
  bool ours = in_our_mapping(at);
  int fd = ours ? -1 : ::open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (!ours && fd < 0) return false;
  char buffer[4096];
  std::size_t used = 0;
  for (; fd >= 0;) {
    ssize_t got = ::read(fd, buffer + used, sizeof buffer - used);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    used += static_cast<std::size_t>(got);
    std::size_t from = 0;
    for (std::size_t i = 0; i < used; ++i) {
      if (buffer[i] != '\n') continue;
      if (maps_our_segment(buffer + from, buffer + i, at)) ours = true;
      from = i + 1;
    }
    if (ours) break;
    std::memmove(buffer, buffer + from, used - from);  // keep the partial last line
    used -= from;
    if (used == sizeof buffer) used = 0;  // a line longer than the buffer: not ours
  }
  if (fd >= 0) ::close(fd);
  if (!ours) return false;
  auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  void* start = reinterpret_cast<void*>(at & ~(page - 1));
  return ::mmap(start, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                0) != MAP_FAILED;
}
#else
bool repair_our_page(void*) noexcept { return false; }
#endif

void on_sigbus(int sig, siginfo_t* info, void* context) {
  GuardFrame* frame = tls_frame;
  if (frame != nullptr && info != nullptr && info->si_code > 0) {
    const char* at = static_cast<const char*>(info->si_addr);
    if (at >= frame->first && at < frame->first + frame->length) {
      tls_frame = nullptr;
      siglongjmp(frame->jump, 1);  // back into run_guarded: the access becomes an error
    }
  }
  // Outside a guarded copy: a fault in a mapping of one of our own segments (a header
  // read, an unguarded path) is repaired in place, so the VM lives and the next guarded
  // access reports the truncation.
  if (info != nullptr && info->si_code > 0 && repair_our_page(info->si_addr)) {
    repairs.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  // Not ours: whatever was installed before decides.
  if (previous_bus.sa_flags & SA_SIGINFO) {
    if (previous_bus.sa_sigaction != nullptr) previous_bus.sa_sigaction(sig, info, context);
    return;
  }
  if (previous_bus.sa_handler == SIG_DFL || previous_bus.sa_handler == SIG_IGN) {
    // The default action (a core dump): a faulting instruction runs again on return and
    // now gets it; a signal sent by kill(2) is raised again.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGBUS, &dfl, nullptr);
    if (info == nullptr || info->si_code <= 0) ::raise(SIGBUS);
    return;
  }
  previous_bus.sa_handler(sig);
}

}  // namespace

bool install_fault_guard() noexcept {
  static std::mutex once;
  std::lock_guard<std::mutex> lock(once);
  if (guard_installed.load()) return true;
  struct sigaction action {};
  action.sa_sigaction = on_sigbus;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  if (::sigaction(SIGBUS, &action, &previous_bus) != 0) return false;
  guard_installed.store(true);
  return true;
}

void set_fault_segment_dir(const std::string& dir) noexcept {
  std::string prefix = dir + "/spshm_";
  segment_prefix_length.store(0, std::memory_order_release);
  if (prefix.size() >= sizeof segment_prefix) return;  // too long: never repaired
  std::memcpy(segment_prefix, prefix.c_str(), prefix.size() + 1);
  segment_prefix_length.store(prefix.size(), std::memory_order_release);
}

bool fault_guard_installed() noexcept { return guard_installed.load(); }

std::uint64_t fault_repairs() noexcept { return repairs.load(std::memory_order_relaxed); }

bool run_guarded(void (*body)(void*), void* context, const void* first,
                 std::size_t length) noexcept {
  if (!guard_installed.load(std::memory_order_acquire) || length == 0) {
    body(context);
    return true;
  }
  GuardFrame frame;
  frame.first = static_cast<const char*>(first);
  frame.length = length;
  // Threads of the VM run with most signals blocked, and a fault whose signal is blocked
  // kills the process whatever the handler: unblock SIGBUS on this thread for the body
  // only. sigsetjmp saved the mask before (savemask 1), and siglongjmp restores it.
  sigset_t bus, previous_mask;
  sigemptyset(&bus);
  sigaddset(&bus, SIGBUS);
  if (sigsetjmp(frame.jump, 1) != 0) return false;  // the handler cleared tls_frame
  tls_frame = &frame;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  pthread_sigmask(SIG_UNBLOCK, &bus, &previous_mask);
  body(context);
  pthread_sigmask(SIG_SETMASK, &previous_mask, nullptr);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  tls_frame = nullptr;
  return true;
}

// ---- liveness locks ----

#if defined(F_OFD_SETLK)

namespace {

struct flock byte_lock(short type, std::uint64_t offset) noexcept {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(offset);
  fl.l_len = 1;
  fl.l_pid = 0;  // must be 0 for OFD locks
  return fl;
}

}  // namespace

bool has_ofd_locks() noexcept { return true; }

Result<void> lock_shared(const Handle& handle, std::uint64_t offset) {
  struct flock fl = byte_lock(F_RDLCK, offset);
  if (::fcntl(fd_of(handle), F_OFD_SETLK, &fl) == 0) return {};
  int err = errno;
  if (err == EAGAIN || err == EACCES)
    return Error{Errc::busy, err, "the segment is being removed by a cleanup right now"};
  return os_error("cannot take the liveness lock (F_OFD_SETLK)", err);
}

Result<bool> try_lock_exclusive(const Handle& handle, std::uint64_t offset) {
  struct flock fl = byte_lock(F_WRLCK, offset);
  if (::fcntl(fd_of(handle), F_OFD_SETLK, &fl) == 0) return true;
  int err = errno;
  if (err == EAGAIN || err == EACCES) return false;
  return os_error("cannot take an exclusive lock (F_OFD_SETLK)", err);
}

void unlock(const Handle& handle, std::uint64_t offset) noexcept {
  struct flock fl = byte_lock(F_UNLCK, offset);
  (void)::fcntl(fd_of(handle), F_OFD_SETLK, &fl);
}

void unlock_range(const Handle& handle, std::uint64_t offset, std::uint64_t length) noexcept {
  struct flock fl = byte_lock(F_UNLCK, offset);
  fl.l_len = static_cast<off_t>(length);
  (void)::fcntl(fd_of(handle), F_OFD_SETLK, &fl);
}

Result<bool> lock_is_held(const Handle& handle, std::uint64_t offset) {
  struct flock fl = byte_lock(F_WRLCK, offset);
  if (::fcntl(fd_of(handle), F_OFD_GETLK, &fl) != 0)
    return os_error("cannot query the liveness lock (F_OFD_GETLK)", errno);
  return fl.l_type != F_UNLCK;
}

#else  // no OFD locks (macOS): see platform.hpp

bool has_ofd_locks() noexcept { return false; }
Result<void> lock_shared(const Handle&, std::uint64_t) { return {}; }
Result<bool> try_lock_exclusive(const Handle&, std::uint64_t) { return true; }
void unlock(const Handle&, std::uint64_t) noexcept {}
void unlock_range(const Handle&, std::uint64_t, std::uint64_t) noexcept {}
Result<bool> lock_is_held(const Handle&, std::uint64_t) { return true; }

#endif

std::size_t page_size() noexcept {
  static const std::size_t size = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

bool read_small_file(const std::string& path, std::string& out, std::size_t max_bytes) {
  // O_NONBLOCK: a FIFO (or a device) in the path must not block the caller.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return false;
  Handle h(fd);
  char buffer[1024];
  out.clear();
  for (;;) {
    ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) return true;
    if (out.size() + static_cast<std::size_t>(n) > max_bytes) return false;
    out.append(buffer, static_cast<std::size_t>(n));
  }
}

bool parse_uuid(const std::string& text, std::array<std::uint8_t, 16>& out) noexcept {
  std::array<std::uint8_t, 16> parsed{};
  std::size_t nibbles = 0;
  for (char c : text) {
    int v;
    if (c >= '0' && c <= '9')
      v = c - '0';
    else if (c >= 'a' && c <= 'f')
      v = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F')
      v = c - 'A' + 10;
    else if (c == '-' || c == '\n' || c == ' ' || c == '\0')
      continue;
    else
      return false;
    if (nibbles == 32) return false;
    parsed[nibbles / 2] = static_cast<std::uint8_t>(parsed[nibbles / 2] << 4 | v);
    ++nibbles;
  }
  if (nibbles != 32) return false;
  out = parsed;
  return true;
}

// The pid is cached (a getpid system call costs ~0.7 us; the hot paths asked for it
// several times per region cycle) and the cache is cleared in the child of every fork()
// by a pthread_atfork handler: the C ABI library lives in Python workers that may fork.
// The handler is registered before the first value is cached, so no fork can miss it.
// (A raw clone(2) system call runs no atfork handlers: such a child must exec.)
namespace {
std::atomic<std::uint32_t> cached_pid{0};
void forget_pid() noexcept { cached_pid.store(0, std::memory_order_relaxed); }
}  // namespace

std::uint32_t current_pid() noexcept {
  std::uint32_t pid = cached_pid.load(std::memory_order_relaxed);
  if (pid != 0) return pid;
  static const bool registered = ::pthread_atfork(nullptr, nullptr, forget_pid) == 0;
  pid = static_cast<std::uint32_t>(::getpid());
  if (registered) cached_pid.store(pid, std::memory_order_relaxed);
  return pid;
}

std::uint64_t realtime_ns() noexcept {
  struct timespec ts;
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

}  // namespace spshm::platform
