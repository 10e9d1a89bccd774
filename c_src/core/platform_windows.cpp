// Windows part of the OS layer: named file mappings (CreateFileMappingW, OpenFileMappingW,
// MapViewOfFile) backed by the paging file. Security, processes, time: the other
// platform_windows_*.cpp files.
//
// How Windows differs from POSIX shm, and what this file does about it:
// - A file mapping's size is fixed when it is created: create_named takes it, and
//   allocate() only checks it. SEC_COMMIT charges the whole size to the commit limit at
//   creation, so running out of memory fails there (no_space), never on first touch.
// - There is no unlink: the name and the memory go away when the last handle and view
//   in any process are closed. unlink_named only reports whether the name exists.
// - Views start at multiples of the allocation granularity (64 KiB): map() maps from the
//   granule below the offset and hands out a pointer into that view.
// - No OS seal: seal_object makes the DACL read-only, so later opens get read-only
//   access (like mode 0400 on POSIX); views mapped writable before keep working. The
//   header's sealed bit is what the core enforces.
#include <cstring>
#include <string>

#include "platform_windows.hpp"

namespace spshm::platform {

using win::handle_of;
using win::win_error;

namespace {

constexpr char kLocalPrefix[] = "Local\\";

// Rights asked for when opening: queries (size, owner, DACL) always; WRITE_DAC to seal.
constexpr DWORD kReadRights = FILE_MAP_READ | SECTION_QUERY | READ_CONTROL;
constexpr DWORD kWriteRights = kReadRights | FILE_MAP_WRITE | WRITE_DAC;

std::uint64_t allocation_granularity() noexcept {
  static const std::uint64_t granularity = [] {
    SYSTEM_INFO info;
    ::GetSystemInfo(&info);
    return static_cast<std::uint64_t>(info.dwAllocationGranularity);
  }();
  return granularity;
}

DWORD high_part(std::uint64_t v) noexcept { return static_cast<DWORD>(v >> 32); }
DWORD low_part(std::uint64_t v) noexcept { return static_cast<DWORD>(v & 0xffffffffu); }

/// True if a kernel object (of any type, ours or not) holds this name in Local\.
bool name_taken(const std::wstring& name) {
  HANDLE probe = ::OpenFileMappingW(FILE_MAP_READ, FALSE, name.c_str());
  if (probe != nullptr) {
    ::CloseHandle(probe);
    return true;
  }
  DWORD err = ::GetLastError();
  return err == ERROR_ACCESS_DENIED || err == ERROR_INVALID_HANDLE;
}

Error already_exists(const std::string& region_id, DWORD code) {
  return Error{Errc::already_exists, static_cast<int>(code),
               "a shared memory segment named " + region_id +
                   " already exists (on Windows a name lasts until every process has closed "
                   "it): open it (open_mode :open_only / :create_or_open), or pick another name"};
}

bool is_object_name_char(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

}  // namespace

void Handle::reset() noexcept {
  if (native_ != kInvalid && native_ != 0) ::CloseHandle(reinterpret_cast<HANDLE>(native_));
  native_ = kInvalid;
}

void Mapping::reset() noexcept {
  if (address_ != nullptr) {
    // map() may hand out a pointer inside its view: unmap the view it belongs to.
    MEMORY_BASIC_INFORMATION region;
    if (::VirtualQuery(address_, &region, sizeof region) == sizeof region)
      ::UnmapViewOfFile(region.AllocationBase);
  }
  address_ = nullptr;
  length_ = 0;
}

// ---- named objects ----

Result<Handle> create_named(const std::string& region_id, std::uint32_t mode, std::uint64_t size) {
  if (size == 0)
    return Error{Errc::invalid_argument, 0,
                 "a Windows file mapping needs its size at creation (got 0 bytes)"};
  auto security = win::OwnerOnlySecurity::for_mode(mode);
  if (!security) return security.error();
  std::wstring name = win::object_name(region_id);
  HANDLE h = ::CreateFileMappingW(INVALID_HANDLE_VALUE, security->attributes(),
                                  PAGE_READWRITE | SEC_COMMIT, high_part(size), low_part(size),
                                  name.c_str());
  DWORD err = ::GetLastError();
  if (h != nullptr && err == ERROR_ALREADY_EXISTS) {
    // CreateFileMappingW opened somebody else's object: creation must be exclusive.
    ::CloseHandle(h);
    return already_exists(region_id, err);
  }
  if (h == nullptr) {
    // An existing object we may not open reports access denied (or invalid handle when
    // the name belongs to an event, mutex...): the name is taken all the same.
    if ((err == ERROR_ACCESS_DENIED || err == ERROR_INVALID_HANDLE) && name_taken(name))
      return already_exists(region_id, err);
    return win_error("cannot create shared memory segment " + region_id + " of " +
                         std::to_string(size) + " bytes",
                     err);
  }
  return Handle(reinterpret_cast<Handle::native_type>(h));
}

Result<Handle> open_named(const std::string& region_id, Access access) {
  std::wstring name = win::object_name(region_id);
  DWORD rights = access == Access::read_write ? kWriteRights : kReadRights;
  HANDLE h = ::OpenFileMappingW(rights, FALSE, name.c_str());
  if (h == nullptr) {
    DWORD err = ::GetLastError();
    if (err == ERROR_FILE_NOT_FOUND)
      return Error{
          Errc::not_found, static_cast<int>(err),
          "no region " + region_id + " in shared memory (deallocated, expired, or never created)"};
    if (err == ERROR_INVALID_HANDLE)
      return Error{Errc::not_ours, static_cast<int>(err),
                   "Local\\" + region_id +
                       " is a kernel object that is not a file mapping: "
                       "not a snakepit_shm segment"};
    if (err == ERROR_ACCESS_DENIED && access == Access::read_write)
      return Error{Errc::permission_denied, static_cast<int>(err),
                   "cannot open shared memory segment " + region_id +
                       " for writing: it is sealed or read-only for us (open it read-only)"};
    return win_error("cannot open shared memory segment " + region_id, err);
  }
  return Handle(reinterpret_cast<Handle::native_type>(h));
}

Result<void> unlink_named(const std::string& region_id) {
  // Nothing to remove: the object disappears with its last handle. Report not_found like
  // shm_unlink would, so callers see the same outcomes on every OS.
  if (!name_taken(win::object_name(region_id)))
    return Error{Errc::not_found, ERROR_FILE_NOT_FOUND,
                 "no shared memory segment named " + region_id};
  return {};
}

std::string named_path(const std::string& region_id) { return kLocalPrefix + region_id; }

// ---- anonymous objects: none on Windows ----

Result<Handle> create_anonymous(const std::string&, std::uint64_t) {
  return Error{Errc::unsupported, 0,
               "Windows has no anonymous sealable memory object (memfd): use backend :windows"};
}

Result<Handle> create_anonymous_unallocated(const std::string& name, std::uint64_t size) {
  return create_anonymous(name, size);
}

Result<void> allocate_range(const Handle&, std::uint64_t, std::uint64_t, const std::string&) {
  return {};  // a section is committed when it is created
}

std::string handle_path(const Handle&) { return {}; }
std::string anonymous_name(const Handle&) { return {}; }
bool is_process_fd_link(const std::string&) noexcept { return false; }

// ---- any object ----

Result<Handle> open_path(const std::string& path, Access access) {
  // The only "paths" of Windows shared memory are object names: Local\<region id>.
  constexpr std::size_t prefix = sizeof kLocalPrefix - 1;
  bool ours = path.size() > prefix + (sizeof kNamePrefix - 1) &&
              path.compare(0, prefix, kLocalPrefix) == 0 &&
              path.compare(prefix, sizeof kNamePrefix - 1, kNamePrefix) == 0;
  for (std::size_t i = prefix; ours && i < path.size(); ++i) ours = is_object_name_char(path[i]);
  if (!ours)
    return Error{Errc::invalid_argument, 0,
                 "\"" + path.substr(0, 64) +
                     "\" is not a shared memory name on Windows: use Local\\<region id> "
                     "(Windows shared memory has no files)"};
  return open_named(path.substr(prefix), access);
}

Result<ObjectInfo> stat(const Handle& handle, const std::string& what) {
  ObjectInfo info;
  auto size = win::section_size(handle_of(handle), what);
  if (!size) return size.error();
  info.size = *size;
  info.regular = true;  // only file mappings are ever opened (OpenFileMappingW)
  if (auto r = win::describe_security(handle_of(handle), info, what); !r) return r.error();
  info.modified_ns = 0;  // file mappings keep no modification time
  return info;
}

Result<void> set_mode(const Handle& handle, std::uint32_t mode, const std::string& what) {
  auto security = win::OwnerOnlySecurity::for_mode(mode);
  if (!security) return security.error();
  DWORD err = ::SetSecurityInfo(handle_of(handle), SE_KERNEL_OBJECT,
                                DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
                                nullptr, nullptr, security->dacl(), nullptr);
  if (err != ERROR_SUCCESS) return win_error("cannot change the access list of " + what, err);
  return {};
}

Result<void> allocate(const Handle& handle, std::uint64_t size, const std::string& what) {
  // Sized and committed by create_named: a file mapping cannot grow afterwards.
  auto current = win::section_size(handle_of(handle), what);
  if (!current) return current.error();
  if (*current < size)
    return Error{Errc::unsupported, 0,
                 what + " is " + std::to_string(*current) +
                     " bytes and Windows cannot resize a "
                     "file mapping to " +
                     std::to_string(size) + ": it must be created with its final size"};
  return {};
}

Result<void> read_at(const Handle& handle, std::uint64_t offset, void* buffer, std::size_t length,
                     const std::string& what) {
  if (length == 0) return {};
  auto view = map(handle, offset, length, Access::read_only, Sharing::shared, what);
  if (!view) return view.error();
  std::memcpy(buffer, view->data(), length);
  return {};
}

Result<Mapping> map(const Handle& handle, std::uint64_t offset, std::size_t length, Access access,
                    Sharing sharing, const std::string& what) {
  if (length == 0) return Error{Errc::invalid_argument, 0, "cannot map 0 bytes of " + what};
  std::uint64_t start = offset - offset % allocation_granularity();
  std::uint64_t lead = offset - start;
  DWORD rights = sharing == Sharing::private_copy ? FILE_MAP_COPY
                 : access == Access::read_write   ? FILE_MAP_WRITE
                                                  : FILE_MAP_READ;
  void* view = ::MapViewOfFile(handle_of(handle), rights, high_part(start), low_part(start),
                               static_cast<SIZE_T>(lead + length));
  if (view == nullptr) {
    DWORD err = ::GetLastError();
    if (err == ERROR_ACCESS_DENIED && access == Access::read_write)
      return Error{Errc::permission_denied, static_cast<int>(err),
                   "cannot map " + what +
                       " for writing: it is sealed or read-only for us (map it read_only)"};
    return win_error("cannot map " + std::to_string(length) + " bytes of " + what, err);
  }
  return Mapping(static_cast<std::uint8_t*>(view) + lead, length);
}

Result<void> seal_object(const Handle& data_object, BackendKind backend) {
  if (backend != BackendKind::windows)
    return Error{Errc::unsupported, 0, "only backend :windows regions exist on Windows"};
  return set_mode(data_object, 0400, "the sealed segment");
}

// No kernel write seal on Windows: read/3 always copies. A section cannot shrink under a
// view, so no access can fault: run_guarded just runs the body.
Result<void> downgrade_view(const Handle&, Mapping&, std::uint64_t) {
  return Error{Errc::unsupported, 0, "Windows has no kernel write seal"};
}
Result<void> upgrade_view(const Handle&, Mapping&, std::uint64_t) { return {}; }
Result<void> seal_writes(const Handle&) {
  return Error{Errc::unsupported, 0, "Windows has no kernel write seal"};
}
bool writes_sealed(const Handle&) noexcept { return false; }
// Pages of a section are freed with its last view and handle; no hole punching.
Result<void> release_pages(const Handle&, std::uint64_t, std::uint64_t) {
  return Error{Errc::unsupported, 0, "Windows cannot free part of a section's pages"};
}
bool any_write_seal(const Handle&) noexcept { return false; }
bool is_hugetlb(const Handle&) noexcept { return false; }
bool exclusively_locked(const Handle&, std::uint64_t) noexcept { return false; }
HugePageInfo huge_page_info() noexcept { return {}; }
Result<Handle> create_anonymous_huge(const std::string&, std::uint64_t) {
  return Error{Errc::unsupported, 0, "Windows has no huge-page memfds"};
}
bool install_fault_guard() noexcept { return true; }
bool fault_guard_installed() noexcept { return true; }
std::uint64_t fault_repairs() noexcept { return 0; }

void set_fault_segment_dir(const std::string&) noexcept {}
bool run_guarded(void (*body)(void*), void* context, const void*, std::size_t) noexcept {
  body(context);
  return true;
}

// No open file description locks here: encrypted regions are not protected against
// concurrent writers of different processes on this OS (documented in SECURITY.md).
Result<void> try_lock_byte(const Handle&, std::uint64_t, bool) { return {}; }
void unlock_byte(const Handle&, std::uint64_t) noexcept {}

Result<void> lock_memory(void* address, std::size_t length) {
  if (!::VirtualLock(address, length)) {
    DWORD err = ::GetLastError();
    return Error{Errc::mlock_failed, static_cast<int>(err),
                 "cannot lock " + std::to_string(length) +
                     " bytes in memory (VirtualLock: " + win::error_text(err) +
                     "): a process may lock little more than its minimum working set. Raise "
                     "it with SetProcessWorkingSetSize in the process that maps the region, or "
                     "create the region without lock_memory"};
  }
  // Windows has no per-range exclusion from crash dumps (MADV_DONTDUMP): documented.
  return {};
}

// ---- liveness locks: none on Windows ----
// A file mapping is freed with its last handle or view in any process, so nothing is
// ever swept: lock_is_held() says "in use" and the other functions do nothing. Holder
// slots are only claimed when free (see platform.hpp).

bool has_ofd_locks() noexcept { return false; }
Result<void> lock_shared(const Handle&, std::uint64_t) { return {}; }
Result<bool> try_lock_exclusive(const Handle&, std::uint64_t) { return true; }
void unlock(const Handle&, std::uint64_t) noexcept {}
void unlock_range(const Handle&, std::uint64_t, std::uint64_t) noexcept {}
Result<bool> lock_is_held(const Handle&, std::uint64_t) { return true; }

std::size_t page_size() noexcept {
  static const std::size_t size = [] {
    SYSTEM_INFO info;
    ::GetSystemInfo(&info);
    return static_cast<std::size_t>(info.dwPageSize);
  }();
  return size;
}

}  // namespace spshm::platform
