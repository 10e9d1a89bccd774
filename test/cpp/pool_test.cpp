// The warm pool (core/pool.hpp): offer/take, the data memfd lock, data_name, budget.
#include <vector>

#include "helpers.hpp"
#include "pool.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {

constexpr std::uint64_t kSize = 3 << 20;

struct PoolBudget {
  explicit PoolBudget(std::uint64_t bytes) { (void)pool::set_budget(bytes); }
  ~PoolBudget() { (void)pool::set_budget(0); }
};

// Deallocates `r` and offers its data area as the NIF does; true if it was pooled.
bool free_to_pool(Region& r) {
  REQUIRE_OK(r.deallocate(false));
  auto back = pool::offer(r, r.detach_data(), false);
  return !back.has_value();
}

}  // namespace

TEST_CASE("a freed memfd region comes back with a new id, zeroed, its data memfd named", "[pool]") {
  PoolBudget budget(64 << 20);
  Region a = create_ok(options(BackendKind::memfd, kSize));
  std::string old_id = a.id();
  std::string old_data = a.data_path();
  auto bytes = pattern(kSize, 7);
  REQUIRE_OK(a.write(0, bytes.data(), bytes.size()));
  auto before = pool::stats();
  REQUIRE(free_to_pool(a));
  REQUIRE(pool::stats().bytes_held == before.bytes_held + kSize);

  // While pooled, an opener of the old paths is refused.
  OpenTarget old{old_id, a.control_path(), old_data};
  REQUIRE_FALSE(Region::open(old, false).ok());

  Region b = create_ok(options(BackendKind::memfd, kSize));
  REQUIRE(pool::stats().hits == before.hits + 1);
  REQUIRE(b.id() != old_id);
  std::vector<std::uint8_t> back(kSize, 0xFF);
  REQUIRE_OK(b.read(0, back.data(), back.size()));
  REQUIRE(back == std::vector<std::uint8_t>(kSize, 0));
  REQUIRE(std::string(b.header().data_name) == old_id + ".data");
  REQUIRE_OK(validate_header(b.header(), kSize));

  // Its paths open (the data_name check), and that open holds the data lock: b is not
  // pooled while it lives.
  OpenTarget t{b.id(), b.control_path(), b.data_path()};
  auto opened = Region::open(t, false);
  REQUIRE_OK(opened);
  auto mid = pool::stats();
  REQUIRE_FALSE(free_to_pool(b));
  REQUIRE(pool::stats().refused == mid.refused + 1);
}

TEST_CASE("the budget bounds the pool and a smaller budget releases objects", "[pool]") {
  PoolBudget budget(2 * kSize);
  std::vector<Region> regions;
  for (int i = 0; i < 3; ++i) regions.push_back(create_ok(options(BackendKind::memfd, kSize)));
  int pooled = 0;
  for (auto& r : regions) pooled += free_to_pool(r) ? 1 : 0;
  REQUIRE(pooled == 2);
  REQUIRE(pool::stats().bytes_held == 2 * kSize);
  auto released = pool::set_budget(kSize);
  REQUIRE(released.size() == 1);
  REQUIRE(pool::stats().bytes_held == kSize);
  REQUIRE(pool::drain().size() == 1);
  REQUIRE(pool::stats().bytes_held == 0);
}

TEST_CASE("sealed, encrypted, small and posix regions are never pooled", "[pool]") {
  PoolBudget budget(64 << 20);
  auto before = pool::stats();
  Region sealed = create_ok(options(BackendKind::memfd, kSize));
  REQUIRE_OK(sealed.seal());
  REQUIRE_FALSE(free_to_pool(sealed));
  auto enc_opts = options(BackendKind::memfd, kSize);
  enc_opts.encrypted = true;
  enc_opts.security_level = 1;
  Region enc = create_ok(enc_opts);
  REQUIRE_FALSE(free_to_pool(enc));
  Region small = create_ok(options(BackendKind::memfd, 4096));
  REQUIRE_FALSE(free_to_pool(small));
  Region posix = create_ok(options(BackendKind::posix, kSize));
  SegmentCleanup cleanup{posix.id()};
  REQUIRE_FALSE(free_to_pool(posix));
  REQUIRE(pool::stats().entries == before.entries);
}
