// Region ids, well-known names and open modes.
#include "ids.hpp"
#include "guard.hpp"

#include <cstdint>
#include <cstring>

#include "crypto.hpp"
#include "platform.hpp"
#include "region.hpp"

namespace spshm {

namespace {

constexpr std::size_t kPrefixLength = sizeof kNamePrefix - 1;

bool is_name_char(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

bool is_base32_char(char c) noexcept { return (c >= 'a' && c <= 'z') || (c >= '2' && c <= '7'); }

}  // namespace

bool may_create(OpenMode mode) noexcept { return mode != OpenMode::open_only; }
bool may_open_existing(OpenMode mode) noexcept {
  return mode == OpenMode::open_only || mode == OpenMode::create_or_open;
}
bool removes_first(OpenMode mode) noexcept { return mode == OpenMode::remove_and_create; }

bool is_random_region_id(const std::string& id) noexcept {
  if (id.size() != kPrefixLength + kRandomIdLength) return false;
  if (id.compare(0, kPrefixLength, kNamePrefix) != 0) return false;
  for (std::size_t i = kPrefixLength; i < id.size(); ++i)
    if (!is_base32_char(id[i])) return false;
  return true;
}

bool is_named_region_id(const std::string& id) noexcept {
  if (id.size() <= kNamedIdPrefixLength || id.size() > kNamedIdPrefixLength + kMaxNameLength)
    return false;
  if (id.compare(0, kNamedIdPrefixLength, kNamedIdPrefix) != 0) return false;
  for (std::size_t i = kNamedIdPrefixLength; i < id.size(); ++i)
    if (!is_name_char(id[i])) return false;
  return true;
}

std::string random_region_id() {
  // 13 random bytes = 104 bits, of which the first 100 become 20 base32 characters.
  std::uint8_t bytes[13];
  if (!platform::random_bytes(bytes, sizeof bytes)) crypto::random_bytes(bytes, sizeof bytes);
  std::string id(kNamePrefix);
  std::uint32_t buffer = 0;
  int bits = 0;
  std::size_t next = 0;
  while (id.size() < kPrefixLength + kRandomIdLength) {
    if (bits < 5) {
      buffer = (buffer << 8) | bytes[next++];
      bits += 8;
    }
    id += kBase32Alphabet[(buffer >> (bits - 5)) & 31u];
    bits -= 5;
  }
  std::memset(bytes, 0, sizeof bytes);
  return id;
}

Result<void> validate_name(const std::string& name) {
  return guarded([&]() -> Result<void> {
    if (name.empty() || name.size() > kMaxNameLength)
      return Error{Errc::invalid_argument, 0,
                   "region name must be 1 to " + std::to_string(kMaxNameLength) +
                       " characters long, got " + std::to_string(name.size())};
    for (char c : name) {
      if (!is_name_char(c))
        return Error{Errc::invalid_argument, 0,
                     "region name may only contain lower-case letters, digits, '_' and '-' "
                     "(no '/', '.', upper case or spaces): got \"" +
                         name + "\""};
    }
    return {};
  });
}

std::string named_region_id(const std::string& name) { return kNamedIdPrefix + name; }

Result<void> validate_region_id(const std::string& id) {
  return guarded([&]() -> Result<void> {
    if (is_random_region_id(id) || is_named_region_id(id)) return {};
    return Error{Errc::invalid_argument, 0,
                 "not a snakepit_shm region id: \"" + id.substr(0, 64) +
                     "\" (expected spshm_ followed by 20 characters of [a-z2-7], or spshm_n_ "
                     "followed by a name of 1 to 21 characters of [a-z0-9_-])"};
  });
}

}  // namespace spshm
