// Term decoding and encoding helpers of the NIF: the only file that knows how an
// Erlang term maps to a C++ value. No policy here, no core calls except errc_name.
//
// Conventions (lib/snakepit/shared_memory/native.ex):
//   * a term of the wrong type or shape -> the caller returns enif_make_badarg;
//   * a term of the right type with an unusable value -> {:error, {reason, message, errno}}.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <erl_nif.h>

#include "error.hpp"
#include "region.hpp"

namespace spshm::nif {

/// Atoms used by the NIF, created once per load/upgrade (atoms are VM-global and never
/// garbage collected, so caching the terms is safe).
struct Atoms {
  ERL_NIF_TERM ok, error, true_, false_, nil, undefined;
  // backends, open modes, access modes, roles
  ERL_NIF_TERM posix, memfd, windows;
  ERL_NIF_TERM create, open_only, create_or_open, remove_and_create;
  ERL_NIF_TERM read_only, read_write, read_only_unheld, created, opened;
  // option keys
  ERL_NIF_TERM name, open_mode, mode, lock_memory, idle_timeout_ms;
  ERL_NIF_TERM arena, control_offset;  // create option and info keys (arena regions)
  // info / header keys
  ERL_NIF_TERM id, backend, size, capacity, control_path, data_path, data_offset, role;
  ERL_NIF_TERM encrypted, sealed, os_pid, format_version, flags, deallocated, security_level;
  ERL_NIF_TERM refcount, creator_pid, creator_start_time, boot_id, created_at_ns;
  ERL_NIF_TERM last_access_ns, idle_timeout_ns, metadata, holders, pid, start_time, count;
  ERL_NIF_TERM writable, creator_alive, path, state, in_use, removed, removed_incomplete, young;
  ERL_NIF_TERM zero_copy;  // info: the kernel sealed the data (read/3 need not copy)
  // messages
  ERL_NIF_TERM snakepit_shm_owner_down, manager_name;
};
extern Atoms atoms;
void init_atoms(ErlNifEnv* env);

// ---- decoding (false means: wrong type, answer badarg) ----

/// A non-negative integer. Integers above 2^64-1 (bignums) saturate to UINT64_MAX, so
/// that a huge but well-typed size or offset becomes a range error, not badarg.
/// Negative integers, floats and every other term: false.
bool get_u64(ErlNifEnv* env, ERL_NIF_TERM term, std::uint64_t* out);
/// true / false atoms only.
bool get_bool(ErlNifEnv* env, ERL_NIF_TERM term, bool* out);
/// A binary (not an iolist) copied into a std::string; may contain NUL bytes.
bool get_string(ErlNifEnv* env, ERL_NIF_TERM term, std::string* out);
/// Value of an atom key of a map; false if `map` is not a map or the key is missing.
bool get_map_value(ErlNifEnv* env, ERL_NIF_TERM map, ERL_NIF_TERM key, ERL_NIF_TERM* out);

/// Outcome of decoding a compound argument: `invalid` carries an Error (a well-typed
/// term with an unusable value); `badarg` means the term has the wrong type or shape.
enum class Decoded { ok, badarg, invalid };

/// Decodes the option map of create/2 (every key required, extra keys ignored):
/// backend, name, open_mode, mode, security_level, encrypted, lock_memory, metadata,
/// idle_timeout_ms. Range checks here are about the term (mode <= 0o777, level <= 2,
/// the timeout fits in nanoseconds, no NUL in the name); the core checks the rest.
Decoded decode_create_options(ErlNifEnv* env, ERL_NIF_TERM map, CreateOptions* out, Error* why);
/// The optional create keys of the warm pool and huge pages (nif_pool.cpp):
/// huge_pages (:auto | true | false).
Decoded decode_pool_create_options(ErlNifEnv* env, ERL_NIF_TERM map, CreateOptions* out,
                                   Error* why);

/// True when `status` is ok; otherwise sets *reply to badarg or to the error tuple of `why`.
bool decoded(ErlNifEnv* env, Decoded status, const Error& why, ERL_NIF_TERM* reply);

/// A binary naming a path or an id, for the OS: invalid if empty or if it contains a
/// NUL byte (the OS would silently truncate it there). `what` names it in the message.
Decoded get_os_string(ErlNifEnv* env, ERL_NIF_TERM term, const char* what, std::string* out,
                      Error* why);

/// True if a string that names a path, id or name contains a NUL byte (the OS would
/// silently truncate it there).
bool has_nul(std::string_view s) noexcept;

// ---- encoding ----

ERL_NIF_TERM make_binary(ErlNifEnv* env, std::string_view bytes);
ERL_NIF_TERM make_binary(ErlNifEnv* env, const std::uint8_t* bytes, std::size_t length);
ERL_NIF_TERM make_bool(bool value) noexcept;
ERL_NIF_TERM make_ok(ErlNifEnv* env, ERL_NIF_TERM value);
/// {:error, {reason, message, errno}} with reason = errc_name(error.code).
ERL_NIF_TERM make_error(ErlNifEnv* env, const Error& error);
ERL_NIF_TERM make_error(ErlNifEnv* env, Errc code, std::string_view message, int sys_errno = 0);
/// Lower-case hex of `length` bytes.
std::string hex(const std::uint8_t* bytes, std::size_t length);

/// Builds a map from parallel key/value arrays of `N` entries (keys must be distinct).
template <std::size_t N>
ERL_NIF_TERM make_map(ErlNifEnv* env, ERL_NIF_TERM (&keys)[N], ERL_NIF_TERM (&values)[N]) {
  ERL_NIF_TERM map;
  if (!enif_make_map_from_arrays(env, keys, values, N, &map)) return enif_make_badarg(env);
  return map;
}

}  // namespace spshm::nif
