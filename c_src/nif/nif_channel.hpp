// NIFs of the message channel (nif_channel.cpp); the table lives in nif.cpp.
#pragma once

#include <erl_nif.h>

namespace spshm::nif {

/// Opens (load) or takes over (upgrade) the channel's resource types. False on failure.
bool open_channel_resource_types(ErlNifEnv* env);

#define SPSHM_CHANNEL_NIF(name) \
  ERL_NIF_TERM name(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[])
SPSHM_CHANNEL_NIF(nif_channel_layout);
SPSHM_CHANNEL_NIF(nif_channel_open);
SPSHM_CHANNEL_NIF(nif_channel_info);
SPSHM_CHANNEL_NIF(nif_channel_select);
SPSHM_CHANNEL_NIF(nif_channel_events);
SPSHM_CHANNEL_NIF(nif_channel_send);
SPSHM_CHANNEL_NIF(nif_channel_prepare_region);
SPSHM_CHANNEL_NIF(nif_channel_send_region);
SPSHM_CHANNEL_NIF(nif_channel_recv);
SPSHM_CHANNEL_NIF(nif_channel_pump);
SPSHM_CHANNEL_NIF(nif_channel_doorbell);
SPSHM_CHANNEL_NIF(nif_channel_doorbell_close);
SPSHM_CHANNEL_NIF(nif_channel_pump_bell);
SPSHM_CHANNEL_NIF(nif_channel_guard);
SPSHM_CHANNEL_NIF(nif_channel_prepare_wait);
SPSHM_CHANNEL_NIF(nif_channel_flush);
SPSHM_CHANNEL_NIF(nif_channel_close);
SPSHM_CHANNEL_NIF(nif_channel_monitor);
SPSHM_CHANNEL_NIF(nif_channel_stats);
SPSHM_CHANNEL_NIF(nif_channel_sweep_dirs);
// nif_ring_probe.cpp: a private ring for the PropEr model of the indices (tests only)
bool open_ring_probe_type(ErlNifEnv* env);
SPSHM_CHANNEL_NIF(nif_ring_probe_new);
SPSHM_CHANNEL_NIF(nif_ring_probe_write);
SPSHM_CHANNEL_NIF(nif_ring_probe_read);
SPSHM_CHANNEL_NIF(nif_ring_probe_flush);
SPSHM_CHANNEL_NIF(nif_ring_probe_indices);
#undef SPSHM_CHANNEL_NIF

}  // namespace spshm::nif
