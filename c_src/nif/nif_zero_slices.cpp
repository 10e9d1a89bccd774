// --- Zeroing at deallocation in slices (issue 12) ----------------------------------
// One sodium_memzero of a large region keeps a core busy for tens of milliseconds, which
// lets the VM's normal schedulers lose the CPU (bench/FINDINGS.md section 7). A zeroing
// deallocation of a large region therefore runs as deallocate_begin/1 (marks the header
// deallocated: every later read and write, of any process, is refused), zero_step/2
// (dirty CPU, at most 16 MiB per call, returning to a normal scheduler between calls)
// and deallocate_finish/1 (removes the name, gives the data area back). If the caller
// dies before the end, the resource's destructor has the reaper thread zero the rest.

#include "nif_functions.hpp"
#include "reaper.hpp"
#include "resources.hpp"
#include "terms.hpp"

namespace spshm::nif {

// deallocate_begin(region) -> :ok | {:error, _}: the checks of deallocate(region, true),
// then the mark. Normal scheduler: no I/O, no wait.
SPSHM_GUARDED_NIF(nif_deallocate_begin)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  if (res->deallocating.exchange(true)) {
    if (res->deallocated.load())
      return make_error(env, Errc::deallocated,
                        "region " + res->region.id() + " was already deallocated");
    return make_error(env, Errc::busy,
                      "region " + res->region.id() + " is being deallocated by another call");
  }
  if (res->zero_copy_shared.load()) {
    res->deallocating.store(false);
    return make_error(env, Errc::busy,
                      "zero-copy binaries of region " + res->region.id() +
                          " may still be alive and must not change: deallocate with zero: "
                          "false (the memory is freed when the last binary is garbage "
                          "collected)");
  }
  auto marked = res->region.mark_deallocated(true);
  if (!marked.ok()) {
    res->deallocating.store(false);
    return make_error(env, marked.error());
  }
  res->zero_next.store(0);
  return atoms.ok;
}

// await_seal_commit(region, timeout_ms) -> :ok | {:error, {:busy, _, _}}: waits (dirty
// I/O, at most 1000 ms a call) until no seal of this VM is committing the region, woken
// by the commit's end. A zeroing free refused as "being sealed" waits here and retries.
SPSHM_GUARDED_NIF(nif_await_seal_commit)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  std::uint64_t timeout_ms = 0;
  if (!get_region(env, argv[0], &res) || !get_u64(env, argv[1], &timeout_ms) || timeout_ms > 1000)
    return enif_make_badarg(env);
  if (res->region.await_seal_commit(std::chrono::milliseconds(timeout_ms))) return atoms.ok;
  return make_error(env, Errc::busy,
                    "region " + res->region.id() + " is still being sealed after " +
                        std::to_string(timeout_ms) + " ms");
}

// zero_step(region, offset) -> {:ok, next_offset} | {:error, _}: zeroes at most 16 MiB
// from `offset` (which must be where the previous step ended); next_offset == capacity
// when done. Dirty CPU.
SPSHM_GUARDED_NIF(nif_zero_step)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  std::uint64_t offset = 0;
  if (!get_region(env, argv[0], &res) || !get_u64(env, argv[1], &offset))
    return enif_make_badarg(env);
  std::uint64_t expected = res->zero_next.load();
  if (expected == RegionResource::kNotZeroing || res->deallocated.load())
    return make_error(
        env, Errc::invalid_argument,
        "region " + res->region.id() + " is not being zeroed: call deallocate_begin/1 first");
  if (offset != expected)
    return make_error(env, Errc::invalid_argument,
                      "zero_step/2 at " + std::to_string(offset) + ": the next slice of region " +
                          res->region.id() + " starts at " + std::to_string(expected));
  auto next = res->region.zero_slice(offset, kZeroSlice);
  if (!next.ok()) return make_error(env, next.error());
  // Only the caller that owns the sequence advances it (a racing duplicate fails above
  // or re-zeroes the same slice: harmless).
  std::uint64_t from = offset;
  res->zero_next.compare_exchange_strong(from, next.value());
  return make_ok(env, enif_make_uint64(env, next.value()));
}

// deallocate_finish(region) -> :ok | {:error, _}: once every slice is zeroed, removes the
// name and gives the data area back (as deallocate/2 ends). Dirty I/O (a POSIX unlink).
SPSHM_GUARDED_NIF(nif_deallocate_finish)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  std::uint64_t next = res->zero_next.load();
  if (next == RegionResource::kNotZeroing || res->deallocated.load())
    return make_error(
        env, Errc::invalid_argument,
        "region " + res->region.id() + " is not being zeroed: call deallocate_begin/1 first");
  if (next < res->region.capacity())
    return make_error(env, Errc::invalid_argument,
                      "region " + res->region.id() + " is zeroed up to " + std::to_string(next) +
                          " of " + std::to_string(res->region.capacity()) +
                          " bytes: finish the zero_step/2 calls first");
  auto done = res->region.unlink();
  if (!done.ok()) return make_error(env, done.error());
  res->deallocated.store(true);
  if (!res->zero_copy_shared.load()) res->retire();
  return atoms.ok;
}

}  // namespace spshm::nif
