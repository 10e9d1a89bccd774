// The C ABI (snakepit_shm.h), called as the Python client calls it.
#include "helpers.hpp"
#include "snakepit_shm.h"

#if defined(__linux__)
#include <fcntl.h>
#endif

using namespace spshm;
using namespace spshm_test;

TEST_CASE("C error codes are the negated Errc position plus one", "[capi]") {
  REQUIRE(SPSHM_E_INVALID_ARGUMENT == -(static_cast<int>(Errc::invalid_argument) + 1));
  REQUIRE(SPSHM_E_NOT_FOUND == -(static_cast<int>(Errc::not_found) + 1));
  REQUIRE(SPSHM_E_CORRUPT == -(static_cast<int>(Errc::corrupt) + 1));
  REQUIRE(SPSHM_E_SEALED == -(static_cast<int>(Errc::sealed) + 1));
  REQUIRE(SPSHM_E_TAMPERED == -(static_cast<int>(Errc::tampered) + 1));
  REQUIRE(SPSHM_E_HOLDER_TABLE_FULL == -(static_cast<int>(Errc::holder_table_full) + 1));
  REQUIRE(SPSHM_E_IO_ERROR == -(static_cast<int>(Errc::io_error) + 1));
  REQUIRE(spshm_abi_version() == 2);
}

TEST_CASE("spshm_header_layout returns the layout and truncates safely", "[capi]") {
  std::string layout = layout_description();
  REQUIRE(spshm_header_layout(nullptr, 0) == layout.size());
  std::vector<char> buf(layout.size() + 1);
  REQUIRE(spshm_header_layout(buf.data(), buf.size()) == layout.size());
  REQUIRE(std::string(buf.data()) == layout);
  char small[10];
  REQUIRE(spshm_header_layout(small, sizeof small) == layout.size());
  REQUIRE(std::string(small) == layout.substr(0, 9));
}

TEST_CASE("spshm_validate_header and spshm_hold/release", "[capi]") {
  Region r = create_ok(options(BackendKind::memfd, 1000));
  char err[256];
  REQUIRE(spshm_validate_header(&r.header(), 1000, err, sizeof err) == SPSHM_OK);
  REQUIRE(err[0] == '\0');
  REQUIRE(spshm_validate_header(&r.header(), 999, err, sizeof err) == SPSHM_E_CORRUPT);
  REQUIRE(std::string(err).find("truncated") != std::string::npos);
  REQUIRE(spshm_validate_header(nullptr, 1, err, sizeof err) == SPSHM_E_INVALID_ARGUMENT);

  REQUIRE(spshm_hold(&r.header(), 321, 5, 1, err, sizeof err) == SPSHM_OK);
  REQUIRE(r.header().refcount.load() == 1);
  REQUIRE(holders(r.header())[0].writable);
  REQUIRE(spshm_release(&r.header(), 321, 5, err, sizeof err) == SPSHM_OK);
  REQUIRE(spshm_release(&r.header(), 321, 5, err, sizeof err) == SPSHM_E_NOT_FOUND);
  REQUIRE(std::string(err).find("321") != std::string::npos);
  REQUIRE(spshm_release(&r.header(), 321, 5, nullptr, 0) == SPSHM_E_NOT_FOUND);  // no buffer

  // Memory that is not a header is refused before anything is written to it.
  std::vector<std::uint8_t> junk(kHeaderSize, 0xAB);
  REQUIRE(spshm_hold(junk.data(), 1, 1, 0, err, sizeof err) == SPSHM_E_CORRUPT);
  REQUIRE(std::all_of(junk.begin(), junk.end(), [](std::uint8_t b) { return b == 0xAB; }));
  REQUIRE(spshm_hold(nullptr, 1, 1, 0, err, sizeof err) == SPSHM_E_INVALID_ARGUMENT);

  REQUIRE_OK(r.seal());
  REQUIRE(spshm_hold(&r.header(), 321, 5, 1, err, sizeof err) == SPSHM_E_SEALED);
}

TEST_CASE("spshm_process_start_time", "[capi]") {
  std::uint64_t t = 0;
  char err[128];
  REQUIRE(spshm_process_start_time(self_pid(), &t, err, sizeof err) == SPSHM_OK);
  REQUIRE(t == process_start_time(self_pid()).value());
  REQUIRE(spshm_process_start_time(0, &t, err, sizeof err) == SPSHM_E_NOT_FOUND);
  REQUIRE(spshm_process_start_time(self_pid(), nullptr, err, sizeof err) ==
          SPSHM_E_INVALID_ARGUMENT);
}

TEST_CASE("spshm_decrypt and spshm_encrypt interoperate with Region", "[capi][crypto]") {
  CreateOptions o = options(BackendKind::memfd, 200000);
  o.encrypted = true;
  Region r = create_ok(o);
  auto bytes = pattern(200000, 3);
  REQUIRE_OK(r.write(0, bytes.data(), bytes.size()));
  char err[256];
  std::vector<std::uint8_t> out(70000);
  REQUIRE(spshm_decrypt(&r.header(), r.data(), r.capacity(), r.key(), 65000, out.data(), out.size(),
                        err, sizeof err) == SPSHM_OK);
  REQUIRE(std::equal(out.begin(), out.end(), bytes.begin() + 65000));

  auto patch = pattern(1000, 4);
  REQUIRE(spshm_encrypt(&r.header(), r.data(), r.capacity(), r.key(), 65000, patch.data(),
                        patch.size(), err, sizeof err) == SPSHM_OK);
  std::vector<std::uint8_t> back(1000);
  REQUIRE_OK(r.read(65000, back.data(), back.size()));
  REQUIRE(back == patch);

  REQUIRE(spshm_decrypt(&r.header(), r.data(), r.capacity(), r.key(), 199999, out.data(), 2, err,
                        sizeof err) == SPSHM_E_OUT_OF_BOUNDS);
  REQUIRE(spshm_decrypt(&r.header(), r.data(), r.capacity() - 1, r.key(), 0, out.data(), 1, err,
                        sizeof err) == SPSHM_E_INVALID_ARGUMENT);
  std::uint8_t wrong[32] = {};
  REQUIRE(spshm_decrypt(&r.header(), r.data(), r.capacity(), wrong, 0, out.data(), 1, err,
                        sizeof err) == SPSHM_E_TAMPERED);
  REQUIRE(std::string(err).find("chunk 0") != std::string::npos);

  Region plain = create_ok(options(BackendKind::memfd, 100));
  REQUIRE(spshm_decrypt(&plain.header(), plain.data(), 100, r.key(), 0, out.data(), 1, err,
                        sizeof err) == SPSHM_E_INVALID_ARGUMENT);
  REQUIRE_OK(r.seal());
  REQUIRE(spshm_encrypt(&r.header(), r.data(), r.capacity(), r.key(), 0, patch.data(), 1, err,
                        sizeof err) == SPSHM_E_SEALED);
}

TEST_CASE("spshm_create makes a worker-owned region the core can open", "[capi]") {
  char err[256];
  char id[64];
  int control = -1, data = -1;
  REQUIRE(spshm_create(4096, 2, "{\"dtype\":\"uint8\"}", 0, id, &control, &data, err, sizeof err) ==
          SPSHM_OK);
  REQUIRE(control >= 0);
  REQUIRE(data >= 0);
  REQUIRE(validate_region_id(id));
  {
    // Another process would open these paths; the core's own mapping is gone.
    std::string pid = std::to_string(self_pid());
    OpenTarget target{id, "/proc/" + pid + "/fd/" + std::to_string(control),
                      "/proc/" + pid + "/fd/" + std::to_string(data)};
    auto opened = Region::open(target, true);
    REQUIRE(opened);
    REQUIRE(opened->size() == 4096);
    REQUIRE(std::string(opened->header().metadata, opened->header().metadata_length) ==
            "{\"dtype\":\"uint8\"}");
    REQUIRE(opened->header().creator_pid == self_pid());
  }
  ::close(control);
  ::close(data);

  // POSIX: reached by id; the one descriptor handed out holds the liveness lock, so no
  // sweep finds the new output unheld before the caller could lock it (attack run 4 D).
  REQUIRE(spshm_create(100, 1, nullptr, 0, id, &control, &data, err, sizeof err) == SPSHM_OK);
  REQUIRE(control >= 0);
  REQUIRE(data == -1);
  REQUIRE(sweep_segment(id, false).value() == SweepOutcome::in_use);
  REQUIRE(Region::open(OpenTarget{id, "", ""}, true));
  ::close(control);
  REQUIRE(sweep_segment(id, false).value() == SweepOutcome::removed);

  REQUIRE(spshm_create(0, 2, nullptr, 0, id, &control, &data, err, sizeof err) ==
          SPSHM_E_INVALID_ARGUMENT);
  REQUIRE(spshm_create(10, 7, nullptr, 0, id, &control, &data, err, sizeof err) ==
          SPSHM_E_INVALID_ARGUMENT);
  REQUIRE(spshm_create(10, 2, nullptr, 0, nullptr, &control, &data, err, sizeof err) ==
          SPSHM_E_INVALID_ARGUMENT);
}

#if defined(__linux__)
TEST_CASE("a worker's slot claim, release before close, and the one data lock", "[capi]") {
  char err[256];
  char id[64];
  int control = -1, data = -1;
  REQUIRE(spshm_create(4096, 2, nullptr, 0, id, &control, &data, err, sizeof err) == SPSHM_OK);
  std::string proc = "/proc/" + std::to_string(self_pid()) + "/fd/";
  int fd = ::open((proc + std::to_string(control)).c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  void* header = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  REQUIRE(header != MAP_FAILED);
  auto locked = [&](std::uint64_t byte) {
    int probe = ::open((proc + std::to_string(control)).c_str(), O_RDWR | O_CLOEXEC);
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(byte);
    fl.l_len = 1;
    REQUIRE(::fcntl(probe, F_OFD_GETLK, &fl) == 0);
    ::close(probe);
    return fl.l_type != F_UNLCK;
  };

  // A worker's claim starts at its pid's slot, away from the VM's from slot 0 on.
  const std::uint32_t pid = 4096 + 7;  // any pid: slot 7
  int slot = -1;
  REQUIRE(spshm_hold_fd(header, fd, &slot, pid, 11, 0, err, sizeof err) == SPSHM_OK);
  REQUIRE(slot == 7);
  REQUIRE(locked(kSlotLockBase + 7));
  // Released before the close: the slot is free, its lock goes with the close.
  REQUIRE(spshm_release_fd_closing(header, fd, 0, &slot, err, sizeof err) == SPSHM_OK);
  REQUIRE(static_cast<RegionHeader*>(header)->refcount.load() == 0);
  REQUIRE(holders(*static_cast<RegionHeader*>(header)).empty());
  REQUIRE(locked(kSlotLockBase + 7));
  ::munmap(header, 4096);
  ::close(fd);
  REQUIRE_FALSE(locked(kSlotLockBase + 7));

  // The data lock: shared between openers, refused while the pool holds the object.
  int reader = ::open((proc + std::to_string(data)).c_str(), O_RDONLY | O_CLOEXEC);
  int pool = ::open((proc + std::to_string(data)).c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(spshm_lock_data(reader, err, sizeof err) == SPSHM_OK);
  struct flock excl {};
  excl.l_type = F_WRLCK;
  excl.l_whence = SEEK_SET;
  excl.l_len = 1;
  REQUIRE(::fcntl(pool, F_OFD_SETLK, &excl) == -1);  // a reader holds it
  ::close(reader);
  REQUIRE(::fcntl(pool, F_OFD_SETLK, &excl) == 0);
  int late = ::open((proc + std::to_string(data)).c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(spshm_lock_data(late, err, sizeof err) == SPSHM_E_DEALLOCATED);
  REQUIRE(std::string(err).find("warm pool") != std::string::npos);
  REQUIRE(spshm_lock_data(-1, err, sizeof err) == SPSHM_E_INVALID_ARGUMENT);
  ::close(late);
  ::close(pool);
  ::close(control);
  ::close(data);
}
#endif

TEST_CASE("spshm_give_up_output loses to an adoption that came first, and wins once", "[capi]") {
  // Attack run 5 (E2): a worker's give-up and a VM's adoption must never both win.
  char err[256];
  Region given = create_ok(options(BackendKind::memfd, 64));
  REQUIRE(spshm_give_up_output(&given.header(), err, sizeof err) == 1);
  REQUIRE((given.header().state.load() & kStateDeallocated) != 0);
  REQUIRE(spshm_give_up_output(&given.header(), err, sizeof err) == 0);  // once

  Region adopted = create_ok(options(BackendKind::memfd, 64));
  adopted.header().state.fetch_or(kStateAdopted);  // what adopt_region/2's mark does
  REQUIRE(spshm_give_up_output(&adopted.header(), err, sizeof err) == 0);
  REQUIRE((adopted.header().state.load() & kStateDeallocated) == 0);

  std::vector<std::uint8_t> junk(kHeaderSize, 0xAB);
  REQUIRE(spshm_give_up_output(junk.data(), err, sizeof err) == SPSHM_E_CORRUPT);
  REQUIRE(spshm_give_up_output(nullptr, err, sizeof err) == SPSHM_E_INVALID_ARGUMENT);
}
