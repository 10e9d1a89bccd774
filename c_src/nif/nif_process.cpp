// NIFs about processes: owner monitors, pidfd watches of OS processes, identities.
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "encode.hpp"
#include "nif_functions.hpp"
#include "platform.hpp"
#include "region.hpp"
#include "resources.hpp"
#include "terms.hpp"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434  // the same number on every Linux architecture
#endif

namespace spshm::nif {

namespace {

bool valid_os_pid(std::uint64_t os_pid) noexcept { return os_pid > 0 && os_pid <= INT32_MAX; }

ERL_NIF_TERM invalid_pid(ErlNifEnv* env, std::uint64_t os_pid) {
  return make_error(env, Errc::invalid_argument,
                    "os_pid " + std::to_string(os_pid) + " is not a valid process id");
}

// A pidfd for `os_pid`, or an Error. Linux >= 5.3.
Result<int> open_pidfd(std::uint32_t os_pid) {
  long fd = ::syscall(SYS_pidfd_open, static_cast<pid_t>(os_pid), 0u);
  if (fd >= 0) return static_cast<int>(fd);
  int err = errno;
  if (err == ENOSYS) {
    return Error{Errc::unsupported, err,
                 "pidfd_open is not available (Linux >= 5.3 needed): watch OS processes by "
                 "polling process_alive/2 instead"};
  }
  if (err == ESRCH) {
    return Error{Errc::not_found, err, "process " + std::to_string(os_pid) + " does not exist"};
  }
  return os_error("pidfd_open(" + std::to_string(os_pid) + ")", err);
}

}  // namespace

SPSHM_GUARDED_NIF(nif_monitor_owner)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* res;
  ErlNifPid pid;
  if (!get_region(env, argv[0], &res) || !enif_get_local_pid(env, argv[1], &pid)) {
    return enif_make_badarg(env);
  }
  int rc = enif_monitor_process(env, res, &pid, nullptr);
  if (rc > 0) {
    return make_error(env, Errc::not_found, "owner process is not alive");
  }
  if (rc < 0) {
    return make_error(env, Errc::unsupported, "the region resource type has no down callback");
  }
  return atoms.ok;
}

// The caller receives {:select, watch, ref, :ready_input} once the process exits. The
// start time is compared AFTER the pidfd is open: the pidfd pins that very process, so
// a pid reused by another process between the caller's check and now is detected.
SPSHM_GUARDED_NIF(nif_watch_os_process)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::uint64_t os_pid = 0, start_time = 0;
  if (!get_u64(env, argv[0], &os_pid) || !get_u64(env, argv[1], &start_time) ||
      !enif_is_ref(env, argv[2])) {
    return enif_make_badarg(env);
  }
  if (!valid_os_pid(os_pid)) return invalid_pid(env, os_pid);
  auto pid = static_cast<std::uint32_t>(os_pid);
  auto pidfd = open_pidfd(pid);
  if (!pidfd.ok()) return make_error(env, pidfd.error());

  void* mem = enif_alloc_resource(resource_types.watch, sizeof(WatchResource));
  if (mem == nullptr) {
    ::close(pidfd.value());
    return make_error(env, Errc::no_space, "out of memory for a watch resource");
  }
  auto* w = new (mem) WatchResource();
  w->fd.store(pidfd.value());  // from here on the destructor or stop callback closes it
  w->os_pid = pid;
  ERL_NIF_TERM term = enif_make_resource(env, w);
  enif_release_resource(w);

  // A pidfd is readable once its process has exited: a zombie (killed, not yet reaped)
  // still has its /proc entry and start time, but it is gone for our purposes.
  struct pollfd pfd = {w->fd.load(), POLLIN, 0};
  bool exited = ::poll(&pfd, 1, 0) > 0;
  auto now = process_start_time(pid);
  if (exited || !now.ok() || now.value() != start_time) {
    return make_error(env, Errc::not_found,
                      "process " + std::to_string(pid) + " with start time " +
                          std::to_string(start_time) + " is gone (pid reused or exited)");
  }
  int rc = enif_select(env, static_cast<ErlNifEvent>(w->fd.load()), ERL_NIF_SELECT_READ, w, nullptr,
                       argv[2]);
  if (rc < 0) {
    return make_error(env, Errc::io_error,
                      "enif_select refused the pidfd (" + std::to_string(rc) +
                          "): the VM may have been started with a lower file limit");
  }
  w->selected.store(true);
  ErlNifPid self;
  if (enif_self(env, &self)) (void)enif_monitor_process(env, w, &self, nullptr);
  return make_ok(env, term);
}

SPSHM_GUARDED_NIF(nif_cancel_watch)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  WatchResource* w;
  if (!get_watch(env, argv[0], &w)) return enif_make_badarg(env);
  int fd = w->fd.load();
  if (fd >= 0 && w->selected.exchange(false)) {
    enif_select(env, static_cast<ErlNifEvent>(fd), ERL_NIF_SELECT_STOP, w, nullptr,
                atoms.undefined);
  }
  return atoms.ok;
}

SPSHM_GUARDED_NIF(nif_process_start_time)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::uint64_t os_pid = 0;
  if (!get_u64(env, argv[0], &os_pid)) return enif_make_badarg(env);
  if (!valid_os_pid(os_pid)) return invalid_pid(env, os_pid);
  auto start = process_start_time(static_cast<std::uint32_t>(os_pid));
  if (!start.ok()) return make_error(env, start.error());
  return make_ok(env, enif_make_uint64(env, start.value()));
}

SPSHM_GUARDED_NIF(nif_process_alive)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::uint64_t os_pid = 0, start_time = 0;
  if (!get_u64(env, argv[0], &os_pid) || !get_u64(env, argv[1], &start_time)) {
    return enif_make_badarg(env);
  }
  if (!valid_os_pid(os_pid)) return atoms.false_;
  return make_bool(process_alive(static_cast<std::uint32_t>(os_pid), start_time));
}

SPSHM_GUARDED_NIF(nif_self_info)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  return encode_self_info(env);
}

// Dirty (I/O bound): reads a few small files (the memory cgroup's limit and usage files,
// MemoryLimits) in one call, where File.read/1 makes three dirty calls per file through
// Erlang's file server. [binary | :error] in the order of the paths.
SPSHM_GUARDED_NIF(nif_read_small_files)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  constexpr unsigned kMaxFiles = 64;
  constexpr std::size_t kMaxBytes = 64 * 1024;
  unsigned length = 0;
  if (!enif_get_list_length(env, argv[0], &length) || length > kMaxFiles)
    return enif_make_badarg(env);
  std::vector<std::string> paths;
  ERL_NIF_TERM list = argv[0], head;
  while (enif_get_list_cell(env, list, &head, &list)) {
    ErlNifBinary path;
    if (!enif_inspect_binary(env, head, &path) || path.size == 0 || path.size > 4096 ||
        std::memchr(path.data, 0, path.size) != nullptr)
      return enif_make_badarg(env);
    paths.emplace_back(reinterpret_cast<const char*>(path.data), path.size);
  }
  std::vector<ERL_NIF_TERM> out;
  std::string text;
  for (const auto& path : paths)
    out.push_back(platform::read_small_file(path, text, kMaxBytes) ? make_binary(env, text)
                                                                   : atoms.error);
  return enif_make_list_from_array(env, out.data(), static_cast<unsigned>(out.size()));
}

}  // namespace spshm::nif
