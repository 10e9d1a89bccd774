// NIFs of the warm pool (core/pool.hpp) and huge pages: configure, stats, drain, the
// host's huge pages, and the pool's side of freeing a region's data area.
#include <cstring>
#include <string>

#include <erl_nif.h>

#include "nif_functions.hpp"
#include "platform.hpp"
#include "pool.hpp"
#include "reaper.hpp"
#include "resources.hpp"
#include "terms.hpp"

namespace spshm::nif {

namespace {

void dispose_entries(std::vector<pool::Entry>&& entries) noexcept {
  for (auto& e : entries) {
    Region::DetachedData data;
    data.object = std::move(e.object);
    data.mapping = std::move(e.mapping);
    data.bytes = e.object_size;
    dispose(std::move(data));  // large munmaps go to the reaper thread
  }
}

ERL_NIF_TERM atom(ErlNifEnv* env, const char* name) { return enif_make_atom(env, name); }

}  // namespace

void release_data_to_pool_or_dispose(Region& region, Region::DetachedData&& data) noexcept {
  auto back = pool::offer(region, std::move(data), false);
  if (back) dispose(std::move(*back));
}

// pool_configure(budget_bytes): sets the budget (0 disables); objects over it are freed.
SPSHM_GUARDED_NIF(nif_pool_configure)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::uint64_t budget = 0;
  if (!get_u64(env, argv[0], &budget)) return enif_make_badarg(env);
  dispose_entries(pool::set_budget(budget));
  return atoms.ok;
}

// pool_drain(): frees every pooled object (application stop).
SPSHM_GUARDED_NIF(nif_pool_drain)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  auto entries = pool::drain();
  std::uint64_t count = entries.size();
  dispose_entries(std::move(entries));
  return make_ok(env, enif_make_uint64(env, count));
}

SPSHM_GUARDED_NIF(nif_pool_stats)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  pool::Stats s = pool::stats();
  ERL_NIF_TERM keys[] = {atom(env, "hits"),    atom(env, "misses"),  atom(env, "bytes_held"),
                         atom(env, "entries"), atom(env, "budget"),  atom(env, "returned"),
                         atom(env, "refused"), atom(env, "released")};
  ERL_NIF_TERM values[] = {enif_make_uint64(env, s.hits),       enif_make_uint64(env, s.misses),
                           enif_make_uint64(env, s.bytes_held), enif_make_uint64(env, s.entries),
                           enif_make_uint64(env, s.budget),     enif_make_uint64(env, s.returned),
                           enif_make_uint64(env, s.refused),    enif_make_uint64(env, s.released)};
  return make_map(env, keys, values);
}

// pooled_object(path): the data memfd at path sits in some VM's warm pool.
SPSHM_GUARDED_NIF(nif_pooled_object)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::string path;
  if (!get_string(env, argv[0], &path)) return enif_make_badarg(env);
  return make_bool(pool::is_pooled_object(path));
}

// huge_page_info(): %{page_size, total, free} of the host's default hugetlb pool.
SPSHM_GUARDED_NIF(nif_huge_page_info)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  platform::HugePageInfo info = platform::huge_page_info();
  ERL_NIF_TERM keys[] = {atom(env, "page_size"), atom(env, "total"), atom(env, "free")};
  ERL_NIF_TERM values[] = {enif_make_uint64(env, info.page_size), enif_make_uint64(env, info.total),
                           enif_make_uint64(env, info.free)};
  return make_map(env, keys, values);
}

Decoded decode_pool_create_options(ErlNifEnv* env, ERL_NIF_TERM map, CreateOptions* out,
                                   Error* why) {
  ERL_NIF_TERM value;
  if (enif_get_map_value(env, map, atom(env, "huge_pages"), &value)) {
    if (enif_is_identical(value, atom(env, "auto")))
      out->huge_pages = HugePages::automatic;
    else if (enif_is_identical(value, atoms.true_))
      out->huge_pages = HugePages::on;
    else if (enif_is_identical(value, atoms.false_))
      out->huge_pages = HugePages::off;
    else {
      *why = Error{Errc::invalid_argument, 0, "huge_pages must be :auto, true or false"};
      return Decoded::invalid;
    }
  }
  return Decoded::ok;
}

}  // namespace spshm::nif
