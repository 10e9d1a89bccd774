// crypto.cpp: the chunked XChaCha20-Poly1305 layout of encrypted regions.
#include <algorithm>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

constexpr std::uint64_t kStride = kChunkSize + kChunkOverhead;

CreateOptions encrypted(BackendKind backend, std::uint64_t size) {
  CreateOptions o = options(backend, size);
  o.encrypted = true;
  o.security_level = 1;
  return o;
}

std::vector<std::uint8_t> read_all(const Region& r) {
  std::vector<std::uint8_t> out(r.size());
  auto res = r.read(0, out.data(), out.size());
  INFO((res ? std::string() : res.error().message));
  REQUIRE(res.ok());
  return out;
}

}  // namespace

TEST_CASE("encrypted_capacity adds 40 bytes per started chunk", "[crypto]") {
  REQUIRE(encrypted_capacity(0) == 0);
  REQUIRE(encrypted_capacity(1) == 41);
  REQUIRE(encrypted_capacity(kChunkSize) == kChunkSize + 40);
  REQUIRE(encrypted_capacity(kChunkSize + 1) == kChunkSize + 1 + 80);
  REQUIRE(encrypted_capacity(10 * std::uint64_t{kChunkSize}) == 10 * kStride);
}

TEST_CASE("an encrypted region starts as zeros and round-trips odd ranges", "[crypto]") {
  auto backend = GENERATE(BackendKind::memfd, BackendKind::posix);
  const std::uint64_t size = 3 * kChunkSize + 1000;
  Region r = create_ok(encrypted(backend, size));
  SegmentCleanup cleanup{backend == BackendKind::posix ? r.id() : ""};
  REQUIRE(r.encrypted());
  REQUIRE(r.capacity() == encrypted_capacity(size));
  REQUIRE(r.key() != nullptr);
  REQUIRE(r.header().flags & kFlagEncrypted);
  REQUIRE(r.header().cipher == static_cast<std::uint32_t>(CipherKind::xchacha20poly1305_chunks));
  REQUIRE(r.header().chunk_size == kChunkSize);
  REQUIRE_OK(validate_header(
      r.header(), r.backend() == BackendKind::posix ? kHeaderSize + r.capacity() : r.capacity()));

  std::vector<std::uint8_t> shadow(size, 0);
  REQUIRE(read_all(r) == shadow);
  struct Range {
    std::uint64_t offset, length;
  };
  std::uint32_t seed = 10;
  for (Range w :
       {Range{1, 70000}, Range{kChunkSize - 1, 2}, Range{2 * kChunkSize - 1, kChunkSize + 2},
        Range{0, kChunkSize}, Range{3 * kChunkSize, 1000}, Range{size - 1, 1}, Range{12345, 0},
        Range{0, size}, Range{100, 3 * kChunkSize}}) {
    auto bytes = pattern(w.length, seed++);
    REQUIRE_OK(r.write(w.offset, bytes.data(), bytes.size()));
    std::copy(bytes.begin(), bytes.end(), shadow.begin() + w.offset);
    REQUIRE(read_all(r) == shadow);
  }
  for (Range rd : {Range{3, 5}, Range{kChunkSize - 3, 7}, Range{kChunkSize, kChunkSize},
                   Range{70001, 127000}, Range{size - 10, 10}}) {
    std::vector<std::uint8_t> part(rd.length);
    REQUIRE_OK(r.read(rd.offset, part.data(), part.size()));
    REQUIRE(std::equal(part.begin(), part.end(), shadow.begin() + rd.offset));
  }
  std::uint8_t byte;
  REQUIRE_ERR(r.read(size, &byte, 1), Errc::out_of_bounds);
  REQUIRE_ERR(r.write(size - 1, shadow.data(), 2), Errc::out_of_bounds);
  REQUIRE_OK(r.deallocate(false));
}

TEST_CASE("no plaintext reaches the segment", "[crypto]") {
  const std::uint64_t size = 2 * kChunkSize + 5000;
  Region r = create_ok(encrypted(BackendKind::memfd, size));
  const std::string secret = "SECRET-PAYLOAD!!";
  std::vector<std::uint8_t> plain(size);
  for (std::size_t i = 0; i < size; ++i) plain[i] = static_cast<std::uint8_t>(secret[i % 16]);
  REQUIRE_OK(r.write(0, plain.data(), plain.size()));
  REQUIRE_OK(r.write(777, plain.data(), 3000));  // a partial (read-modify-write) chunk too
  const std::uint8_t* begin = r.data();
  const std::uint8_t* end = r.data() + r.capacity();
  // No 8-byte window of the secret appears anywhere in the stored bytes.
  for (std::size_t k = 0; k < 16; ++k) {
    std::string needle = (secret + secret).substr(k, 8);
    REQUIRE(std::search(begin, end, needle.begin(), needle.end()) == end);
  }
  // Nonces are fresh: no two chunks start with the same 24 bytes.
  REQUIRE(std::memcmp(begin, begin + kStride, kNonceSize) != 0);
  REQUIRE(std::memcmp(begin + kStride, begin + 2 * kStride, kNonceSize) != 0);
}

TEST_CASE("a rewritten chunk gets a fresh nonce", "[crypto]") {
  Region r = create_ok(encrypted(BackendKind::memfd, 1000));
  std::vector<std::uint8_t> before(r.data(), r.data() + kNonceSize);
  std::uint8_t b = 1;
  REQUIRE_OK(r.write(10, &b, 1));
  REQUIRE(std::memcmp(before.data(), r.data(), kNonceSize) != 0);
}

TEST_CASE("tampering with any stored byte is detected per chunk", "[crypto]") {
  const std::uint64_t size = 3 * kChunkSize;
  Region r = create_ok(encrypted(BackendKind::memfd, size));
  auto bytes = pattern(size, 5);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  std::uint64_t where = GENERATE(std::uint64_t{0},                 // chunk 1's nonce
                                 std::uint64_t{kNonceSize + 100},  // its ciphertext
                                 std::uint64_t{kStride - 1});      // its tag
  std::uint8_t* target = r.data() + kStride + where;
  *target ^= 0x01;
  std::vector<std::uint8_t> out(size);
  auto res = r.read(kChunkSize + 10, out.data(), 10);
  REQUIRE_ERR(res, Errc::tampered);
  REQUIRE(res.error().message.find("chunk 1") != std::string::npos);
  REQUIRE_OK(r.read(0, out.data(), kChunkSize));               // chunk 0 is intact
  REQUIRE_OK(r.read(2 * kChunkSize, out.data(), kChunkSize));  // chunk 2 too
  // A partial write into the damaged chunk refuses instead of re-sealing garbage.
  REQUIRE_ERR(r.write(kChunkSize + 5, bytes.data(), 3), Errc::tampered);
  *target ^= 0x01;
  REQUIRE_OK(r.read(0, out.data(), size));
  REQUIRE(out == bytes);
}

TEST_CASE("chunks cannot be swapped, and bind region id and size", "[crypto]") {
  const std::uint64_t size = 2 * kChunkSize;
  Region r = create_ok(encrypted(BackendKind::memfd, size));
  auto bytes = pattern(size, 6);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  std::vector<std::uint8_t> chunk0(r.data(), r.data() + kStride);
  std::memcpy(r.data() + kStride, chunk0.data(), kStride);  // replay chunk 0 as chunk 1
  std::vector<std::uint8_t> out(kChunkSize);
  REQUIRE_ERR(r.read(kChunkSize, out.data(), kChunkSize), Errc::tampered);
  REQUIRE_OK(r.read(0, out.data(), kChunkSize));

  // Chunk 0 of one region does not open under another region's id with the same key.
  Region other = create_ok(encrypted(BackendKind::memfd, size));
  std::memcpy(other.data(), chunk0.data(), kStride);
  REQUIRE_ERR(other.read(0, out.data(), 1), Errc::tampered);
}

TEST_CASE("a region opened elsewhere needs the key", "[crypto]") {
  Region r = create_ok(encrypted(BackendKind::memfd, 100000));
  auto bytes = pattern(100000, 7);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  auto opened = Region::open(OpenTarget{r.id(), r.control_path(), r.data_path()}, true);
  REQUIRE_OK(opened);
  REQUIRE(opened->encrypted());
  REQUIRE(opened->key() == nullptr);
  std::vector<std::uint8_t> out(100000);
  REQUIRE_ERR(opened->read(0, out.data(), out.size()), Errc::permission_denied);
  REQUIRE_ERR(opened->write(0, bytes.data(), 1), Errc::permission_denied);
  std::uint8_t wrong[kKeySize] = {1};
  REQUIRE_ERR(opened->use_key(wrong), Errc::tampered);
  REQUIRE_OK(opened->use_key(r.key()));
  REQUIRE_OK(opened->read(0, out.data(), out.size()));
  REQUIRE(out == bytes);

  Region plain = create_ok(options(BackendKind::memfd, 10));
  REQUIRE_ERR(plain.use_key(r.key()), Errc::invalid_argument);
}
