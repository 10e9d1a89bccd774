// One end of a message channel: handshake, transports, send/recv, waiting (channel.hpp).
#include "channel.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "platform.hpp"
#include "platform_channel.hpp"

namespace spshm::channel {

namespace {

constexpr std::uint32_t kEpollIn = 0x001, kEpollOut = 0x004, kEpollErr = 0x008, kEpollHup = 0x010,
                        kEpollRdHup = 0x2000, kEpollEt = 1u << 31;
constexpr std::size_t kReadChunk = 65536;
/// How long a close waits, in the background, for the peer to read the tail of a frame
/// already sent (socket transport).
constexpr int kFlushOnCloseMs = 10000;
/// How long the owner stops watching its listening socket after accept() found this
/// process out of descriptors.
constexpr std::uint64_t kAcceptPauseNs = 50'000'000;

void put_u32(std::uint8_t* p, std::uint32_t v) noexcept { std::memcpy(p, &v, 4); }
void put_u64(std::uint8_t* p, std::uint64_t v) noexcept { std::memcpy(p, &v, 8); }
std::uint32_t get_u32(const std::uint8_t* p) noexcept {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
std::uint64_t get_u64(const std::uint8_t* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// What to do about a failure to make one of the channel's memfds (the rings, the copy of
// a region message): they are memory of this process, neither a file of /dev/shm nor of
// a region's shm_path, so the region advice of os_error() does not apply.
std::string memfd_remedy(int err) {
  switch (err) {
    case EMFILE:
      return "this process is out of file descriptors (RLIMIT_NOFILE): raise its limit "
             "(ulimit -n, systemd LimitNOFILE=) or close descriptors it no longer needs";
    case ENFILE:
      return "the system is out of file descriptors (fs.file-max): close descriptors or raise "
             "the limit";
    case EFBIG:
      return "raise the file size limit (ulimit -f, systemd LimitFSIZE=)";
    case EPERM:
    case EACCES:
      return "memfd_create is refused here (a seccomp filter or a sandbox): allow it";
    case ENOSPC:
    case ENOMEM:
      return "not enough memory for it (RAM, the memory cgroup's limit or the kernel's shmem "
             "limit): free memory or raise the limit";
    case ENOSYS:
      return "this kernel has no memfd_create (Linux 3.17 or later is needed)";
    default:
      return "";
  }
}

// The cause of an OS failure without the advice os_error() appends after strerror.
std::string cause_of(const Error& e) {
  if (e.sys_errno == 0) return e.message;
  const std::string text = std::strerror(e.sys_errno);
  auto at = e.message.find(text);
  return at == std::string::npos ? e.message : e.message.substr(0, at + text.size());
}

// A failure to prepare a region message, worded for the channel's sender: the errno and
// the code stay those of the OS failure.
Error region_message_error(Error e, std::uint64_t length) {
  std::string remedy = memfd_remedy(e.sys_errno);
  e.message = "cannot send the " + std::to_string(length) +
              "-byte message as a region message (a message above the channel's inline "
              "threshold travels in a sealed memfd made by the sender): " +
              cause_of(e) + (remedy.empty() ? "" : "; " + remedy) +
              "; or send smaller messages (up to the inline threshold, set by Channel.open's "
              ":inline_threshold and :ring_size, they need no memfd)";
  return e;
}

// The channel's socket (its private directory, the listening socket) could not be made.
Error socket_error(Error e) {
  std::string remedy;
  switch (e.sys_errno) {
    case EACCES:
    case EPERM:
    case EROFS:
    case ENOENT:
    case ENOTDIR:
      remedy = "; give Channel.open a :socket_dir: an existing directory this user may write to";
      break;
    case ENOSPC:
    case EDQUOT:
      remedy = "; free space there or give Channel.open another :socket_dir";
      break;
    case EMFILE:
    case ENFILE:
      remedy = "; " + memfd_remedy(e.sys_errno);
      break;
    default:
      break;
  }
  e.message = "cannot open the channel: its socket could not be set up: " + cause_of(e) + remedy;
  return e;
}

// The rings of a channel asked with transport :shm could not be made.
Error rings_error(Error e, std::uint64_t size) {
  std::string remedy = memfd_remedy(e.sys_errno);
  e.message = "cannot open the channel with transport :shm: its rings (a memfd of " +
              std::to_string(size) + " bytes) could not be set up: " + cause_of(e) +
              (remedy.empty() ? "" : "; " + remedy) +
              "; or open it with a smaller :ring_size or with transport :auto (falls back "
              "to the socket) or :socket";
  return e;
}

void close_fd(int& fd) noexcept {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

bool from_hex(const std::string& s, std::uint8_t* out, std::size_t n) {
  if (s.size() != 2 * n) return false;
  auto val = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (std::size_t i = 0; i < n; ++i) {
    int hi = val(s[2 * i]), lo = val(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = static_cast<std::uint8_t>(hi * 16 + lo);
  }
  return true;
}

bool equal_ct(const std::uint8_t* a, const std::uint8_t* b, std::size_t n) noexcept {
  std::uint8_t d = 0;
  for (std::size_t i = 0; i < n; ++i) d |= static_cast<std::uint8_t>(a[i] ^ b[i]);
  return d == 0;
}

}  // namespace

const char* close_reason_name(CloseReason r) noexcept {
  switch (r) {
    case CloseReason::none:
      return "none";
    case CloseReason::closed:
      return "closed";
    case CloseReason::peer_closed:
      return "peer_closed";
    case CloseReason::protocol_error:
      return "protocol_error";
    case CloseReason::io_error:
      return "io_error";
  }
  return "io_error";
}

const char* transport_name(Transport t) noexcept { return t == Transport::shm ? "shm" : "socket"; }

// ---------------------------------------------------------------------------------------
// socket directories of dead owners

std::uint64_t sweep_stale_socket_dirs(const std::string& base) {
  return os::sweep_stale_socket_dirs(base, kSocketDirGraceNs);
}

std::uint64_t sweep_default_socket_dirs(const std::vector<std::string>& also_bases) {
  std::uint64_t removed = 0;
  for (const auto& base : os::default_socket_dir_bases(also_bases))
    removed += sweep_stale_socket_dirs(base);
  return removed;
}

// ---------------------------------------------------------------------------------------
// creation

Result<std::unique_ptr<Endpoint>> Endpoint::create_owner(const OwnerOptions& o) {
  if (!ring::valid_capacity(o.ring_size)) {
    return Error{Errc::invalid_argument, 0,
                 "ring_size must be a multiple of 4096 between 4 KiB and 16 MiB, got " +
                     std::to_string(o.ring_size)};
  }
  std::uint32_t inline_max =
      o.inline_max == 0 ? ring::default_inline_max(o.ring_size, o.ring_size) : o.inline_max;
  if (inline_max > ring::max_inline_max(o.ring_size, o.ring_size)) {
    return Error{Errc::invalid_argument, 0,
                 "inline_threshold must be at most a quarter of the ring (" +
                     std::to_string(ring::max_inline_max(o.ring_size, o.ring_size)) + ")"};
  }
  std::unique_ptr<Endpoint> ep(new Endpoint());
  ep->owner_ = true;
  ep->cap_ = o.ring_size;
  ep->inline_max_ = inline_max;
  ep->max_message_ = o.max_message_size;
  ep->cons_.policy = o.ack;
  ep->st_.ring_size = o.ring_size;
  ep->st_.inline_max = inline_max;
  if (auto r = platform::random_bytes(ep->token_, kTokenSize); !r.ok()) return r.error();

  auto ep_fd = os::make_epoll();
  if (!ep_fd.ok()) return ep_fd.error();
  ep->epfd_ = ep_fd.value();

  // Shared memory unless refused; :automatic falls back to the socket transport.
  Error shm_error{Errc::unsupported, 0, "socket transport asked"};
  bool shm_ok = false;
  if (o.transport != Wanted::socket) {
    auto mfd =
        o.refuse_memfd
            ? Result<int>(Error{Errc::unsupported, EPERM, "memfd_create refused (simulated)"})
            : os::make_ring_memfd(ep->total_map_size());
    if (mfd.ok()) {
      ep->memfd_ = mfd.value();
      auto m = os::map_fd(ep->memfd_, ep->total_map_size(), true);
      auto e1 = os::make_eventfd();
      auto e2 = os::make_eventfd();
      if (e1.ok()) ep->wake_fd_ = e1.value();
      if (e2.ok()) ep->peer_wake_fd_ = e2.value();
      if (m.ok() && e1.ok() && e2.ok()) {
        ep->map_ = m.value();
        shm_ok = true;
      } else {
        shm_error = !m.ok() ? m.error() : !e1.ok() ? e1.error() : e2.error();
        if (m.ok()) os::unmap(m.value(), ep->total_map_size());
        close_fd(ep->memfd_);
        close_fd(ep->wake_fd_);
        close_fd(ep->peer_wake_fd_);
      }
    } else {
      shm_error = mfd.error();
    }
    if (!shm_ok && o.transport == Wanted::shm) return rings_error(shm_error, ep->total_map_size());
  }
  if (shm_ok) {
    ep->transport_ = Transport::shm;
    ring::init_header(ep->map_, o.ring_size, o.ring_size, inline_max);
    auto* h = static_cast<ring::ChannelHeader*>(ep->map_);
    auto* base = static_cast<std::uint8_t*>(ep->map_);
    ep->prod_.ctl = &h->rings[0];
    ep->prod_.data = base + ring::kHeaderSize;
    ep->prod_.cap = o.ring_size;
    ep->cons_.ctl = &h->rings[1];
    ep->cons_.data = base + ring::kHeaderSize + o.ring_size;
    ep->cons_.cap = o.ring_size;
    ep->cons_.last_publish_ns = os::monotonic_ns();
    if (!os::epoll_set(ep->epfd_, ep->wake_fd_, kEpollIn | kEpollEt, true)) {
      return os_error("epoll_ctl(doorbell)", errno);
    }
  } else {
    ep->transport_ = Transport::socket;
    if (o.transport == Wanted::automatic) {
      ep->st_.fallbacks = 1;
      ep->st_.fallback_reason = shm_error.message;
    }
  }
  auto dir = os::make_private_dir(o.socket_dir);
  if (!dir.ok()) return socket_error(dir.error());
  ep->dir_ = dir.value().path;
  ep->dir_fd_ = dir.value().lock_fd;
  ep->path_ = ep->dir_ + "/ctl";
  auto lfd = os::listen_unix(ep->path_);
  if (!lfd.ok()) {
    ::rmdir(ep->dir_.c_str());
    close_fd(ep->dir_fd_);
    ep->dir_.clear();
    ep->path_.clear();
    return socket_error(lfd.error());
  }
  ep->listen_fd_ = lfd.value();
  if (!os::epoll_set(ep->epfd_, ep->listen_fd_, kEpollIn, true)) {
    return os_error("epoll_ctl(listen)", errno);
  }
  ep->st_.transport = ep->transport_;
  return ep;
}

Result<std::unique_ptr<Endpoint>> Endpoint::connect(const std::string& path,
                                                    const std::string& token_hex,
                                                    const WorkerOptions& o) {
  std::uint8_t token[kTokenSize];
  if (!from_hex(token_hex, token, kTokenSize)) {
    return Error{Errc::invalid_argument, 0, "the channel token must be 64 hex characters"};
  }
  std::unique_ptr<Endpoint> ep(new Endpoint());
  ep->owner_ = false;
  ep->state_ = State::connected;
  ep->max_message_ = o.max_message_size;
  ep->cons_.policy = o.ack;
  if (o.accepted != nullptr) *o.accepted = false;
  // Given up by the caller (o.cancel_fd readable): before the hello, nothing reached the
  // owner. After it, the socket is shut down first, so that the owner can no longer send
  // its welcome (EPIPE: it drops this connection and keeps listening); a welcome, or part
  // of it, that came before is still readable here, and means the owner took this
  // connection as its one worker.
  auto cancelled = [&ep, &o](bool hello_sent) -> Error {
    bool accepted = false;
    if (hello_sent && ep->conn_fd_ >= 0) {
      ::shutdown(ep->conn_fd_, SHUT_RDWR);
      accepted = !ep->inbuf_.empty();
      std::uint8_t scratch[256];
      for (;;) {
        std::vector<int> got;
        bool trunc = false;
        long n = os::recv_with_fds(ep->conn_fd_, scratch, sizeof scratch, &got, &trunc);
        for (int f : got) ::close(f);
        if (n <= 0) break;
        accepted = true;
      }
    }
    if (o.accepted != nullptr) *o.accepted = accepted;
    return Error{Errc::io_error, ECANCELED,
                 accepted ? "the connect was cancelled after the channel owner had accepted "
                            "this connection: it is closed (the owner sees peer_closed) and "
                            "the channel, which takes one worker for life, cannot be "
                            "connected again"
                          : "the connect was cancelled before the channel owner accepted it: "
                            "the channel still waits for its worker"};
  };
  if (o.cancel_fd >= 0 && os::wait_readable(o.cancel_fd, 0)) return cancelled(false);
  auto fd = os::connect_unix(path);
  if (!fd.ok()) return fd.error();
  ep->conn_fd_ = fd.value();
  os::set_nonblocking(ep->conn_fd_);
  if (o.cancel_fd >= 0 && os::wait_readable(o.cancel_fd, 0)) return cancelled(false);

  std::uint8_t hello[ring::kFrameHeaderSize + kHelloSize];
  put_u32(hello, kHelloSize);
  put_u32(hello + 4, ring::kFrameHello);
  std::memcpy(hello + 8, token, kTokenSize);
  put_u32(hello + 8 + kTokenSize, ring::kVersion);
  put_u32(hello + 12 + kTokenSize, 0);
  if (os::send_with_fds(ep->conn_fd_, hello, sizeof hello, nullptr, 0) !=
      static_cast<long>(sizeof hello)) {
    return os_error("sending the channel hello", errno);
  }
  // Wait for the welcome (+ fds), keeping any bytes that follow it.
  std::vector<int> fds;
  std::uint64_t deadline = os::monotonic_ns() + static_cast<std::uint64_t>(o.timeout_ms) * 1000000;
  std::uint8_t buf[kReadChunk];
  auto cleanup_fds = [&fds]() {
    for (int f : fds) ::close(f);
    fds.clear();
  };
  while (ep->inbuf_.size() < ring::kFrameHeaderSize + kWelcomeSize) {
    std::uint64_t now = os::monotonic_ns();
    if (now >= deadline) {
      cleanup_fds();
      return Error{Errc::io_error, ETIMEDOUT, "no welcome from the channel owner in time"};
    }
    int ready = os::wait_readable_or_cancel(ep->conn_fd_, o.cancel_fd,
                                            static_cast<int>((deadline - now) / 1000000 + 1));
    if (ready == 2) {
      cleanup_fds();
      return cancelled(true);
    }
    if (ready == 0) continue;
    bool trunc = false;
    long n = os::recv_with_fds(ep->conn_fd_, buf, sizeof buf, &fds, &trunc);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n <= 0 || trunc) {
      // The welcome's memfd and doorbells dropped by the kernel because this process is
      // at its descriptor limit: our limit, not a refusal (it was reported as one).
      const bool full = trunc && os::fd_table_full(ep->conn_fd_);
      cleanup_fds();
      if (full) {
        return Error{Errc::io_error, EMFILE,
                     "this process is out of file descriptors (RLIMIT_NOFILE): the kernel "
                     "dropped the channel's memfd and doorbells sent with the welcome; raise "
                     "the limit (ulimit -n, systemd LimitNOFILE=) or keep fewer descriptors "
                     "open, then connect to a new channel (this one took its one worker)"};
      }
      return Error{Errc::permission_denied, n < 0 ? errno : 0,
                   "the channel owner refused the connection (wrong token, already connected "
                   "or closed)"};
    }
    ep->inbuf_.insert(ep->inbuf_.end(), buf, buf + n);
  }
  const std::uint8_t* w = ep->inbuf_.data();
  if (get_u32(w) != kWelcomeSize || get_u32(w + 4) != ring::kFrameWelcome) {
    cleanup_fds();
    return Error{Errc::corrupt, 0, "bad welcome frame from the channel owner"};
  }
  const std::uint8_t* p = w + ring::kFrameHeaderSize;
  std::uint32_t version = get_u32(p), transport = get_u32(p + 4);
  std::uint64_t cap0 = get_u64(p + 8), cap1 = get_u64(p + 16);
  std::uint32_t inline_max = get_u32(p + 24);
  ep->inoff_ = ring::kFrameHeaderSize + kWelcomeSize;
  if (version != ring::kVersion || !ring::valid_capacity(cap0) || cap0 != cap1 ||
      inline_max > ring::max_inline_max(cap0, cap1) || (transport != 1 && transport != 2)) {
    cleanup_fds();
    return Error{Errc::unsupported_version, 0, "unsupported channel welcome"};
  }
  ep->cap_ = cap0;
  ep->inline_max_ = inline_max;
  ep->st_.ring_size = cap0;
  ep->st_.inline_max = inline_max;
  ep->transport_ = static_cast<Transport>(transport);
  ep->st_.transport = ep->transport_;
  auto ep_fd = os::make_epoll();
  if (!ep_fd.ok()) {
    cleanup_fds();
    return ep_fd.error();
  }
  ep->epfd_ = ep_fd.value();
  if (ep->transport_ == Transport::shm) {
    if (fds.size() < 3) {
      cleanup_fds();
      return Error{Errc::corrupt, 0, "the channel welcome carried no memfd/eventfds"};
    }
    ep->memfd_ = fds[0];
    ep->peer_wake_fd_ = fds[1];
    ep->wake_fd_ = fds[2];
    for (std::size_t i = 3; i < fds.size(); ++i) ep->fdq_.push_back(fds[i]);
    fds.clear();
    auto size = os::sealed_size(ep->memfd_);
    if (!size.ok()) return size.error();
    if (size.value() < ep->total_map_size()) {
      return Error{Errc::corrupt, 0, "the channel memfd is smaller than its rings"};
    }
    auto m = os::map_fd(ep->memfd_, ep->total_map_size(), true);
    if (!m.ok()) return m.error();
    ep->map_ = m.value();
    std::string why = ring::validate_header(ep->map_, size.value(), cap0, cap1, inline_max);
    if (!why.empty()) return Error{Errc::corrupt, 0, "channel header: " + why};
    auto* h = static_cast<ring::ChannelHeader*>(ep->map_);
    auto* base = static_cast<std::uint8_t*>(ep->map_);
    ep->prod_.ctl = &h->rings[1];
    ep->prod_.data = base + ring::kHeaderSize + cap0;
    ep->prod_.cap = cap1;
    ep->cons_.ctl = &h->rings[0];
    ep->cons_.data = base + ring::kHeaderSize;
    ep->cons_.cap = cap0;
    // Fresh rings: both indices of ring 1 are ours to start at what is there (0).
    std::uint64_t h1 = h->rings[1].producer.head.load(std::memory_order_acquire);
    std::uint64_t t1 = h->rings[1].consumer.tail.load(std::memory_order_acquire);
    std::uint64_t t0 = h->rings[0].consumer.tail.load(std::memory_order_acquire);
    if (t1 > h1 || h1 - t1 > cap1) return Error{Errc::corrupt, 0, "bad ring indices at connect"};
    ep->prod_.head = h1;
    ep->prod_.tail_seen = t1;
    ep->cons_.tail = ep->cons_.published = ep->cons_.head_seen = t0;
    ep->cons_.last_publish_ns = os::monotonic_ns();
    if (!os::epoll_set(ep->epfd_, ep->wake_fd_, kEpollIn | kEpollEt, true)) {
      return os_error("epoll_ctl(doorbell)", errno);
    }
  } else {
    for (int f : fds) ep->fdq_.push_back(f);
    fds.clear();
    // No doorbell on this transport: a private eventfd, rung only by close(), wakes a
    // thread asleep in recv_wait() (see fail()).
    auto own = os::make_eventfd();
    if (!own.ok()) return own.error();
    ep->wake_fd_ = own.value();
    if (!os::epoll_set(ep->epfd_, ep->wake_fd_, kEpollIn | kEpollEt, true)) {
      return os_error("epoll_ctl(close eventfd)", errno);
    }
  }
  const std::uint32_t interest =
      ep->transport_ == Transport::shm ? kEpollRdHup : kEpollIn | kEpollRdHup;
  if (!os::epoll_set(ep->epfd_, ep->conn_fd_, interest, true)) {
    return os_error("epoll_ctl(socket)", errno);
  }
  std::uint32_t uid = 0, pid = 0;
  if (os::peer_credentials(ep->conn_fd_, &uid, &pid)) ep->st_.peer_pid = pid;
  {
    std::lock_guard<std::mutex> lock(ep->mu_);
    ep->parse_frames();  // frames that followed the welcome
  }
  return ep;
}

Endpoint::~Endpoint() {
  close(CloseReason::closed);
  if (map_ != nullptr) os::unmap(map_, total_map_size());
  close_fd(wake_fd_);  // the worker's, kept by fail() (see there)
  if (epfd_owned_) close_fd(epfd_);
}

int Endpoint::release_wait_fd() noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  epfd_owned_ = false;  // still used here until close(), then forgotten
  return epfd_;
}

std::string Endpoint::token_hex() const {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (auto b : token_) {
    s.push_back(digits[b >> 4]);
    s.push_back(digits[b & 15]);
  }
  return s;
}

// ---------------------------------------------------------------------------------------
// closing

void Endpoint::cleanup_listen() {
  if (listen_fd_ >= 0) {
    if (epfd_ >= 0) os::epoll_remove(epfd_, listen_fd_);
    close_fd(listen_fd_);
  }
  if (!path_.empty()) ::unlink(path_.c_str());
  if (!dir_.empty()) ::rmdir(dir_.c_str());
  dir_.clear();
  close_fd(dir_fd_);  // only now: while it exists, its lock says its owner lives
}

void Endpoint::fail(CloseReason reason, const std::string& detail) {
  if (reason_ != CloseReason::none) return;
  reason_ = reason;
  detail_ = detail;
  failed_.store(true, std::memory_order_relaxed);
  state_ = State::closed;
  if (conn_fd_ >= 0 && reason == CloseReason::closed && !peer_eof_ &&
      out_off_ < out_pending_.size()) {
    // Closed here while the tail of a sent frame still waits for room in the socket
    // (socket transport, a peer reading slowly): send() said ok, so the tail goes out
    // first, on a thread of its own for at most kFlushOnCloseMs, and then the peer sees
    // EOF (as the frames left in a ring are still read after a close).
    if (epfd_ >= 0) os::epoll_remove(epfd_, conn_fd_);
    os::finish_sending_and_close(
        conn_fd_, std::vector<std::uint8_t>(out_pending_.begin() + out_off_, out_pending_.end()),
        kFlushOnCloseMs);
    conn_fd_ = -1;
  }
  if (conn_fd_ >= 0) {
    ::shutdown(conn_fd_, SHUT_RDWR);  // the peer sees EOF now
    if (epfd_ >= 0) os::epoll_remove(epfd_, conn_fd_);
    close_fd(conn_fd_);
  }
  cleanup_listen();
  if (owner_) {
    if (wake_fd_ >= 0 && epfd_ >= 0) os::epoll_remove(epfd_, wake_fd_);
    close_fd(wake_fd_);
  } else {
    // The worker's own doorbell stays registered until the destructor: ringing it wakes
    // a thread asleep in recv_wait() on this endpoint, which then reports the close
    // (closing it here could leave that thread asleep on an empty epoll set).
    if (wake_fd_ >= 0) os::signal_eventfd(wake_fd_);
  }
  close_fd(peer_wake_fd_);
  close_fd(memfd_);
  if (!epfd_owned_) epfd_ = -1;  // its new owner closes it after close() returned
  for (int f : fdq_) ::close(f);
  fdq_.clear();
  for (auto& q : inq_) {
    if (q.fd >= 0) ::close(q.fd);
  }
  inq_.clear();
  inq_bytes_ = 0;
  regions_queued_ = 0;
  out_pending_.clear();
  out_off_ = 0;
}

void Endpoint::close(CloseReason reason) {
  std::lock_guard<std::mutex> lock(mu_);
  fail(reason, reason == CloseReason::closed ? "closed by this side" : "");
}

CloseReason Endpoint::close_reason() {
  std::lock_guard<std::mutex> lock(mu_);
  return reason_;
}

State Endpoint::state() {
  std::lock_guard<std::mutex> lock(mu_);
  return state_;
}

bool Endpoint::accept_paused() {
  std::lock_guard<std::mutex> lock(mu_);
  return accept_paused_ && state_ == State::listening && reason_ == CloseReason::none;
}

Io Endpoint::closed_result(Error* err) {
  CloseReason r = reason_ != CloseReason::none ? reason_ : CloseReason::peer_closed;
  if (err != nullptr) {
    err->code = Errc::closed;
    err->sys_errno = 0;
    err->message = close_reason_name(r);
  }
  return Io::closed;
}

// ---------------------------------------------------------------------------------------
// control socket

void Endpoint::set_conn_interest() {
  if (conn_fd_ < 0 || epfd_ < 0 || peer_eof_) return;
  // With shared memory the socket carries only the fds of region frames, read when their
  // frame is: only the hang-up is watched (so fds never pile up in this process).
  const bool reading =
      !reading_paused_ && !(transport_ == Transport::shm && state_ == State::connected);
  std::uint32_t ev = kEpollRdHup | (reading ? kEpollIn : 0) | (want_out_ ? kEpollOut : 0);
  os::epoll_set(epfd_, conn_fd_, ev, false);
}

void Endpoint::drop_candidate() {
  if (conn_fd_ >= 0) {
    if (epfd_ >= 0) os::epoll_remove(epfd_, conn_fd_);
    close_fd(conn_fd_);
  }
  inbuf_.clear();
  inoff_ = 0;
  for (int f : fdq_) ::close(f);
  fdq_.clear();
  peer_eof_ = false;
  // The listening socket stays registered while a candidate is there (handle_ready).
}

void Endpoint::read_socket() {
  std::uint8_t buf[kReadChunk];
  while (conn_fd_ >= 0 && !peer_eof_ && reason_ == CloseReason::none) {
    if (transport_ == Transport::socket && state_ == State::connected &&
        (inq_bytes_ >= cap_ || fdq_.size() + regions_queued_ >= kMaxQueuedFds / 2)) {
      reading_paused_ = true;  // back-pressure: the kernel buffer fills, the peer blocks
      set_conn_interest();
      return;
    }
    std::vector<int> fds;
    bool trunc = false;
    long n = os::recv_with_fds(conn_fd_, buf, sizeof buf, &fds, &trunc);
    for (int f : fds) fdq_.push_back(f);
    if (trunc || fdq_.size() > kMaxQueuedFds) {
      if (state_ == State::listening) return drop_candidate();
      // The kernel drops the descriptors it cannot install here (EMFILE) and says
      // "truncated": our limit, not a misbehaving peer.
      if (trunc && os::fd_table_full(conn_fd_)) {
        return fail(CloseReason::io_error,
                    "this process is out of file descriptors (RLIMIT_NOFILE): a message's "
                    "memfd from the peer was dropped by the kernel; raise the limit (ulimit "
                    "-n, systemd LimitNOFILE=) or keep fewer descriptors open");
      }
      return fail(CloseReason::protocol_error, "the peer sent unexpected control data or fds");
    }
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      if (state_ == State::listening) return drop_candidate();
      // ECONNRESET and friends: the peer is gone.
      peer_eof_ = true;
      break;
    }
    if (n == 0) {
      if (state_ == State::listening) return drop_candidate();
      peer_eof_ = true;
      break;
    }
    inbuf_.insert(inbuf_.end(), buf, buf + n);
    parse_frames();
  }
  if (peer_eof_ && conn_fd_ >= 0 && epfd_ >= 0) os::epoll_remove(epfd_, conn_fd_);
}

int Endpoint::read_carrier() {
  if (!fdq_.empty()) {
    int fd = fdq_.front();
    fdq_.pop_front();
    return fd;
  }
  if (conn_fd_ < 0) return -1;
  std::uint8_t hdr[ring::kFrameHeaderSize];
  std::vector<int> fds;
  bool trunc = false;
  long n = os::recv_with_fds(conn_fd_, hdr, sizeof hdr, &fds, &trunc);
  if (n == static_cast<long>(sizeof hdr) && !trunc && fds.size() == 1 && get_u32(hdr) == 0 &&
      get_u32(hdr + 4) == ring::kFrameCarrier) {
    return fds[0];
  }
  for (int f : fds) ::close(f);
  return -1;
}

void Endpoint::parse_frames() {
  while (reason_ == CloseReason::none && conn_fd_ >= 0) {
    std::size_t avail = inbuf_.size() - inoff_;
    if (avail < ring::kFrameHeaderSize) break;
    const std::uint8_t* f = inbuf_.data() + inoff_;
    std::uint32_t len = get_u32(f), type = get_u32(f + 4);
    bool ok;
    if (state_ == State::listening) {
      ok = owner_ && type == ring::kFrameHello && len == kHelloSize;
    } else if (type == ring::kFrameCarrier) {
      ok = len == 0;
    } else if (transport_ == Transport::socket && type == ring::kFrameData) {
      ok = len <= inline_max_;
    } else if (transport_ == Transport::socket && type == ring::kFrameRegion) {
      ok = len == ring::kRegionPayloadSize;
    } else {
      ok = false;
    }
    if (!ok) {
      if (state_ == State::listening) return drop_candidate();
      return fail(CloseReason::protocol_error, "malformed control frame (type " +
                                                   std::to_string(type) + ", length " +
                                                   std::to_string(len) + ")");
    }
    if (avail < ring::kFrameHeaderSize + len) break;
    const std::uint8_t* payload = f + ring::kFrameHeaderSize;
    if (type == ring::kFrameHello) {
      if (!handle_hello(payload)) return drop_candidate();
    } else if (type == ring::kFrameData) {
      inq_.push_back(Queued{type, std::vector<std::uint8_t>(payload, payload + len), -1, 0});
      inq_bytes_ += len + ring::kFrameHeaderSize;
    } else if (type == ring::kFrameRegion) {
      if (fdq_.empty()) return fail(CloseReason::protocol_error, "region frame without its fd");
      int fd = fdq_.front();
      fdq_.pop_front();
      inq_.push_back(Queued{type, std::vector<std::uint8_t>(payload, payload + len), fd, 0});
      inq_bytes_ += len + ring::kFrameHeaderSize;
      ++regions_queued_;
    }
    // carrier: its fd is already queued in fdq_, in order
    inoff_ += ring::kFrameHeaderSize + len;
  }
  if (inoff_ == inbuf_.size()) {
    inbuf_.clear();
    inoff_ = 0;
  } else if (inoff_ > 65536) {
    inbuf_.erase(inbuf_.begin(), inbuf_.begin() + static_cast<std::ptrdiff_t>(inoff_));
    inoff_ = 0;
  }
}

bool Endpoint::handle_hello(const std::uint8_t* payload) {
  std::uint32_t uid = 0, pid = 0;
  if (!equal_ct(payload, token_, kTokenSize)) return false;
  if (!os::peer_credentials(conn_fd_, &uid, &pid) || uid != os::effective_uid()) return false;
  if (get_u32(payload + kTokenSize) != ring::kVersion) return false;
  if (!fdq_.empty()) return false;
  std::uint8_t welcome[ring::kFrameHeaderSize + kWelcomeSize] = {};
  put_u32(welcome, kWelcomeSize);
  put_u32(welcome + 4, ring::kFrameWelcome);
  std::uint8_t* p = welcome + ring::kFrameHeaderSize;
  put_u32(p, ring::kVersion);
  put_u32(p + 4, static_cast<std::uint32_t>(transport_));
  put_u64(p + 8, cap_);
  put_u64(p + 16, cap_);
  put_u32(p + 24, inline_max_);
  int fds[3] = {memfd_, wake_fd_, peer_wake_fd_};
  std::size_t nfds = transport_ == Transport::shm ? 3 : 0;
  long n = os::send_with_fds(conn_fd_, welcome, sizeof welcome, fds, nfds);
  if (n != static_cast<long>(sizeof welcome)) return false;
  st_.peer_pid = pid;
  state_ = State::connected;
  st_.state = state_;
  cleanup_listen();  // one worker per channel: nothing is left in the filesystem
  set_conn_interest();
  // The memfd is only needed for the handshake: the mapping keeps the rings alive.
  close_fd(memfd_);
  return true;
}

bool Endpoint::flush_out() {
  while (out_off_ < out_pending_.size()) {
    long n = os::send_with_fds(conn_fd_, out_pending_.data() + out_off_,
                               out_pending_.size() - out_off_, nullptr, 0);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      peer_eof_ = true;  // EPIPE / ECONNRESET: the peer is gone
      out_pending_.clear();
      out_off_ = 0;
      return true;
    }
    out_off_ += static_cast<std::size_t>(n);
  }
  out_pending_.clear();
  out_off_ = 0;
  return true;
}

Io Endpoint::sock_write(const void* data, std::size_t len, const int* fds, std::size_t nfds) {
  if (conn_fd_ < 0 || state_ != State::connected) return Io::would_block;
  if (!flush_out()) {
    blocked_on_socket_ = true;
    return Io::would_block;
  }
  if (peer_eof_) return Io::closed;
  long n = os::send_with_fds(conn_fd_, data, len, fds, nfds);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      blocked_on_socket_ = true;
      return Io::would_block;
    }
    peer_eof_ = true;
    return Io::closed;
  }
  if (static_cast<std::size_t>(n) < len) {  // the rest goes out before anything else,
    const auto* p = static_cast<const std::uint8_t*>(data);
    out_pending_.assign(p + n, p + len);
    out_off_ = 0;
    want_out_ = true;  // as soon as the socket is writable (handle_events flushes it)
    set_conn_interest();
  }
  return Io::ok;
}

// ---------------------------------------------------------------------------------------
// events and waiting

// The doorbell eventfd is registered edge-triggered: a ring of the doorbell is reported
// once by epoll_wait and never needs a read() to be drained. One epoll_wait tells what
// happened (doorbell, hang-up, socket news): one system call per wake-up instead of a read
// of the eventfd plus a poll of the socket.
void Endpoint::handle_events() {
  os::Ready ready[8];
  int n = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (reason_ != CloseReason::none || epfd_ < 0) return;
    n = os::epoll_wait_ready(epfd_, ready, 8, 0);
  }
  handle_ready(ready, n < 0 ? 0 : n);
}

void Endpoint::handle_ready(const os::Ready* ready, int count) {
  std::lock_guard<std::mutex> lock(mu_);
  if (reason_ != CloseReason::none) return;
  ++st_.wakeups;
  bool conn_hup = false;
  for (int i = 0; i < count; ++i) {
    if (ready[i].fd == conn_fd_ && conn_fd_ >= 0 &&
        (ready[i].events & (kEpollRdHup | kEpollHup | kEpollErr)) != 0) {
      conn_hup = true;
    }
  }
  if (transport_ == Transport::shm && map_ != nullptr) {
    ring::end_sleep(cons_);
    prod_.ctl->producer.waiting.store(0, std::memory_order_relaxed);
  }
  if (state_ == State::listening && listen_fd_ >= 0) {
    // One candidate at a time, but never one that blocks the others: the listening socket
    // stays watched, and a new connection replaces a candidate that has not presented a
    // valid hello by then (whatever it had sent is read first). A process that connects
    // and says nothing, or half a hello, would otherwise keep the real worker out for as
    // long as it stays connected.
    if (conn_fd_ >= 0 && !peer_eof_) read_socket();
    if (state_ == State::listening && reason_ == CloseReason::none && !accept_paused_) {
      int fd = os::accept_nonblocking(listen_fd_);
      if (fd >= 0) {
        if (conn_fd_ >= 0) drop_candidate();
        conn_fd_ = fd;
        os::epoll_set(epfd_, conn_fd_, kEpollIn | kEpollRdHup, true);
      } else if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // The connection stays pending and the listening socket readable: watched, it
        // would wake the owner again at once, for as long as no descriptor is free (the
        // channel's process spun on a scheduler). It is watched again after a pause.
        accept_paused_ = true;
        accept_resume_ns_ = os::monotonic_ns() + kAcceptPauseNs;
        os::epoll_remove(epfd_, listen_fd_);
      }
    }
  }
  if (conn_fd_ >= 0 && !peer_eof_) {
    if (transport_ == Transport::shm && state_ == State::connected) {
      // The socket is watched level-triggered for the hang-up: epoll reports it on every
      // wait until it is removed here, so it cannot be missed.
      if (conn_hup) {
        peer_eof_ = true;  // unread carriers stay readable for their frames
        if (epfd_ >= 0) os::epoll_remove(epfd_, conn_fd_);
      }
    } else {
      read_socket();
    }
  }
  if (want_out_ && conn_fd_ >= 0 && reason_ == CloseReason::none) {
    if (flush_out()) {
      want_out_ = false;
      blocked_on_socket_ = false;
      set_conn_interest();
    }
  }
}

int Endpoint::take_doorbell_fd() noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  if (!owner_ || transport_ != Transport::shm || wake_fd_ < 0 || reason_ != CloseReason::none) {
    errno = EINVAL;
    return -1;
  }
  int dup = os::dup_cloexec(wake_fd_);
  if (dup < 0) return -1;
  if (epfd_ >= 0) os::epoll_remove(epfd_, wake_fd_);
  return dup;
}

void Endpoint::doorbell_woke() {
  std::lock_guard<std::mutex> lock(mu_);
  if (reason_ != CloseReason::none || transport_ != Transport::shm || map_ == nullptr) return;
  ++st_.wakeups;
  ring::end_sleep(cons_);
  prod_.ctl->producer.waiting.store(0, std::memory_order_relaxed);
}

bool Endpoint::prepare_wait(bool want_data, bool want_space, std::uint64_t need) {
  std::lock_guard<std::mutex> lock(mu_);
  // Closed or at EOF: a caller that wants something must look now (recv/send report it);
  // one that wants nothing may sleep (nothing more will happen).
  if (reason_ != CloseReason::none || peer_eof_) return !(want_data || want_space);
  bool sleep = true;
  const std::uint64_t now = os::monotonic_ns();
  if (accept_paused_ && now >= accept_resume_ns_ && listen_fd_ >= 0 && epfd_ >= 0) {
    accept_paused_ = false;  // watched again: a connection still pending wakes us now
    os::epoll_set(epfd_, listen_fd_, kEpollIn, true);
  }
  if (want_data) {
    if (transport_ == Transport::shm) {
      bool wake = false;
      if (!ring::prepare_sleep(cons_, now, &wake)) sleep = false;
      if (wake) os::signal_eventfd(peer_wake_fd_);
    } else if (!inq_.empty()) {
      sleep = false;
    }
  } else if (transport_ == Transport::shm && cons_.tail != cons_.published) {
    if (ring::flush(cons_, now)) os::signal_eventfd(peer_wake_fd_);
  }
  if (want_space && state_ == State::connected) {
    if (blocked_on_socket_ || transport_ == Transport::socket) {
      if (out_pending_.size() > out_off_ || blocked_on_socket_) {
        want_out_ = true;
        set_conn_interest();
      } else {
        sleep = false;
      }
    } else if (!ring::prepare_wait_space(prod_, ring::frame_size(need))) {
      sleep = false;
    }
  } else if (want_space && transport_ == Transport::shm) {
    if (!ring::prepare_wait_space(prod_, ring::frame_size(need))) sleep = false;
  }
  if (reading_paused_ && inq_bytes_ < cap_ / 2 && regions_queued_ < kMaxQueuedFds / 4) {
    reading_paused_ = false;
    set_conn_interest();
    sleep = false;  // unread socket data may be waiting
  }
  return sleep;
}

void Endpoint::flush_acks() {
  std::lock_guard<std::mutex> lock(mu_);
  if (reason_ == CloseReason::none && transport_ == Transport::shm && map_ != nullptr) {
    if (ring::flush(cons_, os::monotonic_ns())) os::signal_eventfd(peer_wake_fd_);
  }
}

// ---------------------------------------------------------------------------------------
// sending

Io Endpoint::send(const void* data, std::uint64_t length, Error* err) {
  std::lock_guard<std::mutex> lock(mu_);
  if (reason_ != CloseReason::none) return closed_result(err);
  if (peer_eof_) return closed_result(err);
  if (length > inline_max_) {
    *err = Error{Errc::invalid_argument, 0, "message larger than the inline threshold"};
    return Io::error;
  }
  Io io;
  if (transport_ == Transport::shm) {
    bool bell = false;
    auto s = ring::write(prod_, ring::kFrameData, data, static_cast<std::uint32_t>(length), &bell);
    if (s == ring::Status::protocol_error) {
      fail(CloseReason::protocol_error, "the peer moved the ring's read index out of bounds");
      return closed_result(err);
    }
    if (s == ring::Status::full) {
      blocked_on_socket_ = false;
      io = Io::would_block;
    } else {
      if (bell) os::signal_eventfd(peer_wake_fd_);
      io = Io::ok;
    }
  } else {
    staging_.resize(ring::kFrameHeaderSize + length);
    put_u32(staging_.data(), static_cast<std::uint32_t>(length));
    put_u32(staging_.data() + 4, ring::kFrameData);
    if (length > 0) std::memcpy(staging_.data() + ring::kFrameHeaderSize, data, length);
    io = sock_write(staging_.data(), staging_.size(), nullptr, 0);
    if (io == Io::closed) return closed_result(err);
  }
  if (io == Io::ok) {
    ++st_.messages_sent;
    st_.bytes_sent += length;
  } else {
    ++st_.would_blocks;
  }
  return io;
}

Result<int> Endpoint::prepare_region(const void* data, std::uint64_t length) {
  auto fd = os::make_message_memfd(data, length);
  if (!fd.ok()) return region_message_error(std::move(fd).error(), length);
  return fd;
}

Io Endpoint::send_region(int fd, std::uint64_t size, Error* err) {
  std::lock_guard<std::mutex> lock(mu_);
  if (reason_ != CloseReason::none || peer_eof_) return closed_result(err);
  if (size > max_message_) {
    *err = Error{Errc::too_large, EMSGSIZE,
                 "cannot send the " + std::to_string(size) +
                     "-byte message: it is larger than this end's max_message_size (" +
                     std::to_string(max_message_) +
                     " bytes): send smaller messages or raise max_message_size (Channel.open's "
                     ":max_message_size, Channel.connect's max_message_size)"};
    return Io::error;
  }
  std::uint8_t frame[ring::kFrameHeaderSize + ring::kRegionPayloadSize];
  put_u32(frame, ring::kRegionPayloadSize);
  put_u32(frame + 4, ring::kFrameRegion);
  put_u64(frame + 8, size);
  put_u64(frame + 16, seq_out_);
  Io io;
  if (transport_ == Transport::shm) {
    std::uint64_t space = 0;
    if (ring::free_space(prod_, &space) != ring::Status::ok) {
      fail(CloseReason::protocol_error, "the peer moved the ring's read index out of bounds");
      return closed_result(err);
    }
    if (space < ring::frame_size(ring::kRegionPayloadSize)) {
      blocked_on_socket_ = false;
      io = Io::would_block;
    } else {
      // The fd travels first on the socket, then the frame in the ring names it.
      std::uint8_t carrier[ring::kFrameHeaderSize];
      put_u32(carrier, 0);
      put_u32(carrier + 4, ring::kFrameCarrier);
      io = sock_write(carrier, sizeof carrier, &fd, 1);
      if (io == Io::ok) {
        bool bell = false;
        (void)ring::write(prod_, ring::kFrameRegion, frame + 8, ring::kRegionPayloadSize, &bell);
        if (bell) os::signal_eventfd(peer_wake_fd_);
      }
    }
  } else {
    io = sock_write(frame, sizeof frame, &fd, 1);
  }
  if (io == Io::closed) return closed_result(err);
  if (io == Io::ok) {
    ++seq_out_;
    ::close(fd);  // the peer has its own copy now
    ++st_.messages_sent;
    ++st_.region_messages_sent;
    st_.bytes_sent += size;
  } else {
    ++st_.would_blocks;
  }
  return io;
}

// ---------------------------------------------------------------------------------------
// receiving

Io Endpoint::take_region(std::uint64_t size, std::uint64_t seq, int fd, Received* out, Error* err) {
  if (seq != seq_in_ || size <= inline_max_ || size > max_message_) {
    if (fd >= 0) ::close(fd);
    fail(CloseReason::protocol_error, "region frame out of sequence or of a bad size");
    return closed_result(err);
  }
  auto ok = os::check_message_memfd(fd, size);
  if (!ok.ok()) {
    ::close(fd);
    fail(CloseReason::protocol_error, ok.error().message);
    return closed_result(err);
  }
  ++seq_in_;
  out->kind = Received::region;
  out->fd = fd;
  out->size = size;
  ++st_.messages_received;
  ++st_.region_messages_received;
  st_.bytes_received += size;
  return Io::ok;
}

Io Endpoint::recv(AllocFn alloc, void* ctx, Received* out, Error* err) {
  std::lock_guard<std::mutex> lock(mu_);
  *out = Received{};
  if (reason_ != CloseReason::none) return closed_result(err);
  const bool eof = peer_eof_;  // read before looking at the ring (see CHANNEL.md)
  if (transport_ == Transport::shm) {
    ring::Frame f;
    auto s = ring::peek(cons_, inline_max_, &f);
    if (s == ring::Status::protocol_error) {
      fail(CloseReason::protocol_error, "malformed frame or index in the incoming ring");
      return closed_result(err);
    }
    if (s == ring::Status::ok) {
      const std::uint64_t now = os::monotonic_ns();
      if (f.type == ring::kFrameData) {
        void* dst = alloc(ctx, f.length);
        if (dst == nullptr && f.length > 0) {
          *err = Error{Errc::no_space, ENOMEM, "cannot allocate a received message"};
          return Io::error;
        }
        ring::copy_payload(cons_, f, dst);
        if (ring::consume(cons_, f, now)) os::signal_eventfd(peer_wake_fd_);
        out->kind = Received::data;
        out->length = f.length;
        ++st_.messages_received;
        st_.bytes_received += f.length;
        return Io::ok;
      }
      std::uint8_t payload[ring::kRegionPayloadSize];
      ring::copy_payload(cons_, f, payload);
      int fd = read_carrier();  // sent before the frame was published
      if (fd < 0) {
        if (conn_fd_ >= 0 && os::fd_table_full(conn_fd_)) {
          fail(CloseReason::io_error,
               "this process is out of file descriptors (RLIMIT_NOFILE): a region "
               "message's memfd was dropped by the kernel; raise the limit (ulimit -n, "
               "systemd LimitNOFILE=) or keep fewer descriptors open");
        } else {
          fail(CloseReason::protocol_error, "region frame without its fd");
        }
        return closed_result(err);
      }
      if (ring::consume(cons_, f, now)) os::signal_eventfd(peer_wake_fd_);
      return take_region(get_u64(payload), get_u64(payload + 8), fd, out, err);
    }
  } else if (!inq_.empty()) {
    void* dst = nullptr;
    if (inq_.front().type == ring::kFrameData) {
      // before the message leaves the queue: a refused allocation keeps it there
      dst = alloc(ctx, inq_.front().bytes.size());
      if (dst == nullptr && !inq_.front().bytes.empty()) {
        *err = Error{Errc::no_space, ENOMEM, "cannot allocate a received message"};
        return Io::error;
      }
    }
    Queued q = std::move(inq_.front());
    inq_.pop_front();
    inq_bytes_ -= q.bytes.size() + ring::kFrameHeaderSize;
    if (q.type == ring::kFrameData) {
      if (!q.bytes.empty()) std::memcpy(dst, q.bytes.data(), q.bytes.size());
      out->kind = Received::data;
      out->length = static_cast<std::uint32_t>(q.bytes.size());
      ++st_.messages_received;
      st_.bytes_received += q.bytes.size();
      return Io::ok;
    }
    --regions_queued_;
    return take_region(get_u64(q.bytes.data()), get_u64(q.bytes.data() + 8), q.fd, out, err);
  }
  if (eof) {
    fail(CloseReason::peer_closed, "the peer closed the channel or died");
    return closed_result(err);
  }
  return Io::would_block;
}

Io Endpoint::recv_wait(AllocFn alloc, void* ctx, Received* out, Error* err, std::uint64_t spin_ns,
                       int timeout_ms) {
  Io io = recv(alloc, ctx, out, err);
  if (io != Io::would_block) return io;
  bool shm = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    shm = transport_ == Transport::shm && map_ != nullptr && reason_ == CloseReason::none;
  }
  // The spin saves the worker's wake-up when the owner answers within the window, but
  // only if a CPU is free for the owner meanwhile: on an overloaded machine the spinning
  // worker takes the CPU the BEAM needs to produce that answer. So it spins only while
  // the other runnable tasks are fewer than the CPUs (os::cpus_idle). A spin that
  // shrinks after misses was tried and rejected: on a quiet machine it settles where both
  // sides sleep and every round trip pays two deep wake-ups (bench/FINDINGS.md 8.1).
  std::uint64_t spin = spin_ns > 0 && shm && os::cpus_idle() ? spin_ns : 0;
  // Never past the caller's timeout; a close (another thread) ends it too, below.
  if (timeout_ms >= 0 && spin > static_cast<std::uint64_t>(timeout_ms) * 1000000) {
    spin = static_cast<std::uint64_t>(timeout_ms) * 1000000;
  }
  if (spin > 0) {
    // Only this (the single consumer's) thread touches cons_; the mapping lives as long
    // as the endpoint. The head is read without the mutex, recv() validates it.
    const std::uint64_t until = os::monotonic_ns() + spin;
    do {
      for (int i = 0; i < 32; ++i) {
        if (ring::has_data(cons_)) {
          spin_hits_.fetch_add(1, std::memory_order_relaxed);
          return recv(alloc, ctx, out, err);
        }
        os::cpu_relax();
      }
    } while (os::monotonic_ns() < until && !failed_.load(std::memory_order_relaxed));
    spin_misses_.fetch_add(1, std::memory_order_relaxed);
  }
  const std::uint64_t start = os::monotonic_ns();
  for (;;) {
    int wait_ms = timeout_ms;
    if (timeout_ms >= 0) {
      const std::uint64_t spent = (os::monotonic_ns() - start) / 1000000;
      if (spent >= static_cast<std::uint64_t>(timeout_ms)) return Io::would_block;
      wait_ms = timeout_ms - static_cast<int>(spent);
    }
    if (prepare_wait(true, false, 0)) {
      // The worker's epoll fd is never handed out: it lives as long as the endpoint.
      os::Ready ready[8];
      int n = os::epoll_wait_ready(epfd_, ready, 8, wait_ms);
      handle_ready(ready, n < 0 ? 0 : n);  // also withdraws the announcement
      io = recv(alloc, ctx, out, err);
      if (n < 0) return io;  // would_block: interrupted by a signal, the caller decides
    } else {
      handle_events();
      io = recv(alloc, ctx, out, err);
    }
    if (io != Io::would_block) return io;
  }
}

Stats Endpoint::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s = st_;
  s.spin_hits = spin_hits_.load(std::memory_order_relaxed);
  s.spin_misses = spin_misses_.load(std::memory_order_relaxed);
  s.state = state_;
  s.reason = reason_;
  s.close_detail = detail_;
  if (transport_ == Transport::shm && map_ != nullptr) {
    s.doorbells_rung = prod_.doorbells + cons_.doorbells;
    s.flushes = cons_.flushes;
    s.pending_acks = cons_.unpublished;
    s.out_occupancy = prod_.head - prod_.ctl->consumer.tail.load(std::memory_order_relaxed);
    if (s.out_occupancy > cap_) s.out_occupancy = cap_;
    std::uint64_t h = cons_.ctl->producer.head.load(std::memory_order_relaxed);
    s.in_occupancy = h >= cons_.tail && h - cons_.tail <= cap_ ? h - cons_.tail : 0;
  } else {
    s.in_occupancy = inq_bytes_;
    s.out_occupancy = out_pending_.size() - out_off_;
  }
  return s;
}

}  // namespace spshm::channel
