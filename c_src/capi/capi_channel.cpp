// C ABI of the channel's worker end (snakepit_shm_channel.h) over spshm::channel::Endpoint.
// Nothing may escape to C: every function catches everything.
#include "snakepit_shm_channel.h"

#include <cerrno>
#include <cstring>
#include <memory>
#include <new>
#include <sstream>
#include <string>

#include "channel.hpp"
#include "ring.hpp"

#define SPSHM_EXPORT extern "C" __attribute__((visibility("default")))

struct spshm_channel {
  std::unique_ptr<spshm::channel::Endpoint> ep;
};

namespace {

using spshm::Errc;
using spshm::Error;
using spshm::channel::Io;

int code_of(Errc code) noexcept { return -(static_cast<int>(code) + 1); }

// A JSON string literal of `s` (quotes, backslashes and control bytes escaped).
std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      static const char hex[] = "0123456789abcdef";
      out += "\\u00";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

size_t copy_out(const std::string& s, char* buf, size_t buflen) noexcept {
  if (buf != nullptr && buflen > 0) {
    size_t n = s.size() < buflen - 1 ? s.size() : buflen - 1;
    std::memcpy(buf, s.data(), n);
    buf[n] = '\0';
  }
  return s.size();
}

int fail(const Error& e, char* err, size_t errlen) noexcept {
  copy_out(e.message, err, errlen);
  return code_of(e.code);
}

int io_result(Io io, const Error& e, char* err, size_t errlen) noexcept {
  switch (io) {
    case Io::ok:
      return 0;
    case Io::would_block:
      return SPSHM_CH_WOULD_BLOCK;
    default:
      return fail(e, err, errlen);
  }
}

struct Buffer {
  void* data;
  size_t length;
};

void* into_buffer(void* ctx, size_t length) {
  auto* b = static_cast<Buffer*>(ctx);
  return length <= b->length ? b->data : nullptr;
}

}  // namespace

SPSHM_EXPORT size_t spshm_channel_layout(char* buf, size_t buflen) {
  try {
    return copy_out(spshm::ring::layout_description(), buf, buflen);
  } catch (...) {
    return 0;
  }
}

SPSHM_EXPORT int spshm_ch_connect_cancellable(const char* path, const char* token_hex, int ack_mode,
                                              uint32_t max_batch, uint64_t flush_interval_ns,
                                              uint64_t max_message_size, int timeout_ms,
                                              int cancel_fd, int* accepted_out, spshm_channel** out,
                                              char* err, size_t errlen) {
  try {
    if (path == nullptr || token_hex == nullptr || out == nullptr || ack_mode < 0 || ack_mode > 2 ||
        max_batch == 0) {
      return fail(Error{Errc::invalid_argument, 0, "bad channel connect arguments"}, err, errlen);
    }
    spshm::channel::WorkerOptions o;
    o.ack.mode = static_cast<spshm::ring::AckMode>(ack_mode);
    o.ack.max_batch = max_batch;
    o.ack.flush_interval_ns = flush_interval_ns;
    o.max_message_size = max_message_size;
    o.timeout_ms = timeout_ms;
    o.cancel_fd = cancel_fd;
    bool accepted = false;
    o.accepted = &accepted;
    if (accepted_out != nullptr) *accepted_out = 0;
    auto r = spshm::channel::Endpoint::connect(path, token_hex, o);
    if (accepted_out != nullptr) *accepted_out = accepted ? 1 : 0;
    if (!r.ok()) return fail(r.error(), err, errlen);
    auto* ch = new spshm_channel{std::move(r.value())};
    *out = ch;
    return 0;
  } catch (const std::bad_alloc&) {
    return fail(Error{Errc::no_space, 0, "out of memory"}, err, errlen);
  } catch (...) {
    return fail(Error{Errc::io_error, 0, "unexpected failure"}, err, errlen);
  }
}

SPSHM_EXPORT int spshm_ch_connect(const char* path, const char* token_hex, int ack_mode,
                                  uint32_t max_batch, uint64_t flush_interval_ns,
                                  uint64_t max_message_size, int timeout_ms, spshm_channel** out,
                                  char* err, size_t errlen) {
  return spshm_ch_connect_cancellable(path, token_hex, ack_mode, max_batch, flush_interval_ns,
                                      max_message_size, timeout_ms, -1, nullptr, out, err, errlen);
}

SPSHM_EXPORT void spshm_ch_free(spshm_channel* ch) {
  try {
    delete ch;
  } catch (...) {
  }
}

SPSHM_EXPORT void spshm_ch_close(spshm_channel* ch) {
  try {
    if (ch != nullptr) ch->ep->close();
  } catch (...) {
  }
}

SPSHM_EXPORT int spshm_ch_wait_fd(spshm_channel* ch) { return ch->ep->wait_fd(); }
SPSHM_EXPORT int spshm_ch_transport(spshm_channel* ch) {
  return static_cast<int>(ch->ep->transport());
}
SPSHM_EXPORT uint32_t spshm_ch_inline_max(spshm_channel* ch) { return ch->ep->inline_max(); }
SPSHM_EXPORT uint64_t spshm_ch_ring_size(spshm_channel* ch) { return ch->ep->ring_size(); }

SPSHM_EXPORT int spshm_ch_send(spshm_channel* ch, const void* data, uint64_t length, char* err,
                               size_t errlen) {
  try {
    Error e{Errc::io_error, 0, {}};
    return io_result(ch->ep->send(data, length, &e), e, err, errlen);
  } catch (...) {
    return fail(Error{Errc::io_error, 0, "unexpected failure"}, err, errlen);
  }
}

SPSHM_EXPORT int spshm_ch_prepare_region(const void* data, uint64_t length, int* fd_out,
                                         int* errno_out, char* err, size_t errlen) {
  if (errno_out != nullptr) *errno_out = 0;
  try {
    auto r = spshm::channel::Endpoint::prepare_region(data, length);
    if (!r.ok()) {
      // The OS's errno (EMFILE, EFBIG, EPERM, ENOMEM...): the code alone cannot tell
      // "out of descriptors" from "out of memory".
      if (errno_out != nullptr) *errno_out = r.error().sys_errno;
      return fail(r.error(), err, errlen);
    }
    *fd_out = r.value();
    return 0;
  } catch (const std::bad_alloc&) {
    if (errno_out != nullptr) *errno_out = ENOMEM;
    return fail(Error{Errc::no_space, ENOMEM,
                      "cannot send the message as a region message: out of memory for its "
                      "copy: free memory or send smaller messages"},
                err, errlen);
  } catch (...) {
    return fail(Error{Errc::io_error, 0, "unexpected failure"}, err, errlen);
  }
}

SPSHM_EXPORT int spshm_ch_send_region(spshm_channel* ch, int fd, uint64_t size, char* err,
                                      size_t errlen) {
  try {
    Error e{Errc::io_error, 0, {}};
    return io_result(ch->ep->send_region(fd, size, &e), e, err, errlen);
  } catch (...) {
    return fail(Error{Errc::io_error, 0, "unexpected failure"}, err, errlen);
  }
}

SPSHM_EXPORT int spshm_ch_recv(spshm_channel* ch, void* buf, size_t buflen, uint32_t* length_out,
                               int* fd_out, uint64_t* size_out, char* err, size_t errlen) {
  try {
    Buffer b{buf, buflen};
    spshm::channel::Received r;
    Error e{Errc::io_error, 0, {}};
    Io io = ch->ep->recv(into_buffer, &b, &r, &e);
    if (io != Io::ok) return io_result(io, e, err, errlen);
    if (r.kind == spshm::channel::Received::region) {
      *fd_out = r.fd;
      *size_out = r.size;
      return SPSHM_CH_REGION;
    }
    *length_out = r.length;
    return 0;
  } catch (...) {
    return fail(Error{Errc::io_error, 0, "unexpected failure"}, err, errlen);
  }
}

SPSHM_EXPORT int spshm_ch_recv_wait(spshm_channel* ch, void* buf, size_t buflen,
                                    uint32_t* length_out, int* fd_out, uint64_t* size_out,
                                    uint64_t spin_ns, int timeout_ms, char* err, size_t errlen) {
  try {
    Buffer b{buf, buflen};
    spshm::channel::Received r;
    Error e{Errc::io_error, 0, {}};
    Io io = ch->ep->recv_wait(into_buffer, &b, &r, &e, spin_ns, timeout_ms);
    if (io != Io::ok) return io_result(io, e, err, errlen);
    if (r.kind == spshm::channel::Received::region) {
      *fd_out = r.fd;
      *size_out = r.size;
      return SPSHM_CH_REGION;
    }
    *length_out = r.length;
    return 0;
  } catch (...) {
    return fail(Error{Errc::io_error, 0, "unexpected failure"}, err, errlen);
  }
}

SPSHM_EXPORT int spshm_ch_recv_io(spshm_ch_io* io, int timeout_ms) {
  if (io == nullptr || io->ch == nullptr) return SPSHM_CH_WOULD_BLOCK;
  uint32_t length = 0;
  int fd = -1;
  uint64_t size = 0;
  int rc = spshm_ch_recv_wait(io->ch, io->buf, static_cast<size_t>(io->buflen), &length, &fd, &size,
                              io->spin_ns, timeout_ms, io->err, sizeof io->err);
  // Only a message changes the block: a binding that fills it with "nothing" markers before
  // the call finds a message there even if it was interrupted before it saw the result.
  if (rc == 0 || rc == SPSHM_CH_REGION) {
    io->length = length;
    io->fd = fd;
    io->size = size;
  }
  return rc;
}

namespace {

// Appends a message as u32 length + bytes to a batch buffer; refuses (nullptr) a message
// that does not fit, which then stays in the ring for the next call.
struct Batch {
  uint8_t* data;
  size_t capacity;
  size_t used;
  bool refused;
};

void* into_batch(void* ctx, size_t length) {
  auto* b = static_cast<Batch*>(ctx);
  if (b->used + 4 + length > b->capacity) {
    b->refused = true;
    return nullptr;
  }
  const auto len = static_cast<uint32_t>(length);
  std::memcpy(b->data + b->used, &len, 4);
  void* at = b->data + b->used + 4;
  b->used += 4 + length;
  return at;
}

}  // namespace

SPSHM_EXPORT int spshm_ch_recv_batch_io(spshm_ch_io* io, void* buf, uint64_t buflen,
                                        uint32_t max_count) {
  if (io == nullptr || io->ch == nullptr) return SPSHM_CH_WOULD_BLOCK;
  io->fd = -1;
  io->size = 0;
  try {
    Batch b{static_cast<uint8_t*>(buf), static_cast<size_t>(buflen), 0, false};
    int count = 0;
    // Room for at least a length (an empty message is never refused, so never lost).
    while (static_cast<uint32_t>(count) < max_count && b.used + 4 <= b.capacity) {
      spshm::channel::Received r;
      Error e{Errc::io_error, 0, {}};
      Io got = io->ch->ep->recv(into_batch, &b, &r, &e);
      if (got == Io::would_block || (got == Io::error && b.refused)) break;
      if (got != Io::ok) {
        if (count > 0) break;  // reported by the next call
        return io_result(got, e, io->err, sizeof io->err);
      }
      if (r.kind == spshm::channel::Received::region) {
        io->fd = r.fd;  // the message after the `count` inline ones
        io->size = r.size;
        break;
      }
      ++count;
    }
    io->length = static_cast<uint32_t>(b.used);
    if (io->fd < 0) io->size = b.refused || b.used + 4 > b.capacity ? 1 : 0;  // 1: more waits
    return count;
  } catch (...) {
    return fail(Error{Errc::io_error, 0, "unexpected failure"}, io->err, sizeof io->err);
  }
}

SPSHM_EXPORT int spshm_ch_send_io(spshm_ch_io* io, const void* data, uint64_t length) {
  if (io == nullptr || io->ch == nullptr) return SPSHM_CH_WOULD_BLOCK;
  return spshm_ch_send(io->ch, data, length, io->err, sizeof io->err);
}

SPSHM_EXPORT int spshm_ch_prepare_wait(spshm_channel* ch, int want_data, int want_space,
                                       uint64_t need) {
  try {
    return ch->ep->prepare_wait(want_data != 0, want_space != 0, need) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

SPSHM_EXPORT void spshm_ch_handle_events(spshm_channel* ch) {
  try {
    ch->ep->handle_events();
  } catch (...) {
  }
}

SPSHM_EXPORT void spshm_ch_flush(spshm_channel* ch) {
  try {
    ch->ep->flush_acks();
  } catch (...) {
  }
}

SPSHM_EXPORT size_t spshm_ch_stats(spshm_channel* ch, char* buf, size_t buflen) {
  try {
    auto s = ch->ep->stats();
    std::ostringstream o;
    o << "{\"transport\":\"" << spshm::channel::transport_name(s.transport) << "\""
      << ",\"closed\":\"" << spshm::channel::close_reason_name(s.reason) << "\""
      << ",\"messages_sent\":" << s.messages_sent << ",\"bytes_sent\":" << s.bytes_sent
      << ",\"messages_received\":" << s.messages_received
      << ",\"bytes_received\":" << s.bytes_received
      << ",\"region_messages_sent\":" << s.region_messages_sent
      << ",\"region_messages_received\":" << s.region_messages_received
      << ",\"doorbells_rung\":" << s.doorbells_rung << ",\"wakeups\":" << s.wakeups
      << ",\"flushes\":" << s.flushes << ",\"pending_acks\":" << s.pending_acks
      << ",\"would_blocks\":" << s.would_blocks << ",\"spin_hits\":" << s.spin_hits
      << ",\"spin_misses\":" << s.spin_misses << ",\"ring_size\":" << s.ring_size
      << ",\"inline_max\":" << s.inline_max << ",\"out_occupancy\":" << s.out_occupancy
      << ",\"in_occupancy\":" << s.in_occupancy << ",\"peer_pid\":" << s.peer_pid
      << ",\"close_detail\":" << json_string(s.close_detail) << "}";
    return copy_out(o.str(), buf, buflen);
  } catch (...) {
    return 0;
  }
}
