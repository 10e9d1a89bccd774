// macOS part of the OS layer: what differs from Linux. Named regions are POSIX shm
// objects handled by platform_posix.cpp (shared with Linux); this file answers the rest.
//
// NOT COMPILED OR RUN HERE: no macOS toolchain is reachable from the build machines of
// this project. It is written against the documented Darwin APIs and kept small; see
// docs/ARCHITECTURE.md ("Platforms") for what was verified where.
//
// macOS facts this relies on: shm_open names are at most 31 bytes with the '/'
// (PSHMNAMLEN), which kMaxSegmentNameLength (30) respects; a shm object can be sized by
// ftruncate only once, and the core sizes it exactly once; shm objects have no path and
// cannot be enumerated; there is no memfd.
#include <sys/sysctl.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "platform.hpp"

namespace spshm::platform {

// ---- named objects ----

std::string named_path(const std::string&) { return {}; }  // shm objects have no path

std::string named_dir() { return {}; }

Result<void> set_named_dir(const std::string&) {
  return Error{Errc::unsupported, 0,
               "macOS POSIX shared memory objects are not files: shm_path cannot move them"};
}

std::vector<std::string> list_named() {
  // macOS offers no way to enumerate POSIX shm objects (no /dev/shm, no API): regions of
  // dead processes are found through the manager's registry, not by listing.
  return {};
}

// ---- anonymous objects: no memfd on macOS ----

Result<Handle> create_anonymous(const std::string&, std::uint64_t) {
  return Error{Errc::unsupported, 0,
               "macOS has no memfd (anonymous sealable memory): use backend :posix"};
}

Result<Handle> create_anonymous_unallocated(const std::string& name, std::uint64_t size) {
  return create_anonymous(name, size);
}

std::string handle_path(const Handle&) { return {}; }
std::string anonymous_name(const Handle&) { return {}; }
bool is_process_fd_link(const std::string&) noexcept { return false; }

Result<void> seal_object(const Handle& data_object, BackendKind backend) {
  if (backend != BackendKind::posix)
    return Error{Errc::unsupported, 0, "only backend :posix regions exist on macOS"};
  // No file seals on macOS: as for named regions on Linux, later opens get read-only
  // access; mappings made writable before keep working.
  return set_mode(data_object, 0400, "the sealed segment");
}

// No memfd, no file seals: nothing is kernel-sealed on macOS (read/3 always copies).
Result<void> downgrade_view(const Handle&, Mapping&, std::uint64_t) {
  return Error{Errc::unsupported, 0, "macOS has no kernel write seal"};
}
Result<void> upgrade_view(const Handle&, Mapping&, std::uint64_t) { return {}; }
Result<void> seal_writes(const Handle&) {
  return Error{Errc::unsupported, 0, "macOS has no kernel write seal"};
}
bool writes_sealed(const Handle&) noexcept { return false; }
bool any_write_seal(const Handle&) noexcept { return false; }
bool is_hugetlb(const Handle&) noexcept { return false; }
bool exclusively_locked(const Handle&, std::uint64_t) noexcept { return false; }
HugePageInfo huge_page_info() noexcept { return {}; }
Result<Handle> create_anonymous_huge(const std::string&, std::uint64_t) {
  return Error{Errc::unsupported, 0, "macOS has no huge-page memfds"};
}

// No open file description locks here: encrypted regions are not protected against
// concurrent writers of different processes on this OS (documented in SECURITY.md).
Result<void> try_lock_byte(const Handle&, std::uint64_t, bool) { return {}; }
void unlock_byte(const Handle&, std::uint64_t) noexcept {}

// ---- processes, time, randomness ----

Result<ProcessStat> process_stat(std::uint32_t pid) {
  if (pid == 0) return Error{Errc::not_found, ESRCH, "no process with pid 0"};
  int mib[4] = {CTL_KERN, KERN_PROC, KERN_PROC_PID, static_cast<int>(pid)};
  struct kinfo_proc info {};
  size_t length = sizeof info;
  if (::sysctl(mib, 4, &info, &length, nullptr, 0) != 0)
    return os_error("cannot query process " + std::to_string(pid) + " (sysctl KERN_PROC)", errno);
  if (length == 0)
    return Error{Errc::not_found, ESRCH, "no process with pid " + std::to_string(pid)};
  ProcessStat st;
  // Start time in microseconds since the epoch: with the pid it names one process even
  // after the pid is reused (Linux uses clock ticks since boot for the same purpose).
  const struct timeval& started = info.kp_proc.p_starttime;
  st.start_time = static_cast<std::uint64_t>(started.tv_sec) * 1000000u +
                  static_cast<std::uint64_t>(started.tv_usec);
  st.running = info.kp_proc.p_stat != SZOMB;
  return st;
}

std::array<std::uint8_t, 16> boot_id() {
  // kern.bootsessionuuid: a UUID string chosen at every boot. Zeros if unavailable.
  static std::once_flag once;
  static std::array<std::uint8_t, 16> id{};
  std::call_once(once, [] {
    char text[64] = {};
    size_t length = sizeof text - 1;
    if (::sysctlbyname("kern.bootsessionuuid", text, &length, nullptr, 0) != 0) return;
    (void)parse_uuid(std::string(text, strnlen(text, length)), id);
  });
  return id;
}

Result<void> random_bytes(void* buffer, std::size_t length) {
  // arc4random_buf draws from the kernel CSPRNG and cannot fail.
  ::arc4random_buf(buffer, length);
  return {};
}

}  // namespace spshm::platform
