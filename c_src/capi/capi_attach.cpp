// The worker's fast attach of a memfd region (snakepit_shm.h, spshm_attach_memfd): what
// the Python client's _locate.open_object and attach() do for /proc/<pid>/fd/<n> paths,
// in one call instead of a dozen system calls each wrapped in Python. Same checks, same
// order: the link names the expected memfd before anything is opened (so a reused
// descriptor number that now leads to a device or a FIFO is never opened), the opened
// object is a regular file of our uid, and the link of the opened descriptor still
// names that memfd (the number may have been reused between the two). Any refusal is
// reported by code only: the Python client then redoes the open its own way for the
// message.
#include "snakepit_shm.h"

#if defined(__linux__)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#endif

#include <cerrno>
#include <cstddef>

#include "format.hpp"

#define SPSHM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

#if defined(__linux__)
bool link_is(const char* path, const char* expected, std::size_t expected_length) noexcept {
  char target[512];
  ssize_t n = ::readlink(path, target, sizeof target);
  return n >= 0 && static_cast<std::size_t>(n) == expected_length &&
         std::memcmp(target, expected, expected_length) == 0;
}

/// The link of a data memfd named by the header's data_name ("/memfd:<name> (deleted)"):
/// 1 and the link in `out` when data_name is set and well formed ("spshm_" + 20 of
/// [a-z2-7] + ".data"), 0 when it is empty, SPSHM_E_CORRUPT when it is malformed.
int pooled_data_link(const void* header, char* out, std::size_t capacity) noexcept {
  const char* name = static_cast<const char*>(header) + offsetof(spshm::RegionHeader, data_name);
  std::size_t length = strnlen(name, spshm::kDataNameCapacity);
  if (length == 0) return 0;
  constexpr std::size_t kIdLength = 26;  // "spshm_" + 20
  if (length != kIdLength + 5 || std::memcmp(name, "spshm_", 6) != 0 ||
      std::memcmp(name + kIdLength, ".data", 5) != 0)
    return SPSHM_E_CORRUPT;
  for (std::size_t i = 6; i < kIdLength; ++i)
    if (!((name[i] >= 'a' && name[i] <= 'z') || (name[i] >= '2' && name[i] <= '7')))
      return SPSHM_E_CORRUPT;
  int written =
      std::snprintf(out, capacity, "/memfd:%.*s (deleted)", static_cast<int>(length), name);
  return written > 0 && static_cast<std::size_t>(written) < capacity ? 1 : SPSHM_E_CORRUPT;
}
#endif

}  // namespace

static int open_checked(const char* path, const char* expected_link, int writable, uid_t euid,
                        int* fd_out, uint64_t* size_out) noexcept;

SPSHM_EXPORT int spshm_attach_memfd(const char* control_path, const char* control_link,
                                    const char* data_path, const char* data_link, int data_writable,
                                    void* header_out, int* control_fd, uint64_t* control_size,
                                    int* data_fd, uint64_t* data_size, char* err, size_t errlen) {
#if defined(__linux__)
  if (header_out == nullptr || control_fd == nullptr || data_fd == nullptr ||
      control_size == nullptr || data_size == nullptr)
    return SPSHM_E_INVALID_ARGUMENT;
  const uid_t euid = ::geteuid();  // once for both objects (a system call each time)
  int code = open_checked(control_path, control_link, 1, euid, control_fd, control_size);
  if (code != SPSHM_OK) return code;
  *data_fd = -1;
  // The shared liveness lock first: from here on no sweeper removes the region. Then a
  // private copy of the header (the caller gets the copy: the shared header could change
  // after the check), read once: it also names the data memfd.
  ssize_t n = -1;
  if ((code = spshm_liveness_lock(*control_fd, err, errlen)) == SPSHM_OK) {
    n = *control_size < 4096 ? -1 : ::pread(*control_fd, header_out, 4096, 0);
    if (n != 4096) code = SPSHM_E_CORRUPT;
  }
  if (code == SPSHM_OK) {
    // A data memfd reused from its creator's warm pool keeps its first name, which the
    // header's data_name gives (docs/FORMAT.md); otherwise it is the caller's data_link.
    char pooled[64];
    const char* expected = data_link;
    if ((code = pooled_data_link(header_out, pooled, sizeof pooled)) == 1) expected = pooled;
    if (code >= 0 &&
        (code = open_checked(data_path, expected, data_writable, euid, data_fd, data_size)) ==
            SPSHM_OK &&
        (code = spshm_lock_data(*data_fd, err, errlen)) == SPSHM_OK &&
        (code = spshm_validate_header(header_out, *data_size, err, errlen)) == SPSHM_OK)
      return SPSHM_OK;
    if (*data_fd >= 0) ::close(*data_fd);
  }
  ::close(*control_fd);
  *control_fd = *data_fd = -1;
  return code;
#else
  (void)control_path, (void)control_link, (void)data_path, (void)data_link, (void)data_writable,
      (void)header_out, (void)control_fd, (void)control_size, (void)data_fd, (void)data_size,
      (void)err, (void)errlen;
  return SPSHM_E_UNSUPPORTED;
#endif
}

static int open_checked(const char* path, const char* expected_link, int writable, uid_t euid,
                        int* fd_out, uint64_t* size_out) noexcept {
#if defined(__linux__)
  if (path == nullptr || expected_link == nullptr || fd_out == nullptr || size_out == nullptr)
    return SPSHM_E_INVALID_ARGUMENT;
  std::size_t expected_length = std::strlen(expected_link);
  if (!link_is(path, expected_link, expected_length)) return SPSHM_E_NOT_FOUND;
  int fd = ::open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0)
    return errno == EACCES || errno == EPERM ? SPSHM_E_PERMISSION_DENIED : SPSHM_E_IO_ERROR;
  struct stat st;
  char self[64];
  std::snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != euid ||
      !link_is(self, expected_link, expected_length)) {
    ::close(fd);
    return SPSHM_E_NOT_OURS;
  }
  *fd_out = fd;
  *size_out = static_cast<uint64_t>(st.st_size);
  return SPSHM_OK;
#else
  (void)path, (void)expected_link, (void)writable, (void)euid, (void)fd_out, (void)size_out;
  return SPSHM_E_UNSUPPORTED;
#endif
}

#if defined(__linux__)
namespace {

/// "/memfd:spshm_arena_<20 of [a-z2-7]> (deleted)": the link of one of our arenas.
bool arena_link(const char* path, char* target, std::size_t capacity, std::size_t* length) {
  ssize_t n = ::readlink(path, target, capacity);
  static constexpr char kPrefix[] = "/memfd:spshm_arena_";
  static constexpr char kSuffix[] = " (deleted)";
  constexpr std::size_t prefix = sizeof kPrefix - 1, suffix = sizeof kSuffix - 1;
  if (n != static_cast<ssize_t>(prefix + 20 + suffix)) return false;
  if (std::memcmp(target, kPrefix, prefix) != 0 ||
      std::memcmp(target + prefix + 20, kSuffix, suffix) != 0)
    return false;
  for (std::size_t i = prefix; i < prefix + 20; ++i) {
    char c = target[i];
    if (!((c >= 'a' && c <= 'z') || (c >= '2' && c <= '7'))) return false;
  }
  *length = static_cast<std::size_t>(n);
  return true;
}

}  // namespace
#endif

SPSHM_EXPORT int spshm_attach_arena(const char* path, uint64_t base, const char* region_id,
                                    void* header_out, int* fd_out, uint64_t* size_out, char* err,
                                    size_t errlen) {
#if defined(__linux__)
  if (path == nullptr || region_id == nullptr || header_out == nullptr || fd_out == nullptr ||
      size_out == nullptr || base % 4096 != 0)
    return SPSHM_E_INVALID_ARGUMENT;
  std::size_t id_length = std::strlen(region_id);
  if (id_length == 0 || id_length >= 32) return SPSHM_E_INVALID_ARGUMENT;
  *fd_out = -1;
  char before[128], after[128];
  std::size_t before_length = 0, after_length = 0;
  if (!arena_link(path, before, sizeof before, &before_length)) return SPSHM_E_NOT_FOUND;
  int fd = ::open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0)
    return errno == EACCES || errno == EPERM ? SPSHM_E_PERMISSION_DENIED : SPSHM_E_IO_ERROR;
  int code = SPSHM_E_NOT_OURS;
  struct stat st;
  char self[64];
  std::snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == ::geteuid() &&
      arena_link(self, after, sizeof after, &after_length) && after_length == before_length &&
      std::memcmp(before, after, before_length) == 0) {
    code = SPSHM_E_NOT_FOUND;
    const auto size = static_cast<uint64_t>(st.st_size);
    // The shared liveness lock of the chunk first: from here on its region stays.
    if (size >= 4096 && base <= size - 4096 &&
        (code = spshm_liveness_lock_at(fd, base, err, errlen)) == SPSHM_OK) {
      auto* header = static_cast<char*>(header_out);
      ssize_t n = ::pread(fd, header, 4096, static_cast<off_t>(base));
      // The chunk must hold the region asked for (a stale or forged offset: not found).
      if (n != 4096 || std::memcmp(header + 96, region_id, id_length) != 0 ||
          header[96 + id_length] != '\0') {
        code = SPSHM_E_NOT_FOUND;
      } else if ((code = spshm_validate_header(header, size - base, err, errlen)) == SPSHM_OK) {
        *fd_out = fd;
        *size_out = size;
        return SPSHM_OK;
      }
    }
  }
  ::close(fd);
  return code;
#else
  (void)path, (void)base, (void)region_id, (void)header_out, (void)fd_out, (void)size_out,
      (void)err, (void)errlen;
  return SPSHM_E_UNSUPPORTED;
#endif
}
