// format.hpp / format.cpp: layout description, CRC, and docs/FORMAT.md agreement.
#include <cstddef>
#include <fstream>
#include <map>
#include <sstream>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

std::string field_json(const char* name, std::size_t offset, std::size_t size) {
  return "\"" + std::string(name) + "\":{\"offset\":" + std::to_string(offset) +
         ",\"size\":" + std::to_string(size) + ",";
}

#define HEADER_FIELD(f) field_json(#f, offsetof(RegionHeader, f), sizeof(RegionHeader::f))
#define HOLDER_FIELD(f) field_json(#f, offsetof(HolderSlot, f), sizeof(HolderSlot::f))

}  // namespace

TEST_CASE("layout_description names every header field with offsetof/sizeof", "[format]") {
  std::string json = layout_description();
  REQUIRE(json.front() == '{');
  REQUIRE(json.back() == '}');
  for (const std::string& expected : {HEADER_FIELD(magic),
                                      HEADER_FIELD(format_version),
                                      HEADER_FIELD(header_size),
                                      HEADER_FIELD(data_size),
                                      HEADER_FIELD(data_capacity),
                                      HEADER_FIELD(data_offset),
                                      HEADER_FIELD(backend),
                                      HEADER_FIELD(flags),
                                      HEADER_FIELD(creator_pid),
                                      HEADER_FIELD(security_level),
                                      HEADER_FIELD(creator_start_time),
                                      HEADER_FIELD(boot_id),
                                      HEADER_FIELD(created_at_ns),
                                      HEADER_FIELD(cipher),
                                      HEADER_FIELD(chunk_size),
                                      HEADER_FIELD(region_id),
                                      HEADER_FIELD(metadata_length),
                                      HEADER_FIELD(header_crc32),
                                      HEADER_FIELD(data_name),
                                      HEADER_FIELD(reserved0),
                                      HEADER_FIELD(metadata),
                                      HEADER_FIELD(state),
                                      HEADER_FIELD(refcount),
                                      HEADER_FIELD(last_access_ns),
                                      HEADER_FIELD(idle_timeout_ns),
                                      HEADER_FIELD(holder_capacity),
                                      HEADER_FIELD(holders_generation),
                                      HEADER_FIELD(holders),
                                      HEADER_FIELD(reserved1),
                                      HOLDER_FIELD(slot_state),
                                      HOLDER_FIELD(pid),
                                      HOLDER_FIELD(start_time),
                                      HOLDER_FIELD(count)}) {
    INFO(expected);
    REQUIRE(json.find(expected) != std::string::npos);
  }
  // flags is a field of both the header and the holder: both must be present.
  REQUIRE(json.find(HEADER_FIELD(flags)) != json.rfind(HOLDER_FIELD(flags)));
}

TEST_CASE("layout_description states every constant", "[format]") {
  std::string json = layout_description();
  for (const std::string& expected :
       {std::string("\"magic\":\"SPSHMHDR\""),
        "\"format_version\":" + std::to_string(kFormatVersion),
        std::string("\"header_size\":4096"),
        std::string("\"immutable_size\":2048"),
        std::string("\"metadata_offset\":256"),
        std::string("\"metadata_capacity\":1792"),
        std::string("\"holder_capacity\":64"),
        std::string("\"region_id_capacity\":32"),
        std::string("\"crc_covered_prefix\":132"),
        std::string("\"name_prefix\":\"spshm_\""),
        std::string("\"max_segment_name_length\":30"),
        std::string("\"chunk_size\":65536"),
        std::string("\"nonce_size\":24"),
        std::string("\"tag_size\":16"),
        std::string("\"chunk_overhead\":40"),
        std::string("\"key_size\":32"),
        std::string("\"aad_size\":48"),
        std::string("\"data_lock_byte\":1"),
        std::string("\"seal_lock_byte\":2"),
        std::string("\"backends\":{\"posix\":1,\"memfd\":2,\"windows\":3}"),
        std::string("\"flags\":{\"encrypted\":1,\"named\":2,\"split_data\":4,\"worker_output\":8,"
                    "\"liveness_locks\":16,\"arena\":32,\"huge_pages\":128}"),
        std::string("\"arena_data_offset\":4096"),
        std::string("\"states\":{\"sealed\":1,\"deallocated\":2,\"sealing\":4,\"adopted\":8}"),
        std::string("\"slot_states\":{\"free\":0,\"busy\":1,\"live\":2}"),
        std::string("\"holder_flags\":{\"writable\":1,\"incarnation_mask\":4294967040}"),
        std::string("\"holder\":{\"size\":24,")}) {
    INFO(expected);
    REQUIRE(json.find(expected) != std::string::npos);
  }
}

TEST_CASE("layout_description fields tile the header without gaps", "[format]") {
  // Every byte of [0, 4096) belongs to exactly one field, in order.
  std::string json = layout_description();
  std::size_t expected_offset = 0;
  std::size_t pos = json.find("\"fields\":{");
  std::size_t end = json.find("\"holder\":{");
  while ((pos = json.find("\"offset\":", pos)) != std::string::npos && pos < end) {
    std::size_t offset = std::stoul(json.substr(pos + 9));
    std::size_t size_pos = json.find("\"size\":", pos);
    std::size_t size = std::stoul(json.substr(size_pos + 7));
    REQUIRE(offset == expected_offset);
    expected_offset += size;
    pos = size_pos;
  }
  REQUIRE(expected_offset == kHeaderSize);
}

TEST_CASE("docs/FORMAT.md tables agree with the header layout", "[format][docs]") {
  auto header_rows = format_md_rows("Header fields");
  REQUIRE(header_rows.size() == 29);
  std::string json = layout_description();
  for (const auto& [field, row] : header_rows) {
    INFO(field);
    REQUIRE(json.find(field_json(field.c_str(), row.offset, row.size)) != std::string::npos);
  }
  auto holder_rows = format_md_rows("Holder slot");
  REQUIRE(holder_rows.size() == 5);
  REQUIRE(holder_rows["slot_state"].offset == offsetof(HolderSlot, slot_state));
  REQUIRE(holder_rows["pid"].offset == offsetof(HolderSlot, pid));
  REQUIRE(holder_rows["start_time"].offset == offsetof(HolderSlot, start_time));
  REQUIRE(holder_rows["count"].offset == offsetof(HolderSlot, count));
  REQUIRE(holder_rows["flags"].offset == offsetof(HolderSlot, flags));
}

TEST_CASE("crc32 is zlib's CRC-32", "[format]") {
  REQUIRE(crc32("123456789", 9) == 0xCBF43926u);
  REQUIRE(crc32("", 0) == 0u);
  // Chaining equals one pass (what header_crc relies on).
  REQUIRE(crc32("56789", 5, crc32("1234", 4)) == 0xCBF43926u);
}

TEST_CASE("header_crc covers the prefix and the metadata only", "[format]") {
  CreateOptions o = options(BackendKind::memfd, 100);
  o.metadata_json = "{\"dtype\":\"float32\"}";
  Region r = create_ok(o);
  RegionHeader& h = r.header();
  std::uint32_t crc = header_crc(h);
  REQUIRE(crc == h.header_crc32);
  std::vector<std::uint8_t> expected(reinterpret_cast<std::uint8_t*>(&h),
                                     reinterpret_cast<std::uint8_t*>(&h) + kCrcCoveredPrefix);
  expected.insert(expected.end(), h.metadata, h.metadata + h.metadata_length);
  REQUIRE(crc32(expected.data(), expected.size()) == crc);
  h.refcount.fetch_add(1);  // mutable part: not covered
  REQUIRE(header_crc(h) == crc);
  h.refcount.fetch_sub(1);
}

TEST_CASE("docs/FORMAT.md's Locks table names the lock bytes of format.hpp", "[format][docs]") {
  std::map<std::string, std::string> meaning;  // byte -> meaning cell
  for (const auto& cells : format_md_table("Locks"))
    if (cells.size() >= 4) meaning[cells[0]] = cells[3];
  REQUIRE(meaning[std::to_string(kLivenessLockByte)].find("**liveness**") != std::string::npos);
  REQUIRE(meaning[std::to_string(kDataLockByte)].find("**data lock**") != std::string::npos);
  REQUIRE(meaning[std::to_string(kSealLockByte)].find("**seal lock**") != std::string::npos);
  REQUIRE(meaning.count("3–255") == 1);  // the reserved range starts after the seal lock
}
