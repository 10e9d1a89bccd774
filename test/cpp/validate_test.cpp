// validate_header: every check refuses what it should.
#include <fcntl.h>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

/// A private copy of a real header, to damage.
struct Copy {
  alignas(RegionHeader) unsigned char bytes[sizeof(RegionHeader)];
  explicit Copy(const RegionHeader& h) { std::memcpy(bytes, &h, sizeof bytes); }
  RegionHeader& get() { return *reinterpret_cast<RegionHeader*>(bytes); }
  void recrc() { get().header_crc32 = header_crc(get()); }
};

void require_corrupt(const Result<void>& r, const std::string& fragment) {
  REQUIRE_FALSE(r.ok());
  INFO(r.error().message);
  REQUIRE(r.error().code == Errc::corrupt);
  REQUIRE(r.error().message.find(fragment) != std::string::npos);
}

}  // namespace

TEST_CASE("validate_header accepts a fresh header of either backend", "[validate]") {
  Region m = create_ok(options(BackendKind::memfd, 1000));
  REQUIRE_OK(validate_header(m.header(), 1000));
  REQUIRE(m.header().data_offset == 0);
  REQUIRE(m.header().flags == (kFlagSplitData | kFlagLivenessLocks));
  Region p = create_ok(options(BackendKind::posix, 1000));
  SegmentCleanup cleanup{p.id()};
  REQUIRE_OK(validate_header(p.header(), kHeaderSize + 1000));
  REQUIRE(p.header().data_offset == kHeaderSize);
  REQUIRE(p.header().flags == kFlagLivenessLocks);
  REQUIRE_OK(p.deallocate(false));
}

TEST_CASE("validate_header rejects damaged headers", "[validate]") {
  Region r = create_ok(options(BackendKind::memfd, 1000));
  const RegionHeader& h = r.header();

  SECTION("wrong magic") {
    Copy c(h);
    c.get().magic[0] = 'X';
    require_corrupt(validate_header(c.get(), 1000), "bad magic");
  }
  SECTION("a future format version") {
    Copy c(h);
    c.get().format_version = kFormatVersion + 1;
    c.recrc();
    auto res = validate_header(c.get(), 1000);
    REQUIRE_ERR(res, Errc::unsupported_version);
    REQUIRE(res.error().message.find("upgrade") != std::string::npos);
  }
  SECTION("data bigger than the object holding it") {
    require_corrupt(validate_header(h, 999), "truncated");
  }
  SECTION("a bad CRC") {
    Copy c(h);
    c.get().header_crc32 ^= 1;
    require_corrupt(validate_header(c.get(), 1000), "CRC");
  }
  SECTION("an immutable field changed without the CRC") {
    Copy c(h);
    c.get().data_size = 500;
    c.get().data_capacity = 500;
    require_corrupt(validate_header(c.get(), 1000), "CRC");
  }
  SECTION("nonzero reserved bytes") {
    Copy c(h);
    c.get().reserved0[7] = 1;
    c.recrc();
    require_corrupt(validate_header(c.get(), 1000), "reserved0");
    Copy d(h);
    d.get().reserved1[479] = 1;
    require_corrupt(validate_header(d.get(), 1000), "reserved1");
  }
  SECTION("metadata longer than its capacity") {
    Copy c(h);
    c.get().metadata_length = kMetadataCapacity + 1;
    c.recrc();
    require_corrupt(validate_header(c.get(), 1000), "metadata_length");
  }
  SECTION("a wrong header size or holder capacity") {
    Copy c(h);
    c.get().header_size = 8192;
    c.recrc();
    require_corrupt(validate_header(c.get(), 1000), "header_size");
    Copy d(h);
    d.get().holder_capacity = 63;
    require_corrupt(validate_header(d.get(), 1000), "holder_capacity");
  }
  SECTION("sizes that contradict each other") {
    Copy c(h);
    c.get().data_capacity = 2000;
    c.recrc();
    require_corrupt(validate_header(c.get(), 1 << 20), "data_capacity");
    Copy d(h);
    d.get().flags |= kFlagEncrypted;
    d.recrc();
    require_corrupt(validate_header(d.get(), 1 << 20), "cipher");
  }
  SECTION("an unknown backend or a region id that is not ours") {
    Copy c(h);
    c.get().backend = 9;
    c.recrc();
    require_corrupt(validate_header(c.get(), 1000), "backend");
    Copy d(h);
    std::memset(d.get().region_id, 0, kRegionIdCapacity);
    std::memcpy(d.get().region_id, "../../etc/passwd", 16);
    d.recrc();
    require_corrupt(validate_header(d.get(), 1000), "region id");
  }
}

TEST_CASE("the mutable half can change without invalidating the header", "[validate]") {
  Region r = create_ok(options(BackendKind::memfd, 1000));
  REQUIRE_OK(hold(r.header(), 55, 1, true));
  r.touch();
  REQUIRE_OK(r.seal());
  REQUIRE_OK(validate_header(r.header(), 1000));
  REQUIRE_OK(release(r.header(), 55, 1));
}
