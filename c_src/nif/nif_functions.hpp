// Every NIF of Snakepit.SharedMemory.Native, one C++ function each. The table with the
// dirty-scheduler flag of each lives in nif.cpp.
#pragma once

#include <erl_nif.h>

namespace spshm::nif {

/// {:error, {reason, message, errno}} built without any C++ allocation (for the catch
/// blocks of guard_nif: after std::bad_alloc nothing may allocate from the C++ heap).
ERL_NIF_TERM static_error(ErlNifEnv* env, const char* reason, const char* message,
                          int sys_errno) noexcept;

/// Runs a NIF body so that no C++ exception ever crosses into the VM (it would abort
/// the whole VM): std::bad_alloc becomes {:error, {:no_space, "out of memory ...", ENOMEM}},
/// anything else {:error, {:io_error, "internal error ...", 0}}.
ERL_NIF_TERM guard_nif(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[],
                       ERL_NIF_TERM (*body)(ErlNifEnv*, int, const ERL_NIF_TERM[])) noexcept;

/// Defines NIF `name` as guard_nif over the body that follows the macro:
///   SPSHM_GUARDED_NIF(nif_x)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) { ... }
/// Every NIF is defined this way (new NIFs too).
#define SPSHM_GUARDED_NIF(name)                                            \
  static ERL_NIF_TERM name##_body(ErlNifEnv*, int, const ERL_NIF_TERM[]);  \
  ERL_NIF_TERM name(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]) { \
    return guard_nif(env, argc, argv, name##_body);                        \
  }                                                                        \
  static ERL_NIF_TERM name##_body

#define SPSHM_NIF(name) ERL_NIF_TERM name(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[])

// nif_region.cpp: regions as a whole
SPSHM_NIF(nif_header_layout);
SPSHM_NIF(nif_arena_configure);
SPSHM_NIF(nif_arena_maintain);
SPSHM_NIF(nif_arena_stats);
SPSHM_NIF(nif_inspect_arena);
SPSHM_NIF(nif_create);
SPSHM_NIF(nif_create_plain);
SPSHM_NIF(nif_open);
SPSHM_NIF(nif_info);
SPSHM_NIF(nif_header);
SPSHM_NIF(nif_hold_counts);
SPSHM_NIF(nif_seal);
SPSHM_NIF(nif_deallocate);
SPSHM_NIF(nif_deallocate_plain);
SPSHM_NIF(nif_last_access);
SPSHM_NIF(nif_set_idle_timeout);
SPSHM_NIF(nif_mark_adopted);
SPSHM_NIF(nif_export_key);
SPSHM_NIF(nif_release_holder);
SPSHM_NIF(nif_inspect_path);
SPSHM_NIF(nif_unlink_segment);
SPSHM_NIF(nif_sweep_segment);
SPSHM_NIF(nif_reap_holders);
SPSHM_NIF(nif_reaped_holds);
SPSHM_NIF(nif_list_counts);
SPSHM_NIF(nif_list_segments);

// nif_quota.cpp: quota charges and owner counters (core/quota.hpp), keep_name/2
/// Opens the quota resource types; returns the counters (kept across an upgrade through
/// priv_data: `old_state` is the previous library's), nullptr on failure.
void* open_quota(ErlNifEnv* env, void* old_state);
SPSHM_NIF(nif_quota_owner_new);
SPSHM_NIF(nif_quota_reserve);
SPSHM_NIF(nif_quota_release);
SPSHM_NIF(nif_quota_resize);
SPSHM_NIF(nif_quota_host);
SPSHM_NIF(nif_quota_attach);
SPSHM_NIF(nif_quota_held);
SPSHM_NIF(nif_quota_totals);
SPSHM_NIF(nif_quota_owned);
SPSHM_NIF(nif_keep_name);
SPSHM_NIF(nif_names_dropped);

// nif_mapping.cpp: mappings and data access
SPSHM_NIF(nif_map);
SPSHM_NIF(nif_unmap);
SPSHM_NIF(nif_write);
SPSHM_NIF(nif_write_dirty);
SPSHM_NIF(nif_read);
SPSHM_NIF(nif_read_dirty);
SPSHM_NIF(nif_read_zero_copy);
// encrypted regions created in slices (issue 12), nif_create_slices.cpp
SPSHM_NIF(nif_init_chunks);
SPSHM_NIF(nif_publish);
// large reads in slices (issue 12)
// nif_zero_slices.cpp: zeroing at deallocation in slices
SPSHM_NIF(nif_allocate_step);  // nif_create_slices.cpp
SPSHM_NIF(nif_deallocate_begin);
SPSHM_NIF(nif_zero_step);
SPSHM_NIF(nif_deallocate_finish);
SPSHM_NIF(nif_await_seal_commit);

// nif_sweep_slices.cpp: large orphans freed in slices, the reaper's counts
bool open_unlinked_type(ErlNifEnv* env);
SPSHM_NIF(nif_sweep_segment_begin);
SPSHM_NIF(nif_release_pages_step);
SPSHM_NIF(nif_reaper_stats);

bool open_read_buffer_type(ErlNifEnv* env);
SPSHM_NIF(nif_read_buffer);
SPSHM_NIF(nif_read_into);
SPSHM_NIF(nif_read_buffer_take);

// nif_process.cpp: processes, owners and OS-process watches
SPSHM_NIF(nif_monitor_owner);
SPSHM_NIF(nif_watch_os_process);
SPSHM_NIF(nif_cancel_watch);
SPSHM_NIF(nif_process_start_time);
SPSHM_NIF(nif_process_alive);
SPSHM_NIF(nif_self_info);
SPSHM_NIF(nif_read_small_files);

// nif_health.cpp: shm_path and filesystem space (health checks)
SPSHM_NIF(nif_set_shm_dir);
SPSHM_NIF(nif_shm_dir);
SPSHM_NIF(nif_fs_stat);

// nif_runtime_index.cpp: the bare-id index of memfd regions
SPSHM_NIF(nif_runtime_index_sweep);
SPSHM_NIF(nif_runtime_index_flush);

// nif_pool.cpp: the warm pool and huge pages
SPSHM_NIF(nif_pool_configure);
SPSHM_NIF(nif_pool_drain);
SPSHM_NIF(nif_pool_stats);
SPSHM_NIF(nif_huge_page_info);
SPSHM_NIF(nif_pooled_object);

#undef SPSHM_NIF

}  // namespace spshm::nif
