#include "terms.hpp"

#include <cerrno>
#include <cstring>
#include <new>

#include "nif_functions.hpp"

namespace spshm::nif {

Atoms atoms;

namespace {
ERL_NIF_TERM atom(ErlNifEnv* env, const char* name) { return enif_make_atom(env, name); }
}  // namespace

void init_atoms(ErlNifEnv* env) {
  Atoms& a = atoms;
  a.ok = atom(env, "ok");
  a.error = atom(env, "error");
  a.true_ = atom(env, "true");
  a.false_ = atom(env, "false");
  a.nil = atom(env, "nil");
  a.undefined = atom(env, "undefined");
  a.posix = atom(env, "posix");
  a.memfd = atom(env, "memfd");
  a.windows = atom(env, "windows");
  a.create = atom(env, "create");
  a.open_only = atom(env, "open_only");
  a.create_or_open = atom(env, "create_or_open");
  a.remove_and_create = atom(env, "remove_and_create");
  a.read_only = atom(env, "read_only");
  a.read_only_unheld = atom(env, "read_only_unheld");
  a.read_write = atom(env, "read_write");
  a.created = atom(env, "created");
  a.opened = atom(env, "opened");
  a.name = atom(env, "name");
  a.open_mode = atom(env, "open_mode");
  a.mode = atom(env, "mode");
  a.lock_memory = atom(env, "lock_memory");
  a.arena = atom(env, "arena");
  a.control_offset = atom(env, "control_offset");
  a.idle_timeout_ms = atom(env, "idle_timeout_ms");
  a.id = atom(env, "id");
  a.backend = atom(env, "backend");
  a.size = atom(env, "size");
  a.capacity = atom(env, "capacity");
  a.control_path = atom(env, "control_path");
  a.data_path = atom(env, "data_path");
  a.data_offset = atom(env, "data_offset");
  a.role = atom(env, "role");
  a.encrypted = atom(env, "encrypted");
  a.sealed = atom(env, "sealed");
  a.zero_copy = atom(env, "zero_copy");
  a.os_pid = atom(env, "os_pid");
  a.format_version = atom(env, "format_version");
  a.flags = atom(env, "flags");
  a.deallocated = atom(env, "deallocated");
  a.security_level = atom(env, "security_level");
  a.refcount = atom(env, "refcount");
  a.creator_pid = atom(env, "creator_pid");
  a.creator_start_time = atom(env, "creator_start_time");
  a.boot_id = atom(env, "boot_id");
  a.created_at_ns = atom(env, "created_at_ns");
  a.last_access_ns = atom(env, "last_access_ns");
  a.idle_timeout_ns = atom(env, "idle_timeout_ns");
  a.metadata = atom(env, "metadata");
  a.holders = atom(env, "holders");
  a.pid = atom(env, "pid");
  a.start_time = atom(env, "start_time");
  a.count = atom(env, "count");
  a.writable = atom(env, "writable");
  a.creator_alive = atom(env, "creator_alive");
  a.in_use = atom(env, "in_use");
  a.removed = atom(env, "removed");
  a.removed_incomplete = atom(env, "removed_incomplete");
  a.young = atom(env, "young");
  a.path = atom(env, "path");
  a.state = atom(env, "state");
  a.snakepit_shm_owner_down = atom(env, "snakepit_shm_owner_down");
  a.manager_name = atom(env, "Elixir.Snakepit.SharedMemory.Manager");
}

bool get_u64(ErlNifEnv* env, ERL_NIF_TERM term, std::uint64_t* out) {
  ErlNifUInt64 value;
  if (enif_get_uint64(env, term, &value)) {
    *out = value;
    return true;
  }
  if (enif_term_type(env, term) != ERL_NIF_TERM_TYPE_INTEGER) return false;
  // An integer that does not fit in 64 unsigned bits: negative (badarg) or a bignum
  // above 2^64-1 (saturates, so that range checks report it as too large).
  if (enif_compare(term, enif_make_int(env, 0)) < 0) return false;
  *out = UINT64_MAX;
  return true;
}

bool get_bool(ErlNifEnv* env, ERL_NIF_TERM term, bool* out) {
  (void)env;
  if (enif_is_identical(term, atoms.true_)) {
    *out = true;
    return true;
  }
  if (enif_is_identical(term, atoms.false_)) {
    *out = false;
    return true;
  }
  return false;
}

bool get_string(ErlNifEnv* env, ERL_NIF_TERM term, std::string* out) {
  ErlNifBinary bin;
  if (!enif_inspect_binary(env, term, &bin)) return false;
  out->assign(reinterpret_cast<const char*>(bin.data), bin.size);
  return true;
}

bool get_map_value(ErlNifEnv* env, ERL_NIF_TERM map, ERL_NIF_TERM key, ERL_NIF_TERM* out) {
  return enif_get_map_value(env, map, key, out) != 0;
}

bool has_nul(std::string_view s) noexcept { return s.find('\0') != std::string_view::npos; }

ERL_NIF_TERM make_binary(ErlNifEnv* env, const std::uint8_t* bytes, std::size_t length) {
  ERL_NIF_TERM term;
  unsigned char* dst = enif_make_new_binary(env, length, &term);
  if (dst == nullptr) return enif_make_badarg(env);  // out of memory for a small binary
  if (length != 0) std::memcpy(dst, bytes, length);
  return term;
}

ERL_NIF_TERM make_binary(ErlNifEnv* env, std::string_view bytes) {
  return make_binary(env, reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
}

ERL_NIF_TERM make_bool(bool value) noexcept { return value ? atoms.true_ : atoms.false_; }

ERL_NIF_TERM make_ok(ErlNifEnv* env, ERL_NIF_TERM value) {
  return enif_make_tuple2(env, atoms.ok, value);
}

ERL_NIF_TERM make_error(ErlNifEnv* env, Errc code, std::string_view message, int sys_errno) {
  ERL_NIF_TERM reason = enif_make_atom(env, errc_name(code));
  ERL_NIF_TERM detail =
      enif_make_tuple3(env, reason, make_binary(env, message), enif_make_int(env, sys_errno));
  return enif_make_tuple2(env, atoms.error, detail);
}

ERL_NIF_TERM static_error(ErlNifEnv* env, const char* reason, const char* message,
                          int sys_errno) noexcept {
  ERL_NIF_TERM text;
  std::size_t length = std::strlen(message);
  unsigned char* dst = enif_make_new_binary(env, length, &text);
  if (dst == nullptr) return enif_make_badarg(env);  // the VM itself is out of memory
  std::memcpy(dst, message, length);
  ERL_NIF_TERM detail =
      enif_make_tuple3(env, enif_make_atom(env, reason), text, enif_make_int(env, sys_errno));
  return enif_make_tuple2(env, atoms.error, detail);
}

ERL_NIF_TERM guard_nif(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[],
                       ERL_NIF_TERM (*body)(ErlNifEnv*, int, const ERL_NIF_TERM[])) noexcept {
  try {
    return body(env, argc, argv);
  } catch (const std::bad_alloc&) {
    return static_error(env, "no_space", "out of memory in the snakepit_shm NIF", ENOMEM);
  } catch (...) {
    return static_error(env, "io_error", "internal error in the snakepit_shm NIF", 0);
  }
}

ERL_NIF_TERM make_error(ErlNifEnv* env, const Error& error) {
  return make_error(env, error.code, error.message, error.sys_errno);
}

std::string hex(const std::uint8_t* bytes, std::size_t length) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(length * 2);
  for (std::size_t i = 0; i < length; ++i) {
    out.push_back(digits[bytes[i] >> 4]);
    out.push_back(digits[bytes[i] & 0x0f]);
  }
  return out;
}

}  // namespace spshm::nif

namespace spshm::nif {

namespace {

bool decode_backend(ERL_NIF_TERM term, BackendKind* out) {
  if (enif_is_identical(term, atoms.posix))
    *out = BackendKind::posix;
  else if (enif_is_identical(term, atoms.memfd))
    *out = BackendKind::memfd;
  else if (enif_is_identical(term, atoms.windows))
    *out = BackendKind::windows;
  else
    return false;
  return true;
}

bool decode_open_mode(ERL_NIF_TERM term, OpenMode* out) {
  if (enif_is_identical(term, atoms.create))
    *out = OpenMode::create;
  else if (enif_is_identical(term, atoms.open_only))
    *out = OpenMode::open_only;
  else if (enif_is_identical(term, atoms.create_or_open))
    *out = OpenMode::create_or_open;
  else if (enif_is_identical(term, atoms.remove_and_create))
    *out = OpenMode::remove_and_create;
  else
    return false;
  return true;
}

Decoded invalid(Error* why, std::string message) {
  *why = Error{Errc::invalid_argument, 0, std::move(message)};
  return Decoded::invalid;
}

}  // namespace

bool decoded(ErlNifEnv* env, Decoded status, const Error& why, ERL_NIF_TERM* reply) {
  switch (status) {
    case Decoded::ok:
      return true;
    case Decoded::badarg:
      *reply = enif_make_badarg(env);
      return false;
    case Decoded::invalid:
      *reply = make_error(env, why);
      return false;
  }
  return false;
}

Decoded get_os_string(ErlNifEnv* env, ERL_NIF_TERM term, const char* what, std::string* out,
                      Error* why) {
  if (!get_string(env, term, out)) return Decoded::badarg;
  if (out->empty()) return invalid(why, std::string(what) + " is empty");
  if (has_nul(*out)) return invalid(why, std::string(what) + " contains a NUL byte");
  return Decoded::ok;
}

Decoded decode_create_options(ErlNifEnv* env, ERL_NIF_TERM map, CreateOptions* out, Error* why) {
  ERL_NIF_TERM backend, name, open_mode, mode, level, encrypted, lock, metadata, timeout;
  if (!enif_is_map(env, map) || !get_map_value(env, map, atoms.backend, &backend) ||
      !get_map_value(env, map, atoms.name, &name) ||
      !get_map_value(env, map, atoms.open_mode, &open_mode) ||
      !get_map_value(env, map, atoms.mode, &mode) ||
      !get_map_value(env, map, atoms.security_level, &level) ||
      !get_map_value(env, map, atoms.encrypted, &encrypted) ||
      !get_map_value(env, map, atoms.lock_memory, &lock) ||
      !get_map_value(env, map, atoms.metadata, &metadata) ||
      !get_map_value(env, map, atoms.idle_timeout_ms, &timeout)) {
    return Decoded::badarg;
  }

  CreateOptions o;
  std::uint64_t mode_bits = 0, security_level = 0, timeout_ms = 0;
  if (!decode_backend(backend, &o.backend) || !decode_open_mode(open_mode, &o.open_mode) ||
      !get_u64(env, mode, &mode_bits) || !get_u64(env, level, &security_level) ||
      !get_bool(env, encrypted, &o.encrypted) || !get_bool(env, lock, &o.lock_memory) ||
      !get_string(env, metadata, &o.metadata_json) || !get_u64(env, timeout, &timeout_ms)) {
    return Decoded::badarg;
  }
  if (!enif_is_identical(name, atoms.nil) && !get_string(env, name, &o.name)) {
    return Decoded::badarg;
  }
  // Optional (issue 12): an encrypted region's chunks initialised in slices by the caller.
  ERL_NIF_TERM defer;
  if (enif_get_map_value(env, map, enif_make_atom(env, "defer_chunks"), &defer) &&
      !get_bool(env, defer, &o.defer_chunks)) {
    return Decoded::badarg;
  }
  if (enif_get_map_value(env, map, enif_make_atom(env, "defer_allocate"), &defer) &&
      !get_bool(env, defer, &o.defer_allocate)) {
    return Decoded::badarg;
  }

  if (mode_bits > 0777) {
    return invalid(why, "mode " + std::to_string(mode_bits) +
                            " is not a permission mask: use 0..0o777 (e.g. 0o600)");
  }
  if (security_level > 2) {
    return invalid(why, "security_level " + std::to_string(security_level) +
                            " is out of range: use 0 (standard), 1 (high) or 2 (maximum)");
  }
  if (timeout_ms > UINT64_MAX / 1000000) {
    return invalid(why, "idle_timeout_ms " + std::to_string(timeout_ms) +
                            " is too large: it must fit in 64-bit nanoseconds");
  }
  if (!enif_is_identical(name, atoms.nil)) {
    if (has_nul(o.name)) return invalid(why, "name contains a NUL byte: use [a-z0-9_-] only");
    auto valid = validate_name(o.name);
    if (!valid.ok()) {
      *why = valid.error();
      return Decoded::invalid;
    }
  }
  // Optional: absent means a dedicated region (Snakepit.SharedMemory.Arena decides).
  ERL_NIF_TERM arena;
  if (enif_get_map_value(env, map, atoms.arena, &arena) && !get_bool(env, arena, &o.arena)) {
    return Decoded::badarg;
  }
  o.mode = static_cast<std::uint32_t>(mode_bits);
  o.security_level = static_cast<std::uint32_t>(security_level);
  o.idle_timeout_ns = timeout_ms * 1000000;
  // Optional keys of the warm pool / huge pages (nif_pool.cpp).
  if (Decoded d = decode_pool_create_options(env, map, &o, why); d != Decoded::ok) return d;
  *out = std::move(o);
  return Decoded::ok;
}

}  // namespace spshm::nif
