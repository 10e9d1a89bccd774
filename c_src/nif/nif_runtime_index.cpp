// The runtime index of bare region ids (core/runtime_index.hpp): its sweep.
#include "nif_functions.hpp"
#include "runtime_index.hpp"
#include "terms.hpp"

namespace spshm::nif {

// Dirty (I/O bound): lists a directory and reads a link per entry.
SPSHM_GUARDED_NIF(nif_runtime_index_sweep)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  auto done = runtime_index::sweep();
  std::string dir = runtime_index::directory();
  ERL_NIF_TERM keys[] = {enif_make_atom(env, "directory"), enif_make_atom(env, "kept"),
                         enif_make_atom(env, "removed")};
  ERL_NIF_TERM values[] = {dir.empty() ? enif_make_atom(env, "nil") : make_binary(env, dir),
                           enif_make_uint64(env, done.kept), enif_make_uint64(env, done.removed)};
  return make_ok(env, make_map(env, keys, values));
}

// Dirty (waits): until the entries of arena regions queued so far are written.
SPSHM_GUARDED_NIF(nif_runtime_index_flush)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  unsigned int timeout_ms = 0;
  if (!enif_get_uint(env, argv[0], &timeout_ms)) return enif_make_badarg(env);
  if (runtime_index::flush(std::chrono::milliseconds(timeout_ms))) return enif_make_atom(env, "ok");
  return make_error(env, Errc::busy, "the runtime index writer did not finish in time");
}

}  // namespace spshm::nif
