// Snakepit.SharedMemory.Native: the NIF table and the library's lifecycle.
//
// Every function decodes its terms, calls c_src/core, encodes the result; no policy.
// Dirty flags are declared here, per function:
//   * create, open, deallocate, inspect_path: I/O bound (fallocate, zeroing, reading
//     files; open waits up to 1 s for the creator of a named region to publish it);
//   * write_dirty, read_dirty: CPU bound (memcpy, encryption of large payloads).
//
// RLIMIT_NOFILE is deliberately left alone: the VM sizes its poll set from the limit it
// had at boot, so raising it from here would hand out fds (pidfds) that enif_select then
// refuses. Raise it before starting the VM (`ulimit -n`) when keeping many memfd regions
// (two descriptors each) alive.
#include <erl_nif.h>

#include "nif_board.hpp"
#include "nif_channel.hpp"
#include "nif_functions.hpp"
#include "platform.hpp"
#include "reaper.hpp"
#include "resources.hpp"
#include "runtime_index.hpp"
#include "terms.hpp"

namespace spshm::nif {
namespace {

constexpr unsigned kIo = ERL_NIF_DIRTY_JOB_IO_BOUND;
constexpr unsigned kCpu = ERL_NIF_DIRTY_JOB_CPU_BOUND;

ErlNifFunc nif_funcs[] = {
    {"header_layout", 0, nif_header_layout, 0},
    // arenas of small regions (nif_arena.cpp)
    {"arena_configure", 2, nif_arena_configure, 0},
    {"arena_maintain", 0, nif_arena_maintain, kIo},
    {"arena_stats", 0, nif_arena_stats, 0},
    {"inspect_arena", 1, nif_inspect_arena, kIo},
    {"create", 2, nif_create, kIo},
    {"runtime_index_sweep", 0, nif_runtime_index_sweep, kIo},
    {"runtime_index_flush", 1, nif_runtime_index_flush, kIo},
    {"create_plain", 2, nif_create_plain, 0},
    // The same as create/2 on a dirty CPU scheduler: an encrypted region's creation is
    // encryption of every chunk, CPU work that must not crowd the dirty I/O threads.
    {"create_cpu", 2, nif_create, kCpu},
    {"open", 2, nif_open, kIo},
    {"info", 1, nif_info, 0},
    {"header", 1, nif_header, 0},
    {"hold_counts", 1, nif_hold_counts, 0},
    {"map", 2, nif_map, 0},
    {"unmap", 1, nif_unmap, 0},
    {"write", 3, nif_write, 0},
    {"write_dirty", 3, nif_write_dirty, kCpu},
    {"read", 3, nif_read, 0},
    {"read_dirty", 3, nif_read_dirty, kCpu},
    {"read_zero_copy", 3, nif_read_zero_copy, 0},
    {"init_chunks", 3, nif_init_chunks, kCpu},
    {"publish", 1, nif_publish, 0},
    {"allocate_step", 2, nif_allocate_step, kIo},
    {"read_buffer", 1, nif_read_buffer, 0},
    {"read_into", 5, nif_read_into, kCpu},
    {"read_buffer_take", 1, nif_read_buffer_take, 0},
    {"seal", 1, nif_seal, kIo},  // waits for in-flight writes of this VM
    {"deallocate", 2, nif_deallocate, kIo},
    {"deallocate_plain", 2, nif_deallocate_plain, 0},
    // nif_zero_slices.cpp: a zeroing deallocation in slices
    {"deallocate_begin", 1, nif_deallocate_begin, 0},
    {"zero_step", 2, nif_zero_step, kCpu},
    {"deallocate_finish", 1, nif_deallocate_finish, kIo},
    {"await_seal_commit", 2, nif_await_seal_commit, kIo},
    {"last_access", 1, nif_last_access, 0},
    {"set_idle_timeout", 2, nif_set_idle_timeout, 0},
    {"mark_adopted", 1, nif_mark_adopted, 0},
    {"export_key", 1, nif_export_key, 0},
    {"release_holder", 3, nif_release_holder, 0},
    {"reap_holders", 1, nif_reap_holders, 0},
    {"reaped_holds", 0, nif_reaped_holds, 0},
    {"list_counts", 1, nif_list_counts, 0},
    {"monitor_owner", 2, nif_monitor_owner, 0},
    {"watch_os_process", 3, nif_watch_os_process, 0},
    {"cancel_watch", 1, nif_cancel_watch, 0},
    {"inspect_path", 1, nif_inspect_path, kIo},
    {"unlink_segment", 1, nif_unlink_segment, kIo},
    {"sweep_segment", 2, nif_sweep_segment, kIo},
    // nif_sweep_slices.cpp: an orphan's pages freed in slices
    {"sweep_segment_begin", 1, nif_sweep_segment_begin, kIo},
    {"release_pages_step", 1, nif_release_pages_step, kIo},
    {"reaper_stats", 0, nif_reaper_stats, 0},
    {"list_segments", 0, nif_list_segments, kIo},
    {"process_start_time", 1, nif_process_start_time, 0},
    {"process_alive", 2, nif_process_alive, 0},
    {"self_info", 0, nif_self_info, 0},
    {"read_small_files", 1, nif_read_small_files, kIo},
    // nif_health.cpp
    {"set_shm_dir", 1, nif_set_shm_dir, kIo},
    {"shm_dir", 0, nif_shm_dir, 0},
    {"fs_stat", 1, nif_fs_stat, kIo},
    // status board (nif_board.cpp)
    {"board_layout", 0, nif_board_layout, 0},
    {"board_init", 4, nif_board_init, kIo},
    {"board_open", 1, nif_board_open, 0},
    {"board_info", 1, nif_board_info, 0},
    {"board_join", 4, nif_board_join, 0},
    {"board_update", 2, nif_board_update, 0},
    {"board_leave", 1, nif_board_leave, 0},
    {"board_entries", 1, nif_board_entries, 0},
    {"board_entries_dirty", 1, nif_board_entries, kCpu},
    {"board_least_loaded", 2, nif_board_least_loaded, 0},
    {"board_least_loaded", 3, nif_board_least_loaded, 0},
    {"board_reclaim", 3, nif_board_reclaim, 0},
    {"board_watch_info", 2, nif_board_watch_info, 0},
    {"board_monotonic_ns", 0, nif_board_monotonic_ns, 0},
    // the message channel (nif_channel.cpp): every call is short except these three dirty
    // ones (mkdtemp + fallocate of the rings; copying a large message into a memfd;
    // sweeping the socket directories of dead owners)
    {"channel_layout", 0, nif_channel_layout, 0},
    {"channel_open", 1, nif_channel_open, kIo},
    {"channel_info", 1, nif_channel_info, 0},
    {"channel_select", 1, nif_channel_select, 0},
    {"channel_events", 1, nif_channel_events, 0},
    {"channel_send", 2, nif_channel_send, 0},
    {"channel_prepare_region", 1, nif_channel_prepare_region, kCpu},
    {"channel_send_region", 2, nif_channel_send_region, 0},
    {"channel_recv", 3, nif_channel_recv, 0},
    {"channel_pump", 3, nif_channel_pump, 0},
    {"channel_doorbell", 1, nif_channel_doorbell, 0},
    {"channel_doorbell_close", 1, nif_channel_doorbell_close, 0},
    {"channel_pump_bell", 5, nif_channel_pump_bell, 0},
    {"channel_guard", 1, nif_channel_guard, 0},
    {"channel_prepare_wait", 4, nif_channel_prepare_wait, 0},
    {"channel_flush", 1, nif_channel_flush, 0},
    {"channel_close", 1, nif_channel_close, 0},
    {"channel_monitor", 2, nif_channel_monitor, 0},
    {"channel_stats", 1, nif_channel_stats, 0},
    {"channel_sweep_dirs", 0, nif_channel_sweep_dirs, kIo},
    {"ring_probe_new", 3, nif_ring_probe_new, 0},
    {"ring_probe_write", 3, nif_ring_probe_write, 0},
    {"ring_probe_read", 1, nif_ring_probe_read, 0},
    {"ring_probe_flush", 1, nif_ring_probe_flush, 0},
    {"ring_probe_indices", 1, nif_ring_probe_indices, 0},
    // the warm pool and huge pages (nif_pool.cpp); configure/drain may free many objects
    {"pool_configure", 1, nif_pool_configure, kIo},
    {"pool_drain", 0, nif_pool_drain, kIo},
    {"pool_stats", 0, nif_pool_stats, 0},
    {"huge_page_info", 0, nif_huge_page_info, kIo},
    {"pooled_object", 1, nif_pooled_object, kIo},
    // quota charges (nif_quota.cpp): atomic additions, never dirty
    {"quota_owner_new", 0, nif_quota_owner_new, 0},
    {"quota_reserve", 5, nif_quota_reserve, 0},
    {"quota_release", 1, nif_quota_release, 0},
    {"quota_resize", 2, nif_quota_resize, 0},
    {"quota_host", 3, nif_quota_host, 0},
    {"quota_attach", 2, nif_quota_attach, 0},
    {"quota_held", 1, nif_quota_held, 0},
    {"quota_totals", 0, nif_quota_totals, 0},
    {"quota_owned", 1, nif_quota_owned, 0},
    {"keep_name", 2, nif_keep_name, 0},
    {"names_dropped", 0, nif_names_dropped, 0},
};

// load and upgrade do the same: resource types are opened with CREATE | TAKEOVER, so a
// reloaded library takes over the types (and every live resource) of the old one.
int init(ErlNifEnv* env) {
  init_atoms(env);
  if (!open_resource_types(env)) return 1;
  if (!open_board_resource_types(env)) return 3;
  if (!open_channel_resource_types(env) || !open_ring_probe_type(env)) return 3;
  if (!open_read_buffer_type(env)) return 3;
  if (!open_unlinked_type(env)) return 3;
  if (!init_self_identity()) return 2;
  (void)start_reaper();  // without it, large regions are destroyed in place
  // SIGBUS of a POSIX segment truncated by a peer becomes a :truncated error.
  if (!platform::install_fault_guard()) return 3;
  return 0;
}

// priv_data holds the quota counters, handed from a library to its upgrade (live charges
// of the old one count in them).
int load(ErlNifEnv* env, void** priv_data, ERL_NIF_TERM) {
  *priv_data = open_quota(env, nullptr);
  if (*priv_data == nullptr) return 4;
  return init(env);
}

int upgrade(ErlNifEnv* env, void** priv_data, void** old_priv_data, ERL_NIF_TERM) {
  *priv_data = open_quota(env, *old_priv_data);
  if (*priv_data == nullptr) return 4;
  return init(env);
}

void unload(ErlNifEnv*, void*) {
  stop_reaper();
  runtime_index::stop_writer();  // its thread runs this library's code
}

}  // namespace
}  // namespace spshm::nif

extern "C" {
ERL_NIF_INIT(Elixir.Snakepit.SharedMemory.Native, spshm::nif::nif_funcs, spshm::nif::load, nullptr,
             spshm::nif::upgrade, spshm::nif::unload)
}
