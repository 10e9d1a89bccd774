// The C ABI (snakepit_shm.h) over the core. Nothing may escape to C: every function
// catches everything and turns it into an SPSHM_E* code and a message.
#include "snakepit_shm.h"

#if defined(__linux__)
#include <fcntl.h>
#include <unistd.h>
#endif

#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>

#include "board.hpp"
#include "crypto.hpp"
#include "format.hpp"
#include "header.hpp"
#include "platform.hpp"
#include "region.hpp"
#include "region_impl.hpp"

#define SPSHM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using spshm::Errc;
using spshm::Error;
using spshm::RegionHeader;

constexpr int kAbiVersion = 2;

int code_of(Errc code) noexcept { return -(static_cast<int>(code) + 1); }

void copy_message(const std::string& message, char* err, size_t errlen) noexcept {
  if (err == nullptr || errlen == 0) return;
  size_t n = message.size() < errlen - 1 ? message.size() : errlen - 1;
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

int fail(const Error& e, char* err, size_t errlen) noexcept {
  copy_message(e.message, err, errlen);
  return code_of(e.code);
}

int fail(Errc code, const char* message, char* err, size_t errlen) noexcept {
  if (err != nullptr && errlen > 0) {
    std::strncpy(err, message, errlen - 1);
    err[errlen - 1] = '\0';
  }
  return code_of(code);
}

int succeed(char* err, size_t errlen) noexcept {
  if (err != nullptr && errlen > 0) err[0] = '\0';
  return SPSHM_OK;
}

int from(const spshm::Result<void>& r, char* err, size_t errlen) noexcept {
  return r ? succeed(err, errlen) : fail(r.error(), err, errlen);
}

/// Runs `body` (which returns an int code) with every exception turned into an error.
template <class Body>
int guarded(char* err, size_t errlen, Body&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return fail(Errc::no_space, "out of memory", err, errlen);
  } catch (...) {
    return fail(Errc::io_error, "internal error in snakepit_shm", err, errlen);
  }
}

/// Before touching memory handed to us as a header, check that it is one (magic and
/// holder capacity), so a wrong pointer from Python fails instead of corrupting memory.
spshm::Result<void> looks_like_header(const void* header) {
  if (header == nullptr) return Error{Errc::invalid_argument, 0, "header pointer is NULL"};
  const auto* h = static_cast<const RegionHeader*>(header);
  if (std::memcmp(h->magic, spshm::kMagic, sizeof spshm::kMagic) != 0 ||
      h->holder_capacity != spshm::kHolderCapacity)
    return Error{Errc::corrupt, 0, "not a snakepit_shm header (bad magic or holder capacity)"};
  return {};
}

/// A private copy of a header in shared memory: validated, then used, without a peer
/// being able to change it in between.
class HeaderCopy {
 public:
  explicit HeaderCopy(const void* header) noexcept { std::memcpy(bytes_, header, sizeof bytes_); }
  const RegionHeader& get() const noexcept {
    return *reinterpret_cast<const RegionHeader*>(bytes_);
  }

 private:
  alignas(RegionHeader) unsigned char bytes_[sizeof(RegionHeader)];
};

/// Checks an encrypted region's header and the caller's buffers for a crypto call.
spshm::Result<void> check_crypto_call(const RegionHeader& h, const uint8_t* data, uint64_t data_len,
                                      const uint8_t* key, uint64_t offset, const void* buffer,
                                      uint64_t length) {
  if (auto r = spshm::validate_header(h, std::numeric_limits<uint64_t>::max()); !r) return r;
  if (!(h.flags & spshm::kFlagEncrypted))
    return Error{Errc::invalid_argument, 0, "the region is not encrypted: read its data directly"};
  if (data == nullptr || key == nullptr || (length > 0 && buffer == nullptr))
    return Error{Errc::invalid_argument, 0, "data, key and buffer must not be NULL"};
  if (data_len < h.data_capacity)
    return Error{Errc::invalid_argument, 0,
                 "data_len " + std::to_string(data_len) + " is smaller than the region's " +
                     std::to_string(h.data_capacity) + "-byte encrypted data area"};
  if (offset > h.data_size || length > h.data_size - offset)
    return Error{Errc::out_of_bounds, 0,
                 "offset " + std::to_string(offset) + " + length " + std::to_string(length) +
                     " is outside the region's " + std::to_string(h.data_size) + " bytes"};
  return {};
}

}  // namespace

SPSHM_EXPORT int spshm_abi_version(void) { return kAbiVersion; }

SPSHM_EXPORT size_t spshm_header_layout(char* buf, size_t buflen) {
  try {
    std::string layout = spshm::layout_description();
    copy_message(layout, buf, buflen);
    return layout.size();
  } catch (...) {
    if (buf != nullptr && buflen > 0) buf[0] = '\0';
    return 0;
  }
}

SPSHM_EXPORT int spshm_validate_header(const void* header, uint64_t data_object_size, char* err,
                                       size_t errlen) {
  return guarded(err, errlen, [&] {
    if (header == nullptr)
      return fail(Errc::invalid_argument, "header pointer is NULL", err, errlen);
    return from(spshm::validate_header(*static_cast<const RegionHeader*>(header), data_object_size),
                err, errlen);
  });
}

SPSHM_EXPORT int spshm_hold(void* header, uint32_t pid, uint64_t start_time, int writable,
                            char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    return from(spshm::hold(*static_cast<RegionHeader*>(header), pid, start_time, writable != 0),
                err, errlen);
  });
}

SPSHM_EXPORT int spshm_release(void* header, uint32_t pid, uint64_t start_time, char* err,
                               size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    return from(spshm::release(*static_cast<RegionHeader*>(header), pid, start_time), err, errlen);
  });
}

SPSHM_EXPORT int spshm_give_up_output(void* header, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    auto& state = static_cast<RegionHeader*>(header)->state;
    std::uint32_t seen = state.load(std::memory_order_acquire);
    do {
      if (seen & (spshm::kStateAdopted | spshm::kStateDeallocated)) return 0;
    } while (!state.compare_exchange_weak(seen, seen | spshm::kStateDeallocated,
                                          std::memory_order_acq_rel, std::memory_order_acquire));
    return 1;
  });
}

namespace {

/// Lends a caller's descriptor to the core without taking ownership of it.
class BorrowedFd {
 public:
  explicit BorrowedFd(int fd) noexcept : handle_(fd) {}
  ~BorrowedFd() { (void)handle_.release(); }
  BorrowedFd(const BorrowedFd&) = delete;
  BorrowedFd& operator=(const BorrowedFd&) = delete;
  const spshm::platform::Handle& get() const noexcept { return handle_; }

 private:
  spshm::platform::Handle handle_;
};

/// Where a worker's claim of a holder slot starts: the VM's opens keep the locks of the
/// slots they claimed from 0 on, so starting elsewhere saves the lock system calls that
/// would find them taken (every such call walks the file's whole lock list: long in an
/// arena, which carries the locks of all its regions).
std::uint32_t first_slot_of(uint32_t pid) noexcept { return pid % spshm::kHolderCapacity; }

}  // namespace

SPSHM_EXPORT int spshm_liveness_lock(int fd, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (fd < 0) return fail(Errc::invalid_argument, "fd must not be negative", err, errlen);
    BorrowedFd handle(fd);
    return from(spshm::take_liveness_lock(handle.get(), "the control object"), err, errlen);
  });
}

SPSHM_EXPORT int spshm_lock_data(int fd, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (fd < 0) return fail(Errc::invalid_argument, "fd must not be negative", err, errlen);
    BorrowedFd handle(fd);
    return from(spshm::lock_data_object(handle.get(), "the data memfd"), err, errlen);
  });
}

SPSHM_EXPORT int spshm_hold_fd(void* header, int fd, int* slot, uint32_t pid, uint64_t start_time,
                               int writable, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    if (fd < 0 || slot == nullptr)
      return fail(Errc::invalid_argument, "fd and slot must be valid", err, errlen);
    BorrowedFd handle(fd);
    return from(spshm::hold_on(*static_cast<RegionHeader*>(header), handle.get(), *slot, pid,
                               start_time, writable != 0, 0, first_slot_of(pid)),
                err, errlen);
  });
}

SPSHM_EXPORT int spshm_release_fd(void* header, int fd, int* slot, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    if (fd < 0 || slot == nullptr)
      return fail(Errc::invalid_argument, "fd and slot must be valid", err, errlen);
    BorrowedFd handle(fd);
    return from(spshm::release_on(*static_cast<RegionHeader*>(header), handle.get(), *slot), err,
                errlen);
  });
}

// ---- arena regions (docs/FORMAT.md, "Arenas"): the same locks, at the control block's
// offset `base` in the arena object ----

SPSHM_EXPORT int spshm_liveness_lock_at(int fd, uint64_t base, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (fd < 0) return fail(Errc::invalid_argument, "fd must not be negative", err, errlen);
    BorrowedFd handle(fd);
    auto locked = spshm::platform::lock_shared(handle.get(), base + spshm::kLivenessLockByte);
    if (!locked && locked.error().code == Errc::busy)
      return fail(Errc::deallocated,
                  "the region was freed and its place in the arena is being reclaimed", err,
                  errlen);
    return from(locked, err, errlen);
  });
}

SPSHM_EXPORT int spshm_hold_fd_at(void* header, int fd, uint64_t base, int* slot, uint32_t pid,
                                  uint64_t start_time, int writable, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    if (fd < 0 || slot == nullptr)
      return fail(Errc::invalid_argument, "fd and slot must be valid", err, errlen);
    BorrowedFd handle(fd);
    return from(spshm::hold_on(*static_cast<RegionHeader*>(header), handle.get(), *slot, pid,
                               start_time, writable != 0, base, first_slot_of(pid)),
                err, errlen);
  });
}

SPSHM_EXPORT int spshm_clear_stale_sealing(void* header, int fd, uint64_t base, char* err,
                                           size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    if (fd < 0) return fail(Errc::invalid_argument, "fd must not be negative", err, errlen);
    BorrowedFd handle(fd);
    if (spshm::clear_stale_sealing(*static_cast<RegionHeader*>(header), handle.get(), base))
      return 0;
    return fail(Errc::busy, "the region is being sealed by a live process", err, errlen);
  });
}

namespace {

// spshm_release_fd_at / spshm_release_fd_closing: the slot's hold given back; with
// keep_lock the slot's lock goes with the close(2) the caller makes next, which drops
// every lock of the open anyway (one walk of the lock list instead of two).
int release_fd(void* header, int fd, uint64_t base, int* slot, bool keep_lock, char* err,
               size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    if (fd < 0 || slot == nullptr)
      return fail(Errc::invalid_argument, "fd and slot must be valid", err, errlen);
    BorrowedFd handle(fd);
    return from(spshm::release_on(*static_cast<RegionHeader*>(header), handle.get(), *slot, base,
                                  keep_lock),
                err, errlen);
  });
}

}  // namespace

SPSHM_EXPORT int spshm_release_fd_at(void* header, int fd, uint64_t base, int* slot, char* err,
                                     size_t errlen) {
  return release_fd(header, fd, base, slot, false, err, errlen);
}

SPSHM_EXPORT int spshm_release_fd_closing(void* header, int fd, uint64_t base, int* slot, char* err,
                                          size_t errlen) {
  return release_fd(header, fd, base, slot, true, err, errlen);
}

SPSHM_EXPORT int spshm_process_start_time(uint32_t pid, uint64_t* out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (out == nullptr) return fail(Errc::invalid_argument, "out pointer is NULL", err, errlen);
    auto r = spshm::process_start_time(pid);
    if (!r) return fail(r.error(), err, errlen);
    *out = *r;
    return succeed(err, errlen);
  });
}

SPSHM_EXPORT int spshm_install_fault_guard(const char* segment_dir, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (segment_dir == nullptr || segment_dir[0] != '/')
      return fail(Errc::invalid_argument, "segment_dir must be an absolute path", err, errlen);
    if (!spshm::platform::install_fault_guard())
      return fail(Errc::io_error, "sigaction(SIGBUS) failed", err, errlen);
    spshm::platform::set_fault_segment_dir(segment_dir);
    return succeed(err, errlen);
  });
}

SPSHM_EXPORT int spshm_decrypt(const void* header, const uint8_t* data, uint64_t data_len,
                               const uint8_t* key, uint64_t offset, uint8_t* out, uint64_t length,
                               char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    HeaderCopy copy(header);
    const RegionHeader& h = copy.get();
    if (auto r = check_crypto_call(h, data, data_len, key, offset, out, length); !r)
      return fail(r.error(), err, errlen);
    spshm::crypto::Binding binding{h.region_id, h.data_size};
    return from(spshm::crypto::decrypt(binding, key, data, offset, out, length), err, errlen);
  });
}

SPSHM_EXPORT int spshm_encrypt(const void* header, uint8_t* data, uint64_t data_len,
                               const uint8_t* key, uint64_t offset, const uint8_t* in,
                               uint64_t length, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (auto r = looks_like_header(header); !r) return fail(r.error(), err, errlen);
    HeaderCopy copy(header);
    const RegionHeader& h = copy.get();
    if (auto r = check_crypto_call(h, data, data_len, key, offset, in, length); !r)
      return fail(r.error(), err, errlen);
    uint32_t state =
        static_cast<const RegionHeader*>(header)->state.load(std::memory_order_acquire);
    if (state & spshm::kStateDeallocated)
      return fail(Errc::deallocated, "the region has been deallocated", err, errlen);
    if (state & spshm::kStateSealed)
      return fail(Errc::sealed, "the region is sealed: it can only be read", err, errlen);
    spshm::crypto::Binding binding{h.region_id, h.data_size};
    return from(spshm::crypto::encrypt(binding, key, data, offset, in, length), err, errlen);
  });
}

namespace {

#if defined(__linux__)
/// A new O_CLOEXEC descriptor of the memfd behind "/proc/<pid>/fd/<n>" (our own pid).
int dup_of_proc_path(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return -1;
  char* end = nullptr;
  long n = std::strtol(path.c_str() + slash + 1, &end, 10);
  if (end == nullptr || *end != '\0' || n < 0) return -1;
  return ::fcntl(static_cast<int>(n), F_DUPFD_CLOEXEC, 0);
}

void close_fd(int fd) { ::close(fd); }
#else
int dup_of_proc_path(const std::string&) { return -1; }  // memfd is Linux-only
void close_fd(int) {}
#endif

}  // namespace

SPSHM_EXPORT int spshm_create(uint64_t size, int backend, const char* metadata_json,
                              uint64_t idle_timeout_ns, char* region_id, int* control_fd,
                              int* data_fd, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (region_id == nullptr || control_fd == nullptr || data_fd == nullptr)
      return fail(Errc::invalid_argument, "region_id, control_fd and data_fd must not be NULL", err,
                  errlen);
    *control_fd = -1;
    *data_fd = -1;
    region_id[0] = '\0';
    if (size == 0) return fail(Errc::invalid_argument, "size must be > 0", err, errlen);
    spshm::CreateOptions options;
    if (backend == static_cast<int>(spshm::BackendKind::posix))
      options.backend = spshm::BackendKind::posix;
    else if (backend == static_cast<int>(spshm::BackendKind::memfd))
      options.backend = spshm::BackendKind::memfd;
    else
      return fail(Errc::invalid_argument, "backend must be 1 (posix) or 2 (memfd)", err, errlen);
#if defined(__linux__)
    if (options.backend == spshm::BackendKind::posix) {
      // Where the VM keeps its POSIX segments (config :snakepit_shm, shm_path), so that
      // it finds the output to adopt it; /dev/shm when the variable is not set.
      const char* dir = std::getenv("SNAKEPIT_SHM_PATH");
      auto moved =
          spshm::platform::set_named_dir(dir != nullptr && *dir != '\0' ? dir : "/dev/shm");
      if (!moved)
        return fail(Error{Errc::invalid_argument, moved.error().sys_errno,
                          "SNAKEPIT_SHM_PATH: " + moved.error().message +
                              " (set it to the VM's config :snakepit_shm, shm_path)"},
                    err, errlen);
    }
#endif
    options.size = size;
    options.mode = 0600;
    options.metadata_json = metadata_json != nullptr ? metadata_json : "{}";
    options.idle_timeout_ns = idle_timeout_ns;
    options.worker_output = true;  // the VM may adopt it (adopt_region/2)
    auto created = spshm::Region::create(options);
    if (!created) return fail(created.error(), err, errlen);
    spshm::Region& region = *created;
    if (options.backend == spshm::BackendKind::memfd) {
      int control = dup_of_proc_path(region.control_path());
      int data = dup_of_proc_path(region.data_path());
      if (control < 0 || data < 0) {
        if (control >= 0) close_fd(control);
        if (data >= 0) close_fd(data);
        return fail(Errc::io_error, "cannot duplicate the region's memfds (out of descriptors?)",
                    err, errlen);
      }
      *control_fd = control;
      *data_fd = data;
    } else {
      // The caller's own open of the segment, its liveness lock taken while the core's
      // open still holds its own: an orphan sweep (any VM's, whenever a peer of it
      // exits) removes whatever nobody holds, and a worker that opened the name only
      // after this returned lost its new output to it (attack run 4 D).
      auto held = spshm::platform::open_named(region.id(), spshm::platform::Access::read_only);
      spshm::Result<void> locked = held ? spshm::take_liveness_lock(*held, "segment " + region.id())
                                        : spshm::Result<void>(held.error());
      if (!locked) {
        (void)spshm::platform::unlink_named(region.id());
        return fail(locked.error(), err, errlen);
      }
      *control_fd = static_cast<int>(held->release());
    }
    copy_message(region.id(), region_id, spshm::kRegionIdCapacity);
    return succeed(err, errlen);
  });
}

// ---- status board ----

namespace {

spshm::Result<spshm::board::View> board_view(void* data, uint64_t bytes) {
  spshm::board::View view;
  switch (spshm::board::View::make(data, bytes, &view)) {
    case spshm::board::ViewStatus::ok:
      return view;
    case spshm::board::ViewStatus::bad_version:
      return Error{Errc::unsupported_version, 0, "the status board has an unknown version"};
    case spshm::board::ViewStatus::too_small:
      return Error{Errc::corrupt, 0, "the region is too small to hold a status board"};
    default:
      return Error{Errc::corrupt, 0,
                   "the region does not hold a valid status board (bad magic or geometry)"};
  }
}

}  // namespace

SPSHM_EXPORT size_t spshm_board_layout(char* buf, size_t buflen) {
  try {
    std::string layout = spshm::board::board_layout_description();
    copy_message(layout, buf, buflen);
    return layout.size();
  } catch (...) {
    if (buf != nullptr && buflen > 0) buf[0] = '\0';
    return 0;
  }
}

SPSHM_EXPORT int spshm_board_join(void* data, uint64_t bytes, const char* worker_id, size_t id_len,
                                  uint32_t pid, uint64_t start_time, uint32_t* index,
                                  uint64_t* owner, uint32_t* capacity, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (worker_id == nullptr || index == nullptr || owner == nullptr)
      return fail(Errc::invalid_argument, "NULL argument", err, errlen);
    if (id_len == 0 || id_len > spshm::board::kWorkerIdCapacity)
      return fail(Errc::invalid_argument, "worker_id must be 1 to 64 bytes", err, errlen);
    auto view = board_view(data, bytes);
    if (!view) return fail(view.error(), err, errlen);
    if (capacity != nullptr) *capacity = view->capacity();
    if (!view->join(std::string(worker_id, id_len), pid, start_time, index, owner)) {
      std::string message = "the status board is full: all " + std::to_string(view->capacity()) +
                            " slots are taken; create the board with a larger capacity";
      copy_message(message, err, errlen);
      return SPSHM_E_BOARD_FULL;
    }
    return succeed(err, errlen);
  });
}

SPSHM_EXPORT int spshm_board_join_locked(int fd, void* data, uint64_t bytes, const char* worker_id,
                                         size_t id_len, uint32_t pid, uint64_t start_time,
                                         uint32_t* index, uint64_t* owner, uint32_t* capacity,
                                         char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (worker_id == nullptr || index == nullptr || owner == nullptr || fd < 0)
      return fail(Errc::invalid_argument, "NULL argument or no descriptor", err, errlen);
    if (id_len == 0 || id_len > spshm::board::kWorkerIdCapacity)
      return fail(Errc::invalid_argument, "worker_id must be 1 to 64 bytes", err, errlen);
    auto view = board_view(data, bytes);
    if (!view) return fail(view.error(), err, errlen);
    if (capacity != nullptr) *capacity = view->capacity();
    if (!view->join_locked(std::string(worker_id, id_len), pid, start_time,
                           spshm::board::SlotLocks(fd), true, pid, index, owner)) {
      std::string message = "the status board is full: all " + std::to_string(view->capacity()) +
                            " slots are taken by live workers; create the board with a larger "
                            "capacity";
      copy_message(message, err, errlen);
      return SPSHM_E_BOARD_FULL;
    }
    return succeed(err, errlen);
  });
}

SPSHM_EXPORT int spshm_board_update(void* slot, uint64_t owner, const uint64_t* values) {
  if (slot == nullptr || values == nullptr) return SPSHM_E_INVALID_ARGUMENT;
  spshm::board::Values v;
  v.state = static_cast<uint32_t>(values[0]);
  v.queue = values[1];
  v.in_flight = values[2];
  v.memory = values[3];
  v.processed = values[4];
  v.errors = values[5];
  for (uint32_t g = 0; g < spshm::board::kGaugeCount; ++g)
    v.gauges[g] = static_cast<int64_t>(values[6 + g]);
  return spshm::board::update_slot(*static_cast<spshm::board::BoardSlot*>(slot), owner, v)
             ? SPSHM_OK
             : code_of(Errc::closed);
}

SPSHM_EXPORT int spshm_board_leave(void* data, uint64_t bytes, uint32_t index, uint64_t owner,
                                   char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    auto view = board_view(data, bytes);
    if (!view) return fail(view.error(), err, errlen);
    if (!view->leave(index, owner))
      return fail(Errc::closed, "the slot is no longer ours (left or reclaimed)", err, errlen);
    return succeed(err, errlen);
  });
}
