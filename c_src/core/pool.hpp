// The warm pool: data memfds of freed large regions, kept mapped for the next region of
// their size.
//
// A fresh 256 MiB region costs its pages twice (fallocate allocates and zeroes them, then
// the writer faults each 4 KiB page into its mapping): ~0.5 s per GiB. A region made from
// a pooled object costs a memset (or nothing when the free already zeroed it), because
// the object's pages and this process's mapping of them are both kept.
//
// What is pooled: the data memfd (and this process's read-write mapping of it) of a
// region created here that was deallocated, is not encrypted, was never sealed (nor a
// seal attempted), is not a worker output, is at least kMinPooledBytes, and that no other
// open of the data object holds (byte 0 of every data memfd is locked shared by every
// opener, C++ and Python, for as long as its open or a mapping of it lives: the kernel
// drops the lock with the last reference). The pool takes that byte exclusively when it
// takes an object and keeps it until it hands the object out again, so no library opener
// can map a pooled object, whoever had its path before. A region made from a pooled
// object gets a new control memfd (a new id, an empty holder table) whose header names
// the data memfd (data_name: a memfd cannot be renamed), and reads as zeros like a fresh
// one (zeroed when handed out unless the free already zeroed it).
//
// Pooled objects are plain memfds of this process: they die with it (SIGKILL included),
// so nothing of the pool can outlive the VM. Budget 0 (the core's default) disables it.
// Thread-safe. Never blocks on I/O: offer() is a few fcntl calls, take() may memset.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "platform.hpp"
#include "region.hpp"

namespace spshm::pool {

/// Smallest data object the pool keeps (smaller regions are cheap to make).
inline constexpr std::uint64_t kMinPooledBytes = std::uint64_t{1} << 20;

struct Stats {
  std::uint64_t hits = 0;        ///< regions made from a pooled object
  std::uint64_t misses = 0;      ///< eligible regions made fresh (nothing pooled fitted)
  std::uint64_t bytes_held = 0;  ///< bytes of the objects in the pool now
  std::uint64_t entries = 0;     ///< objects in the pool now
  std::uint64_t budget = 0;      ///< most bytes the pool may hold
  std::uint64_t returned = 0;    ///< objects taken into the pool
  std::uint64_t refused = 0;     ///< freed eligible-size objects not pooled (held elsewhere,
                                 ///< sealed, over budget)
  std::uint64_t released = 0;    ///< objects given back to the OS by a budget change or drain
};

/// One pooled object.
struct Entry {
  platform::Handle object;    ///< the data memfd (byte 0 locked exclusively by this open)
  platform::Mapping mapping;  ///< this process's read-write mapping of it, from offset 0
  std::uint64_t object_size = 0;
  bool clean = false;  ///< every byte is zero already (zeroed when freed)
  bool huge = false;   ///< a hugetlbfs memfd
};

/// Sets the budget in bytes (0 disables the pool). Objects beyond it are taken out and
/// returned: the caller destroys them (munmap of large objects takes time).
std::vector<Entry> set_budget(std::uint64_t bytes);
/// Takes every object out (application stop); the caller destroys them.
std::vector<Entry> drain();
Stats stats();

/// Whether a region with these options and this data capacity may come from (and go back
/// to) the pool: memfd, unnamed, unencrypted, :standard, not locked in memory, not a
/// worker output, at least kMinPooledBytes, and the pool enabled.
bool eligible(const CreateOptions& options, std::uint64_t capacity) noexcept;

/// A pooled object of at least `object_size` bytes (and at most a quarter more) of the
/// same page kind, mapped at least `capacity` bytes long; counts a hit or a miss. The
/// object's exclusive lock is still held: the caller zeroes it (unless clean), then
/// releases the lock with release_lock() once the region's header names it.
std::optional<Entry> take(std::uint64_t object_size, std::uint64_t capacity, bool huge);
/// Drops the pool's exclusive lock of a taken object.
void release_lock(const platform::Handle& object) noexcept;

/// Offers the data area of `region` (deallocated; detach_data() gave `data`) to the pool.
/// `zeroed`: the deallocation zeroed the data. Returns the data back, untouched, when the
/// pool refuses it (the caller destroys it as before).
std::optional<Region::DetachedData> offer(const Region& region, Region::DetachedData&& data,
                                          bool zeroed);

/// True if `path` (a /proc/<pid>/fd/<n> link to a data memfd of ours) names an object in
/// some process's warm pool (its byte 0 is locked exclusively): not a region, nothing
/// leaked. For tools that scan the host.
bool is_pooled_object(const std::string& path);

}  // namespace spshm::pool

namespace spshm {

/// The data object of a new memfd region, mapped read-write in this process.
struct NewDataObject {
  platform::Handle object;
  platform::Mapping mapping;
  std::string data_name;  ///< the object's memfd name when not id + ".data" (pooled)
  bool pooled = false;    ///< from the pool: its exclusive lock is still held (release_lock)
  bool huge = false;      ///< on hugetlbfs: the mapping covers the whole object
  /// options.defer_allocate honoured: sized, pages not allocated (Region::allocate_range)
  bool unallocated = false;
  std::uint64_t object_size = 0;
};

/// Gets the data object of new memfd region `id` holding `capacity` bytes: a pooled one
/// when the options allow it and one fits (zeroed unless clean), else a huge-page memfd
/// when asked (HugePages::on fails with no_space/unsupported when the host has none;
/// automatic falls back to ordinary pages silently), else a fresh memfd.
Result<NewDataObject> obtain_data_object(const std::string& id, const CreateOptions& options,
                                         std::uint64_t capacity);

}  // namespace spshm
