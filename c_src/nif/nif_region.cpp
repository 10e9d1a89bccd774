// NIFs on regions as a whole: create, open, describe, seal, deallocate, holders.
#include <cstdint>
#include <string>
#include <vector>

#include "encode.hpp"
#include "format.hpp"
#include "nif_functions.hpp"
#include "region.hpp"
#include "resources.hpp"
#include "terms.hpp"

namespace spshm::nif {

namespace {

// Writing into a header this process sees as a private copy would change only that copy.
ERL_NIF_TERM private_header(ErlNifEnv* env, const Region& region, const char* what) {
  return make_error(env, Errc::permission_denied,
                    std::string("cannot ") + what + " of region " + region.id() +
                        ": this process sees a read-only copy of its header (a sealed POSIX "
                        "region of another user or mode); do it from the creating process");
}

// Largest region the NIF accepts: far above any real machine, far below where size
// arithmetic (capacity with chunk overhead, data offsets) could overflow 64 bits.
constexpr std::uint64_t kMaxRegionSize = std::uint64_t{1} << 62;

ERL_NIF_TERM ok_region(ErlNifEnv* env, Region&& region) {
  RegionResource* res = nullptr;
  ERL_NIF_TERM term = make_region_resource(env, std::move(region), &res);
  if (res == nullptr) return make_error(env, Errc::no_space, "out of memory for a region resource");
  return enif_make_tuple3(env, atoms.ok, term, encode_info(env, *res));
}

}  // namespace

SPSHM_GUARDED_NIF(nif_header_layout)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  return make_binary(env, layout_description());
}

namespace {

// create_plain/2 and deallocate_plain/2 run on a normal scheduler, so they take only what
// finishes well inside the 1 ms a NIF may take: the same 64 KiB as write/read, unnamed
// regions only (opening a named one may wait for its creator). A dirty NIF costs a
// scheduler round trip of ~10 us even when it returns at once, more than a small create.
constexpr std::uint64_t kPlainLimit = 65536;

ERL_NIF_TERM do_create(ErlNifEnv* env, const ERL_NIF_TERM argv[], bool plain) {
  std::uint64_t size = 0;
  if (!get_u64(env, argv[0], &size)) return enif_make_badarg(env);
  CreateOptions options;
  Error why{};
  ERL_NIF_TERM reply;
  if (!decoded(env, decode_create_options(env, argv[1], &options, &why), why, &reply)) {
    return reply;
  }
  if (size == 0) {
    return make_error(env, Errc::invalid_argument, "size must be at least 1 byte, got 0");
  }
  if (size > kMaxRegionSize) {
    return make_error(env, Errc::too_large,
                      "size " + std::to_string(size) + " exceeds the limit of 2^62 bytes");
  }
  // A normal scheduler never opens a path: a POSIX segment is a name in a shared
  // directory (a FIFO may sit there). Only memfds, which have no name, are created here.
  if (plain && (size > kPlainLimit || options.backend != BackendKind::memfd)) {
    return make_error(
        env, Errc::invalid_argument,
        "create_plain/2 takes memfd regions of at most 65536 bytes (got " + std::to_string(size) +
            (options.backend != BackendKind::memfd ? ", not memfd" : "") + "): use create/2");
  }
  options.size = size;
  auto region = Region::create(options);
  if (!region.ok()) return make_error(env, region.error());
  RegionResource* res = nullptr;
  ERL_NIF_TERM term = make_region_resource(env, std::move(region).value(), &res);
  if (res == nullptr) return make_error(env, Errc::no_space, "out of memory for a region resource");
  ERL_NIF_TERM drop_name;
  if (res->region.role() == Role::created && res->region.backend() == BackendKind::posix) {
    res->name_ours = true;
    // drop_name: true (the allocator's): until it is registered (keep_name/2), dropping
    // the last reference removes the name. Without it the name stays (tools, tests).
    if (enif_get_map_value(env, argv[1], enif_make_atom(env, "drop_name"), &drop_name) &&
        enif_is_identical(drop_name, atoms.true_)) {
      res->name_state.store(RegionResource::kNameDropUntilKept);
    }
  }
  return enif_make_tuple3(env, atoms.ok, term, encode_info(env, *res));
}

}  // namespace

SPSHM_GUARDED_NIF(nif_create)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  return do_create(env, argv, false);
}

SPSHM_GUARDED_NIF(nif_create_plain)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  return do_create(env, argv, true);
}

SPSHM_GUARDED_NIF(nif_open)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  bool writable = false;
  if (!get_bool(env, argv[1], &writable)) return enif_make_badarg(env);
  OpenTarget target;
  Error why{};
  ERL_NIF_TERM reply;
  int arity = 0;
  const ERL_NIF_TERM* paths = nullptr;
  if (enif_get_tuple(env, argv[0], &arity, &paths) && arity == 3) {
    // {arena path, arena path, control_offset}: a region in an arena (docs/FORMAT.md).
    std::uint64_t offset = 0;
    if (!get_u64(env, paths[2], &offset)) return enif_make_badarg(env);
    if (!decoded(env, get_os_string(env, paths[0], "control_path", &target.control_path, &why), why,
                 &reply)) {
      return reply;
    }
    auto region = open_arena_region(target.control_path, offset, std::string(), writable);
    if (!region.ok()) return make_error(env, region.error());
    return ok_region(env, std::move(region).value());
  }
  if (enif_get_tuple(env, argv[0], &arity, &paths)) {
    if (arity != 2) return enif_make_badarg(env);
    if (!decoded(env, get_os_string(env, paths[0], "control_path", &target.control_path, &why), why,
                 &reply) ||
        !decoded(env, get_os_string(env, paths[1], "data_path", &target.data_path, &why), why,
                 &reply)) {
      return reply;
    }
  } else if (!decoded(env, get_os_string(env, argv[0], "region id", &target.region_id, &why), why,
                      &reply)) {
    return reply;
  }
  auto region = Region::open(target, writable);
  if (!region.ok()) return make_error(env, region.error());
  return ok_region(env, std::move(region).value());
}

SPSHM_GUARDED_NIF(nif_info)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  return encode_info(env, *res);
}

SPSHM_GUARDED_NIF(nif_header)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  return make_ok(env, encode_snapshot(env, snapshot(res->region.header()), std::string()));
}

// {generation, holds}: first frees the slots of dead holders (one non-blocking fcntl per
// claimed slot of another open: the kernel says whether its owner lives), then sums the
// counts of the claimed slots. No allocation, no I/O.
SPSHM_GUARDED_NIF(nif_hold_counts)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  (void)res->region.reap_dead_holders();
  const RegionHeader& h = res->region.header();
  return enif_make_tuple2(env, enif_make_uint(env, h.holders_generation.load()),
                          enif_make_uint(env, reference_count(h)));
}

// Frees the holder slots whose owners are dead (their slot locks are gone). No I/O.
SPSHM_GUARDED_NIF(nif_reap_holders)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  return make_ok(env, enif_make_uint(env, res->region.reap_dead_holders()));
}

// The holds of dead holders this VM released so far, whichever NIF call reaped them.
SPSHM_GUARDED_NIF(nif_reaped_holds)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  return enif_make_uint64(env, reaped_holds_total());
}

SPSHM_GUARDED_NIF(nif_seal)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  // The seal uses the data memfd and mapping: a deallocation racing it must not retire
  // them meanwhile (a closed descriptor, then another region's reusing its number).
  DataAccess access(res);
  if (!access.ok() || res->is_deallocated()) {
    return make_error(env, Errc::deallocated, "region " + res->region.id() + " was deallocated");
  }
  auto sealed = res->region.seal();
  if (!sealed.ok()) return make_error(env, sealed.error());
  return atoms.ok;
}

namespace {

ERL_NIF_TERM do_deallocate(ErlNifEnv* env, const ERL_NIF_TERM argv[], bool plain) {
  RegionResource* res;
  bool zero = false;
  if (!get_region(env, argv[0], &res) || !get_bool(env, argv[1], &zero)) {
    return enif_make_badarg(env);
  }
  if (plain && res->region.backend() != BackendKind::memfd) {
    return make_error(env, Errc::invalid_argument,
                      "deallocate_plain/2 takes memfd regions only (region " + res->region.id() +
                          " has a name to remove, which means opening a path): use "
                          "deallocate/2");
  }
  if (plain && zero && res->region.capacity() > kPlainLimit) {
    return make_error(env, Errc::invalid_argument,
                      "deallocate_plain/2 zeroes at most 65536 bytes (region " + res->region.id() +
                          " has " + std::to_string(res->region.capacity()) + "): use deallocate/2");
  }
  if (res->deallocating.exchange(true)) {
    if (res->deallocated.load()) {
      return make_error(env, Errc::deallocated,
                        "region " + res->region.id() + " was already deallocated");
    }
    return make_error(env, Errc::busy,
                      "region " + res->region.id() + " is being deallocated by another call");
  }
  if (zero && res->zero_copy_shared.load()) {
    res->deallocating.store(false);
    // Zeroing would change the bytes under binaries the VM believes immutable.
    return make_error(env, Errc::busy,
                      "zero-copy binaries of region " + res->region.id() +
                          " may still be alive and must not change: deallocate with zero: "
                          "false (the memory is freed when the last binary is garbage "
                          "collected)");
  }
  auto done = res->region.deallocate(zero);
  if (!done.ok()) {
    res->deallocating.store(false);
    return make_error(env, done.error());
  }
  res->deallocated.store(true);
  // The memory goes back now, not at the next garbage collection of whoever still has
  // this resource (read after deallocating, Dekker with read_zero_copy: a zero-copy
  // binary may point into the data, which must then stay mapped until it is collected).
  if (!res->zero_copy_shared.load()) res->retire();
  return atoms.ok;
}

}  // namespace

// Dirty (I/O bound): zeroing a large region takes about 1 s per 10 GB.
SPSHM_GUARDED_NIF(nif_deallocate)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  return do_deallocate(env, argv, false);
}

// Normal scheduler: marking, unlinking, and zeroing at most 64 KiB.
SPSHM_GUARDED_NIF(nif_deallocate_plain)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  return do_deallocate(env, argv, true);
}

// One atomic load: the access time of the header (map/read/write, any process).
SPSHM_GUARDED_NIF(nif_last_access)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  return enif_make_uint64(env, res->region.header().last_access_ns.load());
}

// [{holds, last_access_ns}] of a list of at most kListCountsMax regions, read from each
// header's refcount and access-time words: what list_regions/1 shows, in one call and one
// or two cache lines per region. Unlike hold_counts/1 it does not reap dead holders' slots
// (that scans the 64-slot table: ~32 cold cache lines per region); the refcount word is
// the sum of the slots' counts at rest, so a dead holder still counts until reaped.
SPSHM_GUARDED_NIF(nif_list_counts)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  constexpr unsigned kListCountsMax = 4096;
  unsigned length = 0;
  if (!enif_get_list_length(env, argv[0], &length) || length > kListCountsMax)
    return enif_make_badarg(env);
  // Two passes: the headers first (each in a page of its own: a TLB and a cache miss per
  // region, ~1 us each on a virtual machine when taken one after the other), prefetched
  // kPrefetch regions ahead so that the misses overlap; then the terms.
  constexpr unsigned kPrefetch = 16;
  std::vector<const RegionHeader*> headers;
  headers.reserve(length);
  ERL_NIF_TERM list = argv[0], head;
  while (enif_get_list_cell(env, list, &head, &list)) {
    RegionResource* res;
    if (!get_region(env, head, &res)) return enif_make_badarg(env);
    headers.push_back(&res->region.header());
  }
  std::vector<ERL_NIF_TERM> out(headers.size());
  for (std::size_t i = 0; i < headers.size(); ++i) {
    if (i + kPrefetch < headers.size()) {
      // refcount and last_access_ns share a cache line (docs/FORMAT.md: 2052, 2056).
      __builtin_prefetch(&headers[i + kPrefetch]->refcount);
    }
    const RegionHeader& h = *headers[i];
    out[i] = enif_make_tuple2(env, enif_make_uint(env, h.refcount.load()),
                              enif_make_uint64(env, h.last_access_ns.load()));
  }
  return enif_make_list_from_array(env, out.data(), static_cast<unsigned>(out.size()));
}

SPSHM_GUARDED_NIF(nif_set_idle_timeout)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  std::uint64_t ms = 0;
  if (!get_region(env, argv[0], &res) || !get_u64(env, argv[1], &ms)) {
    return enif_make_badarg(env);
  }
  if (ms > UINT64_MAX / 1000000) {
    return make_error(env, Errc::invalid_argument,
                      "idle timeout " + std::to_string(ms) + " ms does not fit in 64-bit ns");
  }
  if (!res->region.header_writable()) return private_header(env, res->region, "set the timeout");
  res->region.header().idle_timeout_ns.store(ms * 1000000, std::memory_order_release);
  return atoms.ok;
}

// One atomic fetch_or: marks a worker-created region as taken over by this VM, so its
// creator may close its descriptors (adopt_region/2). busy if it was already adopted.
SPSHM_GUARDED_NIF(nif_mark_adopted)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  if (!res->region.header_writable()) return private_header(env, res->region, "adopt it");
  // Only a worker's output: another VM's region (a ref of a node on the same host) must
  // not be taken over, and then freed, by this VM.
  if ((res->region.header().flags & kFlagWorkerOutput) == 0)
    return make_error(env, Errc::invalid_argument,
                      "region " + res->region.id() +
                          " is not a worker's output (snakepit_shm.allocate/from_array): it "
                          "belongs to the VM that allocated it; map_region/2 it there, or "
                          "fetch/2 it");
  std::uint32_t before =
      res->region.header().state.fetch_or(kStateAdopted, std::memory_order_acq_rel);
  if (before & kStateDeallocated)
    return make_error(env, Errc::deallocated, "region " + res->region.id() + " was deallocated");
  if (before & kStateAdopted)
    return make_error(env, Errc::busy, "region " + res->region.id() + " was already adopted");
  return atoms.ok;
}

SPSHM_GUARDED_NIF(nif_export_key)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  if (!res->region.encrypted()) {
    return make_error(env, Errc::invalid_argument,
                      "region " + res->region.id() + " is not encrypted: it has no key");
  }
  const std::uint8_t* key = res->region.key();
  if (key == nullptr) {
    return make_error(
        env, Errc::invalid_argument,
        "the key of region " + res->region.id() + " is only known to the process that created it");
  }
  return make_ok(env, make_binary(env, key, kKeySize));
}

SPSHM_GUARDED_NIF(nif_release_holder)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  std::uint64_t os_pid = 0, start_time = 0;
  if (!get_region(env, argv[0], &res) || !get_u64(env, argv[1], &os_pid) ||
      !get_u64(env, argv[2], &start_time)) {
    return enif_make_badarg(env);
  }
  if (os_pid == 0 || os_pid > UINT32_MAX) {
    return make_error(env, Errc::invalid_argument,
                      "os_pid " + std::to_string(os_pid) + " is not a valid process id");
  }
  if (!res->region.header_writable()) return private_header(env, res->region, "release holds");
  std::uint32_t released =
      release_all(res->region.header(), static_cast<std::uint32_t>(os_pid), start_time);
  return make_ok(env, enif_make_uint(env, released));
}

SPSHM_GUARDED_NIF(nif_inspect_path)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::string path;
  Error why{};
  ERL_NIF_TERM reply;
  if (!decoded(env, get_os_string(env, argv[0], "path", &path, &why), why, &reply)) return reply;
  auto snap = inspect(path);
  if (!snap.ok()) return make_error(env, snap.error());
  return make_ok(env, encode_snapshot(env, snap.value(), path));
}

// Dirty (I/O bound): opens a name in a shared directory and may unlink a big segment.
SPSHM_GUARDED_NIF(nif_sweep_segment)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::string id;
  Error why{};
  ERL_NIF_TERM reply;
  bool dry_run = false;
  if (!get_bool(env, argv[1], &dry_run)) return enif_make_badarg(env);
  if (!decoded(env, get_os_string(env, argv[0], "region id", &id, &why), why, &reply)) return reply;
  auto done = sweep_segment(id, dry_run);
  if (!done.ok()) return make_error(env, done.error());
  switch (done.value()) {
    case SweepOutcome::removed:
      return make_ok(env, atoms.removed);
    case SweepOutcome::removed_incomplete:
      return make_ok(env, atoms.removed_incomplete);
    case SweepOutcome::in_use:
      return make_ok(env, atoms.in_use);
    case SweepOutcome::young:
      return make_ok(env, atoms.young);
  }
  return make_ok(env, atoms.in_use);
}

// Dirty (I/O bound): reads a directory. The one listing of segments (the manager's
// sweeps and the mix tasks use it).
SPSHM_GUARDED_NIF(nif_list_segments)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  ERL_NIF_TERM list = enif_make_list(env, 0);
  for (const std::string& id : list_segments()) {
    list = enif_make_list_cell(env, make_binary(env, id), list);
  }
  return list;
}

SPSHM_GUARDED_NIF(nif_unlink_segment)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::string id;
  Error why{};
  ERL_NIF_TERM reply;
  if (!decoded(env, get_os_string(env, argv[0], "region id", &id, &why), why, &reply)) return reply;
  auto done = unlink_segment(id);
  if (!done.ok()) return make_error(env, done.error());
  return atoms.ok;
}

}  // namespace spshm::nif
