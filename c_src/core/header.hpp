// Internal helpers that write and check a RegionHeader (format.cpp).
#pragma once

#include <cstdint>
#include <string>

#include "error.hpp"
#include "format.hpp"
#include "platform.hpp"

namespace spshm {

/// Everything a creator decides about a new header; the rest (creator pid, start time,
/// boot id, creation time, cipher, chunk size, holder capacity) is filled in by init_header.
struct HeaderInit {
  std::string region_id;
  BackendKind backend = BackendKind::posix;
  std::uint32_t flags = 0;  ///< kFlag*
  std::uint32_t security_level = 0;
  std::uint64_t data_size = 0;
  std::uint64_t data_capacity = 0;
  std::uint64_t data_offset = 0;
  std::string metadata_json;
  std::uint64_t idle_timeout_ns = 0;
  std::string data_name;  ///< the data memfd's name when not region_id + ".data" (pool reuse)
};

/// Zeroes the header and fills every field except the magic and the CRC. The header
/// must not be visible as published yet (magic zero).
void init_header(RegionHeader& header, const HeaderInit& init);

/// Computes the CRC, then writes the magic last (release): an opener that sees the magic
/// sees a complete header, and one that sees zeros knows creation is still under way.
void publish_header(RegionHeader& header) noexcept;

/// True once publish_header has run (acquire): every immutable field may be read.
bool header_published(const RegionHeader& header) noexcept;

/// The name the data memfd of a split region must have: the header's data_name (a
/// reused pooled object) or, when that is empty, region_id + ".data".
std::string data_object_name(const RegionHeader& header);

/// Every check of validate_header that needs no object size.
Result<void> validate_header_fields(const RegionHeader& header);

/// The sealing side of the seal/hold exclusion (holders.cpp): the pid of a live process
/// other than `self` that holds the region writable (or is registering a writable hold),
/// or 0. Call it only after setting kStateSealed (seq_cst).
/// `lock` (an open of the control object, may be null) lets the kernel say that a slot
/// left busy is dead (its slot lock is free): such slots never block a seal.
std::uint32_t other_writable_holder(const RegionHeader& header, std::uint32_t self,
                                    const platform::Handle* lock = nullptr,
                                    std::uint64_t lock_base = 0);

/// Largest data_size a header may claim (keeps every offset computation far from overflow).
inline constexpr std::uint64_t kMaxDataSize = std::uint64_t{1} << 60;

}  // namespace spshm
