// ring.hpp / channel.hpp: the SPSC ring (wrap-around at every offset, hostile indices and
// frames, waiting flags) and the channel endpoint end to end in one process.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "channel.hpp"
#include "channel_helpers.hpp"
#include "platform_channel.hpp"
#include "ring.hpp"

using namespace spshm;

namespace {

// One ring in private memory, with a producer and a consumer on it.
struct LocalRing {
  explicit LocalRing(std::uint64_t cap, ring::AckMode mode = ring::AckMode::immediate)
      : mem(ring::kHeaderSize + 2 * cap) {
    ring::init_header(mem.data(), cap, cap, static_cast<std::uint32_t>(cap / 4));
    auto* h = reinterpret_cast<ring::ChannelHeader*>(mem.data());
    p.ctl = c.ctl = &h->rings[0];
    p.data = mem.data() + ring::kHeaderSize;
    c.data = p.data;
    p.cap = c.cap = cap;
    c.policy.mode = mode;
    c.policy.flush_interval_ns = UINT64_MAX;
  }
  ring::ChannelHeader* header() { return reinterpret_cast<ring::ChannelHeader*>(mem.data()); }
  std::vector<std::uint8_t> mem;
  ring::Producer p;
  ring::Consumer c;
  std::uint32_t inline_max() const { return static_cast<std::uint32_t>(p.cap / 4); }
};

std::vector<std::uint8_t> pattern(std::size_t n, std::uint8_t seed) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>(seed + i * 31);
  return v;
}

bool read_one(LocalRing& r, std::vector<std::uint8_t>* out) {
  ring::Frame f;
  if (ring::peek(r.c, r.inline_max(), &f) != ring::Status::ok) return false;
  out->assign(f.length, 0);
  ring::copy_payload(r.c, f, out->data());
  (void)ring::consume(r.c, f, 0);
  return true;
}

}  // namespace

TEST_CASE("ring layout matches the documented offsets", "[ring]") {
  std::string d = ring::layout_description();
  CHECK(d.find("\"rings\":[128,256]") != std::string::npos);
  CHECK(d.find("\"head\":0") != std::string::npos);
  CHECK(d.find("\"tail\":64") != std::string::npos);
  CHECK(d.find("\"consumer_waiting\":72") != std::string::npos);
  CHECK(ring::frame_size(0) == 8);
  CHECK(ring::frame_size(1) == 16);
  CHECK(ring::frame_size(8) == 16);
}

TEST_CASE("frames wrap around the end of the ring at every offset", "[ring]") {
  const std::uint64_t cap = 4096;
  for (std::uint64_t offset = 0; offset < cap; offset += ring::kFrameAlign) {
    LocalRing r(cap);
    // Move both indices to `offset` with frames of at most a quarter ring.
    std::uint64_t left = offset;
    std::vector<std::uint8_t> got;
    while (left > 0) {
      std::uint64_t len = std::min<std::uint64_t>(left - 8, r.inline_max() & ~7u);
      if (left - 8 < 8 && left != 8) len = 0;
      auto filler = pattern(len, 1);
      bool bell = false;
      REQUIRE(ring::write(r.p, ring::kFrameData, filler.data(), static_cast<std::uint32_t>(len),
                          &bell) == ring::Status::ok);
      REQUIRE(read_one(r, &got));
      left -= ring::frame_size(len);
    }
    REQUIRE(r.p.head == offset);
    for (std::uint32_t len : {0u, 1u, 7u, 8u, 9u, 100u, 1023u, 1024u}) {
      auto msg = pattern(len, static_cast<std::uint8_t>(offset));
      bool bell = false;
      REQUIRE(ring::write(r.p, ring::kFrameData, msg.data(), len, &bell) == ring::Status::ok);
      REQUIRE(read_one(r, &got));
      REQUIRE(got == msg);
    }
  }
}

TEST_CASE("a full ring refuses, then frees space as the consumer acknowledges", "[ring]") {
  LocalRing r(4096);
  auto msg = pattern(1000, 3);
  bool bell = false;
  int written = 0;
  while (ring::write(r.p, ring::kFrameData, msg.data(), 1000, &bell) == ring::Status::ok) {
    ++written;
  }
  CHECK(written == 4);  // 4 * 1008 = 4032 <= 4096 < 5 * 1008
  std::vector<std::uint8_t> got;
  REQUIRE(read_one(r, &got));
  CHECK(ring::write(r.p, ring::kFrameData, msg.data(), 1000, &bell) == ring::Status::ok);
}

TEST_CASE("batched acknowledgements publish every max_batch frames", "[ring]") {
  LocalRing r(4096, ring::AckMode::batch);
  r.c.policy.max_batch = 4;
  bool bell = false;
  std::vector<std::uint8_t> got;
  for (int i = 0; i < 8; ++i) ring::write(r.p, ring::kFrameData, "x", 1, &bell);
  for (int i = 0; i < 3; ++i) REQUIRE(read_one(r, &got));
  CHECK(r.header()->rings[0].consumer.tail.load() == 0);
  REQUIRE(read_one(r, &got));
  CHECK(r.header()->rings[0].consumer.tail.load() == 4 * 16);
  // A waiting producer is never kept waiting by batching.
  r.header()->rings[0].producer.waiting.store(1);
  REQUIRE(read_one(r, &got));
  CHECK(r.header()->rings[0].consumer.tail.load() == 5 * 16);
  CHECK(r.header()->rings[0].producer.waiting.load() == 0);
}

TEST_CASE("the doorbell is rung only for a consumer that announced it sleeps", "[ring]") {
  LocalRing r(4096);
  bool bell = true, wake = false;
  ring::write(r.p, ring::kFrameData, "a", 1, &bell);
  CHECK_FALSE(bell);
  std::vector<std::uint8_t> got;
  REQUIRE(read_one(r, &got));
  REQUIRE(ring::prepare_sleep(r.c, 0, &wake));  // empty: may sleep
  ring::write(r.p, ring::kFrameData, "b", 1, &bell);
  CHECK(bell);
  ring::write(r.p, ring::kFrameData, "c", 1, &bell);
  CHECK_FALSE(bell);                                // once per sleep
  CHECK_FALSE(ring::prepare_sleep(r.c, 0, &wake));  // data there: do not sleep
}

TEST_CASE("hostile indices and frames are protocol errors, never out-of-bounds reads", "[ring]") {
  std::vector<std::uint8_t> got;
  ring::Frame f;
  SECTION("head beyond tail + capacity") {
    LocalRing r(4096);
    r.header()->rings[0].producer.head.store(4096 + 8);
    CHECK(ring::peek(r.c, r.inline_max(), &f) == ring::Status::protocol_error);
  }
  SECTION("head behind the tail") {
    LocalRing r(4096);
    bool bell;
    ring::write(r.p, ring::kFrameData, "abc", 3, &bell);
    REQUIRE(read_one(r, &got));
    r.header()->rings[0].producer.head.store(0);
    CHECK(ring::peek(r.c, r.inline_max(), &f) == ring::Status::protocol_error);
  }
  SECTION("frame length beyond what was published") {
    LocalRing r(4096);
    bool bell;
    ring::write(r.p, ring::kFrameData, "abc", 3, &bell);
    std::uint32_t len = 4000;
    std::memcpy(r.p.data, &len, 4);
    CHECK(ring::peek(r.c, r.inline_max(), &f) == ring::Status::protocol_error);
    len = 0xFFFFFFFFu;
    std::memcpy(r.p.data, &len, 4);
    CHECK(ring::peek(r.c, r.inline_max(), &f) == ring::Status::protocol_error);
  }
  SECTION("unknown type, oversized inline frame, bad region frame") {
    for (std::uint32_t type : {0u, 3u, 16u, 0xFFFFFFFFu}) {
      LocalRing r(4096);
      bool bell;
      ring::write(r.p, type, "abcd", 4, &bell);
      CHECK(ring::peek(r.c, r.inline_max(), &f) == ring::Status::protocol_error);
    }
    LocalRing r(4096);
    bool bell;
    auto big = pattern(1024, 1);
    ring::write(r.p, ring::kFrameData, big.data(), 1024, &bell);
    CHECK(ring::peek(r.c, 1000, &f) == ring::Status::protocol_error);
    LocalRing r2(4096);
    ring::write(r2.p, ring::kFrameRegion, "12345678", 8, &bell);
    CHECK(ring::peek(r2.c, r2.inline_max(), &f) == ring::Status::protocol_error);
  }
  SECTION("a consumer tail out of bounds is a protocol error for the producer") {
    LocalRing r(4096);
    bool bell;
    auto msg = pattern(1000, 1);
    for (int i = 0; i < 4; ++i) ring::write(r.p, ring::kFrameData, msg.data(), 1000, &bell);
    r.header()->rings[0].consumer.tail.store(99999);
    CHECK(ring::write(r.p, ring::kFrameData, msg.data(), 1000, &bell) ==
          ring::Status::protocol_error);
  }
  SECTION("random garbage never reads outside") {
    std::uint64_t seed = 42;
    auto rnd = [&seed]() {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      return seed >> 17;
    };
    for (int round = 0; round < 2000; ++round) {
      LocalRing r(4096);
      for (auto& b : std::vector<std::uint8_t*>{}) (void)b;
      for (std::uint64_t i = 0; i < 4096; ++i) r.p.data[i] = static_cast<std::uint8_t>(rnd());
      r.header()->rings[0].producer.head.store(rnd() % 8192);
      int n = 0;
      while (n++ < 100 && read_one(r, &got)) {
        CHECK(got.size() <= 4096);
      }
    }
  }
}

TEST_CASE("endpoint: owner and worker exchange messages over both transports", "[channel]") {
  for (auto wanted : {channel::Wanted::shm, channel::Wanted::socket}) {
    channel::OwnerOptions o;
    o.ring_size = 16384;
    o.transport = wanted;
    auto owner = channel::Endpoint::create_owner(o);
    REQUIRE(owner.ok());
    auto& ow = *owner.value();
    std::string path = ow.socket_path(), token = ow.token_hex();
    spshm_test::OwnerPump pump(ow);
    channel::WorkerOptions wo;
    auto worker = channel::Endpoint::connect(path, token, wo);
    REQUIRE(worker.ok());
    auto& wk = *worker.value();
    CHECK(wk.transport() ==
          (wanted == channel::Wanted::shm ? channel::Transport::shm : channel::Transport::socket));
    // The socket file is gone once connected (the welcome goes out just before).
    for (int i = 0; i < 100 && ::access(path.c_str(), F_OK) == 0; ++i) ::usleep(10000);
    CHECK(::access(path.c_str(), F_OK) != 0);
    Error e{Errc::io_error, 0, {}};
    auto msg = pattern(1000, 9);
    REQUIRE(ow.send(msg.data(), msg.size(), &e) == channel::Io::ok);
    auto big = pattern(100000, 5);
    auto fd = channel::Endpoint::prepare_region(big.data(), big.size());
    REQUIRE(fd.ok());
    channel::Io io;
    while ((io = ow.send_region(fd.value(), big.size(), &e)) == channel::Io::would_block) {
    }
    REQUIRE(io == channel::Io::ok);
    std::vector<std::uint8_t> buf(16384);
    struct Ctx {
      std::vector<std::uint8_t>* b;
    } ctx{&buf};
    auto alloc = [](void* c, std::size_t n) -> void* {
      auto* b = static_cast<Ctx*>(c)->b;
      return n <= b->size() ? b->data() : nullptr;
    };
    channel::Received r;
    for (int i = 0; i < 1000 && wk.recv(alloc, &ctx, &r, &e) == channel::Io::would_block; ++i) {
      wk.prepare_wait(true, false, 0);
      channel::os::wait_readable(wk.wait_fd(), 10);
      wk.handle_events();
    }
    REQUIRE(r.kind == channel::Received::data);
    CHECK(std::vector<std::uint8_t>(buf.begin(), buf.begin() + r.length) == msg);
    while (wk.recv(alloc, &ctx, &r, &e) == channel::Io::would_block) {
      channel::os::wait_readable(wk.wait_fd(), 10);
      wk.handle_events();
    }
    REQUIRE(r.kind == channel::Received::region);
    REQUIRE(r.size == big.size());
    auto m = channel::os::map_fd(r.fd, r.size, false);
    REQUIRE(m.ok());
    CHECK(std::memcmp(m.value(), big.data(), big.size()) == 0);
    channel::os::unmap(m.value(), r.size);
    ::close(r.fd);
    // The worker closes: the owner drains and sees peer_closed.
    REQUIRE(wk.send("bye", 3, &e) == channel::Io::ok);
    worker.value().reset();
    channel::Io got;
    for (int i = 0; i < 500; ++i) {
      got = ow.recv(alloc, &ctx, &r, &e);
      if (got == channel::Io::closed) break;
      if (got == channel::Io::ok) CHECK(r.length == 3);
      channel::os::wait_readable(ow.wait_fd(), 10);
      ow.handle_events();
    }
    auto st = ow.stats();
    INFO("transport " << int(wanted == channel::Wanted::shm) << " received " << st.messages_received
                      << " wakeups " << st.wakeups << " loops " << pump.loops() << " state "
                      << int(st.state));
    CHECK(got == channel::Io::closed);
    CHECK(ow.close_reason() == channel::CloseReason::peer_closed);
    pump.stop();
  }
}

TEST_CASE("endpoint: a wrong token is refused and the real worker still connects", "[channel]") {
  channel::OwnerOptions o;
  auto owner = channel::Endpoint::create_owner(o);
  REQUIRE(owner.ok());
  auto& ow = *owner.value();
  spshm_test::OwnerPump pump(ow);
  channel::WorkerOptions wo;
  wo.timeout_ms = 2000;
  auto bad = channel::Endpoint::connect(ow.socket_path(), std::string(64, '0'), wo);
  CHECK_FALSE(bad.ok());
  auto good = channel::Endpoint::connect(ow.socket_path(), ow.token_hex(), wo);
  CHECK(good.ok());
  pump.stop();
}

TEST_CASE("endpoint: a cancelled connect leaves the channel to the next worker", "[channel]") {
  // Carried note (attack run 4 A): Python's aio.connect, cancelled, let its executor
  // thread finish the handshake, and the owner took that abandoned connection as the
  // channel's one worker. The connect now watches a cancel descriptor.
  channel::OwnerOptions o;
  auto owner = channel::Endpoint::create_owner(o);
  REQUIRE(owner.ok());
  auto& ow = *owner.value();
  int pipe_fds[2];
  REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
  channel::WorkerOptions wo;
  wo.timeout_ms = 5000;
  wo.cancel_fd = pipe_fds[0];
  bool accepted = true;
  wo.accepted = &accepted;
  // The owner does not run yet: the worker sent its hello and waits for the welcome.
  std::thread canceller([&] {
    ::usleep(100000);
    ::close(pipe_fds[1]);
  });
  auto gone = channel::Endpoint::connect(ow.socket_path(), ow.token_hex(), wo);
  canceller.join();
  REQUIRE_FALSE(gone.ok());
  CHECK(gone.error().sys_errno == ECANCELED);
  CHECK_FALSE(accepted);
  // Already given up: nothing is even sent.
  accepted = true;
  auto never = channel::Endpoint::connect(ow.socket_path(), ow.token_hex(), wo);
  REQUIRE_FALSE(never.ok());
  CHECK(never.error().sys_errno == ECANCELED);
  CHECK_FALSE(accepted);
  ::close(pipe_fds[0]);
  // Now the owner reads the abandoned hello: its welcome cannot go out (the worker shut
  // the socket down), so it keeps listening and the real worker connects.
  spshm_test::OwnerPump pump(ow);
  channel::WorkerOptions real;
  real.timeout_ms = 3000;
  auto good = channel::Endpoint::connect(ow.socket_path(), ow.token_hex(), real);
  CHECK(good.ok());
  pump.stop();
}

TEST_CASE("endpoint: connections that stall in the handshake do not lock the real worker out",
          "[channel]") {
  // Session-4 attack: a process of the user connected to the control socket and said
  // nothing (or half a hello); the owner kept that one candidate for good and every real
  // worker timed out ("no welcome from the channel owner in time").
  channel::OwnerOptions o;
  auto owner = channel::Endpoint::create_owner(o);
  REQUIRE(owner.ok());
  auto& ow = *owner.value();
  spshm_test::OwnerPump pump(ow);
  std::vector<int> stallers;
  for (int i = 0; i < 3; ++i) {
    auto fd = channel::os::connect_unix(ow.socket_path());
    REQUIRE(fd.ok());
    if (i == 1) {  // half a hello: a frame header announcing 40 bytes, then nothing
      std::uint8_t half[12] = {40, 0, 0, 0, 16, 0, 0, 0, 1, 2, 3, 4};
      REQUIRE(::send(fd.value(), half, sizeof half, MSG_NOSIGNAL) == sizeof half);
    }
    stallers.push_back(fd.value());
    ::usleep(20000);  // each one accepted before the next arrives
  }
  channel::WorkerOptions wo;
  wo.timeout_ms = 3000;
  auto good = channel::Endpoint::connect(ow.socket_path(), ow.token_hex(), wo);
  INFO((good.ok() ? std::string("connected") : good.error().message));
  CHECK(good.ok());
  CHECK(ow.state() == channel::State::connected);
  pump.stop();
  for (int fd : stallers) ::close(fd);
}

TEST_CASE("endpoint: recv_wait sleeps on the edge-triggered doorbell, times out, sees the close",
          "[channel]") {
  channel::OwnerOptions o;
  o.ring_size = 16384;
  o.transport = channel::Wanted::shm;
  auto owner = channel::Endpoint::create_owner(o);
  REQUIRE(owner.ok());
  auto& ow = *owner.value();
  spshm_test::OwnerPump pump(ow);
  channel::WorkerOptions wo;
  auto worker = channel::Endpoint::connect(ow.socket_path(), ow.token_hex(), wo);
  REQUIRE(worker.ok());
  auto& wk = *worker.value();
  std::vector<std::uint8_t> buf(16384);
  struct Ctx {
    std::vector<std::uint8_t>* b;
  } ctx{&buf};
  auto alloc = [](void* c, std::size_t n) -> void* {
    auto* b = static_cast<Ctx*>(c)->b;
    return n <= b->size() ? b->data() : nullptr;
  };
  Error e{Errc::io_error, 0, {}};
  channel::Received r;

  // Nothing comes: the wait ends after its timeout, without a message.
  auto t0 = channel::os::monotonic_ns();
  CHECK(wk.recv_wait(alloc, &ctx, &r, &e, 0, 30) == channel::Io::would_block);
  CHECK(channel::os::monotonic_ns() - t0 >= 25'000'000ull);

  // Every message wakes the sleeping receiver (the doorbell eventfd is never read: an
  // edge-triggered registration reports each ring once), in order, none lost.
  constexpr int kCount = 3000;
  std::atomic<int> received{0};
  std::atomic<bool> in_order{true};
  std::thread rx([&] {
    Error re{Errc::io_error, 0, {}};
    channel::Received rr;
    for (int i = 0; i < kCount; ++i) {
      if (wk.recv_wait(alloc, &ctx, &rr, &re, i % 2 == 0 ? 0 : 20'000, 10'000) != channel::Io::ok) {
        break;
      }
      std::uint32_t v = 0;
      std::memcpy(&v, buf.data(), 4);
      if (rr.length != 4 || v != static_cast<std::uint32_t>(i)) in_order = false;
      received = i + 1;
    }
  });
  for (std::uint32_t i = 0; i < kCount; ++i) {
    if (i % 97 == 0) ::usleep(2000);  // let the receiver fall asleep now and then
    while (ow.send(&i, 4, &e) == channel::Io::would_block) ::usleep(100);
  }
  rx.join();
  CHECK(received.load() == kCount);
  CHECK(in_order.load());
  CHECK(ow.stats().doorbells_rung > 0);

  // The owner closes while the worker sleeps: recv_wait returns closed (peer_closed).
  std::thread closer([&] {
    ::usleep(50000);
    ow.close();
  });
  t0 = channel::os::monotonic_ns();
  CHECK(wk.recv_wait(alloc, &ctx, &r, &e, 10'000, 10'000) == channel::Io::closed);
  CHECK(channel::os::monotonic_ns() - t0 < 5'000'000'000ull);
  CHECK(wk.close_reason() == channel::CloseReason::peer_closed);
  closer.join();
  pump.stop();
}
