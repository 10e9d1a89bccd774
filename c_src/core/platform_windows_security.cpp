// Windows OS layer: error texts, object names, the owner-only security descriptor of
// every region, and what stat() learns from an object (size, owner, access list).
#include <string>
#include <vector>

#include "platform_windows.hpp"

// NtQuerySection (ntdll): the only way to learn the size of a file mapping from a handle.
extern "C" {
struct SpshmSectionBasicInformation {
  PVOID base_address;
  ULONG allocation_attributes;
  LARGE_INTEGER maximum_size;
};
NTSTATUS NTAPI NtQuerySection(HANDLE section, int information_class, PVOID information,
                              SIZE_T length, PSIZE_T result_length);
}

namespace spshm::platform::win {

namespace {

constexpr int kSectionBasicInformation = 0;

// What the current user may do with a region, by mode. WRITE_DAC lets a holder seal it.
constexpr DWORD kAllowRead = FILE_MAP_READ | SECTION_QUERY | READ_CONTROL;
constexpr DWORD kAllowWrite = kAllowRead | FILE_MAP_WRITE | WRITE_DAC;

std::string to_utf8(const wchar_t* text, int length) {
  int bytes = ::WideCharToMultiByte(CP_UTF8, 0, text, length, nullptr, 0, nullptr, nullptr);
  if (bytes <= 0) return {};
  std::string out(static_cast<std::size_t>(bytes), '\0');
  ::WideCharToMultiByte(CP_UTF8, 0, text, length, out.data(), bytes, nullptr, nullptr);
  return out;
}

/// Frees memory the security functions allocated with LocalAlloc.
struct LocalFreeGuard {
  HLOCAL memory;
  ~LocalFreeGuard() {
    if (memory != nullptr) ::LocalFree(memory);
  }
};

std::uint32_t relative_id(PSID sid) noexcept {
  UCHAR count = *::GetSidSubAuthorityCount(sid);
  return count == 0 ? 0u : static_cast<std::uint32_t>(*::GetSidSubAuthority(sid, count - 1u));
}

/// POSIX-style mode bits read from a DACL: the current user's rights as 0600/0400, any
/// other SID's as 0066/0044. A NULL DACL lets everyone in: 0666.
std::uint32_t dacl_mode(const ACL* dacl, PSID user) {
  if (dacl == nullptr) return 0666;
  std::uint32_t mode = 0;
  for (DWORD i = 0; i < dacl->AceCount; ++i) {
    void* ace = nullptr;
    if (!::GetAce(const_cast<ACL*>(dacl), i, &ace)) continue;
    auto* header = static_cast<ACE_HEADER*>(ace);
    if (header->AceType != ACCESS_ALLOWED_ACE_TYPE) continue;
    auto* allowed = static_cast<ACCESS_ALLOWED_ACE*>(ace);
    PSID sid = reinterpret_cast<PSID>(&allowed->SidStart);
    bool mine = ::EqualSid(sid, user) != FALSE;
    if (allowed->Mask & (FILE_MAP_READ | GENERIC_READ | GENERIC_ALL)) mode |= mine ? 0400 : 0044;
    if (allowed->Mask & (FILE_MAP_WRITE | GENERIC_WRITE | GENERIC_ALL)) mode |= mine ? 0200 : 0022;
  }
  return mode;
}

}  // namespace

std::wstring object_name(const std::string& region_id) {
  // Region ids are ASCII ([a-z0-9_-]): widening each byte is the UTF-16 conversion.
  std::wstring name = L"Local\\";
  for (char c : region_id) name += static_cast<wchar_t>(static_cast<unsigned char>(c));
  return name;
}

std::string error_text(DWORD code) {
  wchar_t* text = nullptr;
  DWORD length = ::FormatMessageW(
      FORMAT_MESSAGE_ALLOCATE_BUFFER | FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS,
      nullptr, code, 0, reinterpret_cast<wchar_t*>(&text), 0, nullptr);
  LocalFreeGuard guard{text};
  std::string message = length > 0 ? to_utf8(text, static_cast<int>(length)) : std::string();
  while (!message.empty() && (message.back() == '\n' || message.back() == '\r' ||
                              message.back() == ' ' || message.back() == '.'))
    message.pop_back();
  if (message.empty()) message = "unknown error";
  return message + " (Windows error " + std::to_string(code) + ")";
}

Error win_error(const std::string& what, DWORD code) {
  Errc errc = Errc::io_error;
  std::string hint;
  switch (code) {
    case ERROR_ALREADY_EXISTS:
      errc = Errc::already_exists;
      break;
    case ERROR_FILE_NOT_FOUND:
      errc = Errc::not_found;
      break;
    case ERROR_ACCESS_DENIED:
      errc = Errc::permission_denied;
      hint = ": the region's access list does not grant this (regions are owner-only)";
      break;
    case ERROR_NOT_ENOUGH_MEMORY:
    case ERROR_OUTOFMEMORY:
    case ERROR_COMMITMENT_LIMIT:
      errc = Errc::no_space;
      hint =
          ": the commit limit (RAM + paging file) is reached; free memory, enlarge the "
          "paging file, or use smaller regions";
      break;
    default:
      break;
  }
  return Error{errc, static_cast<int>(code), what + ": " + error_text(code) + hint};
}

namespace {

Result<std::vector<std::uint8_t>> read_user_sid() {
  HANDLE token = nullptr;
  if (!::OpenProcessToken(::GetCurrentProcess(), TOKEN_QUERY, &token))
    return win_error("cannot read this process's access token", ::GetLastError());
  Handle token_guard(reinterpret_cast<Handle::native_type>(token));
  DWORD length = 0;
  ::GetTokenInformation(token, TokenUser, nullptr, 0, &length);
  std::vector<std::uint8_t> buffer(length);
  if (length == 0 || !::GetTokenInformation(token, TokenUser, buffer.data(), length, &length))
    return win_error("cannot read the user of this process's token", ::GetLastError());
  PSID sid = reinterpret_cast<TOKEN_USER*>(buffer.data())->User.Sid;
  std::vector<std::uint8_t> out(::GetLengthSid(sid));
  if (!::CopySid(static_cast<DWORD>(out.size()), out.data(), sid))
    return win_error("cannot copy the user's SID", ::GetLastError());
  return out;
}

}  // namespace

Result<std::vector<std::uint8_t>> current_user_sid() {
  // The user of a process's primary token never changes: read it once.
  static const Result<std::vector<std::uint8_t>> sid = read_user_sid();
  return sid;
}

Result<OwnerOnlySecurity> OwnerOnlySecurity::for_mode(std::uint32_t mode) {
  if (mode & 0077u)
    return Error{Errc::invalid_argument, 0,
                 "regions on Windows are owner-only: mode may not grant group or other access "
                 "(got 0" +
                     std::to_string((mode >> 6) & 7u) + std::to_string((mode >> 3) & 7u) +
                     std::to_string(mode & 7u) + "; use 0600 or 0400)"};
  auto sid = current_user_sid();
  if (!sid) return sid.error();
  OwnerOnlySecurity s;
  s.sid_ = std::move(*sid);
  PSID user = s.sid_.data();
  DWORD acl_size = sizeof(ACL) + sizeof(ACCESS_ALLOWED_ACE) + ::GetLengthSid(user);
  s.acl_.assign(acl_size, 0);
  ACL* acl = s.dacl();
  DWORD rights = (mode & 0200u) ? kAllowWrite : kAllowRead;
  if (!::InitializeAcl(acl, acl_size, ACL_REVISION) ||
      !::AddAccessAllowedAce(acl, ACL_REVISION, rights, user))
    return win_error("cannot build the access list of a region", ::GetLastError());
  // One explicit ACE for this user: never a NULL DACL (anyone), never inherited ACEs.
  if (!::InitializeSecurityDescriptor(&s.descriptor_, SECURITY_DESCRIPTOR_REVISION) ||
      !::SetSecurityDescriptorDacl(&s.descriptor_, TRUE, acl, FALSE) ||
      !::SetSecurityDescriptorControl(&s.descriptor_, SE_DACL_PROTECTED, SE_DACL_PROTECTED) ||
      !::SetSecurityDescriptorOwner(&s.descriptor_, user, FALSE))
    return win_error("cannot build the security descriptor of a region", ::GetLastError());
  return s;
}

Result<void> describe_security(HANDLE h, ObjectInfo& info, const std::string& what) {
  PSID owner = nullptr;
  PACL dacl = nullptr;
  PSECURITY_DESCRIPTOR descriptor = nullptr;
  DWORD err =
      ::GetSecurityInfo(h, SE_KERNEL_OBJECT, OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
                        &owner, nullptr, &dacl, nullptr, &descriptor);
  if (err != ERROR_SUCCESS)
    return win_error("cannot read the owner and access list of " + what, err);
  LocalFreeGuard guard{descriptor};
  auto user = current_user_sid();
  if (!user) return user.error();
  info.owned_by_us = owner != nullptr && ::EqualSid(owner, user->data());
  info.owner = owner != nullptr ? relative_id(owner) : 0;
  info.mode = dacl_mode(dacl, user->data());
  return {};
}

Result<std::uint64_t> section_size(HANDLE h, const std::string& what) {
  SpshmSectionBasicInformation basic{};
  SIZE_T returned = 0;
  NTSTATUS status = ::NtQuerySection(h, kSectionBasicInformation, &basic, sizeof basic, &returned);
  if (status < 0)
    return win_error("cannot read the size of " + what, ::RtlNtStatusToDosError(status));
  return static_cast<std::uint64_t>(basic.maximum_size.QuadPart);
}

}  // namespace spshm::platform::win
