// ids.cpp: region ids, names, open modes.
#include <set>

#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

bool matches_random_pattern(const std::string& id) {
  if (id.size() != 26 || id.rfind("spshm_", 0) != 0) return false;
  for (std::size_t i = 6; i < id.size(); ++i) {
    char c = id[i];
    if (!((c >= 'a' && c <= 'z') || (c >= '2' && c <= '7'))) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("random region ids are unique and match spshm_[a-z2-7]{20}", "[ids]") {
  std::set<std::string> seen;
  for (int i = 0; i < 20000; ++i) {
    std::string id = random_region_id();
    INFO(id);
    REQUIRE(matches_random_pattern(id));
    REQUIRE(validate_region_id(id).ok());
    REQUIRE(seen.insert(id).second);
  }
  // Every base32 character shows up in that many ids (the encoding covers the alphabet).
  std::set<char> chars;
  for (const auto& id : seen) chars.insert(id.begin() + 6, id.end());
  REQUIRE(chars.size() == 32);
}

TEST_CASE("names: 1..21 characters of [a-z0-9_-]", "[ids]") {
  REQUIRE(validate_name("a").ok());
  REQUIRE(validate_name("model-weights_v2").ok());
  REQUIRE(validate_name(std::string(21, 'z')).ok());
  for (const std::string& bad :
       std::vector<std::string>{"", "a/b", "..", "../x", "a.b", "Upper", "with space",
                                std::string(22, 'a'), std::string("nul\0x", 5), "caf\xc3\xa9"}) {
    INFO(bad);
    REQUIRE_ERR(validate_name(bad), Errc::invalid_argument);
  }
}

TEST_CASE("named ids fit in 30 characters with the leading slash", "[ids]") {
  std::string id = named_region_id(std::string(21, 'x'));
  REQUIRE(id == "spshm_n_" + std::string(21, 'x'));
  REQUIRE(id.size() + 1 <= kMaxSegmentNameLength);
  REQUIRE(validate_region_id(id).ok());
  REQUIRE(random_region_id().size() + 1 <= kMaxSegmentNameLength);
}

TEST_CASE("validate_region_id rejects anything else", "[ids]") {
  for (const std::string& bad : std::vector<std::string>{
           "", "spshm_", "spshm_n_", "spshm_abc", "spshm_" + std::string(21, 'a'),
           "spshm_" + std::string(19, 'a') + "1", "spshm_" + std::string(19, 'a') + "A",
           "SPSHM_" + std::string(20, 'a'), "spshm_n_" + std::string(22, 'a'), "spshm_n_a/b",
           "spshm_n_..", "../spshm_n_a", "/spshm_n_a", "xspshm_n_a", "spshm_n_A"}) {
    INFO(bad);
    REQUIRE_ERR(validate_region_id(bad), Errc::invalid_argument);
  }
}

TEST_CASE("open mode roles", "[ids]") {
  REQUIRE(may_create(OpenMode::create));
  REQUIRE(may_create(OpenMode::create_or_open));
  REQUIRE(may_create(OpenMode::remove_and_create));
  REQUIRE_FALSE(may_create(OpenMode::open_only));
  REQUIRE(may_open_existing(OpenMode::open_only));
  REQUIRE(may_open_existing(OpenMode::create_or_open));
  REQUIRE_FALSE(may_open_existing(OpenMode::create));
  REQUIRE_FALSE(may_open_existing(OpenMode::remove_and_create));
  REQUIRE(removes_first(OpenMode::remove_and_create));
  REQUIRE_FALSE(removes_first(OpenMode::create_or_open));
}
