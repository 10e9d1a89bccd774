// The on-memory format: layout description, CRC, header creation and validation.
#include <atomic>
#include <cstddef>
#include <cstring>
#include <string>
#include <string_view>

#include "crypto.hpp"
#include "guard.hpp"
#include "header.hpp"
#include "ids.hpp"
#include "platform.hpp"
#include "region.hpp"

namespace spshm {

// ---- layout_description ----

namespace {

struct FieldDesc {
  const char* name;
  std::size_t offset;
  std::size_t size;
  const char* type;
};

#define SPSHM_HEADER_FIELD(field, type) \
  FieldDesc { #field, offsetof(RegionHeader, field), sizeof(RegionHeader::field), type }
#define SPSHM_HOLDER_FIELD(field, type) \
  FieldDesc { #field, offsetof(HolderSlot, field), sizeof(HolderSlot::field), type }

const FieldDesc kHeaderFields[] = {
    SPSHM_HEADER_FIELD(magic, "char[8]"),
    SPSHM_HEADER_FIELD(format_version, "u32"),
    SPSHM_HEADER_FIELD(header_size, "u32"),
    SPSHM_HEADER_FIELD(data_size, "u64"),
    SPSHM_HEADER_FIELD(data_capacity, "u64"),
    SPSHM_HEADER_FIELD(data_offset, "u64"),
    SPSHM_HEADER_FIELD(backend, "u32"),
    SPSHM_HEADER_FIELD(flags, "u32"),
    SPSHM_HEADER_FIELD(creator_pid, "u32"),
    SPSHM_HEADER_FIELD(security_level, "u32"),
    SPSHM_HEADER_FIELD(creator_start_time, "u64"),
    SPSHM_HEADER_FIELD(boot_id, "u8[16]"),
    SPSHM_HEADER_FIELD(created_at_ns, "u64"),
    SPSHM_HEADER_FIELD(cipher, "u32"),
    SPSHM_HEADER_FIELD(chunk_size, "u32"),
    SPSHM_HEADER_FIELD(region_id, "char[32]"),
    SPSHM_HEADER_FIELD(metadata_length, "u32"),
    SPSHM_HEADER_FIELD(header_crc32, "u32"),
    SPSHM_HEADER_FIELD(data_name, "char[40]"),
    SPSHM_HEADER_FIELD(reserved0, "u8[80]"),
    SPSHM_HEADER_FIELD(metadata, "char[1792]"),
    SPSHM_HEADER_FIELD(state, "atomic u32"),
    SPSHM_HEADER_FIELD(refcount, "atomic u32"),
    SPSHM_HEADER_FIELD(last_access_ns, "atomic u64"),
    SPSHM_HEADER_FIELD(idle_timeout_ns, "atomic u64"),
    SPSHM_HEADER_FIELD(holder_capacity, "u32"),
    SPSHM_HEADER_FIELD(holders_generation, "atomic u32"),
    SPSHM_HEADER_FIELD(holders, "HolderSlot[64]"),
    SPSHM_HEADER_FIELD(reserved1, "u8[480]"),
};

const FieldDesc kHolderFields[] = {
    SPSHM_HOLDER_FIELD(slot_state, "atomic u32"), SPSHM_HOLDER_FIELD(pid, "u32"),
    SPSHM_HOLDER_FIELD(start_time, "u64"),        SPSHM_HOLDER_FIELD(count, "atomic u32"),
    SPSHM_HOLDER_FIELD(flags, "atomic u32"),
};

#undef SPSHM_HEADER_FIELD
#undef SPSHM_HOLDER_FIELD

class JsonObject {
 public:
  explicit JsonObject(std::string& out) : out_(out) { out_ += '{'; }
  ~JsonObject() { out_ += '}'; }
  JsonObject(const JsonObject&) = delete;
  JsonObject& operator=(const JsonObject&) = delete;

  void number(const char* key, std::uint64_t value) {
    this->key(key);
    out_ += std::to_string(value);
  }
  void string(const char* key, const std::string& value) {
    this->key(key);
    out_ += '"';
    out_ += value;  // only identifiers and constants of ours: nothing to escape
    out_ += '"';
  }
  /// Starts a nested object under `key`; the caller creates a JsonObject right after.
  void key(const char* key) {
    if (!first_) out_ += ',';
    first_ = false;
    out_ += '"';
    out_ += key;
    out_ += "\":";
  }

 private:
  std::string& out_;
  bool first_ = true;
};

void describe_fields(JsonObject& parent, std::string& out, const FieldDesc* begin,
                     const FieldDesc* end) {
  parent.key("fields");
  JsonObject fields(out);
  for (const FieldDesc* f = begin; f != end; ++f) {
    fields.key(f->name);
    JsonObject field(out);
    field.number("offset", f->offset);
    field.number("size", f->size);
    field.string("type", f->type);
  }
}

}  // namespace

std::string layout_description() {
  std::string out;
  out.reserve(4096);
  {
    JsonObject root(out);
    root.string("magic", std::string(kMagic, sizeof kMagic));
    root.number("format_version", kFormatVersion);
    root.number("header_size", kHeaderSize);
    root.number("immutable_size", kImmutableSize);
    root.number("metadata_offset", kMetadataOffset);
    root.number("metadata_capacity", kMetadataCapacity);
    root.number("holder_capacity", kHolderCapacity);
    root.number("region_id_capacity", kRegionIdCapacity);
    root.number("crc_covered_prefix", kCrcCoveredPrefix);
    root.string("name_prefix", kNamePrefix);
    root.number("max_segment_name_length", kMaxSegmentNameLength);
    root.number("chunk_size", kChunkSize);
    root.number("nonce_size", kNonceSize);
    root.number("tag_size", kTagSize);
    root.number("chunk_overhead", kChunkOverhead);
    root.number("key_size", kKeySize);
    root.number("posix_data_offset", kHeaderSize);
    root.number("memfd_data_offset", 0);
    root.number("arena_data_offset", kHeaderSize);
    root.number("aad_size", crypto::kAadSize);
    root.number("data_lock_byte", kDataLockByte);
    root.number("seal_lock_byte", kSealLockByte);
    {
      root.key("backends");
      JsonObject o(out);
      o.number("posix", static_cast<std::uint32_t>(BackendKind::posix));
      o.number("memfd", static_cast<std::uint32_t>(BackendKind::memfd));
      o.number("windows", static_cast<std::uint32_t>(BackendKind::windows));
    }
    {
      root.key("ciphers");
      JsonObject o(out);
      o.number("none", static_cast<std::uint32_t>(CipherKind::none));
      o.number("xchacha20poly1305_chunks",
               static_cast<std::uint32_t>(CipherKind::xchacha20poly1305_chunks));
    }
    {
      root.key("flags");
      JsonObject o(out);
      o.number("encrypted", kFlagEncrypted);
      o.number("named", kFlagNamed);
      o.number("split_data", kFlagSplitData);
      o.number("worker_output", kFlagWorkerOutput);
      o.number("liveness_locks", kFlagLivenessLocks);
      o.number("arena", kFlagArena);
      o.number("huge_pages", kFlagHugePages);
    }
    {
      root.key("states");
      JsonObject o(out);
      o.number("sealed", kStateSealed);
      o.number("deallocated", kStateDeallocated);
      o.number("sealing", kStateSealing);
      o.number("adopted", kStateAdopted);
    }
    {
      root.key("slot_states");
      JsonObject o(out);
      o.number("free", kSlotFree);
      o.number("busy", kSlotBusy);
      o.number("live", kSlotLive);
    }
    {
      root.key("holder_flags");
      JsonObject o(out);
      o.number("writable", kHolderWritable);
      o.number("incarnation_mask", 0xFFFFFF00u);
    }
    describe_fields(root, out, std::begin(kHeaderFields), std::end(kHeaderFields));
    {
      root.key("holder");
      JsonObject holder(out);
      holder.number("size", sizeof(HolderSlot));
      describe_fields(holder, out, std::begin(kHolderFields), std::end(kHolderFields));
    }
  }
  return out;
}

// ---- CRC-32 (zlib: reflected polynomial 0xEDB88320, init and final xor 0xFFFFFFFF) ----

namespace {

struct CrcTable {
  std::uint32_t entries[256];
  constexpr CrcTable() : entries{} {
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
      entries[i] = c;
    }
  }
};
constexpr CrcTable kCrcTable;

}  // namespace

std::uint32_t crc32(const void* data, std::size_t length, std::uint32_t seed) noexcept {
  const auto* p = static_cast<const std::uint8_t*>(data);
  std::uint32_t c = seed ^ 0xFFFFFFFFu;
  for (std::size_t i = 0; i < length; ++i) c = kCrcTable.entries[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

namespace {

std::uint32_t crc_of(const std::uint8_t* prefix, const RegionHeader& header) noexcept {
  std::uint32_t length = header.metadata_length;
  if (length > kMetadataCapacity) length = kMetadataCapacity;
  return crc32(header.metadata, length, crc32(prefix, kCrcCoveredPrefix));
}

}  // namespace

std::uint32_t header_crc(const RegionHeader& header) noexcept {
  return crc_of(reinterpret_cast<const std::uint8_t*>(&header), header);
}

// ---- creation ----

void init_header(RegionHeader& h, const HeaderInit& init) {
  std::memset(static_cast<void*>(&h), 0, sizeof h);
  h.format_version = kFormatVersion;
  h.header_size = kHeaderSize;
  h.data_size = init.data_size;
  h.data_capacity = init.data_capacity;
  h.data_offset = init.data_offset;
  h.backend = static_cast<std::uint32_t>(init.backend);
  h.flags = init.flags;
  h.creator_pid = platform::current_pid();
  h.security_level = init.security_level;
  auto start = process_start_time(h.creator_pid);
  h.creator_start_time = start ? *start : 0;
  auto boot = platform::boot_id();
  std::memcpy(h.boot_id, boot.data(), boot.size());
  h.created_at_ns = platform::realtime_ns();
  bool encrypted = (init.flags & kFlagEncrypted) != 0;
  h.cipher = static_cast<std::uint32_t>(encrypted ? CipherKind::xchacha20poly1305_chunks
                                                  : CipherKind::none);
  h.chunk_size = encrypted ? kChunkSize : 0;
  std::memcpy(h.region_id, init.region_id.data(),
              std::min<std::size_t>(init.region_id.size(), kRegionIdCapacity));
  std::memcpy(h.data_name, init.data_name.data(),
              std::min<std::size_t>(init.data_name.size(), kDataNameCapacity - 1));
  h.metadata_length = static_cast<std::uint32_t>(init.metadata_json.size());
  std::memcpy(h.metadata, init.metadata_json.data(),
              std::min<std::size_t>(init.metadata_json.size(), kMetadataCapacity));
  h.last_access_ns.store(h.created_at_ns, std::memory_order_relaxed);
  h.idle_timeout_ns.store(init.idle_timeout_ns, std::memory_order_relaxed);
  h.holder_capacity = kHolderCapacity;
}

void publish_header(RegionHeader& h) noexcept {
  std::uint8_t prefix[kCrcCoveredPrefix];
  std::memcpy(prefix, &h, sizeof prefix);
  std::memcpy(prefix, kMagic, sizeof kMagic);
  h.header_crc32 = crc_of(prefix, h);
  std::atomic_thread_fence(std::memory_order_release);
  std::memcpy(h.magic, kMagic, sizeof kMagic);
}

bool header_published(const RegionHeader& h) noexcept {
  char magic[sizeof kMagic];
  std::memcpy(magic, h.magic, sizeof magic);
  std::atomic_thread_fence(std::memory_order_acquire);
  for (char c : magic)
    if (c != 0) return true;
  return false;
}

// ---- validation ----

namespace {

Error corrupt(const RegionHeader& h, const std::string& what) {
  std::string id(h.region_id, strnlen(h.region_id, kRegionIdCapacity));
  std::string message = "corrupt region header";
  if (!id.empty() && validate_region_id(id)) message += " of " + id;
  message += ": " + what +
             " (the segment was damaged or written by something else: deallocate it, or "
             "remove it with `mix snakepit.shm.cleanup`)";
  return Error{Errc::corrupt, 0, std::move(message)};
}

bool all_zero(const void* data, std::size_t length) noexcept {
  const auto* p = static_cast<const std::uint8_t*>(data);
  for (std::size_t i = 0; i < length; ++i)
    if (p[i] != 0) return false;
  return true;
}

// data_name: all zero, or "spshm_" + [a-z2-7]{20} + ".data" then zeros (a pooled data
// memfd keeps the name it was created with: the header says which one belongs to it).
Result<void> validate_data_name(const RegionHeader& h) {
  std::size_t length = strnlen(h.data_name, kDataNameCapacity);
  if (length == kDataNameCapacity) return corrupt(h, "data_name is not NUL terminated");
  if (!all_zero(h.data_name + length, kDataNameCapacity - length))
    return corrupt(h, "data_name padding is not zero");
  if (length == 0) return {};
  std::string name(h.data_name, length);
  constexpr std::string_view suffix = ".data";
  bool ok = name.size() > suffix.size() &&
            name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0 &&
            validate_region_id(name.substr(0, name.size() - suffix.size())).ok();
  if (!ok) return corrupt(h, "data_name is not the name of a data memfd of ours");
  return {};
}

Result<void> validate_identity(const RegionHeader& h) {
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0)
    return Error{Errc::corrupt, 0,
                 "not a snakepit_shm header (bad magic): the object was not created by "
                 "snakepit_shm, or its creator died before finishing it"};
  if (h.format_version > kFormatVersion)
    return Error{Errc::unsupported_version, 0,
                 "region header has format version " + std::to_string(h.format_version) +
                     ", newer than the " + std::to_string(kFormatVersion) +
                     " this build understands: upgrade snakepit_shm"};
  if (h.format_version == 0) return corrupt(h, "format_version is 0");
  if (h.header_size != kHeaderSize)
    return corrupt(h, "header_size is " + std::to_string(h.header_size) + ", expected " +
                          std::to_string(kHeaderSize));
  if (h.holder_capacity != kHolderCapacity)
    return corrupt(h, "holder_capacity is " + std::to_string(h.holder_capacity) + ", expected " +
                          std::to_string(kHolderCapacity));
  if (!all_zero(h.reserved0, sizeof h.reserved0)) return corrupt(h, "reserved0 is not zero");
  if (auto r = validate_data_name(h); !r) return r;
  if (!all_zero(h.reserved1, sizeof h.reserved1)) return corrupt(h, "reserved1 is not zero");
  if (h.metadata_length > kMetadataCapacity)
    return corrupt(h, "metadata_length " + std::to_string(h.metadata_length) +
                          " exceeds the capacity " + std::to_string(kMetadataCapacity));
  if (!all_zero(h.metadata + h.metadata_length, kMetadataCapacity - h.metadata_length))
    return corrupt(h, "metadata padding is not zero");
  std::uint32_t crc = header_crc(h);
  if (crc != h.header_crc32)
    return corrupt(h, "header CRC mismatch (stored " + std::to_string(h.header_crc32) +
                          ", computed " + std::to_string(crc) + ")");
  return {};
}

Result<void> validate_kind(const RegionHeader& h) {
  std::string id(h.region_id, strnlen(h.region_id, kRegionIdCapacity));
  if (id.size() == kRegionIdCapacity) return corrupt(h, "region_id is not NUL-terminated");
  if (!all_zero(h.region_id + id.size(), kRegionIdCapacity - id.size()))
    return corrupt(h, "region_id padding is not zero");
  if (!validate_region_id(id)) return corrupt(h, "region_id is not a valid region id");
  bool named = id.compare(0, kNamedIdPrefixLength, kNamedIdPrefix) == 0;
  if (named != ((h.flags & kFlagNamed) != 0))
    return corrupt(h, "the named flag does not match the region id");
  if (h.flags & ~(kFlagEncrypted | kFlagNamed | kFlagSplitData | kFlagWorkerOutput |
                  kFlagLivenessLocks | kFlagArena | kFlagHugePages))
    return corrupt(h, "unknown flags " + std::to_string(h.flags));
  if (h.security_level > 2)
    return corrupt(h, "security_level " + std::to_string(h.security_level) + " is unknown");
  switch (static_cast<BackendKind>(h.backend)) {
    case BackendKind::posix:
    case BackendKind::memfd:
    case BackendKind::windows:
      break;
    default:
      return corrupt(h, "backend " + std::to_string(h.backend) + " is unknown");
  }
  bool split = (h.flags & kFlagSplitData) != 0;
  if (h.flags & kFlagArena) {
    // An arena chunk: a memfd whose data follows the control block in the same object.
    if (static_cast<BackendKind>(h.backend) != BackendKind::memfd || split ||
        (h.flags & (kFlagNamed | kFlagEncrypted | kFlagWorkerOutput)) != 0)
      return corrupt(h, "the arena flag does not match the backend or flags");
    if (h.data_offset != kHeaderSize)
      return corrupt(h, "data_offset of an arena chunk is " + std::to_string(h.data_offset) +
                            ", expected " + std::to_string(kHeaderSize));
    return {};
  }
  if (split != (static_cast<BackendKind>(h.backend) == BackendKind::memfd))
    return corrupt(h, "the split-data flag does not match the backend");
  std::uint64_t expected_offset = split ? 0 : kHeaderSize;
  if (h.data_offset != expected_offset)
    return corrupt(h, "data_offset is " + std::to_string(h.data_offset) + ", expected " +
                          std::to_string(expected_offset));
  return {};
}

Result<void> validate_sizes(const RegionHeader& h) {
  if (h.data_size == 0) return corrupt(h, "data_size is 0");
  if (h.data_size > kMaxDataSize) return corrupt(h, "data_size is implausibly large");
  bool encrypted = (h.flags & kFlagEncrypted) != 0;
  if (encrypted) {
    if (h.cipher != static_cast<std::uint32_t>(CipherKind::xchacha20poly1305_chunks))
      return corrupt(h, "encrypted region with cipher " + std::to_string(h.cipher));
    if (h.chunk_size != kChunkSize)
      return corrupt(h, "chunk_size is " + std::to_string(h.chunk_size) + ", expected " +
                            std::to_string(kChunkSize));
    if (h.data_capacity != encrypted_capacity(h.data_size))
      return corrupt(h, "data_capacity does not match the encrypted layout of data_size");
  } else {
    if (h.cipher != static_cast<std::uint32_t>(CipherKind::none) || h.chunk_size != 0)
      return corrupt(h, "unencrypted region with a cipher or chunk size");
    if (h.data_capacity != h.data_size) return corrupt(h, "data_capacity differs from data_size");
  }
  return {};
}

}  // namespace

Result<void> validate_header_fields(const RegionHeader& header) {
  if (auto r = validate_identity(header); !r) return r;
  if (auto r = validate_kind(header); !r) return r;
  return validate_sizes(header);
}

Result<void> validate_header(const RegionHeader& header, std::uint64_t data_object_size,
                             const std::string& what) {
  return guarded([&]() -> Result<void> {
    if (auto r = validate_header_fields(header); !r) {
      if (what.empty() || r.error().message.find(what) != std::string::npos) return r;
      Error e = std::move(r).error();
      e.message = what + ": " + e.message;
      return e;
    }
    // data_offset <= 4096 and data_capacity <= ~2^60 after the checks above: no overflow.
    std::uint64_t end = header.data_offset + header.data_capacity;
    if (end > data_object_size)
      return corrupt(header, "the data area ends at byte " + std::to_string(end) +
                                 " but the object holding it has only " +
                                 std::to_string(data_object_size) + " bytes (truncated or shrunk)");
    return {};
  });
}

std::string data_object_name(const RegionHeader& h) {
  std::size_t length = strnlen(h.data_name, kDataNameCapacity);
  if (length > 0 && length < kDataNameCapacity) return std::string(h.data_name, length);
  return std::string(h.region_id, strnlen(h.region_id, kRegionIdCapacity)) + ".data";
}

}  // namespace spshm
