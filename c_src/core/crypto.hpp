// Internal: libsodium glue and the chunked XChaCha20-Poly1305 layout (crypto.cpp).
//
// Plaintext byte p of an encrypted region lives in chunk i = p / kChunkSize, stored at
// i * (kChunkSize + kChunkOverhead) as nonce (24) || ciphertext (len_i) || tag (16), with
// len_i = min(kChunkSize, data_size - i * kChunkSize). Each chunk is sealed with its own
// random nonce and AAD = region_id (32 bytes as stored in the header) || u64le(i) ||
// u64le(data_size), so chunks cannot be moved between positions, regions or sizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "error.hpp"
#include "format.hpp"

namespace spshm::crypto {

inline constexpr std::size_t kAadSize = kRegionIdCapacity + 16;
inline constexpr std::uint64_t kChunkStride = std::uint64_t{kChunkSize} + kChunkOverhead;

/// sodium_init, once per process (thread-safe).
Result<void> init();
/// libsodium's CSPRNG (calls init first).
void random_bytes(void* buffer, std::size_t length) noexcept;
/// sodium_memzero: never optimised away.
void secure_zero(void* buffer, std::size_t length) noexcept;

/// A 32-byte key in sodium_malloc'd (guarded, mlock'd when possible) memory, zeroed and
/// freed on destruction. Move-only.
class Key {
 public:
  Key() noexcept = default;
  Key(Key&& other) noexcept : bytes_(other.bytes_) { other.bytes_ = nullptr; }
  Key& operator=(Key&& other) noexcept;
  Key(const Key&) = delete;
  Key& operator=(const Key&) = delete;
  ~Key();

  static Result<Key> generate();
  static Result<Key> copy_of(const std::uint8_t* bytes);
  const std::uint8_t* data() const noexcept { return bytes_; }
  bool empty() const noexcept { return bytes_ == nullptr; }

 private:
  std::uint8_t* bytes_ = nullptr;
};

/// What every chunk of one region is bound to.
struct Binding {
  const char* region_id;  ///< kRegionIdCapacity bytes, exactly as stored in the header
  std::uint64_t data_size;
};

/// Writes every chunk as the encryption of zeros, so that every chunk authenticates.
/// `data` holds encrypted_capacity(data_size) bytes.
Result<void> initialise_chunks(const Binding& binding, const std::uint8_t* key, std::uint8_t* data);
/// The number of chunks of a region of binding.data_size bytes.
std::uint64_t chunk_count(const Binding& binding) noexcept;
/// initialise_chunks() for chunks [first, first + count) only (the caller clips).
Result<void> initialise_chunk_range(const Binding& binding, const std::uint8_t* key,
                                    std::uint8_t* data, std::uint64_t first, std::uint64_t count);

/// Encrypts plaintext [offset, offset + length) into `data` (read-modify-write of
/// partially covered chunks, fresh nonces). The caller checks bounds and serialises
/// writers of one region: two concurrent writes of one chunk would corrupt it.
Result<void> encrypt(const Binding& binding, const std::uint8_t* key, std::uint8_t* data,
                     std::uint64_t offset, const std::uint8_t* src, std::uint64_t length);

/// Decrypts plaintext [offset, offset + length) of `data` into `dst`; tampered if a tag
/// fails. Ciphertext is copied out of the shared memory before it is authenticated, so
/// a peer changing it concurrently cannot get unauthenticated bytes accepted.
Result<void> decrypt(const Binding& binding, const std::uint8_t* key, const std::uint8_t* data,
                     std::uint64_t offset, std::uint8_t* dst, std::uint64_t length);

}  // namespace spshm::crypto
