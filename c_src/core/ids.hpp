// Internal constants and checks of region ids and names (ids.cpp).
#pragma once

#include <cstddef>
#include <string>

namespace spshm {

/// Region ids: "spshm_" + 20 base32 characters, or "spshm_n_" + a 1..21 character name.
inline constexpr char kNamedIdPrefix[] = "spshm_n_";
inline constexpr std::size_t kNamedIdPrefixLength = sizeof kNamedIdPrefix - 1;
inline constexpr std::size_t kRandomIdLength = 20;
inline constexpr std::size_t kMaxNameLength = 21;
/// RFC 4648 base32, lower case: what random ids are made of.
inline constexpr char kBase32Alphabet[] = "abcdefghijklmnopqrstuvwxyz234567";

bool is_random_region_id(const std::string& id) noexcept;
bool is_named_region_id(const std::string& id) noexcept;

}  // namespace spshm
