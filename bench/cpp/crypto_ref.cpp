// libsodium and libc called directly (issue 6, part 5): the ceiling for the product's
// encryption and zeroing. Same layout as the product: 64 KiB plaintext chunks, each
// XChaCha20-Poly1305-IETF with a fresh random 24-byte nonce, 48 bytes of AAD and a
// detached 16-byte tag. Persistent, so that it is measured in the same rounds as the
// product; one command per line on stdin, one answer ("<ns>") per line:
//
//   encrypt <bytes> | decrypt <bytes> | memset <bytes> | memzero <bytes> | memcpy <bytes>
//   quit
//
// Buffers are grown and touched before the timed part.
#include <sodium.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>

#include "bench_util.hpp"

namespace {

constexpr std::size_t kChunk = 65536;
constexpr std::size_t kNonce = crypto_aead_xchacha20poly1305_ietf_NPUBBYTES;
constexpr std::size_t kTag = crypto_aead_xchacha20poly1305_ietf_ABYTES;
constexpr std::size_t kStride = kChunk + kNonce + kTag;
constexpr std::size_t kAad = 48;

struct State {
  bench::Mapping plain, sealed;
  std::size_t capacity = 0;
  unsigned char key[crypto_aead_xchacha20poly1305_ietf_KEYBYTES];
  unsigned char aad[kAad] = {};

  void ensure(std::size_t bytes) {
    if (capacity >= bytes) return;
    std::size_t chunks = (bytes + kChunk - 1) / kChunk;
    plain = bench::map_anonymous(bytes);
    sealed = bench::map_anonymous(chunks * kStride);
    bench::fill_pattern(plain.data(), bytes);
    std::memset(sealed.data(), 0, sealed.size());
    capacity = bytes;
  }

  void encrypt(std::size_t bytes) {
    for (std::size_t off = 0, i = 0; off < bytes; off += kChunk, ++i) {
      std::size_t len = std::min(kChunk, bytes - off);
      unsigned char* stored = sealed.data() + i * kStride;
      std::memcpy(aad + 32, &i, sizeof i);
      randombytes_buf(stored, kNonce);
      crypto_aead_xchacha20poly1305_ietf_encrypt_detached(stored + kNonce, stored + kNonce + len,
                                                          nullptr, plain.data() + off, len, aad,
                                                          kAad, nullptr, stored, key);
    }
  }

  bool decrypt(std::size_t bytes) {
    for (std::size_t off = 0, i = 0; off < bytes; off += kChunk, ++i) {
      std::size_t len = std::min(kChunk, bytes - off);
      const unsigned char* stored = sealed.data() + i * kStride;
      std::memcpy(aad + 32, &i, sizeof i);
      if (crypto_aead_xchacha20poly1305_ietf_decrypt_detached(
              plain.data() + off, nullptr, stored + kNonce, len, stored + kNonce + len, aad, kAad,
              stored, key) != 0)
        return false;
    }
    return true;
  }
};

}  // namespace

int main() {
  if (sodium_init() < 0) {
    std::fprintf(stderr, "crypto_ref: sodium_init failed\n");
    return 1;
  }
  State state;
  crypto_aead_xchacha20poly1305_ietf_keygen(state.key);
  char line[256], op[32];
  while (std::fgets(line, sizeof line, stdin) != nullptr) {
    unsigned long long bytes = 0;
    if (std::strncmp(line, "quit", 4) == 0) break;
    if (std::sscanf(line, "%31s %llu", op, &bytes) != 2 || bytes == 0) {
      std::printf("error expected '<op> <bytes>', got: %s", line);
      std::fflush(stdout);
      continue;
    }
    state.ensure(bytes);
    std::string what(op);
    bool ok = true;
    if (what == "decrypt") state.encrypt(bytes);  // something valid to open
    std::uint64_t start = bench::now_ns();
    if (what == "encrypt") {
      state.encrypt(bytes);
    } else if (what == "decrypt") {
      ok = state.decrypt(bytes);
    } else if (what == "memset") {
      std::memset(state.plain.data(), 0, bytes);
    } else if (what == "memzero") {
      sodium_memzero(state.plain.data(), bytes);
    } else if (what == "memcpy") {
      std::memcpy(state.sealed.data(), state.plain.data(), bytes);
    } else {
      ok = false;
    }
    std::uint64_t elapsed = bench::now_ns() - start;
    asm volatile("" : : "r"(state.plain.data()), "r"(state.sealed.data()) : "memory");
    if (ok)
      std::printf("%" PRIu64 "\n", elapsed);
    else
      std::printf("error %s failed\n", op);
    std::fflush(stdout);
  }
  return 0;
}
