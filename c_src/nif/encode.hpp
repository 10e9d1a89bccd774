// Encoders of the maps the NIF returns (info/1, header/1, inspect_path/1, self_info/0).
#pragma once

#include <erl_nif.h>

#include "region.hpp"

namespace spshm::nif {

ERL_NIF_TERM backend_atom(BackendKind kind);

/// %{id, backend, size, capacity, control_path, data_path, data_offset, role, encrypted,
///   sealed, os_pid}
ERL_NIF_TERM encode_info(ErlNifEnv* env, const Region& region);

/// Every header field; `path` (may be empty) adds a :path key (inspect_path/1).
ERL_NIF_TERM encode_snapshot(ErlNifEnv* env, const HeaderSnapshot& s, const std::string& path);

/// %{os_pid, start_time, boot_id}
ERL_NIF_TERM encode_self_info(ErlNifEnv* env);

}  // namespace spshm::nif
