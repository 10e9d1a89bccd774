// Encoders of the maps the NIF returns (info/1, header/1, inspect_path/1, self_info/0).
#pragma once

#include <erl_nif.h>

#include "region.hpp"

namespace spshm::nif {

ERL_NIF_TERM backend_atom(BackendKind kind);

/// %{id, backend, size, capacity, control_path, data_path, data_offset, role, encrypted,
///   sealed, os_pid}
struct RegionResource;
/// The region's description. Holds the data area (DataAccess) while it reads the data
/// descriptor (data_path, the kernel seal), so that a deallocation on another thread
/// cannot retire it in between; a region whose data was retired has data_path "" and
/// zero_copy false.
ERL_NIF_TERM encode_info(ErlNifEnv* env, RegionResource& res);

/// Every header field; `path` (may be empty) adds a :path key (inspect_path/1).
ERL_NIF_TERM encode_snapshot(ErlNifEnv* env, const HeaderSnapshot& s, const std::string& path);

/// %{os_pid, start_time, boot_id}
ERL_NIF_TERM encode_self_info(ErlNifEnv* env);

}  // namespace spshm::nif
