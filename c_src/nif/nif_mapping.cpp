// NIFs on mappings: map/unmap (holds in the header) and bounds-checked data access.
//
// The plain read/write run on a normal scheduler and refuse more than kPlainLimit bytes
// (about 10 us of memcpy, or of XChaCha20 for encrypted regions, well under the 1 ms a
// NIF may take); the *_dirty variants run on dirty CPU schedulers for anything larger.
#include <cstdint>
#include <mutex>
#include <new>
#include <string>

#include "nif_functions.hpp"
#include "region.hpp"
#include "resources.hpp"
#include "terms.hpp"

namespace spshm::nif {

namespace {

constexpr std::uint64_t kPlainLimit = 65536;

std::string region_label(const MappingResource* m) { return "region " + m->owner->region.id(); }

ERL_NIF_TERM truncated_error(ErlNifEnv* env, const Region& region) {
  return make_error(env, Errc::truncated,
                    "region " + region.id() +
                        " lost its memory: another process truncated the segment (POSIX "
                        "backend); its data is gone. Deallocate it");
}

// Checks shared by every access through a mapping; false with *reply set on refusal.
bool usable(ErlNifEnv* env, const MappingResource* m, ERL_NIF_TERM* reply) {
  if (m->closed.load()) {
    *reply = make_error(env, Errc::closed,
                        "this mapping of " + region_label(m) + " was unmapped: map it again");
    return false;
  }
  if (m->owner->region.damaged()) {
    *reply = truncated_error(env, m->owner->region);
    return false;
  }
  if (m->owner->is_deallocated()) {
    *reply = make_error(env, Errc::deallocated, region_label(m) + " was deallocated");
    return false;
  }
  return true;
}

// [offset, offset + length) within [0, size), without overflowing 64 bits.
bool in_bounds(ErlNifEnv* env, const MappingResource* m, std::uint64_t offset, std::uint64_t length,
               ERL_NIF_TERM* reply) {
  std::uint64_t size = m->owner->region.size();
  if (offset <= size && length <= size - offset) return true;
  *reply = make_error(env, Errc::out_of_bounds,
                      "offset " + std::to_string(offset) + " + length " + std::to_string(length) +
                          " exceeds the size of " + region_label(m) + " (" + std::to_string(size) +
                          " bytes)");
  return false;
}

ERL_NIF_TERM too_long_for_plain(ErlNifEnv* env, const char* dirty_name, std::uint64_t length) {
  return make_error(env, Errc::invalid_argument,
                    std::string("use ") + dirty_name + " for payloads over 65536 bytes (got " +
                        std::to_string(length) + ")");
}

ERL_NIF_TERM do_write(ErlNifEnv* env, const ERL_NIF_TERM argv[], bool dirty) {
  MappingResource* m;
  std::uint64_t offset = 0;
  ErlNifBinary data;
  if (!get_mapping(env, argv[0], &m) || !get_u64(env, argv[1], &offset) ||
      !enif_inspect_binary(env, argv[2], &data)) {
    return enif_make_badarg(env);
  }
  ERL_NIF_TERM reply;
  if (!usable(env, m, &reply)) return reply;
  if (!m->writable) {
    return make_error(env, Errc::permission_denied,
                      "this mapping of " + region_label(m) +
                          " is read-only: map it with access_mode :read_write to write");
  }
  if (!dirty && data.size > kPlainLimit) return too_long_for_plain(env, "write_dirty", data.size);
  if (!in_bounds(env, m, offset, data.size, &reply)) return reply;
  DataAccess access(m->owner);
  if (!access.ok()) return make_error(env, Errc::deallocated, region_label(m) + " was deallocated");
  // On a normal scheduler never wait for the region's lock (a dirty multi-GB encryption
  // may hold it): retry on a dirty scheduler instead.
  auto written = m->owner->region.write(offset, data.data, data.size, dirty);
  if (!written.ok() && !dirty && written.error().code == Errc::busy && m->owner->region.encrypted())
    return enif_schedule_nif(env, "write_dirty", ERL_NIF_DIRTY_JOB_CPU_BOUND, nif_write_dirty, 3,
                             argv);
  if (!written.ok()) return make_error(env, written.error());
  return atoms.ok;
}

ERL_NIF_TERM do_read(ErlNifEnv* env, const ERL_NIF_TERM argv[], bool dirty) {
  MappingResource* m;
  std::uint64_t offset = 0, length = 0;
  if (!get_mapping(env, argv[0], &m) || !get_u64(env, argv[1], &offset) ||
      !get_u64(env, argv[2], &length)) {
    return enif_make_badarg(env);
  }
  ERL_NIF_TERM reply;
  if (!usable(env, m, &reply)) return reply;
  if (!dirty && length > kPlainLimit) return too_long_for_plain(env, "read_dirty", length);
  if (!in_bounds(env, m, offset, length, &reply)) return reply;
  ErlNifBinary bin;
  if (!enif_alloc_binary(static_cast<std::size_t>(length), &bin)) {
    return make_error(env, Errc::no_space,
                      "cannot allocate a binary of " + std::to_string(length) +
                          " bytes: read a smaller range, or seal the region for zero-copy reads");
  }
  DataAccess access(m->owner);
  if (!access.ok()) {
    enif_release_binary(&bin);
    return make_error(env, Errc::deallocated, region_label(m) + " was deallocated");
  }
  auto copied = m->owner->region.read(offset, bin.data, bin.size, dirty);
  if (!copied.ok()) {
    enif_release_binary(&bin);
    if (!dirty && copied.error().code == Errc::busy && m->owner->region.encrypted())
      return enif_schedule_nif(env, "read_dirty", ERL_NIF_DIRTY_JOB_CPU_BOUND, nif_read_dirty, 3,
                               argv);
    return make_error(env, copied.error());
  }
  return make_ok(env, enif_make_binary(env, &bin));
}

}  // namespace

SPSHM_GUARDED_NIF(nif_map)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  if (!get_region(env, argv[0], &res)) return enif_make_badarg(env);
  bool writable;
  // read_only_unheld: a read-only mapping that adds no hold (the VM's own passing reads,
  // such as to_nx/1 and a cluster fetch's sender, must not count as holders: the last
  // of them letting go would free a :reference_counted region nobody else holds).
  bool want_hold = true;
  if (enif_is_identical(argv[1], atoms.read_write)) {
    writable = true;
  } else if (enif_is_identical(argv[1], atoms.read_only)) {
    writable = false;
  } else if (enif_is_identical(argv[1], atoms.read_only_unheld)) {
    writable = false;
    want_hold = false;
  } else {
    return enif_make_badarg(env);
  }
  Region& region = res->region;
  if (region.damaged()) return truncated_error(env, region);
  if (res->is_deallocated()) {
    return make_error(env, Errc::deallocated, "region " + region.id() + " was deallocated");
  }
  if (writable && !region.writable()) {
    return make_error(
        env, Errc::permission_denied,
        "region " + region.id() + " was opened read-only: open it writable to map it :read_write");
  }
  if (writable && region.sealed()) {
    return make_error(env, Errc::sealed, "region " + region.id() + " is sealed: map it :read_only");
  }
  // A header this process sees as a private copy (a sealed POSIX region of another
  // process, opened read-only) cannot carry our hold: map without one.
  bool shared_header = want_hold && region.header_writable();
  if (shared_header) {
    auto held = region.hold(self_identity.pid, self_identity.start_time, writable);
    // A header that faulted (a peer truncated the segment) reads as zeros: say so.
    if (!held.ok() && region.damaged()) return truncated_error(env, region);
    if (!held.ok()) return make_error(env, held.error());
  }

  void* mem = enif_alloc_resource(resource_types.mapping, sizeof(MappingResource));
  if (mem == nullptr) {
    if (shared_header) (void)release(region.header(), self_identity.pid, self_identity.start_time);
    return make_error(env, Errc::no_space, "out of memory for a mapping resource");
  }
  auto* m = new (mem) MappingResource{res, writable, shared_header};
  enif_keep_resource(res);  // released by the mapping's destructor
  ERL_NIF_TERM term = enif_make_resource(env, m);
  enif_release_resource(m);
  region.touch();
  return make_ok(env, term);
}

SPSHM_GUARDED_NIF(nif_unmap)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  MappingResource* m;
  if (!get_mapping(env, argv[0], &m)) return enif_make_badarg(env);
  if (m->closed.exchange(true)) {
    return make_error(env, Errc::closed,
                      "this mapping of " + region_label(m) + " was already unmapped");
  }
  // The memory stays mapped until the region resource is destroyed.
  m->release_hold();
  return atoms.ok;
}

SPSHM_GUARDED_NIF(nif_write)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  return do_write(env, argv, false);
}

SPSHM_GUARDED_NIF(nif_write_dirty)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  return do_write(env, argv, true);
}

SPSHM_GUARDED_NIF(nif_read)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  return do_read(env, argv, false);
}

SPSHM_GUARDED_NIF(nif_read_dirty)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  return do_read(env, argv, true);
}

// O(1) whatever the length: the binary points into the mapping and keeps the region
// resource (hence the mapping) alive. Only honest over bytes that can no longer change:
// a sealed, unencrypted region.
SPSHM_GUARDED_NIF(nif_read_zero_copy)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  MappingResource* m;
  std::uint64_t offset = 0, length = 0;
  if (!get_mapping(env, argv[0], &m) || !get_u64(env, argv[1], &offset) ||
      !get_u64(env, argv[2], &length)) {
    return enif_make_badarg(env);
  }
  ERL_NIF_TERM reply;
  if (!usable(env, m, &reply)) return reply;
  Region& region = m->owner->region;
  if (region.encrypted()) {
    return make_error(env, Errc::invalid_argument,
                      region_label(m) +
                          " is encrypted: zero-copy reads would expose "
                          "ciphertext; use read/3 to decrypt");
  }
  // Only over a seal the kernel enforces (memfd F_SEAL_WRITE, asked of the kernel now):
  // nobody, in any process, can change these bytes any more.
  if (!region.immutable()) {
    return make_error(
        env, Errc::invalid_argument,
        region_label(m) + (region.sealed()
                               ? " is sealed, but not by the kernel (POSIX, Windows and macOS "
                                 "regions can be made writable again by their owner): read/3 "
                                 "copies"
                               : " is not sealed: its bytes may still change, so reads copy; "
                                 "seal it first for zero-copy reads"));
  }
  if (!in_bounds(env, m, offset, length, &reply)) return reply;
  m->owner->zero_copy_shared.store(true);
  if (m->owner->deallocating.load()) {
    return make_error(env, Errc::deallocated, region_label(m) + " is being deallocated");
  }
  DataAccess access(m->owner);
  if (!access.ok()) return make_error(env, Errc::deallocated, region_label(m) + " was deallocated");
  region.touch();
  ERL_NIF_TERM bin = enif_make_resource_binary(env, m->owner, region.data() + offset,
                                               static_cast<std::size_t>(length));
  return make_ok(env, bin);
}

// --- Large reads in slices (issue 12) -------------------------------------------------
// One dirty call that runs for tens of milliseconds let the normal schedulers sleep
// through their timers for as long (bench/FINDINGS.md section 7). A large read therefore
// fills one binary in slices of about 1 ms each, returning to a normal scheduler between
// them: read_buffer/1 allocates it (not touched: cheap), read_into/5 (dirty CPU) copies or
// decrypts one slice into it, read_buffer_take/1 hands it over as a binary (no copy).

namespace {

ErlNifResourceType* read_buffer_type = nullptr;

struct ReadBuffer {
  std::mutex mutex;  ///< read_into holds it (dirty); take only tries it (normal scheduler)
  ErlNifBinary bin{};
  bool owned = false;  ///< bin is ours until taken
  /// Bytes [0, filled) were written by read_into: slices fill the buffer in order, and
  /// take hands it over only once it is full (enif_alloc_binary does not clear memory:
  /// an unfilled byte would be whatever the VM's allocator held there before).
  std::uint64_t filled = 0;
};

void read_buffer_dtor(ErlNifEnv*, void* obj) {
  auto* b = static_cast<ReadBuffer*>(obj);
  if (b->owned) enif_release_binary(&b->bin);
  b->~ReadBuffer();
}

bool get_read_buffer(ErlNifEnv* env, ERL_NIF_TERM term, ReadBuffer** out) {
  return enif_get_resource(env, term, read_buffer_type, reinterpret_cast<void**>(out)) != 0;
}

}  // namespace

bool open_read_buffer_type(ErlNifEnv* env) {
  ErlNifResourceTypeInit init{};
  init.dtor = read_buffer_dtor;
  auto flags = static_cast<ErlNifResourceFlags>(ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER);
  read_buffer_type = enif_open_resource_type_x(env, "spshm_read_buffer", &init, flags, nullptr);
  return read_buffer_type != nullptr;
}

// read_buffer(length) -> {:ok, buffer} | {:error, {:no_space, ...}}
SPSHM_GUARDED_NIF(nif_read_buffer)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::uint64_t length = 0;
  if (!get_u64(env, argv[0], &length) || length > SIZE_MAX) return enif_make_badarg(env);
  void* mem = enif_alloc_resource(read_buffer_type, sizeof(ReadBuffer));
  if (mem == nullptr) return make_error(env, Errc::no_space, "out of memory for a read buffer");
  auto* b = new (mem) ReadBuffer{};
  ERL_NIF_TERM term = enif_make_resource(env, b);
  enif_release_resource(b);
  if (!enif_alloc_binary(static_cast<std::size_t>(length), &b->bin)) {
    return make_error(env, Errc::no_space,
                      "cannot allocate a binary of " + std::to_string(length) +
                          " bytes: read a smaller range, or seal the region for zero-copy reads");
  }
  b->owned = true;
  return make_ok(env, term);
}

// read_into(mapping, offset, buffer, at, length) -> :ok | {:error, _}: bytes [offset,
// offset + length) of the region into bytes [at, at + length) of the buffer.
SPSHM_GUARDED_NIF(nif_read_into)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  MappingResource* m;
  ReadBuffer* b;
  std::uint64_t offset = 0, at = 0, length = 0;
  if (!get_mapping(env, argv[0], &m) || !get_u64(env, argv[1], &offset) ||
      !get_read_buffer(env, argv[2], &b) || !get_u64(env, argv[3], &at) ||
      !get_u64(env, argv[4], &length)) {
    return enif_make_badarg(env);
  }
  ERL_NIF_TERM reply;
  if (!usable(env, m, &reply)) return reply;
  if (!in_bounds(env, m, offset, length, &reply)) return reply;
  std::lock_guard<std::mutex> lock(b->mutex);
  if (!b->owned) return make_error(env, Errc::closed, "this read buffer was already taken");
  if (at > b->bin.size || length > b->bin.size - at) {
    return make_error(env, Errc::out_of_bounds,
                      "at " + std::to_string(at) + " + length " + std::to_string(length) +
                          " exceeds the read buffer of " + std::to_string(b->bin.size) + " bytes");
  }
  if (at > b->filled) {
    return make_error(env, Errc::invalid_argument,
                      "read buffer slices are filled in order: the next one starts at " +
                          std::to_string(b->filled) + ", not " + std::to_string(at));
  }
  DataAccess access(m->owner);
  if (!access.ok()) return make_error(env, Errc::deallocated, region_label(m) + " was deallocated");
  auto copied = m->owner->region.read(offset, b->bin.data + at, static_cast<std::size_t>(length));
  if (!copied.ok()) return make_error(env, copied.error());
  if (at + length > b->filled) b->filled = at + length;
  return atoms.ok;
}

// read_buffer_take(buffer) -> {:ok, binary} | {:error, _}: the buffer's binary, whole,
// without a copy; the buffer is empty afterwards. Never waits (normal scheduler).
SPSHM_GUARDED_NIF(nif_read_buffer_take)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ReadBuffer* b;
  if (!get_read_buffer(env, argv[0], &b)) return enif_make_badarg(env);
  std::unique_lock<std::mutex> lock(b->mutex, std::try_to_lock);
  if (!lock.owns_lock())
    return make_error(env, Errc::busy, "this read buffer is being filled by another call");
  if (!b->owned) return make_error(env, Errc::closed, "this read buffer was already taken");
  if (b->filled < b->bin.size) {
    return make_error(env, Errc::invalid_argument,
                      "this read buffer is not filled (" + std::to_string(b->filled) + " of " +
                          std::to_string(b->bin.size) +
                          " bytes): uninitialised memory is never handed out");
  }
  b->owned = false;
  return make_ok(env, enif_make_binary(env, &b->bin));
}

}  // namespace spshm::nif
