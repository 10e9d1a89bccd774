// --- Removing a large orphan in slices (issue 12) ----------------------------------
// The last close of an unlinked POSIX segment frees all its pages in one system call
// (0.1 s per GiB), which keeps a core busy for as long and lets the VM's normal
// schedulers lose the CPU while they busy-wait (bench/FINDINGS.md section 7). The sweep
// therefore removes an orphan's name with sweep_segment_begin/1, which keeps the open
// object (and its exclusive liveness lock), and frees its pages with
// release_pages_step/1, a bounded amount per dirty call, returning to a normal
// scheduler between calls. A sweeper killed midway leaves the object to its resource's
// destructor, which hands it to the reaper thread.

#include <mutex>
#include <new>

#include "nif_functions.hpp"
#include "reaper.hpp"
#include "region.hpp"
#include "terms.hpp"

namespace spshm::nif {

namespace {

/// Bytes freed per release_pages_step/1 call: about 1 ms of page freeing.
constexpr std::uint64_t kReleaseStep = std::uint64_t{8} << 20;

ErlNifResourceType* unlinked_type = nullptr;

struct Unlinked {
  std::mutex mutex;  ///< release_pages_step holds it; a concurrent call answers busy
  platform::Handle object;
  std::uint64_t released = 0;
};

void unlinked_dtor(ErlNifEnv*, void* obj) {
  auto* u = static_cast<Unlinked*>(obj);
  if (u->object.valid()) {
    // Whatever is left would be freed by this close, on the scheduler that collected the
    // last reference: the reaper thread frees it in pieces instead.
    Region::DetachedData data;
    data.object = std::move(u->object);
    data.bytes = kReapThreshold;
    dispose(std::move(data));
  }
  u->~Unlinked();
}

bool get_unlinked(ErlNifEnv* env, ERL_NIF_TERM term, Unlinked** out) {
  return enif_get_resource(env, term, unlinked_type, reinterpret_cast<void**>(out)) != 0;
}

}  // namespace

bool open_unlinked_type(ErlNifEnv* env) {
  ErlNifResourceTypeInit init{};
  init.dtor = unlinked_dtor;
  auto flags = static_cast<ErlNifResourceFlags>(ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER);
  unlinked_type = enif_open_resource_type_x(env, "spshm_unlinked", &init, flags, nullptr);
  return unlinked_type != nullptr;
}

// sweep_segment_begin(id) -> {:ok, outcome, unlinked | nil} | {:error, _}: sweep_segment/2
// (not a dry run); when it removed the segment, `unlinked` holds the open object whose
// pages release_pages_step/1 frees (nil when there is nothing to free in slices: a sealed
// segment, mode 0400, is closed here).
SPSHM_GUARDED_NIF(nif_sweep_segment_begin)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::string id;
  Error why{};
  ERL_NIF_TERM reply;
  if (!decoded(env, get_os_string(env, argv[0], "region id", &id, &why), why, &reply)) return reply;
  platform::Handle kept;
  auto done = sweep_segment_keeping(id, false, &kept);
  if (!done.ok()) return make_error(env, done.error());
  ERL_NIF_TERM outcome = atoms.in_use;
  switch (done.value()) {
    case SweepOutcome::removed:
      outcome = atoms.removed;
      break;
    case SweepOutcome::removed_incomplete:
      outcome = atoms.removed_incomplete;
      break;
    case SweepOutcome::in_use:
      outcome = atoms.in_use;
      break;
    case SweepOutcome::young:
      outcome = atoms.young;
      break;
  }
  ERL_NIF_TERM handle = atoms.nil;
  if (kept.valid()) {
    void* mem = enif_alloc_resource(unlinked_type, sizeof(Unlinked));
    if (mem == nullptr) return enif_make_tuple3(env, atoms.ok, outcome, atoms.nil);  // closed
    auto* u = new (mem) Unlinked{};
    u->object = std::move(kept);
    handle = enif_make_resource(env, u);
    enif_release_resource(u);
  }
  return enif_make_tuple3(env, atoms.ok, outcome, handle);
}

// release_pages_step(unlinked) -> {:ok, bytes_left} | {:error, _}: frees up to 8 MiB of
// the object's pages (dirty I/O); at 0 the object is closed and further calls answer 0.
SPSHM_GUARDED_NIF(nif_release_pages_step)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Unlinked* u;
  if (!get_unlinked(env, argv[0], &u)) return enif_make_badarg(env);
  std::unique_lock<std::mutex> lock(u->mutex, std::try_to_lock);
  if (!lock.owns_lock())
    return make_error(env, Errc::busy, "another call is freeing this segment's pages");
  auto left = release_unlinked_pages(u->object, kReleaseStep, u->released);
  if (!left.ok()) {
    u->object.reset();  // freeing in place failed: the close frees the rest
    return make_error(env, left.error());
  }
  return make_ok(env, enif_make_uint64(env, left.value()));
}

// reaper_stats() -> %{pieces_unmapped, pieces_released, pause_ns, pauses}: what the reaper thread
// did since the library was loaded (tests and the bench).
SPSHM_GUARDED_NIF(nif_reaper_stats)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  ReaperCounts c = reaper_counts();
  ERL_NIF_TERM keys[] = {enif_make_atom(env, "pieces_unmapped"),
                         enif_make_atom(env, "pieces_released"), enif_make_atom(env, "pause_ns"),
                         enif_make_atom(env, "pauses")};
  ERL_NIF_TERM values[] = {enif_make_uint64(env, c.pieces_unmapped),
                           enif_make_uint64(env, c.pieces_released),
                           enif_make_uint64(env, c.pause_ns), enif_make_uint64(env, c.pauses)};
  ERL_NIF_TERM map;
  enif_make_map_from_arrays(env, keys, values, 4, &map);
  return map;
}

}  // namespace spshm::nif
