// The OS layer of the core: every system call the core makes goes through here.
//
// One interface, one file per OS, chosen in one place (CMakeLists.txt):
//   platform_posix.cpp    shm_open objects, files, mappings, mlock (Linux and macOS)
//   platform_linux.cpp    memfd + seals, /proc, getrandom, boot_id, /dev/shm listing
//   platform_windows.cpp  CreateFileMappingW, MapViewOfFile, ... (built with mingw)
// Nothing here names a file descriptor: a Handle is an opaque, move-only OS handle, so
// region.cpp, which uses only this interface, compiles unchanged on every OS.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "error.hpp"
#include "format.hpp"

namespace spshm::platform {

/// An open OS object (a file descriptor on POSIX, a HANDLE on Windows). Closes on
/// destruction; never blocks.
class Handle {
 public:
  using native_type = std::intptr_t;
  static constexpr native_type kInvalid = -1;

  Handle() noexcept = default;
  explicit Handle(native_type native) noexcept : native_(native) {}
  Handle(Handle&& other) noexcept : native_(other.release()) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      native_ = other.release();
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }

  bool valid() const noexcept { return native_ != kInvalid; }
  native_type native() const noexcept { return native_; }
  native_type release() noexcept {
    native_type n = native_;
    native_ = kInvalid;
    return n;
  }
  void reset() noexcept;  ///< closes (per OS)

 private:
  native_type native_ = kInvalid;
};

/// A view of (part of) an OS object in this process. Unmaps on destruction.
class Mapping {
 public:
  Mapping() noexcept = default;
  Mapping(void* address, std::size_t length) noexcept : address_(address), length_(length) {}
  Mapping(Mapping&& other) noexcept : address_(other.address_), length_(other.length_) {
    other.address_ = nullptr;
    other.length_ = 0;
  }
  Mapping& operator=(Mapping&& other) noexcept {
    if (this != &other) {
      reset();
      address_ = other.address_;
      length_ = other.length_;
      other.address_ = nullptr;
      other.length_ = 0;
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  std::uint8_t* data() const noexcept { return static_cast<std::uint8_t*>(address_); }
  std::size_t size() const noexcept { return length_; }
  /// Splits off [offset, size()) as a Mapping of its own (offset page-aligned, POSIX
  /// only: a Windows view cannot be unmapped in parts); this one keeps [0, offset).
  Mapping split_at(std::size_t offset) noexcept {
    if (address_ == nullptr || offset >= length_) return Mapping();
    Mapping tail(static_cast<std::uint8_t*>(address_) + offset, length_ - offset);
    length_ = offset;
    return tail;
  }
  bool valid() const noexcept { return address_ != nullptr; }
  void reset() noexcept;  ///< unmaps (per OS)

 private:
  void* address_ = nullptr;
  std::size_t length_ = 0;
};

enum class Access { read_only, read_write };
/// shared: writes reach the object; private_copy: copy-on-write view that never does.
enum class Sharing { shared, private_copy };

struct ObjectInfo {
  std::uint64_t size = 0;
  bool regular = false;           ///< a regular file / shm object (not a directory, FIFO, device)
  std::uint32_t owner = 0;        ///< owner uid (POSIX)
  bool owned_by_us = false;       ///< owner == effective uid of this process
  std::uint32_t mode = 0;         ///< permission bits (07777)
  std::uint64_t modified_ns = 0;  ///< last modification, CLOCK_REALTIME
  std::uint64_t device = 0;       ///< with `inode`, identifies the object (0 where unknown)
  std::uint64_t inode = 0;
};

// ---- named objects: POSIX shm_open "/<region_id>" (Windows: Local\<region_id>) ----

/// The backend of named objects on this OS: posix (shm_open) or windows (file mapping).
BackendKind named_backend() noexcept;

/// Creates the object exclusively (never opens an existing one: already_exists), with
/// permissions `mode` whatever the umask. POSIX: size 0, allocate() sizes it. Windows: a
/// file mapping's size is fixed at creation, so it is created with `size` bytes and
/// allocate() only checks them.
Result<Handle> create_named(const std::string& region_id, std::uint32_t mode, std::uint64_t size);
/// Opens an existing object without following symbolic links.
Result<Handle> open_named(const std::string& region_id, Access access);
/// Removes the name (not_found if there is none). Mappings stay valid.
Result<void> unlink_named(const std::string& region_id);
/// The filesystem path of a named object ("/dev/shm/<id>"), or "" if the OS has none
/// (macOS). Windows: the object name "Local\<id>", which open_path() accepts.
std::string named_path(const std::string& region_id);
/// Region ids of every named object whose name starts with kNamePrefix.
std::vector<std::string> list_named();
/// The directory whose files are the named objects ("/dev/shm" unless set_named_dir()
/// moved it), or "" where named objects are not files (macOS, Windows).
std::string named_dir();
/// Moves the named objects of this process to `dir` (an absolute path of an existing
/// directory, normally a tmpfs): create_named, open_named, unlink_named, named_path and
/// list_named all follow. unsupported where named objects are not files.
Result<void> set_named_dir(const std::string& dir);

/// Size and free space of the filesystem holding `path` (statvfs), and whether it is a
/// tmpfs (memory-backed: Linux statfs TMPFS_MAGIC).
struct FsSpace {
  std::uint64_t total = 0;      ///< bytes
  std::uint64_t free = 0;       ///< bytes free for root
  std::uint64_t available = 0;  ///< bytes free for unprivileged users
  bool tmpfs = false;
};
Result<FsSpace> fs_space(const std::string& path);

// ---- anonymous objects (Linux memfd) ----

/// Creates an anonymous object of `size` bytes (allocated, zero-filled) that nobody can
/// shrink or grow. unsupported where the OS has no such thing.
Result<Handle> create_anonymous(const std::string& debug_name, std::uint64_t size);
/// create_anonymous() without allocating the pages (the memory check, the size, the
/// seals and the mode are the same): allocate_range() allocates them in slices.
Result<Handle> create_anonymous_unallocated(const std::string& debug_name, std::uint64_t size);
/// Allocates the pages of bytes [offset, offset + length) of the object (posix_fallocate:
/// out of memory fails here, not with SIGBUS on first touch). No-op where objects are
/// allocated when sized (macOS, Windows).
Result<void> allocate_range(const Handle& handle, std::uint64_t offset, std::uint64_t length,
                            const std::string& what);
/// Path through which another process of our uid opens `handle` ("/proc/<pid>/fd/<n>").
std::string handle_path(const Handle& handle);
/// Name given to create_anonymous() of the object behind `handle` ("" if not anonymous).
std::string anonymous_name(const Handle& handle);

// ---- warm pool and huge pages (Linux memfd; pool.hpp) ----

/// True if the object carries a seal that forbids writes now or to future mappings
/// (memfd F_SEAL_WRITE or F_SEAL_FUTURE_WRITE). False elsewhere.
bool any_write_seal(const Handle& object) noexcept;
/// True if some open holds byte `offset` of the object exclusively (F_OFD_GETLK asking
/// for a shared lock): a data memfd in a warm pool. False elsewhere or on error.
bool exclusively_locked(const Handle& object, std::uint64_t offset) noexcept;
/// True if the object lives on hugetlbfs (a memfd made with MFD_HUGETLB).
bool is_hugetlb(const Handle& object) noexcept;
/// What the host offers for huge-page memfds: the default huge page size and how many
/// pages of it are reserved (vm.nr_hugepages) and free now. Zeros where unknown.
struct HugePageInfo {
  std::uint64_t page_size = 0;
  std::uint64_t total = 0;
  std::uint64_t free = 0;
};
HugePageInfo huge_page_info() noexcept;
/// create_anonymous() with MFD_HUGETLB: `size` must be a multiple of the huge page size.
/// no_space when the hugetlb pool has too few free pages, unsupported without hugetlbfs.
Result<Handle> create_anonymous_huge(const std::string& debug_name, std::uint64_t size);

// ---- any object ----

/// Opens a path without following symbolic links, except the process fd links
/// "/proc/<pid>/fd/<n>", which are followed only to an anonymous object named
/// kNamePrefix... (not_ours otherwise). Never blocks (FIFOs are opened non-blocking).
Result<Handle> open_path(const std::string& path, Access access);
/// True for paths of the form "/proc/<pid>/fd/<n>" ("/proc/self/fd/<n>").
bool is_process_fd_link(const std::string& path) noexcept;
Result<ObjectInfo> stat(const Handle& handle, const std::string& what);
Result<void> set_mode(const Handle& handle, std::uint32_t mode, const std::string& what);
/// Frees the pages of bytes [offset, offset + length) of the object, which keeps its size
/// (reads there give zeros afterwards, never SIGBUS): Linux fallocate PUNCH_HOLE. Lets a
/// caller free a large object's memory in pieces instead of all at once in the last
/// close or unlink. unsupported elsewhere; refused (permission_denied) by a write seal.
Result<void> release_pages(const Handle& handle, std::uint64_t offset, std::uint64_t length);
/// Sets the size to `size` and allocates every byte (a full filesystem fails here, not
/// with SIGBUS on first touch).
Result<void> allocate(const Handle& handle, std::uint64_t size, const std::string& what);
/// Refuses (too_large, EFBIG) to grow a file of ours to `size` bytes above this process's
/// RLIMIT_FSIZE (ulimit -f, systemd LimitFSIZE=): growing past it with ftruncate,
/// fallocate or pwrite raises SIGXFSZ, whose default action (kept by the BEAM) ends the
/// process. Every path that sizes a segment, memfd or arena calls it first. POSIX only.
Result<void> check_file_size_limit(const std::string& what, std::uint64_t size);
Result<void> read_at(const Handle& handle, std::uint64_t offset, void* buffer, std::size_t length,
                     const std::string& what);
Result<Mapping> map(const Handle& handle, std::uint64_t offset, std::size_t length, Access access,
                    Sharing sharing, const std::string& what);
/// Makes the data immutable for every future mapping and open of other processes
/// (memfd: F_SEAL_FUTURE_WRITE; named POSIX: mode 0400). Existing mappings keep working.
Result<void> seal_object(const Handle& data_object, BackendKind backend);
// ---- liveness locks (Linux: open file description locks, F_OFD_*) ----
//
// A lock belongs to the open file description of `handle`, not to the process: it lasts
// until the last descriptor of that open is closed (also on SIGKILL), works across PID
// namespaces, and conflicts with locks of every other open, even of the same process.
// Bytes may lie beyond the end of the object.

/// True where the OS has open file description locks (Linux). Elsewhere the functions
/// below do nothing, lock_is_held() says true (never "unused": nothing is deleted on its
/// word) and try_lock_exclusive() says true (callers only take free slots there).
bool has_ofd_locks() noexcept;
/// Takes a shared lock of byte `offset` (F_OFD_SETLK, F_RDLCK); busy if another open
/// holds it exclusively (a sweeper removing the object right now).
Result<void> lock_shared(const Handle& handle, std::uint64_t offset);
/// Tries an exclusive lock of byte `offset` without waiting (the handle must be open for
/// writing): false if another open holds a lock there.
Result<bool> try_lock_exclusive(const Handle& handle, std::uint64_t offset);
/// Drops this open's lock of byte `offset`.
void unlock(const Handle& handle, std::uint64_t offset) noexcept;
/// Drops this open's locks of bytes [offset, offset + length) in one call (other opens'
/// locks there stay).
void unlock_range(const Handle& handle, std::uint64_t offset, std::uint64_t length) noexcept;
/// True if an open other than this one holds a lock of byte `offset` (F_OFD_GETLK with
/// F_WRLCK: works on a read-only handle).
Result<bool> lock_is_held(const Handle& handle, std::uint64_t offset);
// ---- kernel-enforced immutability (Linux memfd; unsupported elsewhere) ----

/// Replaces `view`, a shared mapping of `object` from byte `offset`, in place (same
/// address, MAP_FIXED) by a read-only mapping of a read-only open of the object, so that
/// this process keeps no mapping the kernel counts as writable (VM_MAYWRITE): one that
/// could never be mprotect'ed writable again. unsupported where the OS cannot.
Result<void> downgrade_view(const Handle& object, Mapping& view, std::uint64_t offset);
/// The reverse, after a refused seal: maps the view read-write again from `object`.
Result<void> upgrade_view(const Handle& object, Mapping& view, std::uint64_t offset);
/// Forbids every write to the object, by anyone, for ever (memfd F_SEAL_WRITE). busy
/// while any process (a forked child included) maps it writable; unsupported where the
/// OS has no such seal. `object` must be open for writing.
Result<void> seal_writes(const Handle& object);
/// True if the kernel forbids every write to the object (F_SEAL_WRITE is set on it).
bool writes_sealed(const Handle& object) noexcept;

// ---- advisory byte locks between processes ----

/// Locks byte `offset` of the object without waiting, exclusively or shared, as an open
/// file description lock (Linux F_OFD_SETLK): owned by this open of the object, so two
/// opens conflict even in one process, and released by the kernel when the last
/// descriptor of the open closes (its process died). busy on a conflicting lock.
/// macOS and Windows: no cross-process lock, always succeeds (documented).
Result<void> try_lock_byte(const Handle& object, std::uint64_t offset, bool exclusive);
void unlock_byte(const Handle& object, std::uint64_t offset) noexcept;

// ---- guarded access to mappings a peer may truncate (POSIX shm) ----

/// Installs, once per process, the SIGBUS handler behind run_guarded(): it acts only on
/// a thread inside run_guarded() whose fault lies in the range it guards, and chains to
/// the handler installed before it otherwise. Idempotent; false if sigaction failed.
/// Windows: nothing to install (a section cannot shrink under a view).
bool install_fault_guard() noexcept;
bool fault_guard_installed() noexcept;
/// How many faults outside run_guarded() the handler repaired so far (Linux: a page of a
/// mapping of a /dev/shm/spshm_* segment that lost its memory is replaced by a private
/// zero page, so that header reads of a truncated segment do not kill the process).
std::uint64_t fault_repairs() noexcept;

/// Tells the SIGBUS handler where segments live (set_named_dir calls it): a fault in a
/// mapping of "<dir>/spshm_*" outside a guarded copy is repaired.
void set_fault_segment_dir(const std::string& dir) noexcept;
/// Runs body(context) and returns true; or returns false if body touched a page of
/// [first, first + length) that its object no longer has (a peer truncated it: SIGBUS),
/// abandoning body at that instant. body must take no lock and own no object with a
/// destructor (it is left by siglongjmp). Without the handler installed it just runs body.
bool run_guarded(void (*body)(void*), void* context, const void* first,
                 std::size_t length) noexcept;

/// mlock + keep out of core dumps; mlock_failed names RLIMIT_MEMLOCK and how to raise it.
Result<void> lock_memory(void* address, std::size_t length);
std::size_t page_size() noexcept;

// ---- processes, time, randomness ----

/// This process's pid: cached, and reset in the child of fork() (pthread_atfork).
std::uint32_t current_pid() noexcept;

struct ProcessStat {
  std::uint64_t start_time = 0;  ///< clock ticks since boot (/proc/<pid>/stat field 22)
  bool running = false;          ///< exists and is not a zombie
};
/// not_found if no process has this pid.
Result<ProcessStat> process_stat(std::uint32_t pid);
/// Parses a UUID's 32 hex digits ('-', whitespace and a newline ignored) into `out`;
/// false (out untouched) unless there are exactly 32. The one boot id parser (POSIX).
bool parse_uuid(const std::string& text, std::array<std::uint8_t, 16>& out) noexcept;
/// Reads a small file (a /proc or cgroup file) whole, at most `max_bytes`: false if it
/// cannot be opened or read, or is longer (POSIX).
bool read_small_file(const std::string& path, std::string& out, std::size_t max_bytes = 1 << 20);
/// This boot's id (Linux: /proc/sys/kernel/random/boot_id), zeros if unknown.
std::array<std::uint8_t, 16> boot_id();
/// Fills `buffer` from the OS CSPRNG.
Result<void> random_bytes(void* buffer, std::size_t length);
std::uint64_t realtime_ns() noexcept;

}  // namespace spshm::platform
