// Internal to the Windows OS layer (platform_windows*.cpp): the only header of the core
// that includes <windows.h>. Built with mingw-w64 (cmake/mingw-w64.cmake).
#pragma once

#ifndef _WIN32_WINNT
#define _WIN32_WINNT 0x0602  // Windows 8: GetSystemTimePreciseAsFileTime
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>

// These need <windows.h> first.
#include <aclapi.h>
#include <bcrypt.h>
#include <winternl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "platform.hpp"

namespace spshm::platform::win {

/// The HANDLE inside a platform::Handle.
inline HANDLE handle_of(const Handle& h) noexcept { return reinterpret_cast<HANDLE>(h.native()); }

/// "Local\<region_id>" as UTF-16: the per-session namespace of named kernel objects.
std::wstring object_name(const std::string& region_id);

/// Text of a Win32 error code (FormatMessageW, as UTF-8, without the trailing newline).
std::string error_text(DWORD code);
/// Builds an Error from a Win32 error code: ERROR_ALREADY_EXISTS -> already_exists,
/// ERROR_FILE_NOT_FOUND -> not_found, ERROR_ACCESS_DENIED -> permission_denied,
/// ERROR_NOT_ENOUGH_MEMORY / ERROR_COMMITMENT_LIMIT -> no_space, else io_error. The
/// message is `what`, the system's text and the code; sys_errno holds the Win32 code.
Error win_error(const std::string& what, DWORD code);

/// The SID of the user running this process (from the process token), as bytes.
Result<std::vector<std::uint8_t>> current_user_sid();

/// A security descriptor granting the current user only (never a NULL DACL): map
/// read+write (mode has 0200) or map read (0400), plus query and READ_CONTROL/WRITE_DAC.
/// Owner: the current user (not the Administrators group an elevated token would set).
class OwnerOnlySecurity {
 public:
  /// invalid_argument if `mode` grants group or other access: Windows regions are
  /// owner-only.
  static Result<OwnerOnlySecurity> for_mode(std::uint32_t mode);

  OwnerOnlySecurity(OwnerOnlySecurity&&) noexcept = default;
  OwnerOnlySecurity& operator=(OwnerOnlySecurity&&) noexcept = default;

  SECURITY_ATTRIBUTES* attributes() noexcept {
    attributes_.nLength = sizeof attributes_;
    attributes_.lpSecurityDescriptor = &descriptor_;  // re-pointed: this object may have moved
    attributes_.bInheritHandle = FALSE;
    return &attributes_;
  }
  ACL* dacl() noexcept { return reinterpret_cast<ACL*>(acl_.data()); }

 private:
  OwnerOnlySecurity() = default;
  std::vector<std::uint8_t> sid_;
  std::vector<std::uint8_t> acl_;
  SECURITY_DESCRIPTOR descriptor_{};
  SECURITY_ATTRIBUTES attributes_{};
};

/// Owner and DACL of an object, summed up like POSIX stat: owner RID as `owner`,
/// owned_by_us, and mode bits (0600/0400 for the current user's ACE, 0066/0044 if any
/// other SID is allowed access, 0666 for a NULL DACL). Needs READ_CONTROL on `h`.
Result<void> describe_security(HANDLE h, ObjectInfo& info, const std::string& what);

/// The size of a file mapping object (NtQuerySection). Needs SECTION_QUERY on `h`.
Result<std::uint64_t> section_size(HANDLE h, const std::string& what);

}  // namespace spshm::platform::win
