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

}  // namespace spshm::nif
