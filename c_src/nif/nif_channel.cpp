// NIFs of the message channel (Snakepit.SharedMemory.Channel): the owner end of a
// spshm::channel::Endpoint in a resource, woken by enif_select on the endpoint's epoll fd
// (doorbell eventfd + control socket), so that incoming data becomes a message in the
// mailbox of the channel's process. No NIF here blocks: waiting is enif_select's job.
//
// Resources:
//   * ChannelResource owns the Endpoint. Its epoll fd, once handed to enif_select, is
//     closed only by the `stop` callback. It monitors the owner process: the `down`
//     callback closes the channel (the worker sees EOF at once) even if nobody else runs.
//   * MessageResource is one received region message above 1 MiB (smaller ones are
//     copied: kCopyRegionMax): a read-only mapping of a write-sealed memfd under
//     zero-copy binaries; the destructor unmaps it (on a
//     detached thread for large mappings, so no scheduler waits for a big munmap).
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include <erl_nif.h>

#include "channel.hpp"
#include "nif_channel.hpp"
#include "nif_functions.hpp"
#include "platform_channel.hpp"
#include "ring.hpp"
#include "terms.hpp"

namespace spshm::nif {

namespace {

using channel::Endpoint;
using channel::Io;

struct ChannelResource {
  std::unique_ptr<Endpoint> ep;
  std::mutex mu;  ///< guards the fields below
  int epfd = -1;  ///< the endpoint's epoll fd, ours once released
  bool selected = false;
  bool closed = false;
  bool monitoring = false;
  ErlNifMonitor monitor{};
  /// A duplicate of the owner's doorbell read by the channel process's fd port; closed by
  /// channel_doorbell_close/1 once that port is closed, else by the destructor.
  int bell_fd = -1;
  bool guarding = false;           ///< server_monitor is set (channel_guard/1)
  ErlNifMonitor server_monitor{};  ///< the channel's process: its death closes the channel
  /// When the channel process last took a message (channel_pump_bell's spin window).
  std::atomic<std::uint64_t> last_data_ns{0};
};

struct PreparedResource {
  std::atomic<int> fd{-1};
  std::uint64_t size = 0;
};

struct MessageResource {
  void* addr = nullptr;
  std::uint64_t size = 0;
};

ErlNifResourceType* channel_type = nullptr;
ErlNifResourceType* prepared_type = nullptr;
ErlNifResourceType* message_type = nullptr;

struct ChannelAtoms {
  ERL_NIF_TERM spin, would_block, closed, shm, socket, automatic, immediate, batch, deferred;
  ERL_NIF_TERM listening, connected, accept_paused, none, peer_closed, protocol_error, io_error;
  ERL_NIF_TERM ring_size, inline_threshold, transport, socket_dir, ack_mode, max_batch_size,
      flush_interval_us, max_message_size, simulate_memfd_failure;
  ERL_NIF_TERM path, token, inline_max, state, close_reason, close_detail, messages_sent,
      bytes_sent, messages_received, bytes_received, region_messages_sent, region_messages_received,
      doorbells_rung, wakeups, flushes, pending_acks, would_blocks, fallbacks, fallback_reason,
      out_occupancy, in_occupancy, peer_pid;
} ca;

ERL_NIF_TERM atom(ErlNifEnv* env, const char* name) { return enif_make_atom(env, name); }

ERL_NIF_TERM reason_atom(channel::CloseReason r) {
  switch (r) {
    case channel::CloseReason::none:
      return ca.none;
    case channel::CloseReason::closed:
      return ca.closed;
    case channel::CloseReason::peer_closed:
      return ca.peer_closed;
    case channel::CloseReason::protocol_error:
      return ca.protocol_error;
    case channel::CloseReason::io_error:
      return ca.io_error;
  }
  return ca.io_error;
}

// Closes the endpoint and stops selecting its epoll fd (the stop callback closes it) or
// closes the fd directly if it was never selected. enif_select(STOP) may call the stop
// callback directly, which takes c->mu: so it is called without holding c->mu.
void close_channel(ErlNifEnv* env, ChannelResource* c) {
  if (c->ep) c->ep->close();
  int fd = -1;
  bool was_selected = false;
  {
    std::lock_guard<std::mutex> lock(c->mu);
    c->closed = true;
    fd = c->epfd;
    was_selected = c->selected;
    c->selected = false;
    if (fd >= 0 && !was_selected) {
      ::close(fd);
      c->epfd = -1;
    }
  }
  if (fd >= 0 && was_selected) {
    enif_select(env, static_cast<ErlNifEvent>(fd), ERL_NIF_SELECT_STOP, c, nullptr,
                atoms.undefined);
  }
}

void channel_dtor(ErlNifEnv*, void* obj) {
  auto* c = static_cast<ChannelResource*>(obj);
  // While selected the VM holds a reference, so here the fd is ours (or already closed).
  if (c->epfd >= 0) ::close(c->epfd);
  c->epfd = -1;
  // The doorbell duplicate, if channel_doorbell_close/1 did not run (the channel's process
  // was killed, or a caller never opened a port): closed here rather than leaked. A port
  // still handling the exit signal of its killed process when the last reference goes
  // could find the fd closed under it: a window of microseconds, only on such a kill.
  if (c->bell_fd >= 0) ::close(c->bell_fd);
  c->bell_fd = -1;
  c->ep.reset();  // closes the socket (EOF for the peer), unmaps the rings (<= 32 MiB)
  c->~ChannelResource();
}

void channel_stop(ErlNifEnv*, void* obj, ErlNifEvent event, int) {
  auto* c = static_cast<ChannelResource*>(obj);
  std::lock_guard<std::mutex> lock(c->mu);
  if (c->epfd == static_cast<int>(event)) c->epfd = -1;
  ::close(static_cast<int>(event));
}

// The owner died: close now, whoever else still holds the resource.
void channel_down(ErlNifEnv* env, void* obj, ErlNifPid*, ErlNifMonitor* mon) {
  auto* c = static_cast<ChannelResource*>(obj);
  {
    std::lock_guard<std::mutex> lock(c->mu);
    if (c->guarding && enif_compare_monitors(mon, &c->server_monitor) == 0) {
      c->guarding = false;  // the channel's process died (even killed): close too
    } else {
      c->monitoring = false;
    }
  }
  close_channel(env, c);
}

void prepared_dtor(ErlNifEnv*, void* obj) {
  auto* p = static_cast<PreparedResource*>(obj);
  int fd = p->fd.exchange(-1);
  if (fd >= 0) ::close(fd);
  p->~PreparedResource();
}

void message_dtor(ErlNifEnv*, void* obj) {
  auto* m = static_cast<MessageResource*>(obj);
  void* addr = m->addr;
  std::uint64_t size = m->size;
  if (addr != nullptr) {
    if (size >= (64u << 20)) {
      // A big munmap can take milliseconds: not on a scheduler thread.
      try {
        std::thread([addr, size] { ::munmap(addr, size); }).detach();
      } catch (...) {
        ::munmap(addr, size);
      }
    } else {
      ::munmap(addr, size);
    }
  }
  m->~MessageResource();
}

bool get_channel(ErlNifEnv* env, ERL_NIF_TERM t, ChannelResource** out) {
  return enif_get_resource(env, t, channel_type, reinterpret_cast<void**>(out)) != 0 &&
         (*out)->ep != nullptr;
}

ERL_NIF_TERM closed_tuple(ErlNifEnv* env, ChannelResource* c) {
  return enif_make_tuple2(env, ca.closed, reason_atom(c->ep->close_reason()));
}

ERL_NIF_TERM io_term(ErlNifEnv* env, ChannelResource* c, Io io, const Error& e) {
  switch (io) {
    case Io::ok:
      return atoms.ok;
    case Io::would_block:
      return ca.would_block;
    case Io::closed:
      return closed_tuple(env, c);
    case Io::error:
      break;
  }
  return make_error(env, e);
}

struct BinAlloc {
  ErlNifBinary bin;
  bool allocated = false;
};

void* alloc_binary(void* ctx, std::size_t length) {
  auto* a = static_cast<BinAlloc*>(ctx);
  if (!enif_alloc_binary(length, &a->bin)) return nullptr;
  a->allocated = true;
  return a->bin.data;
}

}  // namespace

bool open_channel_resource_types(ErlNifEnv* env) {
  auto flags = static_cast<ErlNifResourceFlags>(ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER);
  ErlNifResourceTypeInit ci{};
  ci.dtor = channel_dtor;
  ci.stop = channel_stop;
  ci.down = channel_down;
  ErlNifResourceTypeInit pi{};
  pi.dtor = prepared_dtor;
  ErlNifResourceTypeInit mi{};
  mi.dtor = message_dtor;
  channel_type = enif_open_resource_type_x(env, "spshm_channel", &ci, flags, nullptr);
  prepared_type = enif_open_resource_type_x(env, "spshm_channel_prepared", &pi, flags, nullptr);
  message_type = enif_open_resource_type_x(env, "spshm_channel_message", &mi, flags, nullptr);
  if (channel_type == nullptr || prepared_type == nullptr || message_type == nullptr) return false;
#define A(name) ca.name = atom(env, #name)
  A(spin);
  A(would_block);
  A(closed);
  A(shm);
  A(socket);
  ca.automatic = atom(env, "auto");
  A(immediate);
  A(batch);
  A(deferred);
  A(listening);
  A(connected);
  A(accept_paused);
  A(none);
  A(peer_closed);
  A(protocol_error);
  A(io_error);
  A(ring_size);
  A(inline_threshold);
  A(transport);
  A(socket_dir);
  A(ack_mode);
  A(max_batch_size);
  A(flush_interval_us);
  A(max_message_size);
  A(simulate_memfd_failure);
  A(path);
  A(token);
  A(inline_max);
  A(state);
  A(close_reason);
  A(close_detail);
  A(messages_sent);
  A(bytes_sent);
  A(messages_received);
  A(bytes_received);
  A(region_messages_sent);
  A(region_messages_received);
  A(doorbells_rung);
  A(wakeups);
  A(flushes);
  A(pending_acks);
  A(would_blocks);
  A(fallbacks);
  A(fallback_reason);
  A(out_occupancy);
  A(in_occupancy);
  A(peer_pid);
#undef A
  return true;
}

SPSHM_GUARDED_NIF(nif_channel_layout)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  return make_binary(env, ring::layout_description());
}

// channel_open(%{ring_size, inline_threshold, transport, socket_dir, ack_mode,
//                max_batch_size, flush_interval_us, max_message_size}) -> {:ok, ch} | error
SPSHM_GUARDED_NIF(nif_channel_open)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  channel::OwnerOptions o;
  ERL_NIF_TERM v;
  std::uint64_t ring_size, inline_threshold, max_batch, flush_us, max_msg;
  if (!get_map_value(env, argv[0], ca.ring_size, &v) || !get_u64(env, v, &ring_size) ||
      !get_map_value(env, argv[0], ca.inline_threshold, &v) ||
      !get_u64(env, v, &inline_threshold) || !get_map_value(env, argv[0], ca.max_batch_size, &v) ||
      !get_u64(env, v, &max_batch) || !get_map_value(env, argv[0], ca.flush_interval_us, &v) ||
      !get_u64(env, v, &flush_us) || !get_map_value(env, argv[0], ca.max_message_size, &v) ||
      !get_u64(env, v, &max_msg) || !get_map_value(env, argv[0], ca.socket_dir, &v) ||
      !get_string(env, v, &o.socket_dir)) {
    return enif_make_badarg(env);
  }
  if (!get_map_value(env, argv[0], ca.transport, &v)) return enif_make_badarg(env);
  if (enif_is_identical(v, ca.shm)) {
    o.transport = channel::Wanted::shm;
  } else if (enif_is_identical(v, ca.socket)) {
    o.transport = channel::Wanted::socket;
  } else if (enif_is_identical(v, ca.automatic)) {
    o.transport = channel::Wanted::automatic;
  } else {
    return enif_make_badarg(env);
  }
  if (!get_map_value(env, argv[0], ca.ack_mode, &v)) return enif_make_badarg(env);
  if (enif_is_identical(v, ca.immediate)) {
    o.ack.mode = ring::AckMode::immediate;
  } else if (enif_is_identical(v, ca.batch)) {
    o.ack.mode = ring::AckMode::batch;
  } else if (enif_is_identical(v, ca.deferred)) {
    o.ack.mode = ring::AckMode::deferred;
  } else {
    return enif_make_badarg(env);
  }
  if (max_batch == 0 || max_batch > 1'000'000 || inline_threshold > UINT32_MAX ||
      flush_us > 3'600'000'000ull || has_nul(o.socket_dir)) {
    return make_error(env, Errc::invalid_argument, "channel option out of range");
  }
  o.ring_size = ring_size;
  o.inline_max = static_cast<std::uint32_t>(inline_threshold);
  o.ack.max_batch = static_cast<std::uint32_t>(max_batch);
  o.ack.flush_interval_ns = flush_us * 1000;
  o.max_message_size = max_msg;
  ERL_NIF_TERM refuse;
  if (get_map_value(env, argv[0], ca.simulate_memfd_failure, &refuse)) {
    o.refuse_memfd = enif_is_identical(refuse, atoms.true_);
  }
  auto r = Endpoint::create_owner(o);
  if (!r.ok()) return make_error(env, r.error());
  void* mem = enif_alloc_resource(channel_type, sizeof(ChannelResource));
  if (mem == nullptr) return make_error(env, Errc::no_space, "out of memory");
  auto* c = new (mem) ChannelResource();
  c->ep = std::move(r.value());
  c->epfd = c->ep->release_wait_fd();
  ERL_NIF_TERM term = enif_make_resource(env, c);
  enif_release_resource(c);
  return make_ok(env, term);
}

SPSHM_GUARDED_NIF(nif_channel_info)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  if (!get_channel(env, argv[0], &c)) return enif_make_badarg(env);
  ERL_NIF_TERM keys[] = {ca.path, ca.token, ca.transport, ca.ring_size, ca.inline_max};
  ERL_NIF_TERM vals[] = {
      make_binary(env, c->ep->socket_path()), make_binary(env, c->ep->token_hex()),
      c->ep->transport() == channel::Transport::shm ? ca.shm : ca.socket,
      enif_make_uint64(env, c->ep->ring_size()), enif_make_uint64(env, c->ep->inline_max())};
  return make_map(env, keys, vals);
}

// Arms enif_select on the epoll fd for the calling process:
// {:select, ch, :undefined, :ready_input} arrives when something happened.
SPSHM_GUARDED_NIF(nif_channel_select)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  if (!get_channel(env, argv[0], &c)) return enif_make_badarg(env);
  std::lock_guard<std::mutex> lock(c->mu);
  if (c->closed || c->epfd < 0) return closed_tuple(env, c);
  int rc = enif_select(env, static_cast<ErlNifEvent>(c->epfd), ERL_NIF_SELECT_READ, c, nullptr,
                       atoms.undefined);
  if (rc < 0) return make_error(env, Errc::io_error, "enif_select refused the channel's fd");
  c->selected = true;
  return atoms.ok;
}

SPSHM_GUARDED_NIF(nif_channel_events)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  if (!get_channel(env, argv[0], &c)) return enif_make_badarg(env);
  c->ep->handle_events();
  if (c->ep->accept_paused()) return ca.accept_paused;
  return c->ep->state() == channel::State::connected   ? ca.connected
         : c->ep->state() == channel::State::listening ? ca.listening
                                                       : closed_tuple(env, c);
}

SPSHM_GUARDED_NIF(nif_channel_send)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  ErlNifBinary bin;
  if (!get_channel(env, argv[0], &c) || !enif_inspect_binary(env, argv[1], &bin)) {
    return enif_make_badarg(env);
  }
  Error e{Errc::io_error, 0, {}};
  return io_term(env, c, c->ep->send(bin.data, bin.size, &e), e);
}

// Dirty: copies a large message into a fresh sealed memfd.
SPSHM_GUARDED_NIF(nif_channel_prepare_region)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ErlNifBinary bin;
  if (!enif_inspect_binary(env, argv[0], &bin) || bin.size == 0) return enif_make_badarg(env);
  auto fd = Endpoint::prepare_region(bin.data, bin.size);
  if (!fd.ok()) return make_error(env, fd.error());
  void* mem = enif_alloc_resource(prepared_type, sizeof(PreparedResource));
  if (mem == nullptr) {
    ::close(fd.value());
    return make_error(env, Errc::no_space, "out of memory");
  }
  auto* p = new (mem) PreparedResource();
  p->fd.store(fd.value());
  p->size = bin.size;
  ERL_NIF_TERM term = enif_make_resource(env, p);
  enif_release_resource(p);
  return make_ok(env, term);
}

SPSHM_GUARDED_NIF(nif_channel_send_region)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  PreparedResource* p;
  if (!get_channel(env, argv[0], &c) ||
      !enif_get_resource(env, argv[1], prepared_type, reinterpret_cast<void**>(&p))) {
    return enif_make_badarg(env);
  }
  int fd = p->fd.exchange(-1);
  if (fd < 0) return make_error(env, Errc::invalid_argument, "this message was already sent");
  Error e{Errc::io_error, 0, {}};
  Io io = c->ep->send_region(fd, p->size, &e);
  if (io != Io::ok) p->fd.store(fd);  // kept for a retry (or closed by the destructor)
  return io_term(env, c, io, e);
}

namespace {

// Region messages up to this size are copied into an ordinary binary instead of being
// mapped (docs/CHANNEL.md, "Region messages"): held messages then cost the VM no mapping
// each, and at most one mapping per MiB held remains (65 530 of them is 64 GiB).
constexpr std::uint64_t kCopyRegionMax = 1u << 20;

// Up to max_count messages (stopping after max_bytes copied) as a list in order.
// *status: ok, or the close reason; returns false with *error set on a failure.
bool take_messages(ErlNifEnv* env, ChannelResource* c, std::uint64_t max_count,
                   std::uint64_t max_bytes, ERL_NIF_TERM* ordered, std::uint64_t* taken,
                   ERL_NIF_TERM* status, ERL_NIF_TERM* error) {
  ERL_NIF_TERM list = enif_make_list(env, 0);
  std::uint64_t count = 0, copied = 0;
  *status = atoms.ok;
  while (count < max_count && copied < max_bytes) {
    BinAlloc a;
    channel::Received r;
    Error e{Errc::io_error, 0, {}};
    Io io = c->ep->recv(alloc_binary, &a, &r, &e);
    if (io == Io::would_block) break;
    if (io == Io::closed) {
      *status = reason_atom(c->ep->close_reason());
      break;
    }
    if (io == Io::error) {
      if (a.allocated) enif_release_binary(&a.bin);
      *error = make_error(env, e);
      return false;
    }
    ERL_NIF_TERM msg;
    if (r.kind == channel::Received::data) {
      if (a.allocated) {
        msg = enif_make_binary(env, &a.bin);
      } else {
        (void)enif_make_new_binary(env, 0, &msg);
      }
      copied += r.length;
    } else if (r.size <= kCopyRegionMax) {
      // Copied, not mapped: every mapping kept counts against vm.max_map_count (65530
      // by default) for the whole VM, and a message held (in a mailbox in active mode,
      // in a list of results) keeps its mapping: some 65 000 held messages of a few KiB
      // made every later mmap of the VM fail. A copy of at most 1 MiB costs about what
      // mapping it and faulting its pages in does.
      if (!enif_alloc_binary(r.size, &a.bin)) {
        ::close(r.fd);
        *error = make_error(env, Errc::no_space, "cannot allocate a received message");
        return false;
      }
      bool read_ok = channel::os::read_fd(r.fd, a.bin.data, r.size).ok();
      ::close(r.fd);
      if (!read_ok) {
        enif_release_binary(&a.bin);
        *error = make_error(env, Errc::io_error, "cannot read a received region message");
        return false;
      }
      msg = enif_make_binary(env, &a.bin);
      copied += r.size;
    } else {
      auto m = channel::os::map_fd(r.fd, r.size, false);
      ::close(r.fd);
      if (!m.ok()) {
        *error = make_error(env, m.error());
        return false;
      }
      void* mem = enif_alloc_resource(message_type, sizeof(MessageResource));
      if (mem == nullptr) {
        channel::os::unmap(m.value(), r.size);
        *error = make_error(env, Errc::no_space, "out of memory");
        return false;
      }
      auto* mr = new (mem) MessageResource();
      mr->addr = m.value();
      mr->size = r.size;
      // Zero-copy: the memfd is sealed against writes, so these bytes never change.
      msg = enif_make_resource_binary(env, mr, mr->addr, mr->size);
      enif_release_resource(mr);
      copied += 4096;
    }
    list = enif_make_list_cell(env, msg, list);
    ++count;
  }
  enif_make_reverse_list(env, list, ordered);
  *taken = count;
  return true;
}

// Re-arms enif_select on the epoll fd (c->mu taken here). False if closed or refused.
bool select_again(ErlNifEnv* env, ChannelResource* c) {
  std::lock_guard<std::mutex> lock(c->mu);
  if (c->closed || c->epfd < 0) return false;
  int rc = enif_select(env, static_cast<ErlNifEvent>(c->epfd), ERL_NIF_SELECT_READ, c, nullptr,
                       atoms.undefined);
  if (rc < 0) return false;
  c->selected = true;
  return true;
}

}  // namespace

// channel_recv(ch, max_count, max_bytes) -> {:ok, [binary]} | {:closed, reason, [binary]}
//   | {:error, ...}; messages in order, at most max_count, stopping after max_bytes copied.
SPSHM_GUARDED_NIF(nif_channel_recv)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  std::uint64_t max_count = 0, max_bytes = 0;
  if (!get_channel(env, argv[0], &c) || !get_u64(env, argv[1], &max_count) ||
      !get_u64(env, argv[2], &max_bytes) || max_count == 0) {
    return enif_make_badarg(env);
  }
  ERL_NIF_TERM ordered, status, error;
  std::uint64_t taken = 0;
  if (!take_messages(env, c, max_count, max_bytes, &ordered, &taken, &status, &error)) {
    return error;
  }
  if (status == atoms.ok) return enif_make_tuple2(env, atoms.ok, ordered);
  return enif_make_tuple3(env, ca.closed, status, ordered);
}

// The whole wake-up of a connected channel's process in one call (the hot path of an
// active channel): handle the events (doorbell, hang-up), take up to max_count messages,
// and, if the ring was emptied (fewer than max_count taken), announce the sleep and re-arm
// enif_select.
// channel_pump(ch, max_count, max_bytes) -> {:ok, [binary], armed} | {:closed, reason,
//   [binary]} | {:error, ...}. armed false: look again now (more is ready, or the quota
//   was reached and the caller decides what it waits for).
SPSHM_GUARDED_NIF(nif_channel_pump)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  std::uint64_t max_count = 0, max_bytes = 0;
  if (!get_channel(env, argv[0], &c) || !get_u64(env, argv[1], &max_count) ||
      !get_u64(env, argv[2], &max_bytes) || max_count == 0) {
    return enif_make_badarg(env);
  }
  c->ep->handle_events();
  ERL_NIF_TERM ordered, status, error;
  std::uint64_t taken = 0;
  if (!take_messages(env, c, max_count, max_bytes, &ordered, &taken, &status, &error)) {
    return error;
  }
  if (status != atoms.ok) return enif_make_tuple3(env, ca.closed, status, ordered);
  bool armed = false;
  if (taken < max_count && c->ep->prepare_wait(true, false, 0)) {
    if (!select_again(env, c)) {
      return enif_make_tuple3(env, ca.closed, reason_atom(c->ep->close_reason()), ordered);
    }
    armed = true;
  }
  return enif_make_tuple3(env, atoms.ok, ordered, make_bool(armed));
}

// channel_doorbell(ch) -> {:ok, fd} | {:error, ...}: a duplicate of the owner's doorbell
// eventfd, taken out of the epoll fd, for an fd port (Server): the BEAM's schedulers poll a
// port's fd themselves, so a doorbell rung while a scheduler still spins is seen without
// waking the poll thread (docs/CHANNEL.md, "Elixir side").
SPSHM_GUARDED_NIF(nif_channel_doorbell)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  if (!get_channel(env, argv[0], &c)) return enif_make_badarg(env);
  std::lock_guard<std::mutex> lock(c->mu);
  if (c->bell_fd >= 0) return make_error(env, Errc::invalid_argument, "doorbell already taken");
  int fd = c->ep->take_doorbell_fd();
  if (fd < 0) return make_error(env, Errc::unsupported, "no doorbell on this channel");
  c->bell_fd = fd;
  return make_ok(env, enif_make_int(env, fd));
}

// channel_doorbell_close(ch) -> :ok: closes the doorbell duplicate (its port is closed).
SPSHM_GUARDED_NIF(nif_channel_doorbell_close)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  if (!get_channel(env, argv[0], &c)) return enif_make_badarg(env);
  std::lock_guard<std::mutex> lock(c->mu);
  if (c->bell_fd >= 0) ::close(c->bell_fd);
  c->bell_fd = -1;
  return atoms.ok;
}

// The hot path of an active channel whose doorbell is an fd port. After a doorbell
// (woke: true) it withdraws the sleep announcement, with no epoll probe and no
// enif_select; then it takes up to max_count messages. If it emptied the ring:
//   * within spin_ns of the last message taken, while a CPU is free (os::cpus_idle, the
//     worker's own rule), it does NOT announce the sleep and answers :spin: the caller
//     looks again after the other processes of its scheduler ran (a message to itself).
//     A reply that comes meanwhile costs the worker no doorbell (no system call) and the
//     BEAM no wake-up: the Elixir side's brief spin (bench/FINDINGS.md 8.2);
//   * else it announces the sleep: armed true (the doorbell will ring) or false (data
//     arrived meanwhile: look again).
// A full batch (max_count taken) answers :spin too: more is probably there.
// channel_pump_bell(ch, max_count, max_bytes, woke, spin_ns) ->
//   {:ok, [binary], true | false | :spin} | {:closed, reason, [binary]} | {:error, ...}
SPSHM_GUARDED_NIF(nif_channel_pump_bell)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  std::uint64_t max_count = 0, max_bytes = 0, spin_ns = 0;
  bool woke = false;
  if (!get_channel(env, argv[0], &c) || !get_u64(env, argv[1], &max_count) ||
      !get_u64(env, argv[2], &max_bytes) || max_count == 0 || !get_bool(env, argv[3], &woke) ||
      !get_u64(env, argv[4], &spin_ns)) {
    return enif_make_badarg(env);
  }
  if (woke) c->ep->doorbell_woke();
  ERL_NIF_TERM ordered, status, error;
  std::uint64_t taken = 0;
  if (!take_messages(env, c, max_count, max_bytes, &ordered, &taken, &status, &error)) {
    return error;
  }
  if (status != atoms.ok) return enif_make_tuple3(env, ca.closed, status, ordered);
  const std::uint64_t now = channel::os::monotonic_ns();
  if (taken > 0) c->last_data_ns.store(now, std::memory_order_relaxed);
  ERL_NIF_TERM next;
  if (taken >= max_count) {
    next = ca.spin;
  } else if (spin_ns > 0 && now - c->last_data_ns.load(std::memory_order_relaxed) < spin_ns &&
             channel::os::cpus_idle()) {
    next = ca.spin;
  } else {
    next = make_bool(c->ep->prepare_wait(true, false, 0));
  }
  return enif_make_tuple3(env, atoms.ok, ordered, next);
}

SPSHM_GUARDED_NIF(nif_channel_prepare_wait)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  bool want_data, want_space;
  std::uint64_t need;
  if (!get_channel(env, argv[0], &c) || !get_bool(env, argv[1], &want_data) ||
      !get_bool(env, argv[2], &want_space) || !get_u64(env, argv[3], &need)) {
    return enif_make_badarg(env);
  }
  return make_bool(c->ep->prepare_wait(want_data, want_space, need));
}

SPSHM_GUARDED_NIF(nif_channel_flush)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  if (!get_channel(env, argv[0], &c)) return enif_make_badarg(env);
  c->ep->flush_acks();
  return atoms.ok;
}

SPSHM_GUARDED_NIF(nif_channel_close)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  if (!get_channel(env, argv[0], &c)) return enif_make_badarg(env);
  close_channel(env, c);
  return atoms.ok;
}

// Monitors `pid` as the owner (replacing the previous one): its death closes the channel.
SPSHM_GUARDED_NIF(nif_channel_monitor)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  ErlNifPid pid;
  if (!get_channel(env, argv[0], &c) || !enif_get_local_pid(env, argv[1], &pid)) {
    return enif_make_badarg(env);
  }
  std::lock_guard<std::mutex> lock(c->mu);
  // The new monitor first: a pid that is not alive leaves the current owner monitored
  // (controlling_process/2 to a dead pid fails and changes nothing).
  ErlNifMonitor next{};
  if (enif_monitor_process(env, c, &pid, &next) != 0) {
    return make_error(env, Errc::not_found, "the owner process is not alive");
  }
  if (c->monitoring) enif_demonitor_process(env, c, &c->monitor);
  c->monitor = next;
  c->monitoring = true;
  return atoms.ok;
}

// channel_guard(ch) -> :ok: the calling process (the channel's process) is monitored too:
// if it dies in any way, even killed, the channel closes (the worker sees EOF) although
// callers still hold the resource.
SPSHM_GUARDED_NIF(nif_channel_guard)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  ErlNifPid self;
  if (!get_channel(env, argv[0], &c) || enif_self(env, &self) == nullptr) {
    return enif_make_badarg(env);
  }
  std::lock_guard<std::mutex> lock(c->mu);
  if (c->guarding) return atoms.ok;
  if (enif_monitor_process(env, c, &self, &c->server_monitor) != 0) {
    return make_error(env, Errc::not_found, "the channel's process is not alive");
  }
  c->guarding = true;
  return atoms.ok;
}

namespace {

// An environment variable as the VM sees it (os:putenv/2 changes the VM's copy, not what
// getenv(3) reads); empty if unset.
std::string vm_getenv(const char* name) {
  std::vector<char> buf(4096);
  std::size_t size = buf.size();
  int rc = enif_getenv(name, buf.data(), &size);
  if (rc == 1) {  // too small: size is what it needs
    buf.resize(size + 1);
    size = buf.size();
    rc = enif_getenv(name, buf.data(), &size);
  }
  return rc == 0 ? std::string(buf.data(), ::strnlen(buf.data(), buf.size())) : std::string();
}

}  // namespace

// Dirty (I/O bound): lists $XDG_RUNTIME_DIR, $TMPDIR (the process's and the VM's) and
// /tmp and, per candidate, opens, locks and maybe removes a directory
// (channel::sweep_default_socket_dirs).
SPSHM_GUARDED_NIF(nif_channel_sweep_dirs)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  std::vector<std::string> vm_bases;
  for (const char* var : {"XDG_RUNTIME_DIR", "TMPDIR"}) {
    std::string v = vm_getenv(var);
    if (!v.empty()) vm_bases.push_back(std::move(v));
  }
  return enif_make_uint64(env, channel::sweep_default_socket_dirs(vm_bases));
}

SPSHM_GUARDED_NIF(nif_channel_stats)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChannelResource* c;
  if (!get_channel(env, argv[0], &c)) return enif_make_badarg(env);
  auto s = c->ep->stats();
  ERL_NIF_TERM state = s.state == channel::State::listening   ? ca.listening
                       : s.state == channel::State::connected ? ca.connected
                                                              : ca.closed;
  ERL_NIF_TERM keys[] = {ca.transport,
                         ca.state,
                         ca.close_reason,
                         ca.close_detail,
                         ca.messages_sent,
                         ca.bytes_sent,
                         ca.messages_received,
                         ca.bytes_received,
                         ca.region_messages_sent,
                         ca.region_messages_received,
                         ca.doorbells_rung,
                         ca.wakeups,
                         ca.flushes,
                         ca.pending_acks,
                         ca.would_blocks,
                         ca.fallbacks,
                         ca.fallback_reason,
                         ca.ring_size,
                         ca.inline_max,
                         ca.out_occupancy,
                         ca.in_occupancy,
                         ca.peer_pid};
  ERL_NIF_TERM vals[] = {
      s.transport == channel::Transport::shm ? ca.shm : ca.socket,
      state,
      reason_atom(s.reason),
      make_binary(env, s.close_detail),
      enif_make_uint64(env, s.messages_sent),
      enif_make_uint64(env, s.bytes_sent),
      enif_make_uint64(env, s.messages_received),
      enif_make_uint64(env, s.bytes_received),
      enif_make_uint64(env, s.region_messages_sent),
      enif_make_uint64(env, s.region_messages_received),
      enif_make_uint64(env, s.doorbells_rung),
      enif_make_uint64(env, s.wakeups),
      enif_make_uint64(env, s.flushes),
      enif_make_uint64(env, s.pending_acks),
      enif_make_uint64(env, s.would_blocks),
      enif_make_uint64(env, s.fallbacks),
      s.fallback_reason.empty() ? atoms.nil : make_binary(env, s.fallback_reason),
      enif_make_uint64(env, s.ring_size),
      enif_make_uint64(env, s.inline_max),
      enif_make_uint64(env, s.out_occupancy),
      enif_make_uint64(env, s.in_occupancy),
      enif_make_uint(env, s.peer_pid)};
  return make_map(env, keys, vals);
}

}  // namespace spshm::nif
