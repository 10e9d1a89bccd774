// Linux primitives of the message channel (platform_channel.hpp).
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "platform.hpp"
#include "platform_channel.hpp"

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

namespace spshm::channel::os {

namespace {

int memfd(const char* name) noexcept {
  return ::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
}

}  // namespace

Result<int> make_eventfd() {
  int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return os_error("eventfd", errno);
  return fd;
}

void signal_eventfd(int fd) noexcept {
  std::uint64_t one = 1;
  ssize_t rc;
  do {
    rc = ::write(fd, &one, sizeof one);
  } while (rc < 0 && errno == EINTR);
}

std::uint64_t drain_eventfd(int fd) noexcept {
  std::uint64_t v = 0;
  ssize_t rc;
  do {
    rc = ::read(fd, &v, sizeof v);
  } while (rc < 0 && errno == EINTR);
  return rc == sizeof v ? v : 0;
}

namespace {

// A failure of a channel memfd (the rings, a region message): the step and strerror,
// with the code of os_error() but without its advice, which is worded for regions (free
// /dev/shm, smaller regions...): Endpoint words the advice for the channel.
Error memfd_error(const std::string& what, int err) {
  Error e = os_error(what, err);
  e.message = what + ": " + std::strerror(err);
  return e;
}

// RLIMIT_FSIZE: a memfd larger than the limit would raise SIGXFSZ (or fail with EFBIG).
Result<void> check_memfd_size(const char* what, std::uint64_t size) {
  if (platform::check_file_size_limit(what, size).ok()) return {};
  struct rlimit rl {};
  (void)::getrlimit(RLIMIT_FSIZE, &rl);
  return Error{Errc::too_large, EFBIG,
               std::string(what) + " needs a memfd of " + std::to_string(size) +
                   " bytes, above this process's file size limit (RLIMIT_FSIZE " +
                   std::to_string(static_cast<std::uint64_t>(rl.rlim_cur)) + " bytes)"};
}

}  // namespace

Result<int> make_ring_memfd(std::uint64_t size) {
  const char* no = std::getenv("SNAKEPIT_SHM_CHANNEL_NO_MEMFD");
  if (no != nullptr && std::strcmp(no, "1") == 0) {
    return Error{Errc::unsupported, EPERM,
                 "memfd_create refused (SNAKEPIT_SHM_CHANNEL_NO_MEMFD=1 simulates a seccomp "
                 "filter)"};
  }
  if (auto lim = check_memfd_size("the channel rings", size); !lim.ok()) return lim.error();
  int fd = memfd("snakepit-channel");
  if (fd < 0) return memfd_error("memfd_create(snakepit-channel)", errno);
  int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(size));
  if (rc != 0) {
    ::close(fd);
    return memfd_error("posix_fallocate of the channel rings", rc);
  }
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    int err = errno;
    ::close(fd);
    return memfd_error("sealing the channel memfd", err);
  }
  return fd;
}

Result<int> make_message_memfd(const void* data, std::uint64_t length) {
  if (auto lim = check_memfd_size("the message", length); !lim.ok()) return lim.error();
  int fd = memfd("snakepit-channel-msg");
  if (fd < 0) return memfd_error("memfd_create(snakepit-channel-msg)", errno);
  auto fail = [fd](const char* what, int err) {
    ::close(fd);
    return memfd_error(what, err);
  };
  if (::ftruncate(fd, static_cast<off_t>(length)) != 0)
    return fail("ftruncate of the message memfd", errno);
  const auto* p = static_cast<const std::uint8_t*>(data);
  std::uint64_t done = 0;
  while (done < length) {
    std::uint64_t chunk = std::min<std::uint64_t>(length - done, 1u << 30);
    ssize_t n = ::pwrite(fd, p + done, chunk, static_cast<off_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail("writing the message memfd", errno);
    }
    if (n == 0) return fail("writing the message memfd", ENOSPC);
    done += static_cast<std::uint64_t>(n);
  }
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return fail("sealing the message memfd", errno);
  }
  return fd;
}

Result<void> check_message_memfd(int fd, std::uint64_t size) {
  int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0) return Error{Errc::not_ours, errno, "a region message fd is not a memfd"};
  const int need = F_SEAL_SHRINK | F_SEAL_WRITE;
  if ((seals & need) != need) {
    return Error{Errc::not_ours, 0, "a region message memfd is not sealed against writes"};
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) return os_error("fstat of a region message", errno);
  if (!S_ISREG(st.st_mode) || static_cast<std::uint64_t>(st.st_size) < size) {
    return Error{Errc::corrupt, 0, "a region message memfd is smaller than announced"};
  }
  return {};
}

Result<std::uint64_t> sealed_size(int fd) {
  int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
    return Error{Errc::not_ours, seals < 0 ? errno : 0,
                 "the channel memfd is not sealed against shrinking"};
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) return os_error("fstat of the channel memfd", errno);
  return static_cast<std::uint64_t>(st.st_size);
}

Result<void*> map_fd(int fd, std::uint64_t size, bool writable) {
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  void* p = ::mmap(nullptr, size, prot, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return os_error("mmap of a channel memfd", errno);
  return p;
}

void unmap(void* addr, std::uint64_t size) noexcept {
  if (addr != nullptr && size > 0) ::munmap(addr, size);
}

Result<void> read_fd(int fd, unsigned char* dst, std::uint64_t size) {
  std::uint64_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd, dst + done, size - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return memfd_error("read of a channel message memfd", errno);
    if (n == 0) return memfd_error("read of a channel message memfd (it ended early)", EIO);
    done += static_cast<std::uint64_t>(n);
  }
  return {};
}

namespace {

int flock_retry(int fd, int op) noexcept {
  int rc;
  do {
    rc = ::flock(fd, op);
  } while (rc != 0 && errno == EINTR);
  return rc;
}

bool is_socket_dir_name(const char* name) noexcept {
  const std::size_t plen = std::strlen(kSocketDirPrefix);
  if (std::strncmp(name, kSocketDirPrefix, plen) != 0 || std::strlen(name) != plen + 6)
    return false;
  for (const char* c = name + plen; *c != '\0'; ++c) {
    const bool alnum =
        (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9');
    if (!alnum) return false;
  }
  return true;
}

bool same_file(const struct stat& a, const struct stat& b) noexcept {
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

// A directory of ours as a channel makes it: a real directory, this euid, mode 0700.
bool ours_0700_dir(const struct stat& st) noexcept {
  return S_ISDIR(st.st_mode) && st.st_uid == ::geteuid() && (st.st_mode & 07777) == 0700;
}

std::uint64_t realtime_ns() noexcept {
  struct timespec ts;
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

// True if the directory open at `fd` holds exactly one entry, `ctl`, and it is a socket.
// An empty directory (a channel killed between mkdtemp and bind) is fine too.
bool holds_only_ctl_socket(int fd, bool* has_ctl) noexcept {
  *has_ctl = false;
  int lfd = ::openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
  if (lfd < 0) return false;
  DIR* d = ::fdopendir(lfd);
  if (d == nullptr) {
    ::close(lfd);
    return false;
  }
  bool only = true;
  while (struct dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
    struct stat st;
    if (std::strcmp(e->d_name, "ctl") == 0 && ::fstatat(fd, "ctl", &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISSOCK(st.st_mode)) {
      *has_ctl = true;
      continue;
    }
    only = false;
    break;
  }
  ::closedir(d);
  return only;
}

// One candidate entry `name` of the base open at `base_fd`: true if it was removed.
bool sweep_one_socket_dir(int base_fd, const char* name, std::uint64_t grace_ns) noexcept {
  struct stat before;
  if (::fstatat(base_fd, name, &before, AT_SYMLINK_NOFOLLOW) != 0 || !ours_0700_dir(before))
    return false;
  int fd = ::openat(base_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return false;
  bool removed = false;
  struct stat st;
  // The very directory looked at (not one renamed into its place since), still ours.
  if (::fstat(fd, &st) == 0 && same_file(st, before) && ours_0700_dir(st) &&
      flock_retry(fd, LOCK_EX | LOCK_NB) == 0) {
    // Nobody holds its lock: its owner is gone, or has not taken the lock yet (young).
    const std::uint64_t now = realtime_ns();
    const std::uint64_t mtime = static_cast<std::uint64_t>(st.st_mtim.tv_sec) * 1000000000ull +
                                static_cast<std::uint64_t>(st.st_mtim.tv_nsec);
    bool has_ctl = false;
    if (st.st_mtim.tv_sec >= 0 && now > mtime && now - mtime >= grace_ns &&
        holds_only_ctl_socket(fd, &has_ctl)) {
      if (has_ctl) ::unlinkat(fd, "ctl", 0);
      struct stat again;
      if (::fstatat(base_fd, name, &again, AT_SYMLINK_NOFOLLOW) == 0 && same_file(again, st) &&
          ::unlinkat(base_fd, name, AT_REMOVEDIR) == 0) {
        removed = true;
      }
    }
  }
  ::close(fd);  // releases the lock, if taken
  return removed;
}

}  // namespace

Result<PrivateDir> make_private_dir(const std::string& base_in) {
  std::string base = base_in;
  if (base.empty()) {
    for (const char* var : {"XDG_RUNTIME_DIR", "TMPDIR"}) {
      const char* v = std::getenv(var);
      if (v != nullptr && *v != '\0' && ::access(v, W_OK | X_OK) == 0) {
        base = v;
        break;
      }
    }
    if (base.empty()) base = "/tmp";
  }
  const std::string templ = base + "/" + kSocketDirPrefix + "XXXXXX";
  // A sweep of another VM may take (and, were the clocks to jump, remove) a directory
  // between its mkdtemp and its flock: then a fresh one is made.
  for (int attempt = 0;; ++attempt) {
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr) return os_error("mkdtemp(" + templ + ")", errno);
    std::string path(buf.data());  // mkdtemp creates it 0700
    int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
      int err = errno;
      ::rmdir(path.c_str());
      return os_error("opening the channel directory " + path, err);
    }
    if (flock_retry(fd, LOCK_SH) != 0) {
      int err = errno;
      ::close(fd);
      ::rmdir(path.c_str());
      return os_error("locking the channel directory " + path, err);
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      int err = errno;
      ::close(fd);
      ::rmdir(path.c_str());
      return os_error("fstat of the channel directory " + path, err);
    }
    if (st.st_nlink > 0) return PrivateDir{path, fd};
    ::close(fd);  // removed by a sweep before we held the lock
    if (attempt == 2) {
      return Error{Errc::busy, ENOENT, "the channel directory " + path + " was removed at once"};
    }
  }
}

std::uint64_t sweep_stale_socket_dirs(const std::string& base, std::uint64_t grace_ns) {
  if (base.empty()) return 0;
  int bfd = ::open(base.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (bfd < 0) return 0;
  DIR* d = ::fdopendir(bfd);
  if (d == nullptr) {
    ::close(bfd);
    return 0;
  }
  std::vector<std::string> names;
  while (struct dirent* e = ::readdir(d)) {
    if (is_socket_dir_name(e->d_name)) names.emplace_back(e->d_name);
  }
  std::uint64_t removed = 0;
  for (const auto& name : names) {
    if (sweep_one_socket_dir(bfd, name.c_str(), grace_ns)) ++removed;
  }
  ::closedir(d);  // closes bfd
  return removed;
}

std::vector<std::string> default_socket_dir_bases(const std::vector<std::string>& also) {
  std::vector<std::string> bases;
  std::vector<struct stat> seen;
  auto add = [&](const char* dir) {
    if (dir == nullptr || *dir == '\0') return;
    struct stat st;
    if (::stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) return;
    for (const auto& s : seen) {
      if (same_file(s, st)) return;
    }
    seen.push_back(st);
    bases.emplace_back(dir);
  };
  add(std::getenv("XDG_RUNTIME_DIR"));
  add(std::getenv("TMPDIR"));
  for (const auto& dir : also) add(dir.c_str());
  add("/tmp");
  return bases;
}

Result<int> listen_unix(const std::string& path) {
  struct sockaddr_un addr;
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    return Error{Errc::invalid_argument, ENAMETOOLONG,
                 "socket path " + path + " is longer than 107 bytes: choose a shorter socket_dir"};
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return os_error("socket(AF_UNIX)", errno);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::chmod(path.c_str(), 0600) != 0 || ::listen(fd, 4) != 0) {
    int err = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return os_error("listening on " + path, err);
  }
  return fd;
}

Result<int> connect_unix(const std::string& path) {
  struct sockaddr_un addr;
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    return Error{Errc::invalid_argument, ENAMETOOLONG, "bad channel socket path"};
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return os_error("socket(AF_UNIX)", errno);
  int rc;
  do {
    rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    int err = errno;
    ::close(fd);
    return os_error("connecting to the channel socket " + path +
                        " (is the channel still open and not yet connected?)",
                    err);
  }
  return fd;
}

int accept_nonblocking(int listen_fd) noexcept {
  return ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

bool peer_credentials(int fd, std::uint32_t* uid, std::uint32_t* pid) noexcept {
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
  *uid = cred.uid;
  *pid = static_cast<std::uint32_t>(cred.pid);
  return true;
}

std::uint32_t effective_uid() noexcept { return ::geteuid(); }

void set_nonblocking(int fd) noexcept {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0) ::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

void finish_sending_and_close(int fd, std::vector<std::uint8_t> rest, int timeout_ms) noexcept {
  auto finish = [fd, timeout_ms](const std::vector<std::uint8_t>& bytes) {
    std::size_t off = 0;
    const std::uint64_t deadline =
        monotonic_ns() + static_cast<std::uint64_t>(timeout_ms) * 1000000;
    while (off < bytes.size()) {
      long n = send_with_fds(fd, bytes.data() + off, bytes.size() - off, nullptr, 0);
      if (n > 0) {
        off += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) break;
      const std::uint64_t now = monotonic_ns();
      if (now >= deadline) break;
      struct pollfd p = {fd, POLLOUT, 0};
      ::poll(&p, 1, static_cast<int>((deadline - now) / 1000000 + 1));
    }
    ::shutdown(fd, SHUT_RDWR);
    ::close(fd);
  };
  try {
    std::thread([finish, bytes = std::move(rest)] { finish(bytes); }).detach();
  } catch (...) {
    ::shutdown(fd, SHUT_RDWR);
    ::close(fd);
  }
}

long send_with_fds(int fd, const void* data, std::size_t len, const int* fds,
                   std::size_t nfds) noexcept {
  struct iovec iov;
  iov.iov_base = const_cast<void*>(data);
  iov.iov_len = len;
  struct msghdr msg;
  std::memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  if (nfds > 0) {
    if (nfds > 4) {
      errno = EINVAL;
      return -1;
    }
    std::memset(control, 0, sizeof control);
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  ssize_t n;
  do {
    n = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  return n;
}

long recv_with_fds(int fd, void* buf, std::size_t len, std::vector<int>* fds,
                   bool* truncated) noexcept {
  struct iovec iov;
  iov.iov_base = buf;
  iov.iov_len = len;
  struct msghdr msg;
  std::memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = ::recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  *truncated = false;
  if (n < 0) return n;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (std::size_t i = 0; i < count; ++i) {
        int f;
        std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
        fds->push_back(f);
      }
    } else {
      *truncated = true;  // credentials or anything else: not part of our protocol
    }
  }
  if ((msg.msg_flags & MSG_CTRUNC) != 0) *truncated = true;
  return n;
}

bool fd_table_full(int any_fd) noexcept {
  int probe = ::fcntl(any_fd, F_DUPFD_CLOEXEC, 0);
  if (probe >= 0) {
    ::close(probe);
    return false;
  }
  return errno == EMFILE || errno == ENFILE;
}

Result<int> make_epoll() {
  int fd = ::epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) return os_error("epoll_create1", errno);
  return fd;
}

bool epoll_set(int epfd, int fd, std::uint32_t events, bool add) noexcept {
  struct epoll_event ev;
  std::memset(&ev, 0, sizeof ev);
  ev.events = events;
  ev.data.fd = fd;
  return ::epoll_ctl(epfd, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &ev) == 0;
}

void epoll_remove(int epfd, int fd) noexcept {
  struct epoll_event ev;
  ::epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev);
}

int epoll_wait_ready(int epfd, Ready* out, int max, int timeout_ms) noexcept {
  struct epoll_event evs[8];
  if (max > 8) max = 8;
  int n = ::epoll_wait(epfd, evs, max, timeout_ms);
  if (n < 0) return -1;
  for (int i = 0; i < n; ++i) {
    out[i].fd = evs[i].data.fd;
    out[i].events = evs[i].events;
  }
  return n;
}

bool hung_up(int fd) noexcept {
  struct pollfd p = {fd, POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

bool wait_readable(int fd, int timeout_ms) noexcept {
  struct pollfd p = {fd, POLLIN, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, timeout_ms);
  } while (rc < 0 && errno == EINTR);
  return rc > 0;
}

int wait_readable_or_cancel(int fd, int cancel_fd, int timeout_ms) noexcept {
  struct pollfd p[2] = {{fd, POLLIN, 0}, {cancel_fd, POLLIN, 0}};
  int rc;
  do {
    rc = ::poll(p, cancel_fd >= 0 ? 2 : 1, timeout_ms);
  } while (rc < 0 && errno == EINTR);
  if (rc <= 0) return 0;
  if (cancel_fd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)) != 0) return 2;
  return (p[0].revents & (POLLIN | POLLHUP | POLLERR)) != 0 ? 1 : 0;
}

int dup_cloexec(int fd) noexcept { return ::fcntl(fd, F_DUPFD_CLOEXEC, 3); }

// How many other tasks are runnable right now: /proc/loadavg's "running/total" field counts
// the runnable tasks of the whole machine at this instant, the reader included (it runs
// while it reads). Unlike the 1-minute load average, this is not raised by the spinning
// worker itself: a worker whose spin counted against it switched its own spin off after a
// minute of a busy stream and back on a minute after, the bimodal rounds of
// bench/FINDINGS.md 8.2. -1 if unknown.
double others_running() noexcept {
  const char* fake = std::getenv("SNAKEPIT_SHM_CHANNEL_LOADAVG");
  if (fake != nullptr && *fake != '\0') return std::strtod(fake, nullptr);
  int fd = ::open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    char buf[128];
    ssize_t n = ::read(fd, buf, sizeof buf - 1);
    ::close(fd);
    if (n > 0) {
      buf[n] = '\0';
      // "0.50 0.40 0.30 3/155 12345": the fourth field, before the slash
      const char* p = buf;
      for (int field = 0; field < 3 && p != nullptr; ++field) {
        p = std::strchr(p, ' ');
        if (p != nullptr) ++p;
      }
      if (p != nullptr) {
        char* end = nullptr;
        long running = std::strtol(p, &end, 10);
        if (end != p && *end == '/' && running >= 1) return static_cast<double>(running - 1);
      }
    }
  }
  double load = 0;
  if (::getloadavg(&load, 1) == 1) return load;
  return -1;
}

bool cpus_idle() noexcept {
  static std::atomic<std::uint64_t> checked_ns{0};
  static std::atomic<bool> idle{true};
  static std::atomic<std::uint64_t> smoothed_milli{0};  // others running, x1000, smoothed
  const std::uint64_t now = monotonic_ns();
  const std::uint64_t last = checked_ns.load(std::memory_order_relaxed);
  if (last != 0 && now - last < 50'000'000ull) return idle.load(std::memory_order_relaxed);
  checked_ns.store(now, std::memory_order_relaxed);
  const double others = others_running();
  if (others < 0) return idle.load(std::memory_order_relaxed);  // unknown: keep the verdict
  // Smoothed over the last few samples (half-life: one sample, 50 ms), so one unlucky
  // instant does not switch the spin off for long, nor one lucky instant on.
  const auto sample = static_cast<std::uint64_t>(others * 1000.0);
  const std::uint64_t prev = smoothed_milli.load(std::memory_order_relaxed);
  const char* fake = std::getenv("SNAKEPIT_SHM_CHANNEL_LOADAVG");
  const bool exact = last == 0 || (fake != nullptr && *fake != '\0');  // tests: as given
  const std::uint64_t avg = exact ? sample : (prev + sample) / 2;
  smoothed_milli.store(avg, std::memory_order_relaxed);
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  const bool verdict = cpus > 1 && static_cast<double>(avg) / 1000.0 < static_cast<double>(cpus);
  idle.store(verdict, std::memory_order_relaxed);
  return verdict;
}

void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

std::uint64_t monotonic_ns() noexcept {
  struct timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

}  // namespace spshm::channel::os
