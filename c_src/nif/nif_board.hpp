// NIFs of the status board (nif_board.cpp); their table entries live in nif.cpp.
#pragma once

#include <erl_nif.h>

namespace spshm::nif {

/// Opens (load) or takes over (upgrade) the board resource types. False on failure.
bool open_board_resource_types(ErlNifEnv* env);

#define SPSHM_BOARD_NIF(name) ERL_NIF_TERM name(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[])
SPSHM_BOARD_NIF(nif_board_layout);
SPSHM_BOARD_NIF(nif_board_init);
SPSHM_BOARD_NIF(nif_board_open);
SPSHM_BOARD_NIF(nif_board_info);
SPSHM_BOARD_NIF(nif_board_join);
SPSHM_BOARD_NIF(nif_board_update);
SPSHM_BOARD_NIF(nif_board_leave);
SPSHM_BOARD_NIF(nif_board_entries);
SPSHM_BOARD_NIF(nif_board_least_loaded);
SPSHM_BOARD_NIF(nif_board_reclaim);
SPSHM_BOARD_NIF(nif_board_watch_info);
SPSHM_BOARD_NIF(nif_board_monotonic_ns);
#undef SPSHM_BOARD_NIF

}  // namespace spshm::nif
