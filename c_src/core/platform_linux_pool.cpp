// Linux side of the warm pool and of huge-page memfds (platform.hpp, pool.hpp).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "platform.hpp"

#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

namespace spshm::platform {

namespace {

int fd_of(const Handle& h) noexcept { return static_cast<int>(h.native()); }

/// values[i] = the number after "keys[i]:" in /proc/meminfo (0 when absent).
void meminfo_values(const char* const* keys, std::uint64_t* values, std::size_t count) noexcept {
  std::FILE* f = std::fopen("/proc/meminfo", "re");
  if (f == nullptr) return;
  char line[256];
  std::size_t found = 0;
  while (found < count && std::fgets(line, sizeof line, f) != nullptr) {
    for (std::size_t i = 0; i < count; ++i) {
      std::size_t key_length = std::strlen(keys[i]);
      if (std::strncmp(line, keys[i], key_length) == 0 && line[key_length] == ':') {
        values[i] = std::strtoull(line + key_length + 1, nullptr, 10);
        ++found;
        break;
      }
    }
  }
  std::fclose(f);
}

}  // namespace

bool any_write_seal(const Handle& object) noexcept {
  int seals = ::fcntl(fd_of(object), F_GET_SEALS);
  return seals >= 0 && (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) != 0;
}

bool exclusively_locked(const Handle& object, std::uint64_t offset) noexcept {
  struct flock fl {};
  fl.l_type = F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(offset);
  fl.l_len = 1;
  return ::fcntl(fd_of(object), F_OFD_GETLK, &fl) == 0 && fl.l_type == F_WRLCK;
}

bool is_hugetlb(const Handle& object) noexcept {
  struct statfs fs {};
  return ::fstatfs(fd_of(object), &fs) == 0 &&
         static_cast<unsigned long>(fs.f_type) == static_cast<unsigned long>(HUGETLBFS_MAGIC);
}

HugePageInfo huge_page_info() noexcept {
  // One pass of /proc/meminfo for the three values (the kernel formats the whole file
  // on every read: ~20 us).
  const char* keys[] = {"Hugepagesize", "HugePages_Total", "HugePages_Free"};
  std::uint64_t values[3] = {0, 0, 0};
  meminfo_values(keys, values, 3);
  HugePageInfo info;
  info.page_size = values[0] * 1024;
  info.total = values[1];
  info.free = values[2];
  return info;
}

Result<Handle> create_anonymous_huge(const std::string& debug_name, std::uint64_t size) {
  HugePageInfo info = huge_page_info();
  if (info.page_size == 0 || size % info.page_size != 0)
    return Error{Errc::invalid_argument, 0,
                 "a huge-page memfd must be a multiple of the huge page size (" +
                     std::to_string(info.page_size) + " bytes)"};
  int fd = ::memfd_create(debug_name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB);
  if (fd < 0) {
    int err = errno;
    if (err == EINVAL || err == ENOSYS || err == ENOENT)
      return Error{Errc::unsupported, err,
                   "this kernel cannot make huge-page memfds (MFD_HUGETLB): use huge_pages: "
                   ":auto or false"};
    return os_error("cannot create huge-page memfd " + debug_name, err);
  }
  Handle handle(fd);
  std::string what = "huge-page memfd " + debug_name;
  std::uint64_t pages = size / info.page_size;
  if (pages > info.free)
    return Error{Errc::no_space, ENOMEM,
                 "cannot allocate " + std::to_string(size) + " bytes of huge pages for " + what +
                     ": the hugetlb pool has " + std::to_string(info.free) + " free pages of " +
                     std::to_string(info.page_size) +
                     " bytes (vm.nr_hugepages; `mix snakepit.shm.doctor` shows it)"};
  if (auto limit = check_file_size_limit(what, size); !limit.ok()) return limit.error();
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0)
    return os_error("cannot size " + what + " to " + std::to_string(size) + " bytes", errno);
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0)
    return os_error("cannot seal the size of " + what, errno);
  if (::fchmod(fd, 0600) != 0) return os_error("cannot set the permissions of " + what, errno);
  // Reserve every huge page now: a pool emptied by someone else meanwhile fails here
  // (ENOSPC), not with SIGBUS on first touch.
  if (::fallocate(fd, 0, 0, static_cast<off_t>(size)) != 0) {
    int err = errno;
    if (err == ENOSPC || err == ENOMEM)
      return Error{Errc::no_space, err,
                   "the hugetlb pool has too few free pages for " + std::to_string(size) +
                       " bytes (" + what +
                       "): reserve more (vm.nr_hugepages) or use "
                       "huge_pages: :auto"};
    return os_error("cannot allocate " + std::to_string(size) + " bytes for " + what, err);
  }
  return handle;
}

}  // namespace spshm::platform
