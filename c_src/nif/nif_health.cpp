// NIFs of the operational surface: where POSIX segments live (shm_path) and how full the
// filesystem holding them is (health checks). Terms in, core calls, terms out.
#include "nif_functions.hpp"
#include "region.hpp"
#include "terms.hpp"

namespace spshm::nif {

SPSHM_GUARDED_NIF(nif_set_shm_dir)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::string dir;
  Error why{};
  ERL_NIF_TERM reply;
  if (!decoded(env, get_os_string(env, argv[0], "directory", &dir, &why), why, &reply))
    return reply;
  auto done = set_segment_dir(dir);
  if (!done.ok()) return make_error(env, done.error());
  return atoms.ok;
}

SPSHM_GUARDED_NIF(nif_shm_dir)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  std::string dir = segment_dir();
  return dir.empty() ? atoms.nil : make_binary(env, dir);
}

SPSHM_GUARDED_NIF(nif_fs_stat)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::string path;
  Error why{};
  ERL_NIF_TERM reply;
  if (!decoded(env, get_os_string(env, argv[0], "path", &path, &why), why, &reply)) return reply;
  auto space = filesystem_space(path);
  if (!space.ok()) return make_error(env, space.error());
  const FilesystemSpace& s = space.value();
  ERL_NIF_TERM keys[] = {enif_make_atom(env, "total"), enif_make_atom(env, "free"),
                         enif_make_atom(env, "available"), enif_make_atom(env, "tmpfs")};
  ERL_NIF_TERM values[] = {enif_make_uint64(env, s.total), enif_make_uint64(env, s.free),
                           enif_make_uint64(env, s.available), make_bool(s.tmpfs)};
  return make_ok(env, make_map(env, keys, values));
}

}  // namespace spshm::nif
