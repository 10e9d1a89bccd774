// Typed errors of the core: every OS or validation failure becomes an Error with a
// code, the errno that caused it (0 if none) and a message that says what to do.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace spshm {

enum class Errc {
  invalid_argument,     ///< an argument is malformed or out of range
  not_found,            ///< no segment with that id, name or path exists
  already_exists,       ///< open mode :create and the named segment already exists
  permission_denied,    ///< the OS refused access (EACCES/EPERM)
  no_space,             ///< the shm filesystem or memory is full (ENOSPC/ENOMEM)
  too_large,            ///< the size overflows this platform's limits
  corrupt,              ///< the header failed a check (magic, sizes, CRC, reserved bytes)
  unsupported_version,  ///< the header was written by a newer format version
  not_ours,             ///< not a snakepit_shm segment (symlink, other uid, foreign file)
  sealed,               ///< a write was attempted on a sealed region
  busy,                 ///< sealing refused: another process holds the region writable
  expired,              ///< the region's idle timeout has passed
  deallocated,          ///< the region has been freed
  closed,               ///< the mapping was already unmapped
  out_of_bounds,        ///< offset/length fall outside the region
  tampered,             ///< authentication of encrypted data failed
  holder_table_full,    ///< all holder slots of the header are in use
  mlock_failed,         ///< mlock failed, usually RLIMIT_MEMLOCK is too low
  unsupported,          ///< not available on this platform or kernel
  io_error,             ///< any other OS failure
  truncated,            ///< a peer truncated a POSIX segment under our mapping (SIGBUS caught)
};

/// Stable lower_snake_case name of an error code ("not_found"): the Elixir reason atom.
const char* errc_name(Errc code) noexcept;

struct Error {
  Errc code;
  int sys_errno = 0;
  std::string message;
};

/// Builds an Error from errno: maps ENOENT, EEXIST, EACCES, EPERM, ENOSPC, ENOMEM,
/// EFBIG, EINVAL, ENAMETOOLONG, ELOOP ... to a code and appends strerror to `what`.
Error os_error(const std::string& what, int err);

/// A minimal expected<T, Error>.
template <class T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Error error) : v_(std::move(error)) {}
  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }
  T& value() & { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  const T& value() const& { return std::get<0>(v_); }
  T* operator->() { return &std::get<0>(v_); }
  T& operator*() & { return std::get<0>(v_); }
  const Error& error() const& { return std::get<1>(v_); }
  Error&& error() && { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, Error> v_;
};

template <>
class Result<void> {
 public:
  Result() = default;
  Result(Error error) : err_(std::move(error)), ok_(false) {}
  bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  const Error& error() const& { return err_; }
  Error&& error() && { return std::move(err_); }

 private:
  Error err_{Errc::io_error, 0, {}};
  bool ok_ = true;
};

}  // namespace spshm
