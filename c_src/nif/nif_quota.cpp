// The quota counters of Snakepit.SharedMemory.Quota (core/quota.hpp) as resources.
//
// A charge is a resource: the allocating process holds it while it creates the region,
// then the registry record holds it. It is given back by quota_release/1 (the one process
// that took the record out of the registry) or by its destructor, when the last reference
// dies: a caller killed before the registry insert, or after taking the record and before
// releasing it, gives its charge back with its heap. No one has to notice the death, no
// barrier, no recount. The destructor does atomic subtractions only; when a host quota
// reservation rides on the charge (quota_host/3) and was not released, it also sends the
// host quota client one message to abandon it.
//
// Owner counters are resources too (one per owner pid, in the owners table): a charge keeps
// its owner's counter alive, so a counter is never freed while a region counts in it.
#include <cstdint>
#include <new>

#include <erl_nif.h>

#include "nif_functions.hpp"
#include "quota.hpp"
#include "reaper.hpp"
#include "resources.hpp"
#include "terms.hpp"

namespace spshm::nif {
namespace {

struct OwnerResource {
  quota::OwnerCount count;
};

struct ChargeResource {
  ChargeResource(quota::Totals& totals, OwnerResource* o) noexcept
      : owner(o), charge(totals, o != nullptr ? &o->count : nullptr) {}

  OwnerResource* owner;  ///< kept with enif_keep_resource, released in the destructor
  quota::Charge charge;
  /// The region whose name goes if the charge dies unreleased after a free began
  /// (keep_name(region, false)): kept, released by the destructor or the reaper.
  std::atomic<RegionResource*> region{nullptr};
  /// A host quota reservation to abandon if the charge dies unreleased (quota_host/3).
  ErlNifPid host_client{};
  std::uint64_t host_id = 0;
  std::atomic<bool> host_armed{false};
};

ErlNifResourceType* owner_type = nullptr;
ErlNifResourceType* charge_type = nullptr;
quota::Totals* totals = nullptr;

ERL_NIF_TERM atom(ErlNifEnv* env, const char* name) { return enif_make_atom(env, name); }

// The charge died without quota_release/1 and carried a host reservation: the host quota
// client (a GenServer) is told to abandon it, as a caller that gave up waiting does.
void abandon_host(ErlNifEnv* env, ChargeResource* c) {
  ErlNifEnv* msg_env = enif_alloc_env();
  if (msg_env == nullptr) return;
  ERL_NIF_TERM request =
      enif_make_tuple2(msg_env, atom(msg_env, "abandon"), enif_make_uint64(msg_env, c->host_id));
  ERL_NIF_TERM msg = enif_make_tuple2(msg_env, atom(msg_env, "$gen_cast"), request);
  enif_send(env, &c->host_client, msg_env, msg);
  enif_free_env(msg_env);
}

// On the reaper thread: removes the name of a region whose free was cut short.
void unlink_region(void* arg) {
  auto* res = static_cast<RegionResource*>(arg);
  (void)res->region.unlink();  // only while the name is still our object's
  enif_release_resource(res);
}

void charge_dtor(ErlNifEnv* env, void* obj) {
  auto* c = static_cast<ChargeResource*>(obj);
  bool unreleased = c->charge.give_back();
  if (unreleased && c->host_armed.load()) abandon_host(env, c);
  RegionResource* region = c->region.exchange(nullptr);
  if (region != nullptr) {
    // A deallocator took the record (after keep_name(region, false)) and was killed
    // before it finished: the name goes now, not when the last of the readers' copies
    // of the region handle is collected. Unlinking opens a path: the reaper thread.
    if (unreleased && region->drops_name() && !region->deallocated.load()) {
      note_name_dropped(region);
      run_on_reaper(unlink_region, region);
    } else {
      enif_release_resource(region);
    }
  }
  if (c->owner != nullptr) enif_release_resource(c->owner);
  c->~ChargeResource();
}

void owner_dtor(ErlNifEnv*, void* obj) { static_cast<OwnerResource*>(obj)->~OwnerResource(); }

bool get_charge(ErlNifEnv* env, ERL_NIF_TERM term, ChargeResource** out) {
  return enif_get_resource(env, term, charge_type, reinterpret_cast<void**>(out)) != 0;
}

bool get_owner(ErlNifEnv* env, ERL_NIF_TERM term, OwnerResource** out) {
  return enif_get_resource(env, term, owner_type, reinterpret_cast<void**>(out)) != 0;
}

// -1 (no limit) or a non-negative integer.
bool get_limit(ErlNifEnv* env, ERL_NIF_TERM term, std::int64_t* out) {
  ErlNifSInt64 value = 0;
  if (!enif_get_int64(env, term, &value) || value < quota::kUnlimited) return false;
  *out = value;
  return true;
}

}  // namespace

void* open_quota(ErlNifEnv* env, void* old_state) {
  auto flags = static_cast<ErlNifResourceFlags>(ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER);
  ErlNifResourceTypeInit owner_init{};
  owner_init.dtor = owner_dtor;
  ErlNifResourceTypeInit charge_init{};
  charge_init.dtor = charge_dtor;
  owner_type = enif_open_resource_type_x(env, "spshm_quota_owner", &owner_init, flags, nullptr);
  charge_type = enif_open_resource_type_x(env, "spshm_quota_charge", &charge_init, flags, nullptr);
  if (owner_type == nullptr || charge_type == nullptr) return nullptr;
  // An upgraded library keeps the counters the live charges were taken from.
  totals = old_state != nullptr ? static_cast<quota::Totals*>(old_state)
                                : new (std::nothrow) quota::Totals();
  return totals;
}

// quota_owner_new(): a counter of live regions for one owner.
SPSHM_GUARDED_NIF(nif_quota_owner_new)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  void* mem = enif_alloc_resource(owner_type, sizeof(OwnerResource));
  if (mem == nullptr) return enif_make_badarg(env);
  auto* o = new (mem) OwnerResource();
  ERL_NIF_TERM term = enif_make_resource(env, o);
  enif_release_resource(o);
  return term;
}

// quota_reserve(owner | nil, bytes, max_regions, max_bytes, max_per_owner), limits -1 for
// none: {:ok, charge} or {:error, :regions | :bytes | :owner, counted_before}.
SPSHM_GUARDED_NIF(nif_quota_reserve)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  OwnerResource* owner = nullptr;
  if (!enif_is_identical(argv[0], atoms.nil) && !get_owner(env, argv[0], &owner))
    return enif_make_badarg(env);
  ErlNifSInt64 bytes = 0;
  quota::Limits limits;
  if (!enif_get_int64(env, argv[1], &bytes) || bytes < 0 ||
      !get_limit(env, argv[2], &limits.regions) || !get_limit(env, argv[3], &limits.bytes) ||
      !get_limit(env, argv[4], &limits.per_owner)) {
    return enif_make_badarg(env);
  }
  void* mem = enif_alloc_resource(charge_type, sizeof(ChargeResource));
  if (mem == nullptr) return make_error(env, Errc::no_space, "out of memory for a quota charge");
  if (owner != nullptr) enif_keep_resource(owner);
  auto* c = new (mem) ChargeResource(*totals, owner);
  quota::Outcome outcome = c->charge.take(bytes, limits);
  if (outcome.refused != quota::Refused::none) {
    enif_release_resource(c);  // nothing taken: its destructor gives nothing back
    const char* why = outcome.refused == quota::Refused::regions ? "regions"
                      : outcome.refused == quota::Refused::bytes ? "bytes"
                                                                 : "owner";
    return enif_make_tuple3(env, atoms.error, atom(env, why), enif_make_int64(env, outcome.before));
  }
  ERL_NIF_TERM term = enif_make_resource(env, c);
  enif_release_resource(c);  // the term owns it
  return make_ok(env, term);
}

// quota_release(charge): gives it back; true for the call that did, false afterwards.
SPSHM_GUARDED_NIF(nif_quota_release)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChargeResource* c;
  if (!get_charge(env, argv[0], &c)) return enif_make_badarg(env);
  bool released = c->charge.give_back();
  if (released) c->host_armed.store(false);
  return make_bool(released);
}

// quota_resize(charge, bytes): the bytes it holds (before it is registered).
SPSHM_GUARDED_NIF(nif_quota_resize)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChargeResource* c;
  ErlNifSInt64 bytes = 0;
  if (!get_charge(env, argv[0], &c) || !enif_get_int64(env, argv[1], &bytes) || bytes < 0)
    return enif_make_badarg(env);
  c->charge.resize(bytes);
  return atoms.ok;
}

// quota_host(charge, client_pid, reservation_id): abandon that host quota reservation if
// the charge dies unreleased.
SPSHM_GUARDED_NIF(nif_quota_host)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChargeResource* c;
  ErlNifPid client;
  ErlNifUInt64 id = 0;
  if (!get_charge(env, argv[0], &c) || !enif_get_local_pid(env, argv[1], &client) ||
      !enif_get_uint64(env, argv[2], &id)) {
    return enif_make_badarg(env);
  }
  if (c->host_armed.load() || !c->charge.held()) return atoms.ok;  // once, while held
  c->host_client = client;
  c->host_id = id;
  c->host_armed.store(true);
  return atoms.ok;
}

// quota_attach(charge, region): the region whose name the charge removes if it dies
// unreleased once a free began (a POSIX region created here). Once.
SPSHM_GUARDED_NIF(nif_quota_attach)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChargeResource* c;
  RegionResource* region;
  if (!get_charge(env, argv[0], &c) || !get_region(env, argv[1], &region))
    return enif_make_badarg(env);
  if (!region->name_ours) return atoms.ok;  // nothing to remove
  RegionResource* expected = nullptr;
  enif_keep_resource(region);
  if (!c->region.compare_exchange_strong(expected, region)) enif_release_resource(region);
  return atoms.ok;
}

// quota_held(charge): true until it was given back.
SPSHM_GUARDED_NIF(nif_quota_held)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ChargeResource* c;
  if (!get_charge(env, argv[0], &c)) return enif_make_badarg(env);
  return make_bool(c->charge.held());
}

// quota_totals(): {live_regions, live_bytes} as counted.
SPSHM_GUARDED_NIF(nif_quota_totals)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  return enif_make_tuple2(env, enif_make_int64(env, totals->regions.load()),
                          enif_make_int64(env, totals->bytes.load()));
}

// quota_owned(owner): live regions counted for that owner.
SPSHM_GUARDED_NIF(nif_quota_owned)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  OwnerResource* o;
  if (!get_owner(env, argv[0], &o)) return enif_make_badarg(env);
  return enif_make_int64(env, o->count.regions.load());
}

// names_dropped(): names removed because a caller was killed mid-allocation or mid-free.
SPSHM_GUARDED_NIF(nif_names_dropped)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  return enif_make_uint64(env, names_dropped());
}

// keep_name(region, keep): whether the last reference to a POSIX region this VM created
// leaves its name in place (true: registered, re-adoptable) or removes it (false: the
// default from creation until it is registered, and again once a free has begun).
SPSHM_GUARDED_NIF(nif_keep_name)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  bool keep = false;
  if (!get_region(env, argv[0], &res) || !get_bool(env, argv[1], &keep))
    return enif_make_badarg(env);
  if (!res->name_ours) return atoms.ok;
  if (keep) {
    // Only the registration keeps it: after a free began, a late keep changes nothing.
    int expected = RegionResource::kNameDropUntilKept;
    res->name_state.compare_exchange_strong(expected, RegionResource::kNameKept);
  } else {
    res->name_state.store(RegionResource::kNameDropFreeing);
  }
  return atoms.ok;
}

}  // namespace spshm::nif
