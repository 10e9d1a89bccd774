// The VM's quota counters (live regions, live bytes, live regions per owner) and the
// charge that one region holds against them.
//
// A charge adds first and checks the result, so two callers racing for the last slot
// cannot both win; a refused charge rolls its additions back. It is given back exactly
// once: by give_back() on the normal path, or by whoever destroys it (the NIF's resource
// destructor when the last reference to it dies). Every operation is a handful of atomic
// additions: no lock, no allocation, no system call, so it is safe in a destructor that
// runs on a normal scheduler.
#pragma once

#include <atomic>
#include <cstdint>

namespace spshm::quota {

/// A limit that is never reached.
inline constexpr std::int64_t kUnlimited = -1;

/// Live regions and bytes of one VM.
struct Totals {
  std::atomic<std::int64_t> regions{0};
  std::atomic<std::int64_t> bytes{0};
};

/// Live regions of one owner.
struct OwnerCount {
  std::atomic<std::int64_t> regions{0};
};

struct Limits {
  std::int64_t regions = kUnlimited;
  std::int64_t bytes = kUnlimited;
  std::int64_t per_owner = kUnlimited;
};

enum class Refused { none, regions, bytes, owner };

/// What take() decided; `before` is what was counted before this charge (the regions,
/// the bytes or the owner's regions, after the limit that refused it).
struct Outcome {
  Refused refused = Refused::none;
  std::int64_t before = 0;
};

inline bool over(std::int64_t value, std::int64_t limit) noexcept {
  return limit != kUnlimited && value > limit;
}

/// `before + amount`, and whether it overflowed (then the taker refuses, whatever the
/// limit: no counter may wrap).
inline bool add_overflows(std::int64_t before, std::int64_t amount, std::int64_t* sum) noexcept {
  return __builtin_add_overflow(before, amount, sum);
}

/// One region's share of the counters. Not copyable: the counters it holds are given
/// back once, by the one object that took them.
class Charge {
 public:
  Charge(Totals& totals, OwnerCount* owner) noexcept : totals_(&totals), owner_(owner) {}
  Charge(const Charge&) = delete;
  Charge& operator=(const Charge&) = delete;

  /// Takes one region of `bytes` for the owner, or refuses (nothing taken). Once only.
  Outcome take(std::int64_t bytes, const Limits& limits) noexcept {
    std::int64_t count = 0;
    std::int64_t was = totals_->regions.fetch_add(1);
    if (add_overflows(was, 1, &count) || over(count, limits.regions)) {
      totals_->regions.fetch_sub(1);
      return {Refused::regions, was};
    }
    std::int64_t total = 0;
    was = totals_->bytes.fetch_add(bytes);
    if (add_overflows(was, bytes, &total) || over(total, limits.bytes)) {
      totals_->bytes.fetch_sub(bytes);
      totals_->regions.fetch_sub(1);
      return {Refused::bytes, was};
    }
    if (owner_ != nullptr) {
      std::int64_t owned = 0;
      was = owner_->regions.fetch_add(1);
      if (add_overflows(was, 1, &owned) || over(owned, limits.per_owner)) {
        owner_->regions.fetch_sub(1);
        totals_->bytes.fetch_sub(bytes);
        totals_->regions.fetch_sub(1);
        return {Refused::owner, was};
      }
    }
    bytes_.store(bytes);
    state_.store(kHeld);
    return {};
  }

  /// Changes the bytes held (an opened region has its creator's size). Only by the one
  /// process that took the charge, before anyone else can give it back.
  void resize(std::int64_t bytes) noexcept {
    if (state_.load() != kHeld) return;
    std::int64_t before = bytes_.exchange(bytes);
    totals_->bytes.fetch_add(bytes - before);
  }

  /// Gives back what take() took; true for the one call that did (explicit release or
  /// destruction, whichever comes first), false for every other.
  bool give_back() noexcept {
    int expected = kHeld;
    if (!state_.compare_exchange_strong(expected, kGivenBack)) return false;
    totals_->regions.fetch_sub(1);
    totals_->bytes.fetch_sub(bytes_.load());
    if (owner_ != nullptr) owner_->regions.fetch_sub(1);
    return true;
  }

  bool held() const noexcept { return state_.load() == kHeld; }
  std::int64_t bytes() const noexcept { return bytes_.load(); }

 private:
  static constexpr int kEmpty = 0;
  static constexpr int kHeld = 1;
  static constexpr int kGivenBack = 2;

  Totals* totals_;
  OwnerCount* owner_;
  std::atomic<std::int64_t> bytes_{0};
  std::atomic<int> state_{kEmpty};
};

}  // namespace spshm::quota
