// The NIF's resource types and the identity of this VM's OS process.
//
// Lifetime rules (the reason this file exists):
//   * RegionResource owns the spshm::Region: its destructor (~Region) is the only place
//     the memory is unmapped. Mappings and zero-copy binaries keep it alive, so no
//     binary ever points at unmapped memory, whatever order things are dropped in.
//   * MappingResource is one hold of this OS process in the region header. unmap/1
//     releases it; a mapping that is garbage collected without unmap/1 releases it in
//     its destructor (an atomic update of the header: it never blocks).
//   * WatchResource owns a pidfd registered with enif_select; only the `stop` callback
//     closes it once the VM no longer polls it.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

#include <erl_nif.h>

#include "region.hpp"

namespace spshm::nif {

struct RegionResource {
  explicit RegionResource(Region&& r) noexcept : region(std::move(r)) {}

  Region region;
  /// deallocate/2 started through this handle (reset if it failed).
  std::atomic<bool> deallocating{false};
  /// deallocate/2 succeeded through this handle (the header says so too).
  std::atomic<bool> deallocated{false};
  /// deallocate_begin/1 marked it deallocated and zeroing goes on in slices: the offset
  /// of the next slice (kNotZeroing otherwise). If the resource dies before
  /// deallocate_finish/1, the reaper thread zeroes the rest and removes the name.
  static constexpr std::uint64_t kNotZeroing = ~std::uint64_t{0};
  std::atomic<std::uint64_t> zero_next{kNotZeroing};
  /// A zero-copy binary over this region was handed out: it may still be alive, so
  /// the bytes under it must not change (deallocate refuses to zero them). Together
  /// with `deallocating` (both seq_cst) no binary is made while zeroing starts.
  std::atomic<bool> zero_copy_shared{false};
  /// A status board (board_open) keeps a view of the data for as long as it lives: the
  /// data area then stays mapped until the region resource is destroyed (never retired).
  std::atomic<bool> data_pinned{false};
  /// A POSIX segment this VM created (its name is ours to remove).
  bool name_ours = false;
  /// Whether the last reference removes the name (on the reaper thread): kNameDropUntilKept
  /// from creation (create with drop_name: true) until keep_name(true) once the region is
  /// registered (kNameKept), kNameDropFreeing once a free begins (keep_name(false); a late
  /// keep_name(true) no longer undoes it). A caller killed between creating and
  /// registering, or between taking the record out of the registry and deallocating it,
  /// leaves no segment behind (nif_quota.cpp).
  static constexpr int kNameLeft = 0;
  static constexpr int kNameDropUntilKept = 1;
  static constexpr int kNameKept = 2;
  static constexpr int kNameDropFreeing = 3;
  std::atomic<int> name_state{kNameLeft};
  bool drops_name() const noexcept {
    int s = name_state.load();
    return s == kNameDropUntilKept || s == kNameDropFreeing;
  }
  /// Its name was handed to the reaper for removal (counted once: names_dropped()).
  std::atomic<bool> name_dropped{false};

  /// Deallocated through this handle or by anyone else (header state).
  bool is_deallocated() const noexcept {
    return deallocated.load() || (region.header().state.load() & kStateDeallocated) != 0;
  }

  // ---- releasing the data area at deallocation, not at garbage collection ----
  //
  // `access` counts NIF calls touching the data (read/write) in its low bits; bit 63 says
  // the data area is being retired. A call enters (fails once retiring), works, leaves;
  // retire() (after a successful deallocate, unless zero-copy binaries point into the
  // data) sets the bit, and whoever sees the count at zero with the bit set, retire()
  // itself or the last call to leave, detaches the data area and disposes of it (the
  // reaper thread for large ones). Nothing waits.
  static constexpr std::uint64_t kRetiring = std::uint64_t{1} << 63;
  std::atomic<std::uint64_t> access{0};
  std::atomic<bool> data_released{false};

  bool enter() noexcept {
    if (access.fetch_add(1) & kRetiring) {
      leave();
      return false;
    }
    return true;
  }
  void leave() noexcept {
    std::uint64_t before = access.fetch_sub(1);
    if ((before & kRetiring) && (before & ~kRetiring) == 1) release_data();
  }
  void retire() noexcept {
    std::uint64_t before = access.fetch_or(kRetiring);
    if (!(before & kRetiring) && (before & ~kRetiring) == 0) release_data();
  }
  void release_data() noexcept;
};

/// enter()/leave() of a RegionResource for one scope.
class DataAccess {
 public:
  explicit DataAccess(RegionResource* r) noexcept : r_(r), ok_(r->enter()) {}
  ~DataAccess() {
    if (ok_) r_->leave();
  }
  DataAccess(const DataAccess&) = delete;
  DataAccess& operator=(const DataAccess&) = delete;
  bool ok() const noexcept { return ok_; }

 private:
  RegionResource* r_;
  bool ok_;
};

struct MappingResource {
  RegionResource* owner;  ///< kept with enif_keep_resource, released in the destructor
  bool writable;
  /// A hold was added to the shared header. False only when this process sees a private
  /// copy of the header (Region::header_writable()): writing a hold there would detach
  /// our view of the shared header without telling anyone.
  bool held;
  std::atomic<bool> closed{false};  ///< set once by unmap/1 or the destructor

  /// Removes the hold of this mapping once (unmap/1 or the destructor). not_found only if
  /// release_holder/3 already dropped every hold of this VM: the hold is gone either way.
  void release_hold() noexcept;
};

struct WatchResource {
  std::atomic<int> fd{-1};            ///< the pidfd; -1 once closed
  std::atomic<bool> selected{false};  ///< registered with enif_select (stop will close it)
  std::uint32_t os_pid = 0;
};

struct ResourceTypes {
  ErlNifResourceType* region = nullptr;
  ErlNifResourceType* mapping = nullptr;
  ErlNifResourceType* watch = nullptr;
};
extern ResourceTypes resource_types;

/// Opens (load) or takes over (upgrade) every resource type. False on failure.
bool open_resource_types(ErlNifEnv* env);

/// This VM's OS process, resolved at load: the holder identity of every BEAM mapping.
struct SelfIdentity {
  std::uint32_t pid = 0;
  std::uint64_t start_time = 0;
  std::array<std::uint8_t, 16> boot_id{};
};
extern SelfIdentity self_identity;
bool init_self_identity();

// Typed accessors: false if `term` is not a resource of that type (-> badarg).
bool get_region(ErlNifEnv* env, ERL_NIF_TERM term, RegionResource** out);
bool get_mapping(ErlNifEnv* env, ERL_NIF_TERM term, MappingResource** out);
bool get_watch(ErlNifEnv* env, ERL_NIF_TERM term, WatchResource** out);

/// Counts, once per region, a name removed because the last reference to the region (or
/// its quota charge) died with a caller killed mid-allocation or mid-free.
void note_name_dropped(RegionResource* res) noexcept;
/// How many such names since the library was loaded.
std::uint64_t names_dropped() noexcept;

/// Offers a deallocated region's detached data area to the warm pool (nif_pool.cpp),
/// disposing of it as before when the pool refuses it.
void release_data_to_pool_or_dispose(Region& region, Region::DetachedData&& data) noexcept;

/// Moves `region` into a new resource and returns its term (the term owns it).
/// Sets *out (optional) to the resource for further encoding.
ERL_NIF_TERM make_region_resource(ErlNifEnv* env, Region&& region, RegionResource** out);

}  // namespace spshm::nif
