// Error names and the errno -> Errc mapping, with a hint that says what to do.
#include "error.hpp"

#include <cerrno>
#include <cstring>

namespace spshm {

const char* errc_name(Errc code) noexcept {
  switch (code) {
    case Errc::invalid_argument:
      return "invalid_argument";
    case Errc::not_found:
      return "not_found";
    case Errc::already_exists:
      return "already_exists";
    case Errc::permission_denied:
      return "permission_denied";
    case Errc::no_space:
      return "no_space";
    case Errc::too_large:
      return "too_large";
    case Errc::corrupt:
      return "corrupt";
    case Errc::unsupported_version:
      return "unsupported_version";
    case Errc::not_ours:
      return "not_ours";
    case Errc::sealed:
      return "sealed";
    case Errc::busy:
      return "busy";
    case Errc::expired:
      return "expired";
    case Errc::deallocated:
      return "deallocated";
    case Errc::closed:
      return "closed";
    case Errc::out_of_bounds:
      return "out_of_bounds";
    case Errc::tampered:
      return "tampered";
    case Errc::holder_table_full:
      return "holder_table_full";
    case Errc::mlock_failed:
      return "mlock_failed";
    case Errc::unsupported:
      return "unsupported";
    case Errc::io_error:
      return "io_error";
    case Errc::truncated:
      return "truncated";
  }
  return "io_error";
}

namespace {

struct Mapped {
  Errc code;
  const char* hint;  // what the caller can do about it ("" if nothing useful)
};

Mapped map_errno(int err) noexcept {
  switch (err) {
    case ENOENT:
      return {Errc::not_found, "it does not exist (deallocated, or never created)"};
    case EEXIST:
      return {Errc::already_exists, "an object with that name already exists"};
    case EACCES:
    case EPERM:
      return {Errc::permission_denied,
              "the OS refused access: check the owner and mode of the object, or whether it "
              "is sealed"};
    case ENOSPC:
      return {Errc::no_space,
              "not enough free space in the shared memory filesystem: free space in /dev/shm "
              "(df -h /dev/shm), "
              "enlarge it (mount -o remount,size=... /dev/shm; docker --shm-size), or use "
              "backend :memfd"};
    case ENOMEM:
      return {Errc::no_space,
              "out of memory (or out of mappings: vm.max_map_count): free memory or use "
              "smaller regions"};
    case EFBIG:
    case EOVERFLOW:
      return {Errc::too_large, "the size exceeds what this system supports"};
    case EINVAL:
      return {Errc::invalid_argument, "the OS rejected an argument"};
    case ENAMETOOLONG:
      return {Errc::invalid_argument, "the name is too long"};
    case ELOOP:
      return {Errc::not_ours, "it is a symbolic link, which is never followed"};
    case EMFILE:
    case ENFILE:
      return {Errc::io_error,
              "too many open files: raise the limit (ulimit -n, LimitNOFILE=) or free regions"};
    case ENOSYS:
    case EOPNOTSUPP:
      return {Errc::unsupported, "this kernel does not support it"};
    default:
      return {Errc::io_error, ""};
  }
}

}  // namespace

Error os_error(const std::string& what, int err) {
  Mapped m = map_errno(err);
  std::string message = what;
  message += ": ";
  message += std::strerror(err);
  if (*m.hint != '\0') {
    message += " (";
    message += m.hint;
    message += ")";
  }
  return Error{m.code, err, std::move(message)};
}

}  // namespace spshm
