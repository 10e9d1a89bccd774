// The warm pool (pool.hpp): a list of mapped data memfds under one mutex.
#include "pool.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "format.hpp"
#include "region_impl.hpp"

namespace spshm {

Result<void> lock_data_object(const platform::Handle& data, const std::string& what) {
  // Only the pool holds this byte exclusively, and only while the object is not a
  // region's (offer() tries it for a few system calls): a short wait, then give up.
  for (int attempt = 0;; ++attempt) {
    auto r = platform::lock_shared(data, kLivenessLockByte);
    if (r) return r;
    if (r.error().code != Errc::busy)
      return Error{r.error().code, r.error().sys_errno, what + ": " + r.error().message};
    if (attempt >= 5)
      return Error{Errc::deallocated, 0,
                   what +
                       " belongs to no region any more (it was deallocated and its memory "
                       "went back to its creator's warm pool): ask for a fresh ref"};
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

namespace pool {

namespace {

struct Pool {
  std::mutex mutex;
  std::vector<Entry> entries;
  Stats stats;
};

// Never destroyed: the NIF may use it from threads still running at unload.
Pool& the_pool = *new Pool;

std::vector<Entry> trim_locked(Pool& p) {
  std::vector<Entry> out;
  // Largest first: fewest objects released for the bytes to give back.
  std::sort(p.entries.begin(), p.entries.end(),
            [](const Entry& a, const Entry& b) { return a.object_size < b.object_size; });
  while (p.stats.bytes_held > p.stats.budget && !p.entries.empty()) {
    p.stats.bytes_held -= p.entries.back().object_size;
    out.push_back(std::move(p.entries.back()));
    p.entries.pop_back();
    ++p.stats.released;
  }
  p.stats.entries = p.entries.size();
  return out;
}

}  // namespace

std::vector<Entry> set_budget(std::uint64_t bytes) {
  std::lock_guard<std::mutex> lock(the_pool.mutex);
  the_pool.stats.budget = bytes;
  return trim_locked(the_pool);
}

std::vector<Entry> drain() {
  std::lock_guard<std::mutex> lock(the_pool.mutex);
  std::vector<Entry> out = std::move(the_pool.entries);
  the_pool.entries.clear();
  the_pool.stats.released += out.size();
  the_pool.stats.bytes_held = 0;
  the_pool.stats.entries = 0;
  return out;
}

Stats stats() {
  std::lock_guard<std::mutex> lock(the_pool.mutex);
  return the_pool.stats;
}

bool eligible(const CreateOptions& o, std::uint64_t capacity) noexcept {
  if (o.backend != BackendKind::memfd || !o.name.empty() || o.encrypted || o.lock_memory ||
      o.worker_output || o.security_level != 0 || capacity < kMinPooledBytes)
    return false;
  std::lock_guard<std::mutex> lock(the_pool.mutex);
  return the_pool.stats.budget > 0;
}

std::optional<Entry> take(std::uint64_t object_size, std::uint64_t capacity, bool huge) {
  std::lock_guard<std::mutex> lock(the_pool.mutex);
  Pool& p = the_pool;
  auto best = p.entries.end();
  for (auto it = p.entries.begin(); it != p.entries.end(); ++it) {
    if (it->huge != huge || it->object_size < object_size ||
        it->object_size > object_size + object_size / 4 || it->mapping.size() < capacity)
      continue;
    if (best == p.entries.end() || it->object_size < best->object_size) best = it;
  }
  if (best == p.entries.end()) {
    ++p.stats.misses;
    return std::nullopt;
  }
  Entry out = std::move(*best);
  p.entries.erase(best);
  p.stats.bytes_held -= out.object_size;
  p.stats.entries = p.entries.size();
  ++p.stats.hits;
  return out;
}

bool is_pooled_object(const std::string& path) {
  auto handle = platform::open_path(path, platform::Access::read_only);
  return handle && platform::exclusively_locked(*handle, kLivenessLockByte);
}

void release_lock(const platform::Handle& object) noexcept {
  platform::unlock(object, kLivenessLockByte);
}

std::optional<Region::DetachedData> offer(const Region& region, Region::DetachedData&& data,
                                          bool zeroed) {
  const RegionHeader& h = region.header();
  // A sealing bit left by a sealer killed mid-seal (nobody holds the seal lock) is no
  // reason to refuse the object: cleared first (seal_lock.cpp).
  if (h.state.load(std::memory_order_acquire) & kStateSealing) (void)region.clear_stale_sealing();
  std::uint32_t state = h.state.load(std::memory_order_acquire);
  bool shape = region.backend() == BackendKind::memfd && region.role() == Role::created &&
               !region.encrypted() && region.capacity() >= kMinPooledBytes &&
               h.security_level == 0 && (h.flags & kFlagWorkerOutput) == 0 &&
               (state & kStateDeallocated) != 0 && (state & (kStateSealed | kStateSealing)) == 0 &&
               data.object.valid() && data.mapping.valid() && data.mapping.size() >= data.bytes;
  if (!shape) return std::move(data);
  {
    std::lock_guard<std::mutex> lock(the_pool.mutex);
    if (the_pool.stats.budget == 0) return std::move(data);
  }
  auto refuse = [&]() -> std::optional<Region::DetachedData> {
    std::lock_guard<std::mutex> lock(the_pool.mutex);
    ++the_pool.stats.refused;
    return std::move(data);
  };
  // A kernel write seal (a seal that got that far) makes the object useless to a writer.
  if (platform::any_write_seal(data.object)) return refuse();
  auto info = platform::stat(data.object, "the data memfd of " + region.id());
  if (!info) return refuse();
  std::uint64_t object_size = info->size;
  {
    std::lock_guard<std::mutex> lock(the_pool.mutex);
    if (the_pool.stats.bytes_held + object_size > the_pool.stats.budget) {
      ++the_pool.stats.refused;
      return std::move(data);
    }
  }
  // No other open of the object (a worker's attachment, its mapping, a forked child's
  // inherited descriptor, another Region of this VM) holds its lock: nobody but us can
  // see what the next region writes. From here on the byte stays ours.
  auto exclusive = platform::try_lock_exclusive(data.object, kLivenessLockByte);
  if (!exclusive || !*exclusive) return refuse();
  Entry entry;
  entry.huge = platform::is_hugetlb(data.object);
  entry.object_size = object_size;
  // The bytes past the region's end (up to the object's end) were never handed out by
  // this region; a small tail is cleared here so that a zeroed free leaves it all clean.
  std::uint64_t tail = object_size > data.bytes ? object_size - data.bytes : 0;
  bool tail_mapped = object_size <= (data.mapping.size() + platform::page_size() - 1) /
                                        platform::page_size() * platform::page_size() ||
                     entry.huge;
  entry.clean = zeroed && tail_mapped && tail <= 65536;
  if (entry.clean && tail > 0) {
    // A huge page a peer freed faults here if no free one backs it (SIGBUS): guarded;
    // on a fault the object is left unclean, and take() zeroes it (guarded too).
    std::uint8_t* from = data.mapping.data() + data.bytes;
    auto body = [&] { std::memset(from, 0, tail); };
    using Body = decltype(body);
    if (!entry.huge)
      body();
    else if (!platform::run_guarded([](void* b) { (*static_cast<Body*>(b))(); }, &body, from, tail))
      entry.clean = false;
  }
  entry.object = std::move(data.object);
  entry.mapping = std::move(data.mapping);
  std::lock_guard<std::mutex> lock(the_pool.mutex);
  Pool& p = the_pool;
  if (p.stats.bytes_held + object_size > p.stats.budget) {  // the budget shrank meanwhile
    platform::unlock(entry.object, kLivenessLockByte);
    ++p.stats.refused;
    Region::DetachedData back;
    back.object = std::move(entry.object);
    back.mapping = std::move(entry.mapping);
    back.bytes = object_size;
    return back;
  }
  p.stats.bytes_held += object_size;
  ++p.stats.returned;
  p.entries.push_back(std::move(entry));
  p.stats.entries = p.entries.size();
  return std::nullopt;
}

}  // namespace pool

namespace {

std::uint64_t round_up(std::uint64_t n, std::uint64_t unit) noexcept {
  return (n + unit - 1) / unit * unit;
}

Result<NewDataObject> map_fresh(platform::Handle object, std::uint64_t length, bool huge,
                                const std::string& id) {
  NewDataObject out;
  auto mapped = platform::map(object, 0, length, platform::Access::read_write,
                              platform::Sharing::shared, "the data memfd of " + id);
  if (!mapped) return mapped.error();
  out.object = std::move(object);
  out.mapping = std::move(*mapped);
  out.huge = huge;
  return out;
}

/// Zeroes a pooled object before its reuse. Pages of a huge-page one that a peer freed
/// (fallocate PUNCH_HOLE through /proc/<pid>/fd/<n>) fault with SIGBUS when no free huge
/// page can back them: the memset is guarded, and the object's pages are freed instead
/// (zeros without touching them).
void zero_pooled(pool::Entry& entry) {
  auto body = [&] { std::memset(entry.mapping.data(), 0, entry.object_size); };
  if (!entry.huge) return body();
  using Body = decltype(body);
  if (!platform::run_guarded([](void* b) { (*static_cast<Body*>(b))(); }, &body,
                             entry.mapping.data(), entry.object_size))
    (void)platform::release_pages(entry.object, 0, entry.object_size);
}

}  // namespace

Result<NewDataObject> obtain_data_object(const std::string& id, const CreateOptions& o,
                                         std::uint64_t capacity) {
  std::uint64_t page = platform::page_size();
  platform::HugePageInfo huge_info;
  bool huge = false;
  // :auto only for regions of at least one huge page (a smaller one would waste most of
  // its page), and never for encrypted ones (their layout is mapped by its capacity).
  // The huge page size is fixed at boot: read once. The pool's counts are read (one
  // pass of /proc/meminfo, ~20 us) only for a region that could use huge pages.
  static const std::uint64_t huge_page_size = platform::huge_page_info().page_size;
  // true, like :auto, is for regions of at least one huge page (docs): a smaller one
  // would take a whole huge page for a few KiB (and fail with no_space once the pool is
  // empty), where the same region carved from an arena never uses one.
  bool wanted =
      o.huge_pages == HugePages::on && !(huge_page_size != 0 && capacity < huge_page_size);
  bool read = false;
  if (o.huge_pages == HugePages::automatic && !o.encrypted && huge_page_size != 0 &&
      capacity >= huge_page_size) {
    huge_info = platform::huge_page_info();
    read = true;
    wanted = huge_info.page_size != 0 && huge_info.total > 0 && capacity >= huge_info.page_size;
  }
  if (wanted) {
    if (!read) huge_info = platform::huge_page_info();
    std::uint64_t need =
        huge_info.page_size ? round_up(capacity, huge_info.page_size) / huge_info.page_size : 0;
    huge = huge_info.page_size != 0 && huge_info.free >= need;
    if (!huge && o.huge_pages == HugePages::on)
      return Error{Errc::no_space, ENOMEM,
                   huge_info.page_size == 0
                       ? std::string("huge_pages: true, but this host offers no huge pages "
                                     "(no hugetlbfs): use huge_pages: :auto or false")
                       : "huge_pages: true, but the host's hugetlb pool has " +
                             std::to_string(huge_info.free) + " free pages of " +
                             std::to_string(huge_info.page_size) + " bytes and region " + id +
                             " needs " + std::to_string(need) +
                             ": reserve more (as root: echo N > /proc/sys/vm/nr_hugepages) or "
                             "use huge_pages: :auto (`mix snakepit.shm.doctor` shows the pool)"};
  }
  std::uint64_t unit = huge ? huge_info.page_size : page;
  std::uint64_t object_size = round_up(capacity, unit);
  if (pool::eligible(o, capacity)) {
    if (auto entry = pool::take(object_size, capacity, huge)) {
      if (!entry->clean) zero_pooled(*entry);
      NewDataObject out;
      out.data_name = platform::anonymous_name(entry->object);
      out.object = std::move(entry->object);
      out.mapping = std::move(entry->mapping);
      out.pooled = true;
      out.huge = entry->huge;
      return out;
    }
  }
  if (huge) {
    auto object = platform::create_anonymous_huge(id + ".data", object_size);
    if (object) return map_fresh(std::move(*object), object_size, true, id);
    if (o.huge_pages == HugePages::on) return object.error();
    object_size = round_up(capacity, page);  // :auto: the pool emptied meanwhile
  }
  // Not when create() itself writes every page (encryption without defer_chunks) or
  // locks them (lock_memory): they would be faulted in without a reservation.
  bool defer = o.defer_allocate && (!o.encrypted || o.defer_chunks) && !o.lock_memory;
  auto object = defer ? platform::create_anonymous_unallocated(id + ".data", object_size)
                      : platform::create_anonymous(id + ".data", object_size);
  if (!object) return object.error();
  if (defer) {
    auto fresh = map_fresh(std::move(*object), capacity, false, id);
    if (fresh) {
      fresh->unallocated = true;
      fresh->object_size = object_size;
    }
    return fresh;
  }
  // (Prefaulting this mapping with MADV_POPULATE_WRITE or MAP_POPULATE only moves the
  // page faults from the first write into create: no gain measured, bench/FINDINGS.md.)
  return map_fresh(std::move(*object), capacity, false, id);
}

}  // namespace spshm
