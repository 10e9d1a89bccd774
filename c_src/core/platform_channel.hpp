// The OS primitives of the message channel (Linux: platform_channel_linux.cpp):
// eventfd doorbells, sealed memfds, a private Unix socket directory, fd passing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "error.hpp"

namespace spshm::channel::os {

/// A non-blocking, close-on-exec eventfd (counter 0).
Result<int> make_eventfd();
/// fcntl(F_DUPFD_CLOEXEC): a close-on-exec duplicate of fd, or -1 (errno set).
int dup_cloexec(int fd) noexcept;
/// Adds 1 to an eventfd (never blocks; a saturated counter is already "signalled").
void signal_eventfd(int fd) noexcept;
/// Resets an eventfd to 0; returns the count read (0 if it was not signalled).
std::uint64_t drain_eventfd(int fd) noexcept;

/// A memfd of `size` bytes whose pages are allocated now (posix_fallocate: no SIGBUS on
/// first touch), sealed F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL. Honours
/// SNAKEPIT_SHM_CHANNEL_NO_MEMFD=1 (refuses, as a seccomp filter would: for tests).
Result<int> make_ring_memfd(std::uint64_t size);

/// A memfd holding a copy of `data` (written with pwrite, never mapped writable), then
/// sealed F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL: immutable for everyone.
Result<int> make_message_memfd(const void* data, std::uint64_t length);

/// Checks that `fd` is a memfd sealed against writes and shrinking with at least `size`
/// bytes: only then can it be mapped without SIGBUS and shared zero-copy.
Result<void> check_message_memfd(int fd, std::uint64_t size);

/// Checks that `fd` is sealed against shrinking and returns its size.
Result<std::uint64_t> sealed_size(int fd);

/// Maps `size` bytes of `fd` (shared, read-only or read-write).
Result<void*> map_fd(int fd, std::uint64_t size, bool writable);
void unmap(void* addr, std::uint64_t size) noexcept;
/// Reads exactly `size` bytes at offset 0 of `fd` into `dst` (pread, EINTR retried); an
/// error if the file ends first.
Result<void> read_fd(int fd, unsigned char* dst, std::uint64_t size);

/// A channel's private socket directory: its path and a close-on-exec descriptor of it
/// that holds flock(LOCK_SH) for as long as the directory exists (the owner closes it
/// only after removing the directory). A sweep tells a live channel's directory from a
/// dead one's by that lock (sweep_stale_socket_dirs).
struct PrivateDir {
  std::string path;
  int lock_fd = -1;
};

/// Creates a fresh 0700 directory under `base` (empty: $XDG_RUNTIME_DIR, else $TMPDIR,
/// else /tmp, the first that is writable), opens it (O_DIRECTORY | O_NOFOLLOW) and locks
/// it shared. On failure nothing is left (no directory, no descriptor).
Result<PrivateDir> make_private_dir(const std::string& base);

/// Names of the channel socket directories: "spshm-ch-" + the 6 characters of mkdtemp.
inline constexpr const char* kSocketDirPrefix = "spshm-ch-";

/// Removes the socket directories of dead channels in `base`: every entry named
/// kSocketDirPrefix + 6 letters or digits that is a real directory (never a symlink) of
/// this euid with mode exactly 0700, whose lock nobody holds (flock(LOCK_EX | LOCK_NB)
/// succeeds: no live owner anywhere, whatever PID namespace) and whose mtime is at least
/// `grace_ns` old (a channel between its mkdtemp and its flock), and which holds nothing
/// but a socket named `ctl`: the socket is unlinked, then the directory removed. Never
/// follows a symlink; anything else is left alone. Returns how many it removed.
std::uint64_t sweep_stale_socket_dirs(const std::string& base, std::uint64_t grace_ns);

/// The bases an owner without `socket_dir` may choose: $XDG_RUNTIME_DIR, $TMPDIR (as
/// getenv sees them), then `also` (the same variables as a caller's own environment has
/// them: the BEAM's os:putenv does not change the process environment), then /tmp: each
/// that is an existing directory, each once (by device and inode).
std::vector<std::string> default_socket_dir_bases(const std::vector<std::string>& also = {});

/// A listening, non-blocking Unix stream socket bound to `path`, chmod 0600.
Result<int> listen_unix(const std::string& path);
/// A blocking connection to `path`.
Result<int> connect_unix(const std::string& path);
/// Accepts one connection (non-blocking, close-on-exec); -1 with errno EAGAIN if none.
int accept_nonblocking(int listen_fd) noexcept;
/// The uid and pid of the process at the other end of a Unix socket.
bool peer_credentials(int fd, std::uint32_t* uid, std::uint32_t* pid) noexcept;
std::uint32_t effective_uid() noexcept;

void set_nonblocking(int fd) noexcept;

/// sendmsg of `len` bytes with `fds` attached (SCM_RIGHTS), MSG_NOSIGNAL | MSG_DONTWAIT.
/// Returns bytes sent or -1 (errno set).
long send_with_fds(int fd, const void* data, std::size_t len, const int* fds,
                   std::size_t nfds) noexcept;
/// Takes `fd` (a connected stream socket) and finishes sending `rest` on a detached
/// thread, for at most `timeout_ms` (the peer must read meanwhile), then shuts it down
/// and closes it: a local close must not cut a message whose send already succeeded.
/// Without a thread, the socket is shut down and closed at once.
void finish_sending_and_close(int fd, std::vector<std::uint8_t> rest, int timeout_ms) noexcept;
/// recvmsg (MSG_DONTWAIT | MSG_CMSG_CLOEXEC): bytes read (0 = EOF) or -1 (errno);
/// received fds are appended to `fds`. *truncated: the kernel dropped fds or control data.
long recv_with_fds(int fd, void* buf, std::size_t len, std::vector<int>* fds,
                   bool* truncated) noexcept;
/// True if this process cannot open one more descriptor (EMFILE): the kernel then drops
/// the descriptors of an SCM_RIGHTS message and sets MSG_CTRUNC, which is our limit, not
/// a peer's fault. `any_fd` is an open descriptor to duplicate for the test.
bool fd_table_full(int any_fd) noexcept;

/// epoll helpers: level-triggered interest `events` (EPOLLIN = 1, EPOLLOUT = 4,
/// EPOLLRDHUP = 0x2000) on fd; remove.
Result<int> make_epoll();
bool epoll_set(int epfd, int fd, std::uint32_t events, bool add) noexcept;
void epoll_remove(int epfd, int fd) noexcept;
/// One ready descriptor reported by epoll_wait_ready (events as in epoll: EPOLLIN 1,
/// EPOLLOUT 4, EPOLLERR 8, EPOLLHUP 0x10, EPOLLRDHUP 0x2000).
struct Ready {
  int fd;
  std::uint32_t events;
};
/// epoll_wait up to timeout_ms (0: a probe, -1: forever): the number of ready descriptors
/// written to out (at most max), 0 on timeout, -1 when interrupted by a signal or failed.
int epoll_wait_ready(int epfd, Ready* out, int max, int timeout_ms) noexcept;
/// True if the peer of a socket hung up (POLLRDHUP/POLLHUP/POLLERR now), unread data or not.
bool hung_up(int fd) noexcept;
/// Waits up to timeout_ms (-1 forever) for epfd to be readable. True if readable.
bool wait_readable(int fd, int timeout_ms) noexcept;
/// Waits up to timeout_ms (-1 forever) for fd or cancel_fd (-1: none) to be readable:
/// 2 if cancel_fd is (it wins when both are), 1 if fd is, 0 otherwise (time out, signal).
int wait_readable_or_cancel(int fd, int cancel_fd, int timeout_ms) noexcept;
/// True while the machine has a CPU to spare for a spinning receiver: the tasks runnable
/// right now other than the caller (/proc/loadavg's running count, smoothed over a few
/// samples) are fewer than the online CPUs (sampled at most every 50 ms; the 1-minute
/// load average if /proc is not there; the environment variable
/// SNAKEPIT_SHM_CHANNEL_LOADAVG, if set, stands in for that count: tests).
bool cpus_idle() noexcept;
/// A pause instruction for spin loops (lets the sibling hyperthread run).
void cpu_relax() noexcept;

std::uint64_t monotonic_ns() noexcept;

}  // namespace spshm::channel::os
