// libsodium glue and the chunked XChaCha20-Poly1305-IETF layout of encrypted regions.
#include "crypto.hpp"

#include <sodium.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "region.hpp"

namespace spshm {

std::uint64_t encrypted_capacity(std::uint64_t plaintext_size) noexcept {
  std::uint64_t chunks = plaintext_size / kChunkSize + (plaintext_size % kChunkSize ? 1 : 0);
  return plaintext_size + chunks * kChunkOverhead;
}

namespace crypto {

static_assert(kNonceSize == crypto_aead_xchacha20poly1305_ietf_NPUBBYTES);
static_assert(kTagSize == crypto_aead_xchacha20poly1305_ietf_ABYTES);
static_assert(kKeySize == crypto_aead_xchacha20poly1305_ietf_KEYBYTES);

Result<void> init() {
  static std::once_flag once;
  static int status = -1;
  std::call_once(once, [] { status = sodium_init(); });
  if (status < 0)
    return Error{Errc::io_error, 0,
                 "libsodium failed to initialise (sodium_init): no usable entropy source?"};
  return {};
}

void random_bytes(void* buffer, std::size_t length) noexcept {
  (void)init();  // randombytes_buf works (and aborts rather than fail) even if this failed
  randombytes_buf(buffer, length);
}

void secure_zero(void* buffer, std::size_t length) noexcept { sodium_memzero(buffer, length); }

// ---- Key ----

Key& Key::operator=(Key&& other) noexcept {
  if (this != &other) {
    if (bytes_) sodium_free(bytes_);
    bytes_ = other.bytes_;
    other.bytes_ = nullptr;
  }
  return *this;
}

Key::~Key() {
  if (bytes_) sodium_free(bytes_);  // zeroes before freeing
}

namespace {

Result<std::uint8_t*> allocate_key() {
  if (auto r = init(); !r) return r.error();
  auto* bytes = static_cast<std::uint8_t*>(sodium_malloc(kKeySize));
  if (bytes == nullptr)
    return Error{Errc::no_space, 0, "cannot allocate guarded memory for a key (sodium_malloc)"};
  return bytes;
}

}  // namespace

Result<Key> Key::generate() {
  auto bytes = allocate_key();
  if (!bytes) return bytes.error();
  Key key;
  key.bytes_ = *bytes;
  crypto_aead_xchacha20poly1305_ietf_keygen(key.bytes_);
  return key;
}

Result<Key> Key::copy_of(const std::uint8_t* source) {
  auto bytes = allocate_key();
  if (!bytes) return bytes.error();
  Key key;
  key.bytes_ = *bytes;
  std::memcpy(key.bytes_, source, kKeySize);
  return key;
}

// ---- chunks ----

namespace {

struct Chunk {
  std::uint64_t index;
  std::uint64_t plain_offset;  // first plaintext byte of the chunk
  std::uint64_t length;        // plaintext bytes in the chunk
  std::uint64_t stored_at;     // offset of its nonce in the data area
};

Chunk chunk_at(const Binding& b, std::uint64_t index) noexcept {
  std::uint64_t start = index * kChunkSize;
  return Chunk{index, start, std::min<std::uint64_t>(kChunkSize, b.data_size - start),
               index * kChunkStride};
}

void make_aad(const Binding& b, std::uint64_t index, std::uint8_t (&aad)[kAadSize]) noexcept {
  std::memcpy(aad, b.region_id, kRegionIdCapacity);
  for (int i = 0; i < 8; ++i) {
    aad[kRegionIdCapacity + i] = static_cast<std::uint8_t>(index >> (8 * i));
    aad[kRegionIdCapacity + 8 + i] = static_cast<std::uint8_t>(b.data_size >> (8 * i));
  }
}

std::string region_name(const Binding& b) {
  return std::string(b.region_id, strnlen(b.region_id, kRegionIdCapacity));
}

/// Seals `plain` (chunk.length bytes, private memory) into the chunk's place in `data`.
void seal_chunk(const Binding& b, const std::uint8_t* key, std::uint8_t* data, const Chunk& c,
                const std::uint8_t* plain) noexcept {
  std::uint8_t aad[kAadSize];
  make_aad(b, c.index, aad);
  std::uint8_t nonce[kNonceSize];
  randombytes_buf(nonce, sizeof nonce);
  std::uint8_t* stored = data + c.stored_at;
  std::uint8_t tag[kTagSize];
  crypto_aead_xchacha20poly1305_ietf_encrypt_detached(
      stored + kNonceSize, tag, nullptr, plain, c.length, aad, sizeof aad, nullptr, nonce, key);
  std::memcpy(stored, nonce, sizeof nonce);
  std::memcpy(stored + kNonceSize + c.length, tag, sizeof tag);
}

/// Authenticates and decrypts the chunk into `plain` (chunk.length bytes, private memory).
Result<void> open_chunk(const Binding& b, const std::uint8_t* key, const std::uint8_t* data,
                        const Chunk& c, std::uint8_t* plain) {
  std::uint8_t aad[kAadSize];
  make_aad(b, c.index, aad);
  const std::uint8_t* stored = data + c.stored_at;
  std::uint8_t nonce[kNonceSize];
  std::uint8_t tag[kTagSize];
  std::memcpy(nonce, stored, sizeof nonce);
  std::memcpy(plain, stored + kNonceSize, c.length);  // private copy, then decrypt in place
  std::memcpy(tag, stored + kNonceSize + c.length, sizeof tag);
  if (crypto_aead_xchacha20poly1305_ietf_decrypt_detached(plain, nullptr, plain, c.length, tag, aad,
                                                          sizeof aad, nonce, key) != 0) {
    sodium_memzero(plain, c.length);
    return Error{Errc::tampered, 0,
                 "encrypted region " + region_name(b) + ": chunk " + std::to_string(c.index) +
                     " failed authentication: the region was modified outside snakepit_shm "
                     "(or the key is not this region's)"};
  }
  return {};
}

/// Private plaintext scratch space for one chunk, zeroed before it is freed.
class Scratch {
 public:
  Scratch() = default;
  ~Scratch() {
    if (bytes_) {
      sodium_memzero(bytes_.get(), kChunkSize);
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  std::uint8_t* get() {
    if (!bytes_) bytes_.reset(new (std::nothrow) std::uint8_t[kChunkSize]);
    return bytes_.get();
  }

 private:
  std::unique_ptr<std::uint8_t[]> bytes_;
};

Error no_scratch() {
  return Error{Errc::no_space, 0, "cannot allocate a 64 KiB buffer to re-encrypt a chunk"};
}

}  // namespace

Result<void> initialise_chunks(const Binding& b, const std::uint8_t* key, std::uint8_t* data) {
  return initialise_chunk_range(b, key, data, 0, chunk_count(b));
}

std::uint64_t chunk_count(const Binding& b) noexcept {
  return (b.data_size + kChunkSize - 1) / kChunkSize;
}

Result<void> initialise_chunk_range(const Binding& b, const std::uint8_t* key, std::uint8_t* data,
                                    std::uint64_t first, std::uint64_t count) {
  if (auto r = init(); !r) return r;
  static const std::uint8_t zeros[kChunkSize] = {};
  for (std::uint64_t i = first; i < first + count; ++i)
    seal_chunk(b, key, data, chunk_at(b, i), zeros);
  return {};
}

Result<void> encrypt(const Binding& b, const std::uint8_t* key, std::uint8_t* data,
                     std::uint64_t offset, const std::uint8_t* src, std::uint64_t length) {
  if (length == 0) return {};
  if (auto r = init(); !r) return r;
  Scratch scratch;
  std::uint64_t end = offset + length;
  for (std::uint64_t i = offset / kChunkSize; i <= (end - 1) / kChunkSize; ++i) {
    Chunk c = chunk_at(b, i);
    std::uint64_t from = std::max(offset, c.plain_offset);
    std::uint64_t to = std::min(end, c.plain_offset + c.length);
    const std::uint8_t* piece = src + (from - offset);
    if (from == c.plain_offset && to == c.plain_offset + c.length) {
      seal_chunk(b, key, data, c, piece);  // whole chunk: no need to read it first
      continue;
    }
    std::uint8_t* plain = scratch.get();
    if (plain == nullptr) return no_scratch();
    if (auto r = open_chunk(b, key, data, c, plain); !r) return r;
    std::memcpy(plain + (from - c.plain_offset), piece, to - from);
    seal_chunk(b, key, data, c, plain);
  }
  return {};
}

Result<void> decrypt(const Binding& b, const std::uint8_t* key, const std::uint8_t* data,
                     std::uint64_t offset, std::uint8_t* dst, std::uint64_t length) {
  if (length == 0) return {};
  if (auto r = init(); !r) return r;
  Scratch scratch;
  std::uint64_t end = offset + length;
  for (std::uint64_t i = offset / kChunkSize; i <= (end - 1) / kChunkSize; ++i) {
    Chunk c = chunk_at(b, i);
    std::uint64_t from = std::max(offset, c.plain_offset);
    std::uint64_t to = std::min(end, c.plain_offset + c.length);
    std::uint8_t* out = dst + (from - offset);
    if (from == c.plain_offset && to == c.plain_offset + c.length) {
      if (auto r = open_chunk(b, key, data, c, out); !r) return r;  // straight into dst
      continue;
    }
    std::uint8_t* plain = scratch.get();
    if (plain == nullptr) return no_scratch();
    if (auto r = open_chunk(b, key, data, c, plain); !r) return r;
    std::memcpy(out, plain + (from - c.plain_offset), to - from);
  }
  return {};
}

}  // namespace crypto
}  // namespace spshm
