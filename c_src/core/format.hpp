// The on-memory format of a region: the single source of truth.
//
// Every region has a *control object* whose bytes [0, 4096) hold a RegionHeader.
// Its data lives either in the same object right after the header
// (POSIX shm, Windows, macOS: data_offset == 4096) or in a separate *data object*
// (memfd: two memfds, data_offset == 0), so that the data object can be sealed
// with F_SEAL_FUTURE_WRITE while the header stays writable for holders.
//
// docs/FORMAT.md writes this out byte by byte; the Python client mirrors it in
// snakepit_shm/_format.py; tests on the C++, Elixir and Python sides compare all
// three against layout_description() below. All integers are little-endian.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace spshm {

inline constexpr char kMagic[8] = {'S', 'P', 'S', 'H', 'M', 'H', 'D', 'R'};
inline constexpr std::uint32_t kFormatVersion = 1;
inline constexpr std::uint32_t kHeaderSize = 4096;
inline constexpr std::uint32_t kImmutableSize = 2048;  // [0, 2048) never changes after creation
inline constexpr std::uint32_t kMetadataOffset = 256;
inline constexpr std::uint32_t kMetadataCapacity = 1792;  // bytes [256, 2048)
inline constexpr std::uint32_t kHolderCapacity = 64;
inline constexpr std::uint32_t kRegionIdCapacity = 32;
inline constexpr std::uint32_t kDataNameCapacity = 40;
inline constexpr std::uint32_t kCrcCoveredPrefix = 132;  // CRC covers [0, 132) ++ metadata

// Prefix of every segment name of ours ("/spshm_..." in /dev/shm, "memfd:spshm_..." in /proc).
inline constexpr char kNamePrefix[] = "spshm_";
// Longest segment name including the leading '/' (macOS allows 31 bytes with the NUL).
inline constexpr std::size_t kMaxSegmentNameLength = 30;

// Byte ranges of the control object used as open file description locks (Linux
// F_OFD_SETLK; docs/FORMAT.md "Locks"). Locks may lie beyond the end of the object and
// never touch its bytes.
//   byte 0: liveness. Every user (creator, opener, Python attach) holds a shared lock for
//           as long as it uses the region; a sweeper removes a segment only after taking
//           it exclusively (or seeing it free with F_OFD_GETLK).
//   bytes [1, 256): reserved for other protocols (#11: encrypted single writer).
//   byte kSlotLockBase + i: holder slot i. The open that owns slot i holds it
//           exclusively while the slot is claimed; a slot whose lock nobody holds is dead
//           and may be recovered by anyone who takes its lock.
inline constexpr std::uint64_t kLivenessLockByte = 0;
inline constexpr std::uint64_t kSlotLockBase = 256;

// Encrypted layout: each chunk of up to kChunkSize plaintext bytes is stored as
// nonce (24) || ciphertext || tag (16), chunk i at offset i * (kChunkSize + kChunkOverhead).
inline constexpr std::uint32_t kChunkSize = 65536;
inline constexpr std::uint32_t kNonceSize = 24;
inline constexpr std::uint32_t kTagSize = 16;
inline constexpr std::uint32_t kChunkOverhead = kNonceSize + kTagSize;
inline constexpr std::uint32_t kKeySize = 32;

enum class BackendKind : std::uint32_t {
  posix = 1,    ///< named POSIX shm object (shm_open), header and data in one object
  memfd = 2,    ///< two anonymous memfds (control + data), reached through /proc/<pid>/fd
  windows = 3,  ///< Windows named file mapping in the Local\ namespace
};

enum class CipherKind : std::uint32_t {
  none = 0,
  xchacha20poly1305_chunks = 1,  ///< per-chunk XChaCha20-Poly1305-IETF, AAD = id || index || size
};

// Immutable flags (set at creation, covered by the CRC).
inline constexpr std::uint32_t kFlagEncrypted = 1u << 0;
inline constexpr std::uint32_t kFlagNamed = 1u << 1;
inline constexpr std::uint32_t kFlagSplitData = 1u << 2;
/// Every user of this region holds the liveness lock (byte 0): a sweeper may trust the
/// lock alone. Regions written without it (by an older version) are judged by their
/// creator's PID and start time, as that version did.
inline constexpr std::uint32_t kFlagLivenessLocks = 1u << 4;
/// Created by a worker through the C API (snakepit_shm.allocate): the only regions a VM
/// may adopt (adopt_region/2); a VM's own regions never carry it.
inline constexpr std::uint32_t kFlagWorkerOutput = 1u << 3;
/// A small region carved out of an arena (docs/FORMAT.md, "Arenas"): backend memfd, the
/// header is a control block at some page-aligned offset of an arena memfd, the data
/// follows it (data_offset 4096, relative to the control block), and every lock byte of
/// the region is shifted by the control block's offset.
inline constexpr std::uint32_t kFlagArena = 1u << 5;
/// The data memfd lives on hugetlbfs (MFD_HUGETLB): its size is a multiple of the huge
/// page size, and every mapping of it must be too (munmap refuses other lengths), so
/// openers map the whole data object.
inline constexpr std::uint32_t kFlagHugePages = 1u << 7;

// Mutable state bits (RegionHeader::state).
inline constexpr std::uint32_t kStateSealed = 1u << 0;
inline constexpr std::uint32_t kStateDeallocated = 1u << 1;
/// A seal is being committed: writers that honour the header refuse (busy). Cleared when
/// the seal commits (kStateSealed set) or fails. kStateSealed is set only once the seal
/// is committed (memfd: after the kernel accepted F_SEAL_WRITE), and never cleared.
inline constexpr std::uint32_t kStateSealing = 1u << 2;

/// A VM took over a region a worker created (adopt_region/2): the creator may drop it.
inline constexpr std::uint32_t kStateAdopted = 1u << 3;

/// Byte of the control object whose advisory lock (Linux OFD lock) serialises access to
/// the data of an encrypted region across processes: writers lock it exclusively,
/// readers shared, both without waiting (busy on conflict). The kernel drops the lock of
/// a process that dies. (Byte 0 and other ranges are left to other protocols.)
inline constexpr std::uint64_t kDataLockByte = 1;

/// Byte of the control object (shifted by an arena chunk's offset, like every lock byte)
/// that a sealer holds exclusively (Linux OFD lock, taken without waiting) from before it
/// sets kStateSealing until after it clears it (or sets kStateSealed): so a kStateSealing
/// bit whose seal lock another open obtains was left by a sealer that died mid-seal, and
/// that open may clear it (seal_lock.cpp). docs/FORMAT.md, "Locks" and "Sealing".
inline constexpr std::uint64_t kSealLockByte = 2;

// Holder slot states.
inline constexpr std::uint32_t kSlotFree = 0;
inline constexpr std::uint32_t kSlotBusy = 1;  // being claimed or released
inline constexpr std::uint32_t kSlotLive = 2;

// Holder flags.
inline constexpr std::uint32_t kHolderWritable = 1u << 0;

struct HolderSlot {
  std::atomic<std::uint32_t> slot_state;  ///< kSlotFree / kSlotBusy / kSlotLive
  std::uint32_t pid;                      ///< OS pid of the holding process
  std::uint64_t start_time;               ///< /proc/<pid>/stat field 22 (clock ticks since boot)
  std::atomic<std::uint32_t> count;       ///< holds of this process on the region
  std::atomic<std::uint32_t> flags;       ///< kHolderWritable if any of its holds is read-write
};

struct RegionHeader {
  // ---- immutable part, [0, 2048) ----
  char magic[8];                     // 0
  std::uint32_t format_version;      // 8
  std::uint32_t header_size;         // 12
  std::uint64_t data_size;           // 16  bytes usable by the user (plaintext size)
  std::uint64_t data_capacity;       // 24  bytes of the data object in use (ciphertext layout)
  std::uint64_t data_offset;         // 32  where data starts in the data object
  std::uint32_t backend;             // 40  BackendKind
  std::uint32_t flags;               // 44  kFlag*
  std::uint32_t creator_pid;         // 48
  std::uint32_t security_level;      // 52  0 standard, 1 high, 2 maximum
  std::uint64_t creator_start_time;  // 56
  std::uint8_t boot_id[16];          // 64  /proc/sys/kernel/random/boot_id as bytes
  std::uint64_t created_at_ns;       // 80  CLOCK_REALTIME
  std::uint32_t cipher;              // 88  CipherKind
  std::uint32_t chunk_size;          // 92  plaintext bytes per chunk (0 when not encrypted)
  char region_id[32];                // 96  ASCII, NUL padded
  std::uint32_t metadata_length;     // 128
  std::uint32_t header_crc32;        // 132 zlib CRC-32 of [0,132) ++ metadata[0, metadata_length)
  char data_name[40];                // 136 name of the data memfd when not region_id + ".data"
                                     //     (a reused pooled object), NUL padded; else zero
  std::uint8_t reserved0[80];        // 176 zero
  char metadata[1792];               // 256 UTF-8 JSON object, zero padded
  // ---- mutable part, [2048, 4096) ----
  std::atomic<std::uint32_t> state;            // 2048 kState*
  std::atomic<std::uint32_t> refcount;         // 2052 sum of all holds (BEAM mappings + OS holders)
  std::atomic<std::uint64_t> last_access_ns;   // 2056 CLOCK_REALTIME of the last map/read/write
  std::atomic<std::uint64_t> idle_timeout_ns;  // 2064 0 = never expires
  std::uint32_t holder_capacity;               // 2072 kHolderCapacity
  std::atomic<std::uint32_t> holders_generation;  // 2076 bumped on every holder change
  HolderSlot holders[kHolderCapacity];            // 2080, 24 bytes each
  std::uint8_t reserved1[480];                    // 3616 zero
};

static_assert(sizeof(std::atomic<std::uint32_t>) == 4 && sizeof(std::atomic<std::uint64_t>) == 8);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(sizeof(HolderSlot) == 24);
static_assert(offsetof(RegionHeader, format_version) == 8);
static_assert(offsetof(RegionHeader, header_size) == 12);
static_assert(offsetof(RegionHeader, data_size) == 16);
static_assert(offsetof(RegionHeader, data_capacity) == 24);
static_assert(offsetof(RegionHeader, data_offset) == 32);
static_assert(offsetof(RegionHeader, backend) == 40);
static_assert(offsetof(RegionHeader, flags) == 44);
static_assert(offsetof(RegionHeader, creator_pid) == 48);
static_assert(offsetof(RegionHeader, security_level) == 52);
static_assert(offsetof(RegionHeader, creator_start_time) == 56);
static_assert(offsetof(RegionHeader, boot_id) == 64);
static_assert(offsetof(RegionHeader, created_at_ns) == 80);
static_assert(offsetof(RegionHeader, cipher) == 88);
static_assert(offsetof(RegionHeader, chunk_size) == 92);
static_assert(offsetof(RegionHeader, region_id) == 96);
static_assert(offsetof(RegionHeader, metadata_length) == 128);
static_assert(offsetof(RegionHeader, header_crc32) == kCrcCoveredPrefix);
static_assert(offsetof(RegionHeader, data_name) == 136);
static_assert(offsetof(RegionHeader, reserved0) == 176);
static_assert(offsetof(RegionHeader, metadata) == kMetadataOffset);
static_assert(offsetof(RegionHeader, state) == kImmutableSize);
static_assert(offsetof(RegionHeader, refcount) == 2052);
static_assert(offsetof(RegionHeader, last_access_ns) == 2056);
static_assert(offsetof(RegionHeader, idle_timeout_ns) == 2064);
static_assert(offsetof(RegionHeader, holder_capacity) == 2072);
static_assert(offsetof(RegionHeader, holders_generation) == 2076);
static_assert(offsetof(RegionHeader, holders) == 2080);
static_assert(offsetof(RegionHeader, reserved1) == 3616);
static_assert(sizeof(RegionHeader) == kHeaderSize);

// A JSON object naming every constant, field offset and size above. It is what the
// Elixir (Native.header_layout/0) and Python (capi spshm_header_layout) tests compare
// their own constants and docs/FORMAT.md against.
std::string layout_description();

}  // namespace spshm
