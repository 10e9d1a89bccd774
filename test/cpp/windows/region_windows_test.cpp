// Region (region.cpp, region_open.cpp, inspect.cpp) on the Windows backend: the same
// header format and errors as on Linux, through the Windows OS layer.
#include <algorithm>
#include <cstring>

#include "win_test.hpp"

using namespace spshm;
using namespace spshm_test;
using namespace spshm_wintest;

TEST_CASE("a windows region is created, written, read back and reopened", "[windows][region]") {
  Region r = create_ok(windows_options(100000));
  REQUIRE(r.backend() == BackendKind::windows);
  REQUIRE(r.id().rfind("spshm_", 0) == 0);
  REQUIRE(r.control_path() == "Local\\" + r.id());
  REQUIRE(r.data_path() == r.control_path());
  auto bytes = pattern(100000, 1);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));

  const RegionHeader& h = r.header();
  REQUIRE(std::memcmp(h.magic, kMagic, sizeof kMagic) == 0);
  REQUIRE(h.backend == static_cast<std::uint32_t>(BackendKind::windows));
  REQUIRE(h.data_offset == kHeaderSize);
  REQUIRE(h.creator_pid == self_pid());
  REQUIRE(h.creator_start_time == process_start_time(self_pid()).value());
  REQUIRE(std::memcmp(h.boot_id, boot_id().data(), 16) == 0);
  REQUIRE(header_crc(h) == h.header_crc32);
  REQUIRE_OK(validate_header(h, kHeaderSize + 102400));

  auto again = Region::open(OpenTarget{r.id(), {}, {}}, false);
  REQUIRE_OK(again);
  REQUIRE(again->role() == Role::opened);
  REQUIRE(again->size() == 100000);
  REQUIRE(page_protection(again->data()) == PAGE_READONLY);
  std::vector<std::uint8_t> out(100000);
  REQUIRE_OK(again->read(0, out.data(), out.size()));
  REQUIRE(out == bytes);
  REQUIRE_ERR(again->write(0, bytes.data(), 1), Errc::permission_denied);

  auto by_path = Region::open(OpenTarget{{}, r.control_path(), {}}, true);
  REQUIRE_OK(by_path);
  REQUIRE(by_path->data() != r.data());  // another view of the same memory
  REQUIRE_OK(by_path->write(99999, bytes.data(), 1));
  std::uint8_t last = 0;
  REQUIRE_OK(r.read(99999, &last, 1));
  REQUIRE(last == bytes[0]);
}

TEST_CASE("named regions: open modes", "[windows][region]") {
  CreateOptions o = windows_options(5000);
  o.name = unique_name("modes");
  Region first = create_ok(o);
  REQUIRE(first.id() == named_region_id(o.name));
  REQUIRE(first.role() == Role::created);
  REQUIRE_ERR(Region::create(o), Errc::already_exists);
  o.open_mode = OpenMode::create_or_open;
  Region second = create_ok(o);
  REQUIRE(second.role() == Role::opened);
  o.open_mode = OpenMode::open_only;
  REQUIRE(create_ok(o).role() == Role::opened);
  // Windows cannot take a name away from its holders: no remove_and_create while open.
  o.open_mode = OpenMode::remove_and_create;
  REQUIRE_ERR(Region::create(o), Errc::busy);
  o.name = unique_name("absent");
  o.open_mode = OpenMode::open_only;
  REQUIRE_ERR(Region::create(o), Errc::not_found);
  o.open_mode = OpenMode::remove_and_create;
  REQUIRE(create_ok(o).role() == Role::created);
}

TEST_CASE("backends and options Windows cannot honour fail clearly", "[windows][region]") {
  REQUIRE_ERR(Region::create(options(BackendKind::posix, 10)), Errc::unsupported);
  REQUIRE_ERR(Region::create(options(BackendKind::memfd, 10)), Errc::unsupported);
  CreateOptions shared = windows_options(10);
  shared.mode = 0640;
  REQUIRE_ERR(Region::create(shared), Errc::invalid_argument);
  CreateOptions encrypted = windows_options(10);
  encrypted.encrypted = true;
  auto r = Region::create(encrypted);
  REQUIRE_ERR(r, Errc::unsupported);
  REQUIRE(r.error().message.find("libsodium") != std::string::npos);
}

TEST_CASE("a header's CRC covers the prefix and the metadata only", "[windows][format]") {
  CreateOptions o = windows_options(100);
  o.metadata_json = "{\"dtype\":\"float32\"}";
  Region r = create_ok(o);
  RegionHeader& h = r.header();
  std::uint32_t crc = header_crc(h);
  REQUIRE(crc == h.header_crc32);
  std::vector<std::uint8_t> covered(reinterpret_cast<std::uint8_t*>(&h),
                                    reinterpret_cast<std::uint8_t*>(&h) + kCrcCoveredPrefix);
  covered.insert(covered.end(), h.metadata, h.metadata + h.metadata_length);
  REQUIRE(crc32(covered.data(), covered.size()) == crc);
  h.refcount.fetch_add(1);
  REQUIRE(header_crc(h) == crc);
  h.refcount.fetch_sub(1);
}

TEST_CASE("seal: the header bit, and later opens are read-only", "[windows][region]") {
  Region r = create_ok(windows_options(4096));
  REQUIRE_OK(r.seal());
  REQUIRE(r.sealed());
  REQUIRE_OK(r.seal());  // idempotent
  std::uint8_t byte = 1;
  REQUIRE_ERR(r.write(0, &byte, 1), Errc::sealed);
  REQUIRE_ERR(Region::open(OpenTarget{r.id(), {}, {}}, true), Errc::permission_denied);
  auto ro = Region::open(OpenTarget{r.id(), {}, {}}, false);
  REQUIRE_OK(ro);
  REQUIRE(ro->sealed());
  REQUIRE_FALSE(ro->header_writable());  // the DACL refuses writers: private header view
}

TEST_CASE("deallocate marks the header; memory goes with the last handle", "[windows][region]") {
  std::string id;
  {
    Region r = create_ok(windows_options(70000));
    id = r.id();
    auto bytes = pattern(70000, 9);
    REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
    auto peer = Region::open(OpenTarget{id, {}, {}}, false);
    REQUIRE_OK(peer);
    REQUIRE_OK(r.deallocate(true));
    REQUIRE_ERR(Region::open(OpenTarget{id, {}, {}}, false), Errc::deallocated);
    std::uint8_t byte;
    REQUIRE_ERR(peer->read(0, &byte, 1), Errc::deallocated);
    // Zeroed: what the peer's view shows now.
    REQUIRE(std::all_of(peer->data(), peer->data() + peer->capacity(),
                        [](std::uint8_t b) { return b == 0; }));
  }
  REQUIRE_ERR(Region::open(OpenTarget{id, {}, {}}, false), Errc::not_found);
}

TEST_CASE("inspect and list_segments see windows regions", "[windows][inspect]") {
  CreateOptions o = windows_options(1234);
  o.metadata_json = "{\"k\":1}";
  Region r = create_ok(o);
  auto snap = inspect(r.control_path());
  REQUIRE_OK(snap);
  REQUIRE(snap->region_id == r.id());
  REQUIRE(snap->backend == BackendKind::windows);
  REQUIRE(snap->data_size == 1234);
  REQUIRE(snap->metadata_json == "{\"k\":1}");
  REQUIRE(snap->creator_alive);
  auto ids = list_segments();
  REQUIRE(std::find(ids.begin(), ids.end(), r.id()) != ids.end());
  REQUIRE_ERR(inspect("/dev/shm/" + r.id()), Errc::invalid_argument);
}

TEST_CASE("holders work on a windows header", "[windows][holders]") {
  Region r = create_ok(windows_options(64));
  std::uint64_t start = process_start_time(self_pid()).value();
  REQUIRE_OK(hold(r.header(), self_pid(), start, true));
  REQUIRE_OK(hold(r.header(), self_pid(), start, false));
  auto list = holders(r.header());
  REQUIRE(list.size() == 1);
  REQUIRE(list[0].count == 2);
  REQUIRE(list[0].writable);
  REQUIRE(r.header().refcount.load() == 2);
  REQUIRE_OK(release(r.header(), self_pid(), start));
  REQUIRE_OK(release(r.header(), self_pid(), start));
  REQUIRE_ERR(release(r.header(), self_pid(), start), Errc::not_found);
  REQUIRE(r.header().refcount.load() == 0);
  REQUIRE(holders(r.header()).empty());
}
