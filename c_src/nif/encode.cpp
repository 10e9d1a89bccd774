#include "encode.hpp"

#include <vector>

#include "resources.hpp"
#include "terms.hpp"

namespace spshm::nif {

ERL_NIF_TERM backend_atom(BackendKind kind) {
  switch (kind) {
    case BackendKind::posix:
      return atoms.posix;
    case BackendKind::memfd:
      return atoms.memfd;
    case BackendKind::windows:
      return atoms.windows;
  }
  return atoms.undefined;  // a header of an unknown backend (inspect of a foreign file)
}

ERL_NIF_TERM encode_info(ErlNifEnv* env, RegionResource& res) {
  const Atoms& a = atoms;
  const Region& region = res.region;
  // The data descriptor is moved out and closed when a deallocation retires the data
  // area (RegionResource::retire, on whatever thread freed it): read it only inside.
  ERL_NIF_TERM data_path = make_binary(env, std::string());
  bool zero_copy = false;
  {
    DataAccess access(&res);
    if (access.ok()) {
      data_path = make_binary(env, region.data_path());
      zero_copy = region.immutable() && !region.encrypted();
    }
  }
  ERL_NIF_TERM keys[] = {a.id,        a.backend,     a.size,           a.capacity,  a.control_path,
                         a.data_path, a.data_offset, a.role,           a.encrypted, a.sealed,
                         a.os_pid,    a.zero_copy,   a.control_offset, a.arena};
  ERL_NIF_TERM values[] = {
      make_binary(env, region.id()),
      backend_atom(region.backend()),
      enif_make_uint64(env, region.size()),
      enif_make_uint64(env, region.capacity()),
      make_binary(env, region.control_path()),
      data_path,
      // Where the data starts in data_path's object: an arena region's data follows its
      // control block, control_offset bytes into the arena.
      enif_make_uint64(env, region.control_offset() + region.header().data_offset),
      region.role() == Role::created ? a.created : a.opened,
      make_bool(region.encrypted()),
      make_bool(region.sealed()),
      enif_make_uint(env, self_identity.pid),
      make_bool(zero_copy),
      enif_make_uint64(env, region.control_offset()),
      make_bool(region.in_arena()),
  };
  return make_map(env, keys, values);
}

namespace {

ERL_NIF_TERM encode_holders(ErlNifEnv* env, const std::vector<HolderInfo>& holders) {
  const Atoms& a = atoms;
  std::vector<ERL_NIF_TERM> list;
  list.reserve(holders.size());
  for (const HolderInfo& h : holders) {
    ERL_NIF_TERM keys[] = {a.pid, a.start_time, a.count, a.writable};
    ERL_NIF_TERM values[] = {enif_make_uint(env, h.pid), enif_make_uint64(env, h.start_time),
                             enif_make_uint(env, h.count), make_bool(h.writable)};
    list.push_back(make_map(env, keys, values));
  }
  return enif_make_list_from_array(env, list.data(), static_cast<unsigned>(list.size()));
}

}  // namespace

ERL_NIF_TERM encode_snapshot(ErlNifEnv* env, const HeaderSnapshot& s, const std::string& path) {
  const Atoms& a = atoms;
  ERL_NIF_TERM keys[] = {
      a.id,
      a.backend,
      a.format_version,
      a.size,
      a.capacity,
      a.data_offset,
      a.flags,
      a.state,
      a.sealed,
      a.deallocated,
      a.encrypted,
      a.security_level,
      a.refcount,
      a.creator_pid,
      a.creator_start_time,
      a.boot_id,
      a.created_at_ns,
      a.last_access_ns,
      a.idle_timeout_ns,
      a.metadata,
      a.holders,
      a.creator_alive,
      a.in_use,
  };
  ERL_NIF_TERM values[] = {
      make_binary(env, s.region_id),
      backend_atom(s.backend),
      enif_make_uint(env, s.format_version),
      enif_make_uint64(env, s.data_size),
      enif_make_uint64(env, s.data_capacity),
      enif_make_uint64(env, s.data_offset),
      enif_make_uint(env, s.flags),
      enif_make_uint(env, s.state),
      make_bool((s.state & kStateSealed) != 0),
      make_bool((s.state & kStateDeallocated) != 0),
      make_bool((s.flags & kFlagEncrypted) != 0),
      enif_make_uint(env, s.security_level),
      enif_make_uint(env, s.refcount),
      enif_make_uint(env, s.creator_pid),
      enif_make_uint64(env, s.creator_start_time),
      make_binary(env, hex(s.boot_id.data(), s.boot_id.size())),
      enif_make_uint64(env, s.created_at_ns),
      enif_make_uint64(env, s.last_access_ns),
      enif_make_uint64(env, s.idle_timeout_ns),
      make_binary(env, s.metadata_json),
      encode_holders(env, s.holders),
      make_bool(s.creator_alive),
      make_bool(s.in_use),
  };
  ERL_NIF_TERM map = make_map(env, keys, values);
  if (!path.empty()) enif_make_map_put(env, map, a.path, make_binary(env, path), &map);
  // Only for a data memfd reused from the warm pool (its name is not <id>.data).
  if (!s.data_name.empty())
    enif_make_map_put(env, map, enif_make_atom(env, "data_name"), make_binary(env, s.data_name),
                      &map);
  return map;
}

ERL_NIF_TERM encode_self_info(ErlNifEnv* env) {
  const Atoms& a = atoms;
  const SelfIdentity& self = self_identity;
  ERL_NIF_TERM keys[] = {a.os_pid, a.start_time, a.boot_id};
  ERL_NIF_TERM values[] = {enif_make_uint(env, self.pid), enif_make_uint64(env, self.start_time),
                           make_binary(env, hex(self.boot_id.data(), self.boot_id.size()))};
  return make_map(env, keys, values);
}

}  // namespace spshm::nif
