// Small helpers shared by the bench programs: a monotonic clock, RAII for fds and
// mappings, a deterministic fill, the xor-reduce every handoff path computes, and a
// minimal JSON line writer. Header-only; the bench programs are single files.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

namespace bench {

inline std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
}

[[noreturn]] inline void die(const std::string& what) {
  std::fprintf(stderr, "bench: %s: %s\n", what.c_str(), std::strerror(errno));
  std::exit(1);
}

/// An owned file descriptor.
class Fd {
 public:
  explicit Fd(int fd = -1) noexcept : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const noexcept { return fd_; }
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

/// An owned mapping.
class Mapping {
 public:
  Mapping() noexcept = default;
  Mapping(void* address, std::size_t length) noexcept
      : address_(static_cast<std::uint8_t*>(address)), length_(length) {}
  Mapping(Mapping&& other) noexcept
      : address_(std::exchange(other.address_, nullptr)),
        length_(std::exchange(other.length_, 0)) {}
  Mapping& operator=(Mapping&& other) noexcept {
    if (this != &other) {
      reset();
      address_ = std::exchange(other.address_, nullptr);
      length_ = std::exchange(other.length_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }
  std::uint8_t* data() const noexcept { return address_; }
  std::size_t size() const noexcept { return length_; }
  void reset() noexcept {
    if (address_ != nullptr) ::munmap(address_, length_);
    address_ = nullptr;
    length_ = 0;
  }

 private:
  std::uint8_t* address_ = nullptr;
  std::size_t length_ = 0;
};

/// Maps `length` bytes of anonymous private memory (not yet touched).
inline Mapping map_anonymous(std::size_t length) {
  void* p = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) die("mmap of " + std::to_string(length) + " anonymous bytes");
  return Mapping(p, length);
}

/// Fills with a cheap deterministic pattern (every page touched).
inline void fill_pattern(std::uint8_t* p, std::size_t n) {
  std::uint64_t x = 0x9E3779B97F4A7C15ull;
  std::size_t words = n / 8;
  for (std::size_t i = 0; i < words; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i * 8, &x, 8);
  }
  for (std::size_t i = words * 8; i < n; ++i) p[i] = static_cast<std::uint8_t>(i);
}

/// The read pass of every handoff path: xor of the payload viewed as uint64 words.
/// Four independent accumulators let the compiler vectorise it, as numpy does.
inline std::uint64_t xor_reduce(const std::uint8_t* p, std::size_t n) {
  std::uint64_t a = 0, b = 0, c = 0, d = 0;
  std::size_t words = n / 8, i = 0;
  const auto* w = reinterpret_cast<const std::uint64_t*>(p);
  for (; i + 4 <= words; i += 4) {
    a ^= w[i];
    b ^= w[i + 1];
    c ^= w[i + 2];
    d ^= w[i + 3];
  }
  for (; i < words; ++i) a ^= w[i];
  return a ^ b ^ c ^ d;
}

/// Touches one byte per page (write), the way first use of fresh memory does.
inline void touch_pages(std::uint8_t* p, std::size_t n, std::size_t page) {
  for (std::size_t off = 0; off < n; off += page) p[off] = 1;
}

inline std::size_t page_size() { return static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)); }

inline std::uint64_t parse_size(const char* text) {
  char* end = nullptr;
  unsigned long long v = std::strtoull(text, &end, 10);
  if (end == text || *end != '\0' || v == 0) {
    std::fprintf(stderr, "bench: expected a positive integer, got '%s'\n", text);
    std::exit(2);
  }
  return v;
}

}  // namespace bench
