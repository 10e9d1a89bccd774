// NIFs of the arenas of small regions (c_src/core/arena.hpp): configuration, upkeep and
// counters. Terms in, core calls, terms out.
#include <chrono>

#include <vector>

#include "arena.hpp"
#include "encode.hpp"
#include "nif_functions.hpp"
#include "terms.hpp"

namespace spshm::nif {

// arena_configure(arena_bytes, grace_ms): the size of each new arena and how long an
// empty one is kept. Arenas already mapped keep their size.
SPSHM_GUARDED_NIF(nif_arena_configure)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::uint64_t bytes = 0, grace_ms = 0;
  if (!get_u64(env, argv[0], &bytes) || !get_u64(env, argv[1], &grace_ms))
    return enif_make_badarg(env);
  if (bytes > (std::uint64_t{1} << 40) || grace_ms > (std::uint64_t{1} << 40))
    return make_error(env, Errc::invalid_argument,
                      "arena_size must be at most 1 TiB and arena_grace at most 2^40 ms");
  process_arenas().configure(bytes, std::chrono::milliseconds(grace_ms));
  return atoms.ok;
}

// Dirty I/O: returning an arena unmaps megabytes.
SPSHM_GUARDED_NIF(nif_arena_maintain)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  return enif_make_uint(env, process_arenas().maintain());
}

// inspect_arena(path): [{control_offset, header snapshot map}] (dirty I/O: reads a file).
SPSHM_GUARDED_NIF(nif_inspect_arena)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::string path;
  Error why{};
  ERL_NIF_TERM reply;
  if (!decoded(env, get_os_string(env, argv[0], "path", &path, &why), why, &reply)) return reply;
  auto found = inspect_arena(path);
  if (!found.ok()) return make_error(env, found.error());
  std::vector<ERL_NIF_TERM> list;
  for (const ArenaEntry& e : found.value()) {
    list.push_back(enif_make_tuple2(env, enif_make_uint64(env, e.control_offset),
                                    encode_snapshot(env, e.snapshot, path)));
  }
  return make_ok(env,
                 enif_make_list_from_array(env, list.data(), static_cast<unsigned>(list.size())));
}

SPSHM_GUARDED_NIF(nif_arena_stats)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  ArenaStats s = process_arenas().stats();
  ERL_NIF_TERM keys[] = {enif_make_atom(env, "arenas"),      enif_make_atom(env, "arena_bytes"),
                         enif_make_atom(env, "live_chunks"), enif_make_atom(env, "pending_chunks"),
                         enif_make_atom(env, "created"),     enif_make_atom(env, "returned"),
                         enif_make_atom(env, "arena_size")};
  ERL_NIF_TERM values[] = {enif_make_uint64(env, s.arenas),
                           enif_make_uint64(env, s.arena_bytes),
                           enif_make_uint64(env, s.live_chunks),
                           enif_make_uint64(env, s.pending_chunks),
                           enif_make_uint64(env, s.created),
                           enif_make_uint64(env, s.returned),
                           enif_make_uint64(env, process_arenas().arena_bytes())};
  return make_map(env, keys, values);
}

}  // namespace spshm::nif
