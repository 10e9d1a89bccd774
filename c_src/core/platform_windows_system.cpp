// Windows OS layer: listing our named objects, processes, boot id, time, randomness.
#include <array>
#include <cstddef>
#include <cstring>
#include <cwchar>
#include <mutex>
#include <string>
#include <vector>

#include "platform_windows.hpp"

// The object directory API of ntdll: the only way to enumerate named objects.
extern "C" {
struct SpshmObjectDirectoryInformation {
  UNICODE_STRING name;
  UNICODE_STRING type_name;
};
NTSTATUS NTAPI NtOpenDirectoryObject(PHANDLE directory, ACCESS_MASK access,
                                     POBJECT_ATTRIBUTES attributes);
NTSTATUS NTAPI NtQueryDirectoryObject(HANDLE directory, PVOID buffer, ULONG length,
                                      BOOLEAN single_entry, BOOLEAN restart, PULONG context,
                                      PULONG result_length);
}

namespace spshm::platform {

using win::win_error;

namespace {

constexpr ACCESS_MASK kDirectoryQuery = 0x0001;
constexpr NTSTATUS kStatusSuccess = 0;
constexpr NTSTATUS kStatusBufferTooSmall = static_cast<NTSTATUS>(0xC0000023);
constexpr ULONG kMaxEntry = 1 << 17;  // object names are at most 32767 UTF-16 characters
// FILETIME counts 100 ns from 1601-01-01; Unix time starts 11644473600 s later.
constexpr std::uint64_t kUnixEpochAsFileTime = 116444736000000000ull;

/// SYSTEM_TIMEOFDAY_INFORMATION as the kernel fills it (mingw's winternl.h hides the
/// bias fields in a reserved array). BootTime moves when the clock is set; the kernel
/// adds every such shift to BootTimeBias, so BootTime - BootTimeBias stays fixed.
struct TimeOfDay {
  LARGE_INTEGER boot_time;
  LARGE_INTEGER current_time;
  LARGE_INTEGER time_zone_bias;
  ULONG time_zone_id;
  ULONG reserved;
  ULONGLONG boot_time_bias;
  ULONGLONG sleep_time_bias;
};

std::uint64_t filetime_value(const FILETIME& t) noexcept {
  return (static_cast<std::uint64_t>(t.dwHighDateTime) << 32) | t.dwLowDateTime;
}

/// "\Sessions\<n>\BaseNamedObjects": where Local\ names of this session live
/// ("\BaseNamedObjects" in session 0, where services run).
std::wstring session_directory() {
  DWORD session = 0;
  if (!::ProcessIdToSessionId(::GetCurrentProcessId(), &session) || session == 0)
    return L"\\BaseNamedObjects";
  return L"\\Sessions\\" + std::to_wstring(session) + L"\\BaseNamedObjects";
}

bool is_section_of_ours(const SpshmObjectDirectoryInformation& entry, std::string& id) {
  static const wchar_t kSection[] = L"Section";
  std::size_t type_chars = entry.type_name.Length / sizeof(wchar_t);
  if (type_chars != 7 || std::wmemcmp(entry.type_name.Buffer, kSection, 7) != 0) return false;
  std::size_t chars = entry.name.Length / sizeof(wchar_t);
  constexpr std::size_t prefix = sizeof kNamePrefix - 1;
  if (chars <= prefix || chars > kMaxSegmentNameLength) return false;
  id.clear();
  for (std::size_t i = 0; i < chars; ++i) {
    wchar_t c = entry.name.Buffer[i];
    if (c > 0x7f) return false;
    id += static_cast<char>(c);
  }
  return id.compare(0, prefix, kNamePrefix) == 0;
}

}  // namespace

BackendKind named_backend() noexcept { return BackendKind::windows; }

std::string named_dir() { return {}; }

Result<void> set_named_dir(const std::string&) {
  return Error{Errc::unsupported, 0,
               "Windows file mappings are kernel objects, not files: shm_path cannot move them"};
}

Result<FsSpace> fs_space(const std::string& path) {
  return Error{Errc::unsupported, 0, "filesystem space of " + path + " is not measured on Windows"};
}

std::vector<std::string> list_named() {
  // Every file mapping of this session named spshm_*: the Local\ object directory.
  std::vector<std::string> ids;
  std::wstring path = session_directory();
  UNICODE_STRING name;
  ::RtlInitUnicodeString(&name, path.c_str());
  OBJECT_ATTRIBUTES attributes;
  InitializeObjectAttributes(&attributes, &name, 0, nullptr, nullptr);
  HANDLE directory = nullptr;
  if (::NtOpenDirectoryObject(&directory, kDirectoryQuery, &attributes) != kStatusSuccess)
    return ids;
  Handle guard(reinterpret_cast<Handle::native_type>(directory));
  std::vector<unsigned char> buffer(4096);
  ULONG context = 0;
  bool first = true;
  std::string id;
  for (;;) {
    ULONG returned = 0;
    NTSTATUS status =
        ::NtQueryDirectoryObject(directory, buffer.data(), static_cast<ULONG>(buffer.size()), TRUE,
                                 first ? TRUE : FALSE, &context, &returned);
    if (status == kStatusBufferTooSmall && returned > buffer.size() && returned <= kMaxEntry) {
      buffer.resize(returned);  // a long name of somebody else's object: read it again
      continue;
    }
    first = false;
    if (status != kStatusSuccess) break;  // STATUS_NO_MORE_ENTRIES (or a failure)
    const auto& entry = *reinterpret_cast<const SpshmObjectDirectoryInformation*>(buffer.data());
    if (is_section_of_ours(entry, id)) ids.push_back(id);
  }
  return ids;
}

// ---- processes, time, randomness ----

std::uint32_t current_pid() noexcept { return static_cast<std::uint32_t>(::GetCurrentProcessId()); }

Result<ProcessStat> process_stat(std::uint32_t pid) {
  std::string who = "process " + std::to_string(pid);
  if (pid == 0) return Error{Errc::not_found, ERROR_INVALID_PARAMETER, "no process with pid 0"};
  HANDLE process = ::OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE, FALSE, pid);
  if (process == nullptr) {
    DWORD err = ::GetLastError();
    if (err == ERROR_INVALID_PARAMETER)  // what OpenProcess says for a pid nobody has
      return Error{Errc::not_found, static_cast<int>(err),
                   "no process with pid " + std::to_string(pid)};
    return win_error("cannot query " + who, err);
  }
  Handle guard(reinterpret_cast<Handle::native_type>(process));
  FILETIME created, exited, kernel, user;
  if (!::GetProcessTimes(process, &created, &exited, &kernel, &user))
    return win_error("cannot read the start time of " + who, ::GetLastError());
  ProcessStat st;
  // The creation time (FILETIME, 100 ns since 1601) plays the role of Linux's start time:
  // with the pid, it names one process even after the pid is reused.
  st.start_time = filetime_value(created);
  // An exited process lives on as an object while handles to it exist: not running.
  st.running = ::WaitForSingleObject(process, 0) == WAIT_TIMEOUT;
  return st;
}

std::array<std::uint8_t, 16> boot_id() {
  // Windows has no boot id. The boot time, corrected for every later clock change, is the
  // same in every process until the next boot: its 8 bytes (little-endian) followed by
  // "WinBoot\0" are this boot's id. Zeros if the kernel does not say.
  static std::once_flag once;
  static std::array<std::uint8_t, 16> id{};
  std::call_once(once, [] {
    TimeOfDay tod{};
    ULONG returned = 0;
    NTSTATUS status =
        ::NtQuerySystemInformation(SystemTimeOfDayInformation, &tod, sizeof tod, &returned);
    if (status != kStatusSuccess || returned < offsetof(TimeOfDay, sleep_time_bias)) return;
    std::uint64_t boot = static_cast<std::uint64_t>(tod.boot_time.QuadPart) - tod.boot_time_bias;
    for (int i = 0; i < 8; ++i) id[i] = static_cast<std::uint8_t>(boot >> (8 * i));
    std::memcpy(id.data() + 8, "WinBoot", 8);
  });
  return id;
}

Result<void> random_bytes(void* buffer, std::size_t length) {
  auto* out = static_cast<UCHAR*>(buffer);
  while (length > 0) {
    ULONG n = length > 0x40000000u ? 0x40000000u : static_cast<ULONG>(length);
    NTSTATUS status = ::BCryptGenRandom(nullptr, out, n, BCRYPT_USE_SYSTEM_PREFERRED_RNG);
    if (status < 0) return win_error("BCryptGenRandom failed", ::RtlNtStatusToDosError(status));
    out += n;
    length -= n;
  }
  return {};
}

std::uint64_t realtime_ns() noexcept {
  FILETIME now;
  ::GetSystemTimePreciseAsFileTime(&now);
  return (filetime_value(now) - kUnixEpochAsFileTime) * 100u;
}

}  // namespace spshm::platform
