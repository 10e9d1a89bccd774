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

#define SPSHM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

#if defined(__linux__)
bool link_is(const char* path, const char* expected, std::size_t expected_length) noexcept {
  char target[512];
  ssize_t n = ::readlink(path, target, sizeof target);
  return n >= 0 && static_cast<std::size_t>(n) == expected_length &&
         std::memcmp(target, expected, expected_length) == 0;
}
#endif

}  // namespace

static int open_checked(const char* path, const char* expected_link, int writable, int* fd_out,
                        uint64_t* size_out) noexcept;

#if defined(__linux__)
/// The shared lock of byte 0 of the data memfd (docs/FORMAT.md, "The data memfd"), held
/// for as long as this open or a mapping of it lives: the creator's warm pool never takes
/// back an object a worker still maps. Busy while the pool holds the object (the region
/// is gone): the caller's step-by-step path then says so.
static int lock_data(int fd) noexcept {
  struct flock lock {};
  lock.l_type = F_RDLCK;
  lock.l_whence = SEEK_SET;
  lock.l_start = 0;
  lock.l_len = 1;
  if (::fcntl(fd, F_OFD_SETLK, &lock) == 0) return SPSHM_OK;
  return (errno == EAGAIN || errno == EACCES) ? SPSHM_E_BUSY : SPSHM_E_IO_ERROR;
}
#endif

SPSHM_EXPORT int spshm_attach_memfd(const char* control_path, const char* control_link,
                                    const char* data_path, const char* data_link, int data_writable,
                                    void* header_out, int* control_fd, uint64_t* control_size,
                                    int* data_fd, uint64_t* data_size, char* err, size_t errlen) {
#if defined(__linux__)
  if (header_out == nullptr || control_fd == nullptr || data_fd == nullptr ||
      control_size == nullptr || data_size == nullptr)
    return SPSHM_E_INVALID_ARGUMENT;
  int code = open_checked(control_path, control_link, 1, control_fd, control_size);
  if (code != SPSHM_OK) return code;
  // The shared liveness lock first: from here on no sweeper removes the region.
  if ((code = spshm_liveness_lock(*control_fd, err, errlen)) == SPSHM_OK &&
      (code = open_checked(data_path, data_link, data_writable, data_fd, data_size)) == SPSHM_OK &&
      (code = lock_data(*data_fd)) == SPSHM_OK) {
    // A private copy of the header, validated with the core's checks (the caller gets
    // the copy: the shared header could change after the check).
    ssize_t n = *control_size < 4096 ? -1 : ::pread(*control_fd, header_out, 4096, 0);
    if (n == 4096 &&
        (code = spshm_validate_header(header_out, *data_size, err, errlen)) == SPSHM_OK)
      return SPSHM_OK;
    if (n != 4096) code = SPSHM_E_CORRUPT;
    ::close(*data_fd);
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

static int open_checked(const char* path, const char* expected_link, int writable, int* fd_out,
                        uint64_t* size_out) noexcept {
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
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid() ||
      !link_is(self, expected_link, expected_length)) {
    ::close(fd);
    return SPSHM_E_NOT_OURS;
  }
  *fd_out = fd;
  *size_out = static_cast<uint64_t>(st.st_size);
  return SPSHM_OK;
#else
  (void)path, (void)expected_link, (void)writable, (void)fd_out, (void)size_out;
  return SPSHM_E_UNSUPPORTED;
#endif
}
