// The message channel's shared memory: one header page and two single-producer /
// single-consumer byte rings, the single source of truth for their layout.
//
// One memfd holds, in this order:
//   [0, 4096)                         ChannelHeader (below)
//   [4096, 4096 + cap0)               ring 0 data: owner (Elixir) -> worker
//   [4096 + cap0, 4096 + cap0 + cap1) ring 1 data: worker -> owner (Elixir)
// Sizes are sealed (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) at creation.
//
// docs/CHANNEL.md writes this out byte by byte; the Python client mirrors the constants in
// snakepit_shm/_channel_format.py; tests on the C++, Elixir and Python sides compare all
// three against ring::layout_description(). All integers are little-endian.
//
// Everything a peer can write (indices, flags, frame headers, even the "immutable" header
// fields) is treated as hostile: every value read from shared memory is read once into a
// local, validated, and never used to address memory outside the ring.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace spshm::ring {

inline constexpr char kMagic[8] = {'S', 'P', 'S', 'H', 'M', 'C', 'H', 'N'};
inline constexpr std::uint32_t kVersion = 1;
inline constexpr std::uint32_t kHeaderSize = 4096;
inline constexpr std::uint64_t kPageSize = 4096;
inline constexpr std::uint64_t kMinCapacity = 4096;               // 4 KiB
inline constexpr std::uint64_t kMaxCapacity = 16u * 1024 * 1024;  // 16 MiB
inline constexpr std::uint64_t kDefaultCapacity = 64u * 1024;     // 64 KiB
inline constexpr std::uint32_t kFrameHeaderSize = 8;              // u32 length, u32 type
inline constexpr std::uint32_t kFrameAlign = 8;
inline constexpr std::uint32_t kRegionPayloadSize = 16;  // u64 size, u64 sequence

/// Frame types. In the rings only data and region frames appear; the control socket also
/// carries the handshake and the fd carrier of region frames (docs/CHANNEL.md).
enum FrameType : std::uint32_t {
  kFrameData = 1,      ///< payload = the message bytes
  kFrameRegion = 2,    ///< payload = u64 size, u64 sequence; the bytes are in a sealed memfd
  kFrameHello = 16,    ///< socket only: worker -> owner, token and version
  kFrameWelcome = 17,  ///< socket only: owner -> worker, transport and sizes (+ fds)
  kFrameCarrier = 18,  ///< socket only: carries the memfd of the next region frame
};

/// The producer's cache line of one ring.
struct alignas(64) ProducerLine {
  std::atomic<std::uint64_t> head;     ///< +0 bytes ever published (monotonic)
  std::atomic<std::uint32_t> waiting;  ///< +8 1: the producer sleeps until the consumer frees space
  std::uint32_t reserved0;             ///< +12
  std::uint8_t reserved1[48];          ///< +16
};

/// The consumer's cache line of one ring.
struct alignas(64) ConsumerLine {
  std::atomic<std::uint64_t> tail;     ///< +0 bytes ever consumed and acknowledged (monotonic)
  std::atomic<std::uint32_t> waiting;  ///< +8 1: the consumer is about to sleep on its doorbell
  std::uint32_t reserved0;             ///< +12
  std::uint8_t reserved1[48];          ///< +16
};

struct RingControl {
  ProducerLine producer;  ///< +0
  ConsumerLine consumer;  ///< +64
};

struct ChannelHeader {
  char magic[8];                 ///< 0    "SPSHMCHN", written last by the creator
  std::uint32_t version;         ///< 8    1
  std::uint32_t header_size;     ///< 12   4096
  std::uint64_t capacity[2];     ///< 16   bytes of ring 0 and ring 1
  std::uint64_t data_offset[2];  ///< 32   4096 and 4096 + capacity[0]
  std::uint64_t total_size;      ///< 48   4096 + capacity[0] + capacity[1]
  std::uint32_t inline_max;      ///< 56   largest payload sent inline; larger: region frame
  std::uint32_t flags;           ///< 60   0 (reserved)
  std::uint8_t reserved0[64];    ///< 64   zero
  RingControl rings[2];          ///< 128  ring 0 control, 256 ring 1 control
  std::uint8_t reserved1[3712];  ///< 384  zero
};

static_assert(sizeof(ProducerLine) == 64 && sizeof(ConsumerLine) == 64);
static_assert(sizeof(RingControl) == 128);
static_assert(offsetof(RingControl, consumer) == 64);
static_assert(offsetof(ProducerLine, head) == 0 && offsetof(ProducerLine, waiting) == 8);
static_assert(offsetof(ConsumerLine, tail) == 0 && offsetof(ConsumerLine, waiting) == 8);
static_assert(offsetof(ChannelHeader, version) == 8);
static_assert(offsetof(ChannelHeader, header_size) == 12);
static_assert(offsetof(ChannelHeader, capacity) == 16);
static_assert(offsetof(ChannelHeader, data_offset) == 32);
static_assert(offsetof(ChannelHeader, total_size) == 48);
static_assert(offsetof(ChannelHeader, inline_max) == 56);
static_assert(offsetof(ChannelHeader, flags) == 60);
static_assert(offsetof(ChannelHeader, rings) == 128);
static_assert(offsetof(ChannelHeader, reserved1) == 384);
static_assert(sizeof(ChannelHeader) == kHeaderSize);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

/// Bytes a frame with `length` payload bytes occupies in a ring (header + padded payload).
constexpr std::uint64_t frame_size(std::uint64_t length) noexcept {
  return kFrameHeaderSize + ((length + kFrameAlign - 1) & ~std::uint64_t{kFrameAlign - 1});
}

/// A capacity is valid if it is a multiple of 4096 in [4 KiB, 16 MiB].
constexpr bool valid_capacity(std::uint64_t c) noexcept {
  return c >= kMinCapacity && c <= kMaxCapacity && c % kPageSize == 0;
}

/// Default inline threshold: a quarter of the smaller ring, so that a frame always fits.
constexpr std::uint32_t default_inline_max(std::uint64_t cap0, std::uint64_t cap1) noexcept {
  return static_cast<std::uint32_t>((cap0 < cap1 ? cap0 : cap1) / 4);
}

/// The largest inline threshold allowed: a quarter of the smaller ring (a frame of that
/// size, header included, always fits in a ring holding less than 3/4 of its capacity).
constexpr std::uint64_t max_inline_max(std::uint64_t cap0, std::uint64_t cap1) noexcept {
  return (cap0 < cap1 ? cap0 : cap1) / 4;
}

/// Layout facts as JSON (offsets computed with offsetof/sizeof): the test oracle.
std::string layout_description();

/// Initialises a header at `base` (zeroed memory of total_size bytes); magic last.
void init_header(void* base, std::uint64_t cap0, std::uint64_t cap1, std::uint32_t inline_max);

/// Checks a mapped header against the sizes the handshake announced and the object size.
/// Returns an empty string if valid, else what is wrong.
std::string validate_header(const void* base, std::uint64_t object_size, std::uint64_t cap0,
                            std::uint64_t cap1, std::uint32_t inline_max);

enum class Status {
  ok,              ///< done / a frame is available
  empty,           ///< nothing to read
  full,            ///< not enough space now
  protocol_error,  ///< the peer broke the ring's invariants
};

/// The producer side of one ring; `head` is private (the shared copy is only written).
struct Producer {
  RingControl* ctl = nullptr;
  std::uint8_t* data = nullptr;
  std::uint64_t cap = 0;
  std::uint64_t head = 0;       ///< our write position (never read back from shared memory)
  std::uint64_t tail_seen = 0;  ///< the consumer's last acknowledged position we saw
  std::uint64_t doorbells = 0;  ///< times write() asked the caller to ring the doorbell
};

/// Acknowledgement policy of a consumer (batched acks).
enum class AckMode : std::uint32_t { immediate = 0, batch = 1, deferred = 2 };

struct AckPolicy {
  AckMode mode = AckMode::batch;
  std::uint32_t max_batch = 32;
  std::uint64_t flush_interval_ns = 5'000'000;
};

/// The consumer side of one ring; `tail` is private, `published` what the producer sees.
struct Consumer {
  RingControl* ctl = nullptr;
  const std::uint8_t* data = nullptr;
  std::uint64_t cap = 0;
  std::uint64_t tail = 0;       ///< our read position
  std::uint64_t published = 0;  ///< last tail stored to shared memory
  std::uint64_t head_seen = 0;  ///< the producer's last head we saw (validated)
  std::uint32_t unpublished = 0;
  std::uint64_t last_publish_ns = 0;
  std::uint64_t flushes = 0;    ///< times the tail was published
  std::uint64_t doorbells = 0;  ///< times the producer had to be woken
  AckPolicy policy;
};

/// A validated frame at the consumer's tail. `length` <= the bytes published.
struct Frame {
  std::uint32_t type = 0;
  std::uint32_t length = 0;
};

/// Producer: bytes free now, with the shared tail re-read and validated.
Status free_space(Producer& p, std::uint64_t* out) noexcept;

/// Producer: writes one frame of `type` with `length` payload bytes from `payload`, and
/// publishes it. Full: nothing written. *ring_doorbell tells whether the consumer
/// announced it sleeps (the caller then signals its eventfd).
Status write(Producer& p, std::uint32_t type, const void* payload, std::uint32_t length,
             bool* ring_doorbell) noexcept;

/// Producer: announce that we wait for `need` bytes; true if we may sleep (still full
/// after the announcement), false if space appeared (the flag is withdrawn).
bool prepare_wait_space(Producer& p, std::uint64_t need) noexcept;

/// Consumer: the frame at the tail, validated against `inline_max` (data frames) and the
/// published head. empty / ok / protocol_error.
Status peek(Consumer& c, std::uint32_t inline_max, Frame* out) noexcept;

/// Consumer: copies `f.length` payload bytes of the frame at the tail into dst.
void copy_payload(const Consumer& c, const Frame& f, void* dst) noexcept;

/// Consumer: steps over the frame at the tail and publishes the tail as the ack policy
/// says. Returns true if the producer waits for space and must be woken (doorbell).
bool consume(Consumer& c, const Frame& f, std::uint64_t now_ns) noexcept;

/// Consumer: publishes the tail now. Returns true if the producer must be woken.
bool flush(Consumer& c, std::uint64_t now_ns) noexcept;

/// Consumer: publishes the tail, announces it is about to sleep, and re-checks the head.
/// True: the ring is empty, sleep (the producer will ring). False: data arrived, the
/// announcement is withdrawn. *wake_producer as for flush().
bool prepare_sleep(Consumer& c, std::uint64_t now_ns, bool* wake_producer) noexcept;

/// Consumer: true if the producer published bytes beyond our tail (one acquire load, no
/// validation: peek() validates). For spin loops.
bool has_data(const Consumer& c) noexcept;

/// Consumer: after waking up, withdraw the announcement.
void end_sleep(Consumer& c) noexcept;

/// Bytes published but not yet consumed, as last seen (for stats; not validated).
std::uint64_t occupancy(const Consumer& c) noexcept;

}  // namespace spshm::ring
