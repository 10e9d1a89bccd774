// The runtime index: one entry per live region in a per-user 0700 directory, so that a
// worker finds a region by its bare id with one readlink instead of a scan of every
// process's /proc/<pid>/fd (docs/FORMAT.md, "Runtime index").
//
// The directory is the subdirectory pidns-<inode of this PID namespace> of the base
// $SNAKEPIT_SHM_RUNTIME_DIR, else $XDG_RUNTIME_DIR/snakepit_shm, else
// /dev/shm/snakepit_shm-<euid> (tmpfs: publishing never waits for a disk, so it may run on
// a normal scheduler); base and subdirectory are used only while each is a real directory
// owned by this user with no group/other permission (never a symlink), and is never trusted
// further: an entry only says where to look, and the reader checks the memfd link name and the
// header's region id after opening. Everything here is best effort: without the
// directory (read-only /tmp, another user's directory, ...) no entry is written and
// workers fall back to the /proc scan.
//
// An entry is a symbolic link named after the region id whose target is the text
//   "spshm1 <kind> <control path> <data path> <offset> <size>"
// (never a path to follow): kind "memfd" (a dedicated memfd pair, offset 0) or "arena"
// (a region carved from a shared arena file at <offset>). One symlinkat to publish and
// one unlinkat to remove: no file to open, write and close.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace spshm::runtime_index {

struct Entry {
  std::string kind;          ///< "memfd" or "arena"
  std::string control_path;  ///< what to open for the header / control block
  std::string data_path;     ///< what to open for the data (same as control for an arena)
  std::uint64_t offset = 0;  ///< where the region starts in its object
  std::uint64_t size = 0;    ///< its data size in bytes
};

/// The entry's text (the symlink target).
std::string format(const Entry& entry);

/// The base directory: $SNAKEPIT_SHM_RUNTIME_DIR if absolute, else
/// $XDG_RUNTIME_DIR/snakepit_shm, else /dev/shm/snakepit_shm-<euid> ("" off Linux).
std::string base_directory();
/// The subdirectory of the base that holds the entries of one PID namespace (the naming
/// rule, docs/FORMAT.md "Runtime index"): "pidns-<inode>" from the link text
/// "pid:[<inode>]" of /proc/self/ns/pid; "" for any other text. Entries name
/// /proc/<pid>/fd/<n> paths, which mean something only in the PID namespace of their
/// VM: VMs of one user in different namespaces (docker --ipc=container:, pods) sharing
/// the base each list and sweep only their own subdirectory.
std::string namespace_dir_name_of(const std::string& link_text);
/// namespace_dir_name_of(readlink("/proc/self/ns/pid")); "" if unreadable (index off).
std::string namespace_dir_name();

/// The directory in use (base_directory() + "/" + namespace_dir_name()), or "" when the
/// index is off (either not ours, not 0700, uncreatable; the namespace unnamed).
std::string directory();

/// Writes the entry of `region_id` (replacing a stale one). False when not written.
bool publish(const std::string& region_id, const Entry& entry) noexcept;

/// Removes the entry of `region_id` if there is one. Never fails.
void remove(const std::string& region_id) noexcept;

struct SweepResult {
  std::size_t kept = 0;
  std::size_t removed = 0;
};

/// Removes the entries whose memfd no longer exists under the path they name (their VM
/// exited or freed the region without removing it, e.g. kill -9), and anything in the
/// directory that is not an entry of ours.
SweepResult sweep() noexcept;

// Arena regions (runtime_index_writer.cpp): their entries are written by a background
// thread, so that creating or freeing a small region pays no system call for the index.
// An entry may appear a few milliseconds after the region (a lookup before that scans),
// and a region freed before its entry was written never gets one.

/// Queues the entry of an arena region: chunk at `offset` of the arena open as `arena_fd`
/// in this process, `size` data bytes.
void publish_arena_later(const std::string& region_id, int arena_fd, std::uint64_t offset,
                         std::uint64_t size) noexcept;

/// Queues the removal of an arena region's entry (or drops its entry not written yet).
void remove_later(const std::string& region_id) noexcept;

/// Waits until everything queued is written (tests, benchmarks). False on timeout.
bool flush(std::chrono::milliseconds timeout) noexcept;

/// Stops and joins the writer (NIF unload; also at exit). What is still queued is left
/// to the next sweep. Publishing later starts it again.
void stop_writer() noexcept;

/// The entry a region publishes while it lives, removed on remove() or destruction.
class Published {
 public:
  Published() noexcept = default;
  Published(const Published&) = delete;
  Published& operator=(const Published&) = delete;
  ~Published() { remove(); }
  void publish(const std::string& region_id, const Entry& entry) noexcept;
  void remove() noexcept;

 private:
  char id_[40] = {};  ///< the published id ("" when none): no allocation on removal
};

}  // namespace spshm::runtime_index
