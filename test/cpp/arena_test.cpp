// arena.hpp / arena.cpp and arena regions of region.cpp: layout (against docs/FORMAT.md),
// allocation without overlap, growth, reuse only once no other open holds a chunk,
// locks at the chunk's offset, sealing without a kernel seal, return of empty arenas.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "arena.hpp"
#include "format.hpp"
#include "helpers.hpp"
#include "platform.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

CreateOptions arena_options(std::uint64_t size) {
  CreateOptions o = options(BackendKind::memfd, size);
  o.arena = true;
  return o;
}

/// The `| fact | value | meaning |` rows of docs/FORMAT.md "## Arenas".
std::map<std::string, std::string> arena_md_rows() {
  std::map<std::string, std::string> rows;
  for (const auto& cells : format_md_table("Arenas"))
    if (cells.size() >= 2) rows[cells[0]] = cells[1];
  return rows;
}

/// A second open of the arena behind `region` (as a worker's attach makes): its locks
/// conflict with the VM's.
platform::Handle other_open(const Region& region) {
  int fd = ::open(region.control_path().c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  return platform::Handle(fd);
}

void drain_arenas() {
  process_arenas().configure(8u << 20, std::chrono::milliseconds(0));
  process_arenas().maintain();
}

}  // namespace

TEST_CASE("arena layout: docs/FORMAT.md, the layout JSON and a created chunk agree", "[arena]") {
  if (!arenas_supported()) return;  // arenas need Linux with 4 KiB pages
  auto rows = arena_md_rows();
  REQUIRE(rows["backend"] == std::to_string(static_cast<int>(BackendKind::memfd)));
  REQUIRE(rows["flags.arena"] == std::to_string(kFlagArena));
  REQUIRE(rows["arena_data_offset"] == std::to_string(kHeaderSize));
  REQUIRE(rows["lock_base"] == "control_offset");
  std::string json = layout_description();
  REQUIRE(json.find("\"arena\":" + std::to_string(kFlagArena)) != std::string::npos);
  REQUIRE(json.find("\"arena_data_offset\":" + std::to_string(kHeaderSize)) != std::string::npos);

  Region a = create_ok(arena_options(100));
  Region b = create_ok(arena_options(5000));
  REQUIRE(a.in_arena());
  REQUIRE(b.in_arena());
  REQUIRE(a.control_path() == b.control_path());  // one arena, one descriptor
  REQUIRE(a.data_path() == a.control_path());
  const RegionHeader& h = b.header();
  REQUIRE(h.backend == static_cast<std::uint32_t>(BackendKind::memfd));
  REQUIRE((h.flags & kFlagArena) != 0);
  REQUIRE((h.flags & kFlagSplitData) == 0);
  REQUIRE(h.data_offset == kHeaderSize);
  REQUIRE(b.control_offset() % 4096 == 0);
  REQUIRE(a.control_offset() != b.control_offset());
  REQUIRE(reinterpret_cast<std::uintptr_t>(b.data()) % 4096 == 0);
  REQUIRE(b.data() == reinterpret_cast<const std::uint8_t*>(&h) + kHeaderSize);
  REQUIRE_OK(validate_header(h, process_arenas().arena_bytes() - b.control_offset()));

  // Not eligible: dedicated regions, whatever `arena` says.
  CreateOptions named = arena_options(100);
  named.security_level = 1;
  named.encrypted = true;
  REQUIRE_FALSE(arena_eligible(named));
  CreateOptions shared = arena_options(100);
  shared.mode = 0640;
  REQUIRE_FALSE(arena_eligible(shared));
  CreateOptions posix = arena_options(100);
  posix.backend = BackendKind::posix;
  REQUIRE_FALSE(arena_eligible(posix));
}

TEST_CASE("arena: many regions, no overlap, growth by new arenas, all freed", "[arena]") {
  if (!arenas_supported()) return;  // arenas need Linux with 4 KiB pages
  drain_arenas();
  process_arenas().configure(1u << 20, std::chrono::milliseconds(0));
  ArenaStats before = process_arenas().stats();
  std::vector<Region> regions;
  std::set<std::pair<std::string, std::uint64_t>> places;
  // 40 regions of up to 60 KiB in 1 MiB arenas: several arenas.
  for (int i = 0; i < 40; ++i) {
    std::uint64_t size = 1 + static_cast<std::uint64_t>(i) * 1531 % 61440;
    regions.push_back(create_ok(arena_options(size)));
    Region& r = regions.back();
    REQUIRE(r.in_arena());
    REQUIRE(places.emplace(r.control_path(), r.control_offset()).second);
    std::vector<std::uint8_t> pattern(size, static_cast<std::uint8_t>(i + 1));
    REQUIRE_OK(r.write(0, pattern.data(), pattern.size()));
  }
  ArenaStats grown = process_arenas().stats();
  REQUIRE(grown.created - before.created >= 2);
  REQUIRE(grown.live_chunks == 40);
  for (int i = 0; i < 40; ++i) {
    Region& r = regions[static_cast<std::size_t>(i)];
    std::vector<std::uint8_t> got(r.size());
    REQUIRE_OK(r.read(0, got.data(), got.size()));
    for (std::uint8_t byte : got) REQUIRE(byte == static_cast<std::uint8_t>(i + 1));
    REQUIRE(r.header().state.load() == 0);
  }
  regions.clear();
  ArenaStats freed = process_arenas().stats();
  REQUIRE(freed.live_chunks == 0);
  REQUIRE(freed.pending_chunks == 0);
  REQUIRE(process_arenas().maintain() >= 2);  // grace 0: every empty arena goes back
  REQUIRE(process_arenas().stats().arenas == 0);
  process_arenas().configure(8u << 20, std::chrono::milliseconds(30000));
}

TEST_CASE("arena: a chunk another open holds is not reused until it lets go", "[arena]") {
  if (!arenas_supported()) return;  // arenas need Linux with 4 KiB pages
  drain_arenas();
  std::string path;
  std::uint64_t offset = 0;
  platform::Handle worker;
  {
    Region r = create_ok(arena_options(4096));
    std::vector<std::uint8_t> pattern(4096, 0xAB);
    REQUIRE_OK(r.write(0, pattern.data(), pattern.size()));
    path = r.control_path();
    offset = r.control_offset();
    worker = other_open(r);
    REQUIRE_OK(platform::lock_shared(worker, offset + kLivenessLockByte));
  }  // the VM drops the region: the chunk is pending
  REQUIRE(process_arenas().stats().pending_chunks == 1);
  std::vector<Region> others;
  for (int i = 0; i < 64; ++i) {
    others.push_back(create_ok(arena_options(4096)));
    REQUIRE(others.back().control_offset() != offset);
  }
  // The worker still sees its bytes, and the header says deallocated.
  std::vector<std::uint8_t> seen(4096);
  REQUIRE(::pread(static_cast<int>(worker.native()), seen.data(), seen.size(),
                  static_cast<off_t>(offset + kHeaderSize)) == 4096);
  for (std::uint8_t byte : seen) REQUIRE(byte == 0xAB);
  RegionHeader copy;
  REQUIRE(::pread(static_cast<int>(worker.native()), &copy, sizeof copy,
                  static_cast<off_t>(offset)) == static_cast<ssize_t>(sizeof copy));
  REQUIRE((copy.state.load() & kStateDeallocated) != 0);
  worker = platform::Handle();  // the worker lets go (close drops its lock)
  process_arenas().maintain();
  REQUIRE(process_arenas().stats().pending_chunks == 0);
  others.clear();
  // Reused zeroed.
  Region again = create_ok(arena_options(4096));
  std::vector<std::uint8_t> fresh(4096, 1);
  REQUIRE_OK(again.read(0, fresh.data(), fresh.size()));
  for (std::uint8_t byte : fresh) REQUIRE(byte == 0);
}

TEST_CASE("arena: holder slots and locks live at the chunk's offset", "[arena]") {
  if (!arenas_supported()) return;  // arenas need Linux with 4 KiB pages
  Region a = create_ok(arena_options(4096));
  Region b = create_ok(arena_options(4096));
  REQUIRE_OK(a.hold(platform::current_pid(), 1, true));
  // A worker's open holds a slot of b through its own open, at b's offset.
  platform::Handle worker = other_open(b);
  int slot = -1;
  REQUIRE_OK(hold_on(b.header(), worker, slot, 4242, 7, false, b.control_offset()));
  REQUIRE(slot >= 0);
  REQUIRE(reference_count(b.header()) == 1);
  REQUIRE(b.reap_dead_holders() == 0);  // alive: its lock is held
  REQUIRE(reference_count(a.header()) == 1);
  REQUIRE(a.reap_dead_holders() == 0);  // a's own slot is never reaped
  // The worker dies: its slot is reaped through the VM's open of the arena.
  worker = platform::Handle();
  REQUIRE(b.reap_dead_holders() == 1);
  REQUIRE(reference_count(b.header()) == 0);
  REQUIRE_OK(a.release());
  REQUIRE(reference_count(a.header()) == 0);
}

TEST_CASE("arena: seal is the header's word, reads are never zero-copy", "[arena]") {
  if (!arenas_supported()) return;  // arenas need Linux with 4 KiB pages
  Region r = create_ok(arena_options(100));
  std::uint8_t byte = 7;
  REQUIRE_OK(r.write(0, &byte, 1));
  REQUIRE_OK(r.seal());
  REQUIRE(r.sealed());
  REQUIRE_FALSE(r.immutable());
  REQUIRE_ERR(r.write(0, &byte, 1), Errc::sealed);
  // The arena itself keeps no seal: its other regions stay writable.
  Region other = create_ok(arena_options(100));
  REQUIRE_OK(other.write(0, &byte, 1));
  REQUIRE_OK(r.deallocate(true));
  REQUIRE(r.header().state.load() & kStateDeallocated);
}

TEST_CASE("arena: another open reaches a region by its arena path and offset", "[arena]") {
  if (!arenas_supported()) return;  // arenas need Linux with 4 KiB pages
  Region r = create_ok(arena_options(5000));
  std::vector<std::uint8_t> pattern(5000, 0x5A);
  REQUIRE_OK(r.write(0, pattern.data(), pattern.size()));
  auto opened = open_arena_region(r.control_path(), r.control_offset(), r.id(), true);
  REQUIRE_OK(opened);
  Region& o = opened.value();
  REQUIRE(o.id() == r.id());
  REQUIRE(o.in_arena());
  REQUIRE(o.control_offset() == r.control_offset());
  std::vector<std::uint8_t> got(5000);
  REQUIRE_OK(o.read(0, got.data(), got.size()));
  REQUIRE(got == pattern);
  REQUIRE_OK(o.hold(4242, 1, false));
  REQUIRE(reference_count(r.header()) == 1);
  REQUIRE(r.reap_dead_holders() == 0);  // its open lives
  // Wrong offsets and ids are refused.
  REQUIRE_ERR(open_arena_region(r.control_path(), r.control_offset() + 1, "", false),
              Errc::invalid_argument);
  REQUIRE_ERR(open_arena_region(r.control_path(), r.control_offset(), random_region_id(), false),
              Errc::not_found);
  // Its open keeps the chunk: destroyed here, the region is pending, not reused.
  { Region gone = std::move(r); }
  REQUIRE(process_arenas().stats().pending_chunks >= 1);
  opened = Error{Errc::not_found, 0, ""};  // drops o: its open and locks
  process_arenas().maintain();
  Region again = create_ok(arena_options(5000));
  REQUIRE(process_arenas().stats().pending_chunks == 0);
}

TEST_CASE("arena: a deallocated region's locks go at once, its chunk when the Region goes",
          "[arena]") {
  if (!arenas_supported()) return;  // arenas need Linux with 4 KiB pages
  drain_arenas();
  Region r = create_ok(arena_options(4096));
  std::uint64_t offset = r.control_offset();
  platform::Handle probe = other_open(r);  // sees the VM's locks (another open)
  // One hold and its release: the Region keeps its free slot's lock (keep_lock).
  REQUIRE_OK(r.hold(platform::current_pid(), 1, true));
  REQUIRE_OK(r.release());
  auto held = [&](std::uint64_t byte) {
    auto r = platform::lock_is_held(probe, byte);
    REQUIRE(r);
    return *r;
  };
  auto slot_locked = [&] {
    for (std::uint64_t i = 0; i < kHolderCapacity; ++i) {
      if (held(offset + kSlotLockBase + i)) return true;
    }
    return false;
  };
  REQUIRE(held(offset + kLivenessLockByte));
  REQUIRE(slot_locked());
  r.release_arena_locks();  // not deallocated: nothing changes
  REQUIRE(held(offset + kLivenessLockByte));
  REQUIRE(slot_locked());

  REQUIRE_OK(r.deallocate(false));
  r.release_arena_locks();
  r.release_arena_locks();  // idempotent
  REQUIRE_FALSE(held(offset + kLivenessLockByte));
  REQUIRE_FALSE(slot_locked());
  // The chunk stays reserved while the Region lives (a stale handle may still read it).
  std::vector<Region> others;
  for (int i = 0; i < 16; ++i) {
    others.push_back(create_ok(arena_options(4096)));
    REQUIRE(others.back().control_offset() != offset);
  }
  std::uint8_t byte = 0;
  REQUIRE(r.read(0, &byte, 1).error().code == Errc::deallocated);
  REQUIRE(r.hold(platform::current_pid(), 1, true).error().code == Errc::deallocated);
  probe = platform::Handle();
  r = create_ok(arena_options(64));  // the old Region goes: its chunk is reusable
  others.clear();
  REQUIRE(process_arenas().stats().pending_chunks == 0);
}

TEST_CASE("arena: a deallocated region a worker still holds keeps its chunk pending", "[arena]") {
  if (!arenas_supported()) return;  // arenas need Linux with 4 KiB pages
  drain_arenas();
  std::uint64_t offset = 0;
  platform::Handle worker;
  {
    Region r = create_ok(arena_options(4096));
    offset = r.control_offset();
    worker = other_open(r);
    REQUIRE_OK(platform::lock_shared(worker, offset + kLivenessLockByte));
    // A hold of the VM that was never released: its slot's lock stays with the Region.
    REQUIRE_OK(r.hold(platform::current_pid(), 1, true));
    REQUIRE_OK(r.deallocate(false));
    r.release_arena_locks();
    platform::Handle probe = other_open(r);
    auto held = platform::lock_is_held(probe, offset + kLivenessLockByte);
    REQUIRE(held);
    REQUIRE(*held);  // the worker's
  }
  REQUIRE(process_arenas().stats().pending_chunks == 1);
  for (int i = 0; i < 16; ++i) REQUIRE(create_ok(arena_options(4096)).control_offset() != offset);
  worker = platform::Handle();
  process_arenas().maintain();
  REQUIRE(process_arenas().stats().pending_chunks == 0);
}
