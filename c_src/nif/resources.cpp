#include "resources.hpp"

#include <unistd.h>

#include <new>

#include "reaper.hpp"
#include "terms.hpp"

namespace spshm::nif {

ResourceTypes resource_types;
SelfIdentity self_identity;

namespace {
std::atomic<std::uint64_t> names_dropped_total{0};
}

void note_name_dropped(RegionResource* res) noexcept {
  if (!res->name_dropped.exchange(true)) names_dropped_total.fetch_add(1);
}

std::uint64_t names_dropped() noexcept { return names_dropped_total.load(); }

void RegionResource::release_data() noexcept {
  if (data_pinned.load()) return;  // a board view points into it: kept until destroyed
  if (!data_released.exchange(true)) release_data_to_pool_or_dispose(region, region.detach_data());
  region.release_arena_locks();  // an arena chunk's locks: now, not at garbage collection
}

void MappingResource::release_hold() noexcept {
  if (held) (void)owner->region.release();
}

namespace {

// ---- region ----

void region_dtor(ErlNifEnv*, void* obj) {
  // Runs only when no mapping and no zero-copy binary refers to the region any more, on
  // whatever scheduler collected the last reference: a large region's munmap and close
  // go to the reaper thread (~0.1 s per GiB would stall a normal scheduler).
  auto* res = static_cast<RegionResource*>(obj);
  std::uint64_t zero_next = res->zero_next.load();
  if (zero_next != RegionResource::kNotZeroing && !res->deallocated.load()) {
    // Its zeroing started (deallocate_begin/1) and its caller died before the end: the
    // promise is kept by the reaper thread (the rest, in slices, then the name).
    dispose_zeroing(std::move(res->region), zero_next);
  } else if (res->drops_name() && !res->deallocated.load()) {
    // Created here and never registered (or its free was cut short): the reaper thread
    // removes its name (no path is opened on a scheduler), then destroys it.
    // A creation never registered (or a free cut short): the name goes on the reaper
    // thread; a creation only if nobody else opened the name meanwhile (a named region
    // another VM or worker already uses stays for the sweeps to judge).
    note_name_dropped(res);
    std::uint64_t end = res->region.capacity();
    bool unless_held = res->name_state.load() == RegionResource::kNameDropUntilKept;
    dispose_unlinking(std::move(res->region), end, unless_held);
  } else {
    dispose(std::move(res->region));
  }
  res->~RegionResource();
}

// The owner process registered with monitor_owner/2 died: tell the manager. The message
// is built in a process-independent env because the callback env belongs to no process
// we may allocate in for another one. If no manager is registered the notice is dropped:
// the manager re-checks every owner when it (re)starts.
void region_down(ErlNifEnv* env, void* obj, ErlNifPid* pid, ErlNifMonitor*) {
  auto* res = static_cast<RegionResource*>(obj);
  ErlNifPid manager;
  if (!enif_whereis_pid(env, atoms.manager_name, &manager)) return;
  ErlNifEnv* msg_env = enif_alloc_env();
  if (msg_env == nullptr) return;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-qualifiers"  // inside erl_nif's enif_make_pid macro
  ERL_NIF_TERM owner = enif_make_pid(msg_env, pid);
#pragma GCC diagnostic pop
  ERL_NIF_TERM msg = enif_make_tuple3(msg_env, atoms.snakepit_shm_owner_down,
                                      make_binary(msg_env, res->region.id()), owner);
  enif_send(env, &manager, msg_env, msg);
  enif_free_env(msg_env);
}

// ---- mapping ----

void mapping_dtor(ErlNifEnv*, void* obj) {
  auto* m = static_cast<MappingResource*>(obj);
  // A mapping dropped without unmap/1 must not leak its hold in the header.
  if (!m->closed.exchange(true)) m->release_hold();
  enif_release_resource(m->owner);
  m->~MappingResource();
}

// ---- watch ----

void watch_dtor(ErlNifEnv*, void* obj) {
  auto* w = static_cast<WatchResource*>(obj);
  // While selected, the VM keeps a reference to the resource until the stop callback has
  // run, so an fd still open here was never handed to enif_select.
  int fd = w->fd.exchange(-1);
  if (fd >= 0) ::close(fd);
  w->~WatchResource();
}

void watch_stop(ErlNifEnv*, void* obj, ErlNifEvent event, int) {
  auto* w = static_cast<WatchResource*>(obj);
  int expected = static_cast<int>(event);
  if (w->fd.compare_exchange_strong(expected, -1)) ::close(static_cast<int>(event));
}

// The process that asked for the watch died without cancel_watch/1: stop selecting, so
// the VM drops its reference and the pidfd is closed instead of leaking.
void watch_down(ErlNifEnv* env, void* obj, ErlNifPid*, ErlNifMonitor*) {
  auto* w = static_cast<WatchResource*>(obj);
  int fd = w->fd.load();
  if (fd >= 0 && w->selected.exchange(false)) {
    enif_select(env, static_cast<ErlNifEvent>(fd), ERL_NIF_SELECT_STOP, obj, nullptr,
                atoms.undefined);
  }
}

ErlNifResourceType* open_type(ErlNifEnv* env, const char* name,
                              const ErlNifResourceTypeInit& init) {
  auto flags = static_cast<ErlNifResourceFlags>(ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER);
  return enif_open_resource_type_x(env, name, &init, flags, nullptr);
}

}  // namespace

bool open_resource_types(ErlNifEnv* env) {
  ErlNifResourceTypeInit region_init{};
  region_init.dtor = region_dtor;
  region_init.down = region_down;
  ErlNifResourceTypeInit mapping_init{};
  mapping_init.dtor = mapping_dtor;
  ErlNifResourceTypeInit watch_init{};
  watch_init.dtor = watch_dtor;
  watch_init.stop = watch_stop;
  watch_init.down = watch_down;

  ResourceTypes types;
  types.region = open_type(env, "spshm_region", region_init);
  types.mapping = open_type(env, "spshm_mapping", mapping_init);
  types.watch = open_type(env, "spshm_watch", watch_init);
  if (types.region == nullptr || types.mapping == nullptr || types.watch == nullptr) return false;
  resource_types = types;
  return true;
}

bool init_self_identity() {
  SelfIdentity id;
  id.pid = self_pid();
  auto start = process_start_time(id.pid);
  if (!start.ok()) return false;
  id.start_time = start.value();
  id.boot_id = boot_id();
  self_identity = id;
  return true;
}

bool get_region(ErlNifEnv* env, ERL_NIF_TERM term, RegionResource** out) {
  return enif_get_resource(env, term, resource_types.region, reinterpret_cast<void**>(out)) != 0;
}

bool get_mapping(ErlNifEnv* env, ERL_NIF_TERM term, MappingResource** out) {
  return enif_get_resource(env, term, resource_types.mapping, reinterpret_cast<void**>(out)) != 0;
}

bool get_watch(ErlNifEnv* env, ERL_NIF_TERM term, WatchResource** out) {
  return enif_get_resource(env, term, resource_types.watch, reinterpret_cast<void**>(out)) != 0;
}

ERL_NIF_TERM make_region_resource(ErlNifEnv* env, Region&& region, RegionResource** out) {
  void* mem = enif_alloc_resource(resource_types.region, sizeof(RegionResource));
  if (mem == nullptr) return enif_make_badarg(env);
  auto* res = new (mem) RegionResource(std::move(region));
  ERL_NIF_TERM term = enif_make_resource(env, res);
  enif_release_resource(res);  // the term now owns it
  if (out != nullptr) *out = res;
  return term;
}

}  // namespace spshm::nif
