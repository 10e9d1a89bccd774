// board.hpp / board.cpp: layout agreement with docs/FORMAT.md, the seqlock under
// concurrent writers, least_loaded, claim/leave/reclaim, hostile slots.
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <thread>
#include <vector>

#include "board.hpp"
#include "catch.hpp"
#include "helpers.hpp"
#include "snakepit_shm.h"

using namespace spshm::board;
using namespace spshm_test;

namespace {

std::string field_json(const char* name, std::size_t offset, std::size_t size) {
  return "\"" + std::string(name) + "\":{\"offset\":" + std::to_string(offset) +
         ",\"size\":" + std::to_string(size) + "}";
}

#define H(f)                                                 \
  {                                                          \
#f, { offsetof(BoardHeader, f), sizeof(BoardHeader::f) } \
  }
#define S(f)                                             \
  {                                                      \
#f, { offsetof(BoardSlot, f), sizeof(BoardSlot::f) } \
  }

const std::map<std::string, LayoutRow> kHeader = {
    H(magic),          H(version),     H(header_size), H(slot_size),  H(capacity),
    H(stale_after_ms), H(gauge_names), H(created_ns),  H(generation), H(reserved)};
const std::map<std::string, LayoutRow> kSlot = {
    S(owner),     S(seq),       S(pid),       S(state),     S(start_time), S(updated_ns),
    S(queue),     S(in_flight), S(memory),    S(processed), S(errors),     S(gauges),
    S(id_length), S(reserved0), S(worker_id), S(joined_ns)};

/// A board in private, 64-byte aligned memory.
struct TestBoard {
  explicit TestBoard(std::uint32_t capacity, std::uint64_t stale_ms = 30000,
                     std::vector<std::string> gauges = {"a", "b"}) {
    bytes = board_bytes(capacity);
    memory.reset(static_cast<std::uint8_t*>(::operator new (bytes, std::align_val_t{64})));
    REQUIRE(View::init(memory.get(), bytes, capacity, stale_ms, gauges));
    REQUIRE(View::make(memory.get(), bytes, &view) == ViewStatus::ok);
  }
  struct Free {
    void operator()(std::uint8_t* p) const { ::operator delete (p, std::align_val_t{64}); }
  };
  std::unique_ptr<std::uint8_t, Free> memory;
  std::uint64_t bytes = 0;
  View view;
  BoardSlot& slot(std::uint32_t i) { return *view.slot(i); }
};

Values idle(std::uint64_t load) {
  Values v;
  v.state = static_cast<std::uint32_t>(WorkerState::idle);
  v.queue = load;
  return v;
}

}  // namespace

TEST_CASE("board layout: static facts, JSON and docs/FORMAT.md agree", "[board]") {
  std::string json = board_layout_description();
  for (const auto& [name, row] : kHeader)
    REQUIRE(json.find(field_json(name.c_str(), row.offset, row.size)) != std::string::npos);
  for (const auto& [name, row] : kSlot)
    REQUIRE(json.find(field_json(name.c_str(), row.offset, row.size)) != std::string::npos);
  auto header_doc = format_md_rows("Status board header");
  auto slot_doc = format_md_rows("Status board slot");
  REQUIRE(header_doc.size() == kHeader.size());
  REQUIRE(slot_doc.size() == kSlot.size());
  for (const auto& [name, row] : kHeader) {
    INFO(name);
    REQUIRE(header_doc.count(name) == 1);
    REQUIRE(header_doc[name].offset == row.offset);
    REQUIRE(header_doc[name].size == row.size);
  }
  for (const auto& [name, row] : kSlot) {
    INFO(name);
    REQUIRE(slot_doc.count(name) == 1);
    REQUIRE(slot_doc[name].offset == row.offset);
    REQUIRE(slot_doc[name].size == row.size);
  }
  REQUIRE(json.find("\"magic\":\"SPSHMBRD\"") != std::string::npos);
  REQUIRE(json.find("\"slot_size\":192") != std::string::npos);
  REQUIRE(json.find("\"max_capacity\":65536") != std::string::npos);
  // The C ABI reports the same JSON.
  std::vector<char> buf(spshm_board_layout(nullptr, 0) + 1);
  spshm_board_layout(buf.data(), buf.size());
  REQUIRE(std::string(buf.data()) == json);
}

TEST_CASE("board: join, update, read, leave, reuse, full", "[board]") {
  TestBoard b(3);
  std::uint32_t i0, i1, i2, ix;
  std::uint64_t o0, o1, o2, ox;
  REQUIRE(b.view.join("w0", 10, 100, &i0, &o0));
  REQUIRE(b.view.join("w1", 11, 101, &i1, &o1));
  REQUIRE(b.view.join("w2", 12, 102, &i2, &o2));
  REQUIRE_FALSE(b.view.join("w3", 13, 103, &ix, &ox));  // full
  Entry e;
  REQUIRE(b.view.read(i1, monotonic_ns(), &e) == ReadStatus::ok);
  REQUIRE(e.worker_id == "w1");
  REQUIRE(e.values.state == static_cast<std::uint32_t>(WorkerState::starting));
  REQUIRE(e.pid == 11);
  REQUIRE(b.view.update(i1, o1, idle(5)));
  REQUIRE(b.view.read(i1, monotonic_ns(), &e) == ReadStatus::ok);
  REQUIRE(e.values.queue == 5);
  REQUIRE(b.view.leave(i1, o1));
  REQUIRE_FALSE(b.view.leave(i1, o1));
  REQUIRE_FALSE(b.view.update(i1, o1, idle(1)));  // no longer ours
  REQUIRE(b.view.read(i1, monotonic_ns(), &e) == ReadStatus::free);
  REQUIRE(b.view.join("w3", 13, 103, &ix, &ox));  // reused, new incarnation
  REQUIRE(ix == i1);
  REQUIRE(ox != o1);
  REQUIRE_FALSE(b.view.update(i1, o1, idle(1)));  // the old owner word is refused (ABA)
  REQUIRE(b.view.generation() == 5);
}

TEST_CASE("board: least_loaded prefers idle, then load; ties round-robin", "[board]") {
  TestBoard b(16);
  std::vector<std::pair<std::uint32_t, std::uint64_t>> s(6);
  for (int k = 0; k < 6; ++k)
    REQUIRE(b.view.join("w" + std::to_string(k), 1, 1, &s[k].first, &s[k].second));
  Values busy;
  busy.state = static_cast<std::uint32_t>(WorkerState::busy);
  REQUIRE(b.view.update(s[0].first, s[0].second, busy));     // busy, load 0
  REQUIRE(b.view.update(s[1].first, s[1].second, idle(3)));  // idle, load 3
  REQUIRE(b.view.update(s[2].first, s[2].second, idle(1)));  // idle, load 1
  REQUIRE(b.view.update(s[3].first, s[3].second, idle(1)));  // idle, load 1
  Values draining = idle(0);
  draining.state = static_cast<std::uint32_t>(WorkerState::draining);
  REQUIRE(b.view.update(s[4].first, s[4].second, draining));  // not routable
  // s[5] stays starting: not routable
  std::map<std::string, int> counts;
  for (int r = 0; r < 1000; ++r) counts[b.view.least_loaded(monotonic_ns(), r, {}).worker_id]++;
  REQUIRE(counts.size() == 2);
  REQUIRE(counts["w2"] == 500);
  REQUIRE(counts["w3"] == 500);
  auto p = b.view.least_loaded(monotonic_ns(), 0, {"w2", "w3"});
  REQUIRE(p.found);
  REQUIRE(p.worker_id == "w1");
  p = b.view.least_loaded(monotonic_ns(), 0, {"w1", "w2", "w3"});
  REQUIRE(p.worker_id == "w0");  // busy only when no idle is left
  p = b.view.least_loaded(monotonic_ns(), 0, {"w0", "w1", "w2", "w3"});
  REQUIRE_FALSE(p.found);
}

TEST_CASE("board: stale entries are skipped, future timestamps too", "[board]") {
  TestBoard b(2, 50);
  std::uint32_t i;
  std::uint64_t o;
  REQUIRE(b.view.join("w", 1, 1, &i, &o));
  REQUIRE(b.view.update(i, o, idle(0)));
  REQUIRE(b.view.least_loaded(monotonic_ns(), 0, {}).found);
  REQUIRE_FALSE(b.view.least_loaded(monotonic_ns() + 60'000'000, 0, {}).found);
  Entry e;
  REQUIRE(b.view.read(i, monotonic_ns() + 60'000'000, &e) == ReadStatus::ok);
  REQUIRE(e.stale);
  b.slot(i).updated_ns.store(monotonic_ns() + 5'000'000'000ull);  // hostile: 5 s ahead
  REQUIRE_FALSE(b.view.least_loaded(monotonic_ns(), 0, {}).found);
}

TEST_CASE("board: reclaim frees the slots of one (pid, start time) only", "[board]") {
  TestBoard b(8);
  std::uint32_t i;
  std::uint64_t o;
  REQUIRE(b.view.join("a1", 100, 7, &i, &o));
  REQUIRE(b.view.join("a2", 100, 7, &i, &o));
  REQUIRE(b.view.join("reused-pid", 100, 8, &i, &o));
  REQUIRE(b.view.join("b", 200, 7, &i, &o));
  auto owners = b.view.owners();  // distinct (pid, start time) pairs of live slots
  REQUIRE(owners.size() == 3);
  REQUIRE(b.view.reclaim(100, 7) == 2);
  REQUIRE(b.view.owners().size() == 2);
  REQUIRE(b.view.reclaim(100, 7) == 0);
  int live = 0;
  Entry e;
  for (std::uint32_t k = 0; k < 8; ++k)
    live += b.view.read(k, monotonic_ns(), &e) == ReadStatus::ok;
  REQUIRE(live == 2);
}

TEST_CASE("board: no torn read while writer threads hammer their slots", "[board]") {
  TestBoard b(8);
  constexpr int kWriters = 3;
  std::atomic<bool> stop{false};
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    std::uint32_t index;
    std::uint64_t owner;
    REQUIRE(b.view.join("writer" + std::to_string(w), 1, 1, &index, &owner));
    writers.emplace_back([&, index, owner] {
      for (std::uint64_t n = 1; !stop.load(std::memory_order_relaxed); ++n) {
        Values v;
        v.state = static_cast<std::uint32_t>(n % 2 ? WorkerState::idle : WorkerState::busy);
        v.queue = n;
        v.in_flight = n * 3;
        v.memory = ~n;
        v.processed = n * 7;
        v.errors = n ^ 0x5555;
        for (std::uint32_t g = 0; g < kGaugeCount; ++g)
          v.gauges[g] = -static_cast<std::int64_t>(n + g);
        b.view.update(index, owner, v);
      }
    });
  }
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1500);
  std::uint64_t reads = 0, unreadable = 0;
  while (std::chrono::steady_clock::now() < until) {
    for (std::uint32_t k = 0; k < kWriters; ++k) {
      Entry e;
      auto st = b.view.read(k, monotonic_ns(), &e);
      if (st == ReadStatus::unreadable) {
        ++unreadable;
        continue;
      }
      REQUIRE(st == ReadStatus::ok);
      std::uint64_t n = e.values.queue;
      if (n == 0) continue;  // not yet written
      ++reads;
      REQUIRE(e.values.in_flight == n * 3);
      REQUIRE(e.values.memory == ~n);
      REQUIRE(e.values.processed == n * 7);
      REQUIRE(e.values.errors == (n ^ 0x5555));
      REQUIRE(e.values.state == (n % 2 ? 1u : 2u));
      for (std::uint32_t g = 0; g < kGaugeCount; ++g)
        REQUIRE(e.values.gauges[g] == -static_cast<std::int64_t>(n + g));
    }
  }
  stop = true;
  for (auto& t : writers) t.join();
  REQUIRE(reads > 1000);
  INFO("unreadable " << unreadable);
}

TEST_CASE("board: hostile slots never hang a reader", "[board]") {
  TestBoard b(4096);
  for (std::uint32_t k = 0; k < 4096; ++k) {
    std::uint32_t i;
    std::uint64_t o;
    REQUIRE(b.view.join("w" + std::to_string(k), 1, 1, &i, &o));
    REQUIRE(b.view.update(i, o, idle(k)));
  }
  // Every sequence stuck odd (a writer killed mid-update, or a hostile peer).
  for (std::uint32_t k = 0; k < 4096; ++k) b.slot(k).seq.fetch_or(1);
  auto t0 = std::chrono::steady_clock::now();
  auto p = b.view.least_loaded(monotonic_ns(), 0, {});
  auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
          .count();
  REQUIRE_FALSE(p.found);
  REQUIRE(p.unreadable == 4096);
  REQUIRE(ms < 1000);
  Entry e;
  std::uint32_t budget = 0;
  REQUIRE(b.view.read(5, monotonic_ns(), &e, &budget) == ReadStatus::unreadable);
  // One slot fixed by its writer: the writer starts past the odd value, readers agree again.
  b.slot(3).seq.fetch_or(1);
  REQUIRE(b.view.read(3, monotonic_ns(), &e) == ReadStatus::unreadable);

  // Garbage everywhere in the slots: reads stay in bounds, ids clamped to 64 bytes.
  std::uint8_t* slots = b.memory.get() + kBoardHeaderSize;
  for (std::uint64_t k = 0; k < 4096ull * kSlotSize; ++k)
    slots[k] = static_cast<std::uint8_t>(k * 131 + 7);
  for (std::uint32_t k = 0; k < 4096; ++k) {
    b.slot(k).owner.store(kSlotLive);
    b.slot(k).seq.store(2);
    b.slot(k).id_length.store(0xffffffffu);
  }
  REQUIRE(b.view.read(1, monotonic_ns(), &e) == ReadStatus::ok);
  REQUIRE(e.worker_id.size() == 64);
  (void)b.view.least_loaded(monotonic_ns(), 0, {"x"});
}

TEST_CASE("board: views refuse damaged headers", "[board]") {
  TestBoard b(4);
  View v;
  REQUIRE(View::make(b.memory.get(), 100, &v) == ViewStatus::too_small);
  REQUIRE(View::make(b.memory.get(), board_bytes(3), &v) == ViewStatus::bad_geometry);
  auto* h = reinterpret_cast<BoardHeader*>(b.memory.get());
  h->capacity = 70000;
  REQUIRE(View::make(b.memory.get(), b.bytes, &v) == ViewStatus::bad_geometry);
  h->capacity = 4;
  h->version = 2;
  REQUIRE(View::make(b.memory.get(), b.bytes, &v) == ViewStatus::bad_version);
  h->magic[0] = 'X';
  REQUIRE(View::make(b.memory.get(), b.bytes, &v) == ViewStatus::bad_magic);
  // The view made before keeps its own copy of the geometry.
  h->capacity = 0xffffffffu;
  REQUIRE(b.view.capacity() == 4);
  REQUIRE_FALSE(View::init(b.memory.get(), b.bytes, 4, 100, {std::string(32, 'x')}));
  REQUIRE_FALSE(View::init(b.memory.get(), b.bytes, 0, 100, {}));
  REQUIRE_FALSE(View::init(b.memory.get(), b.bytes, 5, 100, {}));
}

TEST_CASE("board C ABI: join, update fast path, leave, full", "[board]") {
  TestBoard b(1);
  std::uint32_t index = 9, capacity = 0;
  std::uint64_t owner = 0;
  char err[256];
  REQUIRE(spshm_board_join(b.memory.get(), b.bytes, "py", 2, 5, 6, &index, &owner, &capacity, err,
                           sizeof err) == SPSHM_OK);
  REQUIRE(index == 0);
  REQUIRE(capacity == 1);
  REQUIRE(spshm_board_join(b.memory.get(), b.bytes, "py2", 3, 5, 6, &index, &owner, &capacity, err,
                           sizeof err) == SPSHM_E_BOARD_FULL);
  REQUIRE(std::string(err).find("all 1 slots") != std::string::npos);
  std::uint64_t values[10] = {1, 4, 2, 1000, 9, 1, 0, 0, 0, static_cast<std::uint64_t>(-3)};
  void* slot = b.memory.get() + kBoardHeaderSize;
  REQUIRE(spshm_board_update(slot, owner, values) == SPSHM_OK);
  Entry e;
  REQUIRE(b.view.read(0, monotonic_ns(), &e) == ReadStatus::ok);
  REQUIRE(e.values.queue == 4);
  REQUIRE(e.values.gauges[3] == -3);
  REQUIRE(spshm_board_update(slot, owner + 1, values) == SPSHM_E_CLOSED);
  REQUIRE(spshm_board_leave(b.memory.get(), b.bytes, 0, owner, err, sizeof err) == SPSHM_OK);
  REQUIRE(spshm_board_leave(b.memory.get(), b.bytes, 0, owner, err, sizeof err) == SPSHM_E_CLOSED);
  std::uint8_t junk[600] = {};
  REQUIRE(spshm_board_join(junk, sizeof junk, "py", 2, 5, 6, &index, &owner, nullptr, err,
                           sizeof err) == SPSHM_E_CORRUPT);
}

#if defined(__linux__)
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

namespace {
// Two opens of one file (distinct open file descriptions: their OFD locks conflict).
struct LockFile {
  LockFile() {
    char path[] = "/tmp/spshm_board_locks_XXXXXX";
    a = ::mkstemp(path);
    REQUIRE(a >= 0);
    b = ::open(path, O_RDWR | O_CLOEXEC);
    REQUIRE(b >= 0);
    c = ::open(path, O_RDWR | O_CLOEXEC);
    REQUIRE(c >= 0);
    ::unlink(path);
  }
  ~LockFile() {
    if (a >= 0) ::close(a);
    if (b >= 0) ::close(b);
    if (c >= 0) ::close(c);
  }
  void close_a() {
    ::close(a);
    a = -1;
  }
  int a = -1, b = -1, c = -1;
};
}  // namespace

TEST_CASE("board: owners hold their slot's lock; a dead owner is seen and recovered", "[board]") {
  TestBoard board(2);
  LockFile f;
  std::uint32_t index = 0;
  std::uint64_t owner = 0;
  REQUIRE(board.view.join_locked("w", 100, 1, SlotLocks(f.a), true, 100, &index, &owner));
  REQUIRE(board.view.owner_alive(index, SlotLocks(f.b)) == 1);
  // Not recovered while its owner lives; another open takes the other slot.
  REQUIRE_FALSE(board.view.recover_dead(index, SlotLocks(f.b)));
  std::uint32_t other = 0;
  std::uint64_t other_owner = 0;
  REQUIRE(board.view.join_locked("x", 200, 1, SlotLocks(f.b), true, 200, &other, &other_owner));
  REQUIRE(other != index);
  std::uint32_t third = 0;
  std::uint64_t third_owner = 0;
  // Full: both owners alive (asked through a third open: the locks of one open never
  // conflict with each other, which is why a VM skips the slots of its own pid).
  REQUIRE_FALSE(
      board.view.join_locked("y", 300, 1, SlotLocks(f.c), true, 300, &third, &third_owner));
  f.close_a();  // what the kernel does when the owner dies
  REQUIRE(board.view.owner_alive(index, SlotLocks(f.b)) == 0);
  REQUIRE(board.view.recover_dead(index, SlotLocks(f.b)));
  Entry e;
  REQUIRE(board.view.read(index, monotonic_ns(), &e) == ReadStatus::free);
  REQUIRE_FALSE(board.view.update(index, owner, Values{}));  // the dead owner's word is void
  REQUIRE(board.view.leave(other, other_owner, nullptr));
}

TEST_CASE("board: a slot left busy by an owner killed mid-join is taken over", "[board]") {
  TestBoard board(1);
  LockFile f;
  std::uint32_t index = 0;
  std::uint64_t owner = 0;
  REQUIRE(board.view.join_locked("w", 100, 1, SlotLocks(f.a), true, 100, &index, &owner));
  // Killed between the claim and its first write: busy, and its lock goes with it.
  board.slot(index).owner.store((owner & 0xffffffff00000000ull) | kSlotBusy);
  std::uint32_t again = 0;
  std::uint64_t again_owner = 0;
  // The same process (pid 100) never takes over its own slots.
  REQUIRE_FALSE(
      board.view.join_locked("z", 100, 1, SlotLocks(f.b), true, 100, &again, &again_owner));
  f.close_a();
  REQUIRE(board.view.join_locked("z", 200, 1, SlotLocks(f.b), true, 200, &again, &again_owner));
  REQUIRE(again == index);
  REQUIRE(again_owner != owner);
  Entry e;
  REQUIRE(board.view.read(index, monotonic_ns(), &e) == ReadStatus::ok);
  REQUIRE(e.worker_id == "z");
}
#endif
