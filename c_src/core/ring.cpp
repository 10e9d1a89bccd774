// SPSC rings of the message channel: indices, frames, fences and the waiting flags.
// The memory-ordering argument is written out in docs/CHANNEL.md ("Memory ordering").
#include "ring.hpp"

#include <cstring>
#include <sstream>

namespace spshm::ring {

namespace {

constexpr auto kAcquire = std::memory_order_acquire;
constexpr auto kRelease = std::memory_order_release;
constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr auto kSeqCst = std::memory_order_seq_cst;

// One read of a u32 that a hostile peer may change at any time: the value is read once
// into a register and only that value is used (no double fetch).
std::uint32_t load_once(const std::uint8_t* p) noexcept {
  std::uint32_t v;
  __atomic_load(reinterpret_cast<const std::uint32_t*>(p), &v, __ATOMIC_RELAXED);
  return v;
}

void store_u32(std::uint8_t* p, std::uint32_t v) noexcept { std::memcpy(p, &v, sizeof v); }

}  // namespace

std::string layout_description() {
  std::ostringstream o;
  o << "{\"magic\":\"SPSHMCHN\",\"version\":" << kVersion << ",\"header_size\":" << kHeaderSize
    << ",\"min_capacity\":" << kMinCapacity << ",\"max_capacity\":" << kMaxCapacity
    << ",\"default_capacity\":" << kDefaultCapacity << ",\"frame_header_size\":" << kFrameHeaderSize
    << ",\"frame_align\":" << kFrameAlign << ",\"region_payload_size\":" << kRegionPayloadSize
    << ",\"frame_types\":{\"data\":" << kFrameData << ",\"region\":" << kFrameRegion
    << ",\"hello\":" << kFrameHello << ",\"welcome\":" << kFrameWelcome
    << ",\"carrier\":" << kFrameCarrier << "}"
    << ",\"fields\":{"
    << "\"magic\":[" << offsetof(ChannelHeader, magic) << ",8]"
    << ",\"version\":[" << offsetof(ChannelHeader, version) << ",4]"
    << ",\"header_size\":[" << offsetof(ChannelHeader, header_size) << ",4]"
    << ",\"capacity\":[" << offsetof(ChannelHeader, capacity) << ",16]"
    << ",\"data_offset\":[" << offsetof(ChannelHeader, data_offset) << ",16]"
    << ",\"total_size\":[" << offsetof(ChannelHeader, total_size) << ",8]"
    << ",\"inline_max\":[" << offsetof(ChannelHeader, inline_max) << ",4]"
    << ",\"flags\":[" << offsetof(ChannelHeader, flags) << ",4]"
    << ",\"reserved0\":[" << offsetof(ChannelHeader, reserved0) << ",64]"
    << ",\"rings\":[" << offsetof(ChannelHeader, rings) << "," << sizeof(RingControl) * 2 << "]"
    << ",\"reserved1\":[" << offsetof(ChannelHeader, reserved1) << ","
    << sizeof(ChannelHeader::reserved1) << "]"
    << "},\"ring_control\":{\"size\":" << sizeof(RingControl)
    << ",\"head\":" << offsetof(RingControl, producer) + offsetof(ProducerLine, head)
    << ",\"producer_waiting\":" << offsetof(RingControl, producer) + offsetof(ProducerLine, waiting)
    << ",\"tail\":" << offsetof(RingControl, consumer) + offsetof(ConsumerLine, tail)
    << ",\"consumer_waiting\":" << offsetof(RingControl, consumer) + offsetof(ConsumerLine, waiting)
    << "}}";
  return o.str();
}

void init_header(void* base, std::uint64_t cap0, std::uint64_t cap1, std::uint32_t inline_max) {
  auto* h = static_cast<ChannelHeader*>(base);
  h->version = kVersion;
  h->header_size = kHeaderSize;
  h->capacity[0] = cap0;
  h->capacity[1] = cap1;
  h->data_offset[0] = kHeaderSize;
  h->data_offset[1] = kHeaderSize + cap0;
  h->total_size = kHeaderSize + cap0 + cap1;
  h->inline_max = inline_max;
  h->flags = 0;
  for (auto& r : h->rings) {
    r.producer.head.store(0, kRelaxed);
    r.producer.waiting.store(0, kRelaxed);
    r.consumer.tail.store(0, kRelaxed);
    r.consumer.waiting.store(0, kRelaxed);
  }
  std::atomic_thread_fence(kRelease);
  std::memcpy(h->magic, kMagic, sizeof kMagic);
}

std::string validate_header(const void* base, std::uint64_t object_size, std::uint64_t cap0,
                            std::uint64_t cap1, std::uint32_t inline_max) {
  ChannelHeader h;  // one copy: every check below looks at the same bytes
  std::memcpy(static_cast<void*>(&h), base, sizeof h);
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) return "bad channel magic";
  if (h.version != kVersion) return "unsupported channel version " + std::to_string(h.version);
  if (h.header_size != kHeaderSize) return "bad channel header size";
  if (!valid_capacity(cap0) || !valid_capacity(cap1)) return "ring capacity out of range";
  if (h.capacity[0] != cap0 || h.capacity[1] != cap1)
    return "ring capacities differ from handshake";
  if (h.data_offset[0] != kHeaderSize || h.data_offset[1] != kHeaderSize + cap0) {
    return "bad ring data offsets";
  }
  if (h.total_size != kHeaderSize + cap0 + cap1 || object_size < h.total_size) {
    return "channel object smaller than its rings";
  }
  if (h.inline_max != inline_max || inline_max > max_inline_max(cap0, cap1)) {
    return "bad inline threshold";
  }
  return {};
}

Status free_space(Producer& p, std::uint64_t* out) noexcept {
  std::uint64_t t = p.ctl->consumer.tail.load(kAcquire);
  // The tail never moves backwards and never passes what we published.
  if (t < p.tail_seen || t > p.head) return Status::protocol_error;
  p.tail_seen = t;
  *out = p.cap - (p.head - t);
  return Status::ok;
}

Status write(Producer& p, std::uint32_t type, const void* payload, std::uint32_t length,
             bool* ring_doorbell) noexcept {
  *ring_doorbell = false;
  const std::uint64_t need = frame_size(length);
  if (need > p.cap) return Status::full;  // never fits: the caller sends a region frame
  if (p.cap - (p.head - p.tail_seen) < need) {
    std::uint64_t space = 0;
    if (free_space(p, &space) != Status::ok) return Status::protocol_error;
    if (space < need) return Status::full;
  }
  const std::uint64_t pos = p.head % p.cap;  // 8-aligned, cap % 8 == 0: the header never wraps
  store_u32(p.data + pos, length);
  store_u32(p.data + pos + 4, type);
  const std::uint64_t at = (pos + kFrameHeaderSize) % p.cap;
  const std::uint64_t first = std::min<std::uint64_t>(length, p.cap - at);
  if (length > 0) {
    std::memcpy(p.data + at, payload, first);
    if (first < length) {
      std::memcpy(p.data, static_cast<const std::uint8_t*>(payload) + first, length - first);
    }
  }
  p.head += need;
  // Release: the frame bytes are visible before the new head. The seq_cst fence orders
  // this store before the load of the consumer's waiting flag (Dekker, see CHANNEL.md).
  p.ctl->producer.head.store(p.head, kRelease);
  std::atomic_thread_fence(kSeqCst);
  if (p.ctl->consumer.waiting.load(kRelaxed) != 0 &&
      p.ctl->consumer.waiting.exchange(0, kSeqCst) != 0) {
    *ring_doorbell = true;
    ++p.doorbells;
  }
  return Status::ok;
}

bool prepare_wait_space(Producer& p, std::uint64_t need) noexcept {
  p.ctl->producer.waiting.store(1, kRelaxed);
  std::atomic_thread_fence(kSeqCst);
  std::uint64_t space = 0;
  if (free_space(p, &space) != Status::ok || space >= need) {
    // Space (or a broken peer the next write reports): do not sleep.
    p.ctl->producer.waiting.store(0, kRelaxed);
    return false;
  }
  return true;
}

Status peek(Consumer& c, std::uint32_t inline_max, Frame* out) noexcept {
  if (c.tail == c.head_seen) {
    std::uint64_t h = c.ctl->producer.head.load(kAcquire);
    // Unsigned: a head behind our tail wraps to a huge distance and fails too.
    if (h - c.tail > c.cap) return Status::protocol_error;
    c.head_seen = h;
    if (h == c.tail) return Status::empty;
  }
  const std::uint64_t avail = c.head_seen - c.tail;
  const std::uint8_t* hdr = c.data + (c.tail % c.cap);
  const std::uint32_t length = load_once(hdr);
  const std::uint32_t type = load_once(hdr + 4);
  if (frame_size(length) > avail) return Status::protocol_error;
  switch (type) {
    case kFrameData:
      if (length > inline_max) return Status::protocol_error;
      break;
    case kFrameRegion:
      if (length != kRegionPayloadSize) return Status::protocol_error;
      break;
    default:
      return Status::protocol_error;
  }
  out->type = type;
  out->length = length;
  return Status::ok;
}

void copy_payload(const Consumer& c, const Frame& f, void* dst) noexcept {
  const std::uint64_t at = (c.tail % c.cap + kFrameHeaderSize) % c.cap;
  const std::uint64_t first = std::min<std::uint64_t>(f.length, c.cap - at);
  auto* out = static_cast<std::uint8_t*>(dst);
  if (f.length == 0) return;
  std::memcpy(out, c.data + at, first);
  if (first < f.length) std::memcpy(out + first, c.data, f.length - first);
}

bool flush(Consumer& c, std::uint64_t now_ns) noexcept {
  if (c.tail != c.published) {
    // Release: we are done reading the frame bytes before the producer may reuse them.
    c.ctl->consumer.tail.store(c.tail, kRelease);
    c.published = c.tail;
    ++c.flushes;
  }
  c.unpublished = 0;
  c.last_publish_ns = now_ns;
  std::atomic_thread_fence(kSeqCst);  // tail store before the waiting-flag load (Dekker)
  if (c.ctl->producer.waiting.load(kRelaxed) != 0 &&
      c.ctl->producer.waiting.exchange(0, kSeqCst) != 0) {
    ++c.doorbells;
    return true;
  }
  return false;
}

bool consume(Consumer& c, const Frame& f, std::uint64_t now_ns) noexcept {
  c.tail += frame_size(f.length);
  ++c.unpublished;
  bool publish = false;
  switch (c.policy.mode) {
    case AckMode::immediate:
      publish = true;
      break;
    case AckMode::batch:
      publish = c.unpublished >= c.policy.max_batch ||
                now_ns - c.last_publish_ns >= c.policy.flush_interval_ns;
      break;
    case AckMode::deferred:
      publish = c.tail - c.published >= c.cap / 2;
      break;
  }
  // A producer waiting for space is never kept waiting by batching.
  if (!publish && c.ctl->producer.waiting.load(kRelaxed) != 0) publish = true;
  return publish ? flush(c, now_ns) : false;
}

bool prepare_sleep(Consumer& c, std::uint64_t now_ns, bool* wake_producer) noexcept {
  *wake_producer = flush(c, now_ns);
  c.ctl->consumer.waiting.store(1, kRelaxed);
  std::atomic_thread_fence(kSeqCst);  // flag store before the head load (Dekker)
  std::uint64_t h = c.ctl->producer.head.load(kAcquire);
  if (h != c.tail) {
    c.ctl->consumer.waiting.store(0, kRelaxed);
    return false;
  }
  return true;
}

bool has_data(const Consumer& c) noexcept {
  return c.tail != c.head_seen || c.ctl->producer.head.load(kAcquire) != c.tail;
}

void end_sleep(Consumer& c) noexcept { c.ctl->consumer.waiting.store(0, kRelaxed); }

std::uint64_t occupancy(const Consumer& c) noexcept { return c.head_seen - c.tail; }

}  // namespace spshm::ring
