// One end of a message channel (docs/CHANNEL.md): two SPSC rings in a sealed memfd,
// eventfd doorbells, and a Unix socket as the control connection (handshake, fd passing,
// peer death as EOF) that also carries the messages when shared memory cannot be used.
//
// The owner end (the BEAM) listens on a socket in a private 0700 directory; the worker
// end connects with the ref's path and token, receives the memfd and both eventfds by
// SCM_RIGHTS and maps the rings. Everything is non-blocking except connect(); callers
// sleep on wait_fd() (an epoll fd: enif_select, poll, asyncio add_reader) after
// prepare_wait() returned true, and call handle_events() when it becomes readable.
// Every public method is thread-safe (one mutex per endpoint, held briefly).
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "error.hpp"
#include "platform_channel.hpp"
#include "ring.hpp"

namespace spshm::channel {

enum class Transport : std::uint32_t { shm = 1, socket = 2 };
enum class Wanted { automatic, shm, socket };
enum class State { listening, connected, closed };
enum class CloseReason { none, closed, peer_closed, protocol_error, io_error };

const char* close_reason_name(CloseReason r) noexcept;
const char* transport_name(Transport t) noexcept;

inline constexpr std::uint32_t kTokenSize = 32;
inline constexpr std::uint32_t kHelloSize = kTokenSize + 8;  // token, u32 version, u32 flags
inline constexpr std::uint32_t kWelcomeSize =
    32;  // u32 version, u32 transport, u64 cap0, u64 cap1, u32 inline_max, u32 0
inline constexpr std::uint32_t kMaxQueuedFds = 256;

/// A channel's socket directory whose lock is free is still left alone this long after
/// its last change: the owner takes the lock a few system calls after mkdtemp.
inline constexpr std::uint64_t kSocketDirGraceNs = 10'000'000'000ull;

/// Removes the socket directories (and `ctl` sockets) that dead owners left in `base`:
/// os::sweep_stale_socket_dirs with kSocketDirGraceNs. Returns how many it removed.
std::uint64_t sweep_stale_socket_dirs(const std::string& base);
/// The same in each default base an owner without `socket_dir` may have chosen
/// ($XDG_RUNTIME_DIR, $TMPDIR, /tmp: each once, if it exists), and in `also_bases` (the
/// caller's own view of those variables: os::default_socket_dir_bases). A custom
/// `socket_dir` is not swept.
std::uint64_t sweep_default_socket_dirs(const std::vector<std::string>& also_bases = {});

struct OwnerOptions {
  std::uint64_t ring_size = ring::kDefaultCapacity;  ///< each ring
  std::uint32_t inline_max = 0;                      ///< 0: a quarter of the ring
  Wanted transport = Wanted::automatic;
  std::string socket_dir;  ///< empty: $XDG_RUNTIME_DIR, $TMPDIR or /tmp
  ring::AckPolicy ack;
  std::uint64_t max_message_size = 1ull << 40;
  bool refuse_memfd = false;  ///< tests: behave as if memfd_create were refused
};

struct WorkerOptions {
  ring::AckPolicy ack;
  std::uint64_t max_message_size = 1ull << 40;
  int timeout_ms = 10000;
  /// -1, or a descriptor that becomes readable when the caller gives the connect up (an
  /// asyncio task cancelled): connect then stops before the hello if it has not sent it,
  /// else shuts the socket down (the owner can no longer send its welcome: it drops the
  /// connection and keeps listening) and fails with errno ECANCELED. If the welcome had
  /// come before the shutdown, the owner took this connection as its one worker:
  /// `accepted` is then set (the owner sees peer_closed; the channel cannot be connected
  /// again).
  int cancel_fd = -1;
  bool* accepted = nullptr;
};

/// One received message: inline bytes went to the allocator; a region message is a
/// validated, write-sealed memfd of `size` bytes that the caller now owns (map it
/// read-only, close it).
struct Received {
  enum Kind { none, data, region } kind = none;
  std::uint32_t length = 0;
  int fd = -1;
  std::uint64_t size = 0;
};

/// Returns where to put `length` inline bytes (nullptr: out of memory).
using AllocFn = void* (*)(void* ctx, std::size_t length);

enum class Io { ok, would_block, closed, error };

struct Stats {
  Transport transport = Transport::shm;
  State state = State::listening;
  CloseReason reason = CloseReason::none;
  std::uint64_t messages_sent = 0, bytes_sent = 0, messages_received = 0, bytes_received = 0;
  std::uint64_t region_messages_sent = 0, region_messages_received = 0;
  std::uint64_t doorbells_rung = 0, wakeups = 0, flushes = 0, pending_acks = 0;
  std::uint64_t would_blocks = 0, fallbacks = 0;
  std::uint64_t spin_hits = 0,
                spin_misses = 0;  ///< recv_wait: spins that caught a message / ran out
  std::uint64_t ring_size = 0, inline_max = 0, out_occupancy = 0, in_occupancy = 0;
  std::uint32_t peer_pid = 0;
  std::string fallback_reason, close_detail;
};

class Endpoint {
 public:
  /// The owner end: rings (or the socket fallback), doorbells, listening socket.
  static Result<std::unique_ptr<Endpoint>> create_owner(const OwnerOptions& options);
  /// The worker end: connects, authenticates with the token (64 hex characters) and maps.
  static Result<std::unique_ptr<Endpoint>> connect(const std::string& path,
                                                   const std::string& token_hex,
                                                   const WorkerOptions& options);
  ~Endpoint();
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  int wait_fd() const noexcept { return epfd_; }
  /// Hands the epoll fd to the caller (the NIF closes it in its select stop callback).
  int release_wait_fd() noexcept;
  const std::string& socket_path() const noexcept { return path_; }
  std::string token_hex() const;
  Transport transport() const noexcept { return transport_; }
  std::uint32_t inline_max() const noexcept { return inline_max_; }
  std::uint64_t ring_size() const noexcept { return cap_; }

  /// Non-blocking: accepts and authenticates the worker, drains the doorbell, reads the
  /// control socket (fds, socket-transport frames, EOF), flushes pending socket output.
  void handle_events();
  /// handle_events() with what a wait on wait_fd() by epoll already reported.
  void handle_ready(const os::Ready* ready, int count);
  /// Owner, shared-memory transport: takes the doorbell out of wait_fd() and returns a
  /// close-on-exec duplicate of it for the caller to wait on (the BEAM reads it through
  /// an fd port, whose fd the schedulers poll themselves: docs/CHANNEL.md). The caller
  /// closes the duplicate. -1 (errno set) if there is no doorbell or dup failed.
  int take_doorbell_fd() noexcept;
  /// The wake-up of a caller whose doorbell rang outside wait_fd(): withdraws the sleep
  /// announcements, counts the wake-up; no system call (the socket's news still come
  /// through wait_fd()).
  void doorbell_woke();
  /// Sends `length` <= inline_max() bytes inline.
  Io send(const void* data, std::uint64_t length, Error* err);
  /// Sends a memfd made by prepare_region(); takes the fd on ok, leaves it on would_block.
  Io send_region(int fd, std::uint64_t size, Error* err);
  /// The sealed memfd of a message too large to travel inline (no lock taken: call it
  /// from a dirty scheduler or thread for large messages).
  static Result<int> prepare_region(const void* data, std::uint64_t length);
  /// Takes the next message: ok (in *out), would_block (none yet), closed (and nothing left).
  Io recv(AllocFn alloc, void* ctx, Received* out, Error* err);
  /// Blocking receive for a worker thread (the Python client): recv(); if nothing is
  /// there, re-checks the ring for up to `spin_ns` (a reply that comes quickly then costs
  /// no doorbell and no wake-up; never past `timeout_ms`, and it ends at a close made by
  /// another thread), then announces the sleep and waits on wait_fd() up to
  /// `timeout_ms` (-1: forever). would_block: nothing within the timeout, or a signal
  /// interrupted the wait (the caller runs its handlers, checks its deadline, calls again).
  /// Takes the mutex only inside recv()/prepare_wait()/handle_events(): send() from
  /// another thread is never held up by a sleeping receiver.
  Io recv_wait(AllocFn alloc, void* ctx, Received* out, Error* err, std::uint64_t spin_ns,
               int timeout_ms);
  /// Announces what the caller will sleep for: data, and/or `need` bytes of send space.
  /// True: sleep on wait_fd(); false: something is ready now, retry.
  bool prepare_wait(bool want_data, bool want_space, std::uint64_t need);
  /// Flushes batched acknowledgements now.
  void flush_acks();
  /// Closes the channel (idempotent): the peer sees EOF at once.
  void close(CloseReason reason = CloseReason::closed);
  CloseReason close_reason();
  State state();
  /// True while the owner stopped watching its listening socket because accept() found
  /// this process out of descriptors (EMFILE): the caller looks again in a while
  /// (kAcceptPauseNs; prepare_wait() watches it again once that has passed), instead of
  /// being woken for the same pending connection over and over.
  bool accept_paused();
  Stats stats();

 private:
  Endpoint() = default;
  Io closed_result(Error* err);
  void fail(CloseReason reason, const std::string& detail);  // mu_ held
  void read_socket();                                        // mu_ held
  int read_carrier();   // shm: the fd of the next region frame, or -1 (mu_ held)
  void parse_frames();  // mu_ held
  bool handle_hello(const std::uint8_t* payload);  // mu_ held
  Io sock_write(const void* data, std::size_t len, const int* fds, std::size_t nfds);
  bool flush_out();  // true if nothing is pending
  void set_conn_interest();
  void drop_candidate();
  void cleanup_listen();
  std::uint64_t total_map_size() const noexcept { return ring::kHeaderSize + 2 * cap_; }
  Io take_region(std::uint64_t size, std::uint64_t seq, int fd, Received* out, Error* err);

  std::mutex mu_;
  bool owner_ = true;
  Transport transport_ = Transport::shm;
  State state_ = State::listening;
  CloseReason reason_ = CloseReason::none;
  std::string detail_;
  bool peer_eof_ = false;
  bool epfd_owned_ = true;
  int epfd_ = -1, listen_fd_ = -1, conn_fd_ = -1, wake_fd_ = -1, peer_wake_fd_ = -1, memfd_ = -1;
  void* map_ = nullptr;
  std::string dir_, path_;
  /// The socket directory, open and locked shared while it exists (os::PrivateDir).
  int dir_fd_ = -1;
  std::uint8_t token_[kTokenSize] = {};
  ring::Producer prod_;
  ring::Consumer cons_;
  std::uint64_t cap_ = 0;
  std::uint32_t inline_max_ = 0;
  std::uint64_t max_message_ = 0;
  // control socket input
  std::vector<std::uint8_t> inbuf_;
  std::size_t inoff_ = 0;
  struct Queued {
    std::uint32_t type;
    std::vector<std::uint8_t> bytes;
    int fd;
    std::uint64_t size;
  };
  std::deque<Queued> inq_;
  std::uint64_t inq_bytes_ = 0;
  std::size_t regions_queued_ = 0;
  bool reading_paused_ = false;
  bool accept_paused_ = false;
  std::uint64_t accept_resume_ns_ = 0;
  std::deque<int> fdq_;
  // control socket output
  std::vector<std::uint8_t> out_pending_;
  std::size_t out_off_ = 0;
  bool blocked_on_socket_ = false;
  bool want_out_ = false;
  std::vector<std::uint8_t> staging_;
  std::uint64_t seq_out_ = 0, seq_in_ = 0;
  std::atomic<std::uint64_t> spin_hits_{0}, spin_misses_{0};
  // Set by fail(): recv_wait()'s spin (which runs without the mutex) stops at a close.
  std::atomic<bool> failed_{false};
  Stats st_;
};

}  // namespace spshm::channel
