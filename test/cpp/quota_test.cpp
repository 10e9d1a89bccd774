// quota.hpp: the quota counters and the charge one region holds against them.
#include <sys/stat.h>

#include <atomic>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "helpers.hpp"
#include "quota.hpp"
#include "region.hpp"

using namespace spshm;

TEST_CASE("a charge adds, checks, and takes nothing when refused", "[quota]") {
  quota::Totals totals;
  quota::OwnerCount owner;
  quota::Limits limits{2, 100, 1};

  quota::Charge a(totals, &owner);
  CHECK(a.take(60, limits).refused == quota::Refused::none);
  quota::Charge b(totals, &owner);
  auto refused = b.take(10, limits);
  CHECK(refused.refused == quota::Refused::owner);
  CHECK(refused.before == 1);
  quota::Charge c(totals, nullptr);
  auto too_big = c.take(41, limits);
  CHECK(too_big.refused == quota::Refused::bytes);
  CHECK(too_big.before == 60);
  CHECK(c.take(40, limits).refused == quota::Refused::none);
  quota::Charge d(totals, nullptr);
  CHECK(d.take(0, limits).refused == quota::Refused::regions);
  CHECK(totals.regions.load() == 2);
  CHECK(totals.bytes.load() == 100);
  CHECK(owner.regions.load() == 1);

  // Given back once: whoever comes second (an explicit release, a destructor) gives
  // nothing back again; a refused charge has nothing to give back.
  CHECK(a.give_back());
  CHECK_FALSE(a.give_back());
  CHECK_FALSE(b.give_back());
  CHECK(totals.regions.load() == 1);
  CHECK(totals.bytes.load() == 40);
  CHECK(owner.regions.load() == 0);
  c.resize(7);
  CHECK(totals.bytes.load() == 7);
  CHECK(c.give_back());
  c.resize(9);  // given back: no effect
  CHECK(totals.regions.load() == 0);
  CHECK(totals.bytes.load() == 0);
}

TEST_CASE("a charge that would wrap a counter is refused, even without limits", "[quota]") {
  // Found by the native fuzzer under UBSan: 1 + INT64_MAX bytes overflowed the sum.
  quota::Totals totals;
  quota::Limits unlimited{quota::kUnlimited, quota::kUnlimited, quota::kUnlimited};
  quota::Charge a(totals, nullptr);
  CHECK(a.take(1, unlimited).refused == quota::Refused::none);
  quota::Charge b(totals, nullptr);
  auto wrapped = b.take(std::numeric_limits<std::int64_t>::max(), unlimited);
  CHECK(wrapped.refused == quota::Refused::bytes);
  CHECK(wrapped.before == 1);
  CHECK(totals.bytes.load() == 1);
  CHECK(totals.regions.load() == 1);
  CHECK(a.give_back());
}

TEST_CASE("racing charges never pass a limit and racing give-backs count once", "[quota]") {
  quota::Totals totals;
  quota::Limits limits{64, quota::kUnlimited, quota::kUnlimited};
  constexpr int kThreads = 8;
  constexpr int kEach = 32;
  std::vector<std::unique_ptr<quota::Charge>> charges;
  for (int i = 0; i < kThreads * kEach; ++i)
    charges.push_back(std::make_unique<quota::Charge>(totals, nullptr));
  std::atomic<int> won{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        if (charges[t * kEach + i]->take(1, limits).refused == quota::Refused::none) ++won;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(won.load() == 64);
  CHECK(totals.regions.load() == 64);
  threads.clear();
  // Two give-backs race for every charge (release and destructor): one wins each.
  std::atomic<int> given{0};
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&] {
      for (auto& c : charges)
        if (c->give_back()) ++given;
    });
  }
  for (auto& th : threads) th.join();
  CHECK(given.load() == 64);
  CHECK(totals.regions.load() == 0);
  CHECK(totals.bytes.load() == 0);
}

// region.cpp: what a creation dropped unregistered does to its name (nif_quota.cpp).
TEST_CASE("unlink_unless_held leaves a name another open holds", "[region][posix]") {
  using namespace spshm_test;
  Region r = create_ok(options(BackendKind::posix, 4096));
  SegmentCleanup cleanup{r.id()};
  struct stat st;
  {
    auto opened = Region::open(OpenTarget{r.id(), "", ""}, false);
    REQUIRE_OK(opened);
    REQUIRE_OK(r.unlink_unless_held());
    CHECK(stat(r.control_path().c_str(), &st) == 0);  // held by `opened`: stays
  }
  REQUIRE_OK(r.unlink_unless_held());
  CHECK(stat(r.control_path().c_str(), &st) != 0);  // nobody else: gone
}
