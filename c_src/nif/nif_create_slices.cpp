// Encrypted regions created in slices (issue 12): create_cpu with defer_chunks: true
// leaves the chunks uninitialised and the header unpublished; init_chunks/3 (dirty CPU)
// encrypts about 1 ms of chunks per call, returning to a normal scheduler between calls
// (one call encrypting a whole large region kept a core busy for as long, which delays
// the timers of idle normal schedulers: bench/FINDINGS.md section 7); publish/1 makes
// the region visible to other processes.
#include <cstdint>

#include "nif_functions.hpp"
#include "region.hpp"
#include "resources.hpp"
#include "terms.hpp"

namespace spshm::nif {

namespace {

// At most this many 64 KiB chunks per call (1 MiB, about 1 ms of XChaCha20-Poly1305).
constexpr std::uint64_t kMaxChunksPerCall = 16;

bool usable(ErlNifEnv* env, RegionResource* res, ERL_NIF_TERM* reply) {
  if (res->is_deallocated()) {
    *reply = make_error(env, Errc::deallocated, "region " + res->region.id() + " was deallocated");
    return false;
  }
  return true;
}

}  // namespace

// init_chunks(region, first, count) -> {:ok, chunks_left} | {:error, _}
SPSHM_GUARDED_NIF(nif_init_chunks)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  std::uint64_t first = 0, count = 0;
  if (!get_region(env, argv[0], &res) || !get_u64(env, argv[1], &first) ||
      !get_u64(env, argv[2], &count)) {
    return enif_make_badarg(env);
  }
  ERL_NIF_TERM reply;
  if (!usable(env, res, &reply)) return reply;
  DataAccess access(res);
  if (!access.ok())
    return make_error(env, Errc::deallocated, "region " + res->region.id() + " was deallocated");
  auto left =
      res->region.initialise_chunks(first, count < kMaxChunksPerCall ? count : kMaxChunksPerCall);
  if (!left.ok()) return make_error(env, left.error());
  return make_ok(env, enif_make_uint64(env, *left));
}

// allocate_step(region, offset) -> {:ok, next_offset} | {:error, _}: a region created with
// defer_allocate (issue 12) gets the pages of its data object allocated from `offset` (where
// the previous step ended), at most 8 MiB (about 1 ms of fallocate) per call; next_offset
// == offset once every page is (then publish/1). Dirty I/O.
SPSHM_GUARDED_NIF(nif_allocate_step)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  constexpr std::uint64_t kAllocateStep = std::uint64_t{8} << 20;
  RegionResource* res;
  std::uint64_t offset = 0;
  if (!get_region(env, argv[0], &res) || !get_u64(env, argv[1], &offset))
    return enif_make_badarg(env);
  ERL_NIF_TERM reply;
  if (!usable(env, res, &reply)) return reply;
  auto next = res->region.allocate_range(offset, kAllocateStep);
  if (!next.ok()) return make_error(env, next.error());
  return make_ok(env, enif_make_uint64(env, *next));
}

// publish(region) -> :ok | {:error, _}
SPSHM_GUARDED_NIF(nif_publish)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  ERL_NIF_TERM reply;
  if (!usable(env, res, &reply)) return reply;
  auto published = res->region.publish();
  if (!published.ok()) return make_error(env, published.error());
  return atoms.ok;
}

}  // namespace spshm::nif
