// crypto.hpp for builds without libsodium (SPSHM_WITH_SODIUM=OFF, chosen in CMakeLists.txt):
// Debian ships no libsodium for mingw-w64, so the Windows cross build uses this file.
// Plain regions work as everywhere; creating, keying, reading or writing an encrypted
// region fails with `unsupported` and says how to get encryption. Randomness comes from
// the OS (platform::random_bytes), zeroing from a loop the compiler may not remove.
#include <cstdio>
#include <cstdlib>

#include "crypto.hpp"
#include "platform.hpp"
#include "region.hpp"

namespace spshm {

// The encrypted layout is part of the format (crypto.hpp), whether or not this build can
// produce it: the same formula as crypto.cpp, so sizes of regions made elsewhere agree.
std::uint64_t encrypted_capacity(std::uint64_t plaintext_size) noexcept {
  std::uint64_t chunks = plaintext_size / kChunkSize + (plaintext_size % kChunkSize ? 1 : 0);
  return plaintext_size + chunks * kChunkOverhead;
}

namespace crypto {

namespace {

Error no_sodium(const char* action) {
  return Error{Errc::unsupported, 0,
               std::string("cannot ") + action +
                   ": this build of snakepit_shm has no encryption (compiled without libsodium, "
                   "as the Windows cross build is). Create the region with encrypted: false, "
                   "or rebuild with libsodium (cmake -DSPSHM_WITH_SODIUM=ON)"};
}

}  // namespace

Result<void> init() { return {}; }  // nothing to initialise: plain regions need no library

void random_bytes(void* buffer, std::size_t length) noexcept {
  // Like libsodium's randombytes_buf: never return predictable bytes; abort instead.
  for (int attempt = 0; attempt < 3; ++attempt)
    if (platform::random_bytes(buffer, length)) return;
  std::fputs("snakepit_shm: the OS random number generator keeps failing: aborting\n", stderr);
  std::abort();
}

void secure_zero(void* buffer, std::size_t length) noexcept {
  // Writes through a volatile pointer are observable behaviour: they cannot be elided.
  volatile std::uint8_t* p = static_cast<volatile std::uint8_t*>(buffer);
  while (length-- > 0) *p++ = 0;
}

// ---- Key: never holds bytes in this build ----

Key& Key::operator=(Key&& other) noexcept {
  if (this != &other) {
    bytes_ = other.bytes_;
    other.bytes_ = nullptr;
  }
  return *this;
}

Key::~Key() = default;

Result<Key> Key::generate() { return no_sodium("generate a key for an encrypted region"); }

Result<Key> Key::copy_of(const std::uint8_t*) {
  return no_sodium("use the key of an encrypted region");
}

Result<void> initialise_chunks(const Binding&, const std::uint8_t*, std::uint8_t*) {
  return no_sodium("create an encrypted region");
}

std::uint64_t chunk_count(const Binding& b) noexcept {
  return (b.data_size + kChunkSize - 1) / kChunkSize;
}

Result<void> initialise_chunk_range(const Binding&, const std::uint8_t*, std::uint8_t*,
                                    std::uint64_t, std::uint64_t) {
  return no_sodium("create an encrypted region");
}

Result<void> encrypt(const Binding&, const std::uint8_t*, std::uint8_t*, std::uint64_t,
                     const std::uint8_t*, std::uint64_t) {
  return no_sodium("write to an encrypted region");
}

Result<void> decrypt(const Binding&, const std::uint8_t*, const std::uint8_t*, std::uint64_t,
                     std::uint8_t*, std::uint64_t) {
  return no_sodium("read an encrypted region");
}

}  // namespace crypto

}  // namespace spshm
