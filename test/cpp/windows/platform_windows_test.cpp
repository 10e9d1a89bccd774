// platform_windows*.cpp: the OS layer on Windows, called directly.
#include <algorithm>
#include <cstring>

#include "win_test.hpp"

using namespace spshm;
using namespace spshm_test;
using namespace spshm_wintest;
namespace pf = spshm::platform;

namespace {

constexpr std::uint64_t kSize = 3 * 65536;

/// A fresh random id: nothing of that name exists.
std::string fresh_id() { return random_region_id(); }

pf::Handle create_ok(const std::string& id, std::uint32_t mode = 0600, std::uint64_t size = kSize) {
  auto h = pf::create_named(id, mode, size);
  INFO((h ? std::string() : h.error().message));
  REQUIRE(h.ok());
  return std::move(h).value();
}

bool listed(const std::string& id) {
  auto ids = pf::list_named();
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

}  // namespace

TEST_CASE("create_named is exclusive and the object lives while a handle does", "[windows]") {
  std::string id = fresh_id();
  {
    pf::Handle h = create_ok(id);
    REQUIRE_ERR(pf::create_named(id, 0600, kSize), Errc::already_exists);
    REQUIRE_ERR(pf::create_named(id, 0600, 2 * kSize), Errc::already_exists);
    REQUIRE(listed(id));
    auto opened = pf::open_named(id, pf::Access::read_write);
    REQUIRE_OK(opened);
    // unlink_named cannot remove anything on Windows: the name stays while handles exist.
    REQUIRE_OK(pf::unlink_named(id));
    REQUIRE_OK(pf::open_named(id, pf::Access::read_only));
  }
  // Last handle closed: the object, its name and its memory are gone.
  REQUIRE_FALSE(listed(id));
  REQUIRE_ERR(pf::open_named(id, pf::Access::read_only), Errc::not_found);
  REQUIRE_ERR(pf::unlink_named(id), Errc::not_found);
}

TEST_CASE("a region's DACL names the current user only, who also owns it", "[windows][security]") {
  std::string id = fresh_id();
  pf::Handle h = create_ok(id);
  PSID owner = nullptr;
  PACL dacl = nullptr;
  PSECURITY_DESCRIPTOR sd = nullptr;
  REQUIRE(::GetSecurityInfo(pf::win::handle_of(h), SE_KERNEL_OBJECT,
                            OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION, &owner, nullptr,
                            &dacl, nullptr, &sd) == ERROR_SUCCESS);
  auto user = pf::win::current_user_sid();
  REQUIRE_OK(user);
  REQUIRE(dacl != nullptr);  // a NULL DACL would let everyone in
  REQUIRE(dacl->AceCount == 1);
  void* ace = nullptr;
  REQUIRE(::GetAce(dacl, 0, &ace));
  REQUIRE(static_cast<ACE_HEADER*>(ace)->AceType == ACCESS_ALLOWED_ACE_TYPE);
  auto* allowed = static_cast<ACCESS_ALLOWED_ACE*>(ace);
  REQUIRE(::EqualSid(reinterpret_cast<PSID>(&allowed->SidStart), user->data()));
  REQUIRE((allowed->Mask & FILE_MAP_WRITE) == FILE_MAP_WRITE);
  REQUIRE(::EqualSid(owner, user->data()));
  ::LocalFree(sd);

  auto info = pf::stat(h, id);
  REQUIRE_OK(info);
  REQUIRE(info->owned_by_us);
  REQUIRE(info->regular);
  REQUIRE(info->mode == 0600);
  REQUIRE(info->size == kSize);
}

TEST_CASE("modes: owner-only, and a read-only DACL refuses writable opens", "[windows][security]") {
  REQUIRE_ERR(pf::create_named(fresh_id(), 0660, kSize), Errc::invalid_argument);
  REQUIRE_ERR(pf::create_named(fresh_id(), 0604, kSize), Errc::invalid_argument);
  std::string id = fresh_id();
  pf::Handle h = create_ok(id);
  REQUIRE_OK(pf::seal_object(h, BackendKind::windows));
  REQUIRE(pf::stat(h, id)->mode == 0400);
  REQUIRE_ERR(pf::open_named(id, pf::Access::read_write), Errc::permission_denied);
  auto ro = pf::open_named(id, pf::Access::read_only);
  REQUIRE_OK(ro);
  REQUIRE_ERR(pf::map(*ro, 0, 4096, pf::Access::read_write, pf::Sharing::shared, id),
              Errc::permission_denied);
  // A private copy-on-write view works through a read-only handle and changes nothing.
  auto mine = pf::map(*ro, 0, 4096, pf::Access::read_write, pf::Sharing::private_copy, id);
  REQUIRE_OK(mine);
  mine->data()[0] = 0x5a;
  std::uint8_t first = 1;
  REQUIRE_OK(pf::read_at(h, 0, &first, 1, id));
  REQUIRE(first == 0);
  // The creator's handle keeps every right (as a POSIX fd keeps O_RDWR after fchmod 0400).
  REQUIRE_OK(pf::set_mode(h, 0600, id));
  REQUIRE_OK(pf::open_named(id, pf::Access::read_write));
}

TEST_CASE("views at any page offset; read-only views are read-only", "[windows]") {
  std::string id = fresh_id();
  pf::Handle h = create_ok(id);
  auto all = pf::map(h, 0, kSize, pf::Access::read_write, pf::Sharing::shared, id);
  REQUIRE_OK(all);
  for (std::uint64_t i = 0; i < kSize; ++i) all->data()[i] = static_cast<std::uint8_t>(i * 7);
  // 4096 is not a multiple of the 64 KiB allocation granularity MapViewOfFile wants.
  for (std::uint64_t offset : {4096ull, 65536ull + 8192ull, 2 * 65536ull}) {
    auto part = pf::map(h, offset, 4096, pf::Access::read_only, pf::Sharing::shared, id);
    REQUIRE_OK(part);
    REQUIRE(std::memcmp(part->data(), all->data() + offset, 4096) == 0);
    REQUIRE(page_protection(part->data()) == PAGE_READONLY);
    std::uint8_t byte = 0;
    REQUIRE_OK(pf::read_at(h, offset + 5, &byte, 1, id));
    REQUIRE(byte == all->data()[offset + 5]);
  }
  REQUIRE(page_protection(all->data()) == PAGE_READWRITE);
  REQUIRE_ERR(pf::map(h, 0, 0, pf::Access::read_only, pf::Sharing::shared, id),
              Errc::invalid_argument);
}

TEST_CASE("sizes are fixed at creation", "[windows]") {
  std::string id = fresh_id();
  pf::Handle h = create_ok(id, 0600, 8192);
  REQUIRE_OK(pf::allocate(h, 8192, id));
  REQUIRE_OK(pf::allocate(h, 4096, id));
  REQUIRE_ERR(pf::allocate(h, 8193, id), Errc::unsupported);
  REQUIRE_ERR(pf::create_named(fresh_id(), 0600, 0), Errc::invalid_argument);
  // More than memory and paging file can commit: no_space at creation, not on touch.
  REQUIRE_ERR(pf::create_named(fresh_id(), 0600, 1ull << 46), Errc::no_space);
}

TEST_CASE("paths are Local\\ names; no memfd, no fd links", "[windows]") {
  std::string id = fresh_id();
  pf::Handle h = create_ok(id);
  REQUIRE(pf::named_path(id) == "Local\\" + id);
  REQUIRE_OK(pf::open_path("Local\\" + id, pf::Access::read_only));
  REQUIRE_ERR(pf::open_path("Local\\" + fresh_id(), pf::Access::read_only), Errc::not_found);
  for (const char* bad : {"/dev/shm/spshm_x", "Local\\..\\spshm_x", "Global\\spshm_x",
                          "Local\\other", "Local\\spshm_A", ""})
    REQUIRE_ERR(pf::open_path(bad, pf::Access::read_only), Errc::invalid_argument);
  REQUIRE_ERR(pf::create_anonymous("spshm_x", 4096), Errc::unsupported);
  REQUIRE_FALSE(pf::is_process_fd_link("/proc/self/fd/3"));
  REQUIRE(pf::handle_path(h).empty());
  REQUIRE(pf::anonymous_name(h).empty());
  REQUIRE(pf::named_backend() == BackendKind::windows);
}

TEST_CASE("a name held by another kind of object counts as taken", "[windows]") {
  std::string id = fresh_id();
  HANDLE event = ::CreateEventW(nullptr, TRUE, FALSE, pf::win::object_name(id).c_str());
  REQUIRE(event != nullptr);
  pf::Handle guard(reinterpret_cast<std::intptr_t>(event));
  REQUIRE_ERR(pf::create_named(id, 0600, kSize), Errc::already_exists);
  REQUIRE_ERR(pf::open_named(id, pf::Access::read_only), Errc::not_ours);
  REQUIRE_FALSE(listed(id));  // only file mappings are listed
}

TEST_CASE("Win32 errors map to the core's codes with the system's text", "[windows][error]") {
  struct Case {
    DWORD code;
    Errc errc;
  };
  for (Case c :
       {Case{ERROR_ALREADY_EXISTS, Errc::already_exists},
        Case{ERROR_FILE_NOT_FOUND, Errc::not_found},
        Case{ERROR_ACCESS_DENIED, Errc::permission_denied},
        Case{ERROR_NOT_ENOUGH_MEMORY, Errc::no_space}, Case{ERROR_COMMITMENT_LIMIT, Errc::no_space},
        Case{ERROR_INVALID_FUNCTION, Errc::io_error}}) {
    Error e = pf::win::win_error("cannot frob segment x", c.code);
    INFO(e.message);
    REQUIRE(e.code == c.errc);
    REQUIRE(e.sys_errno == static_cast<int>(c.code));
    REQUIRE(e.message.rfind("cannot frob segment x: ", 0) == 0);
    REQUIRE(e.message.find("(Windows error " + std::to_string(c.code) + ")") != std::string::npos);
  }
  REQUIRE(pf::win::error_text(ERROR_ACCESS_DENIED).find("denied") != std::string::npos);
}

TEST_CASE("process identity: creation time, liveness, unknown pids", "[windows][process]") {
  auto self = pf::process_stat(pf::current_pid());
  REQUIRE_OK(self);
  REQUIRE(self->running);
  FILETIME created, exited, kernel, user;
  REQUIRE(::GetProcessTimes(::GetCurrentProcess(), &created, &exited, &kernel, &user));
  std::uint64_t expected =
      (static_cast<std::uint64_t>(created.dwHighDateTime) << 32) | created.dwLowDateTime;
  REQUIRE(self->start_time == expected);
  REQUIRE(pf::current_pid() == ::GetCurrentProcessId());
  REQUIRE_ERR(pf::process_stat(0), Errc::not_found);
  // Windows pids are multiples of 4: this one cannot belong to a process.
  REQUIRE_ERR(pf::process_stat(0x7ffffffd), Errc::not_found);
  REQUIRE(process_alive(self_pid(), self->start_time));
  REQUIRE_FALSE(process_alive(self_pid(), self->start_time + 1));
}

TEST_CASE("boot id, clock and random bytes", "[windows][process]") {
  auto id = pf::boot_id();
  REQUIRE(id != std::array<std::uint8_t, 16>{});
  REQUIRE(std::memcmp(id.data() + 8, "WinBoot", 8) == 0);
  REQUIRE(pf::boot_id() == id);
  REQUIRE(run_child({"boot_id", hex16(id)}) == 0);  // the same in another process

  FILETIME now;
  ::GetSystemTimeAsFileTime(&now);
  std::uint64_t unix_100ns =
      ((static_cast<std::uint64_t>(now.dwHighDateTime) << 32) | now.dwLowDateTime) -
      116444736000000000ull;
  std::uint64_t ns = pf::realtime_ns();
  REQUIRE(ns / 1000000000ull >= unix_100ns / 10000000ull);
  REQUIRE(ns / 1000000000ull - unix_100ns / 10000000ull < 5);

  std::uint8_t a[64] = {}, b[64] = {};
  REQUIRE_OK(pf::random_bytes(a, sizeof a));
  REQUIRE_OK(pf::random_bytes(b, sizeof b));
  REQUIRE(std::memcmp(a, b, sizeof a) != 0);
  REQUIRE(std::count(a, a + sizeof a, 0) < 8);
}

TEST_CASE("lock_memory locks a view", "[windows]") {
  std::string id = fresh_id();
  pf::Handle h = create_ok(id, 0600, 65536);
  auto view = pf::map(h, 0, 65536, pf::Access::read_write, pf::Sharing::shared, id);
  REQUIRE_OK(view);
  REQUIRE_OK(pf::lock_memory(view->data(), view->size()));
  REQUIRE(pf::page_size() == 4096);
}

TEST_CASE("list_named reads past objects with long names", "[windows]") {
  // An object whose directory entry does not fit the first buffer (4 KiB) of list_named.
  std::wstring long_name = L"Local\\" + std::wstring(3000, L'x');
  HANDLE event = ::CreateEventW(nullptr, TRUE, FALSE, long_name.c_str());
  REQUIRE(event != nullptr);
  pf::Handle guard(reinterpret_cast<std::intptr_t>(event));
  std::vector<std::string> ids;
  std::vector<pf::Handle> handles;
  for (int i = 0; i < 16; ++i) {
    ids.push_back(fresh_id());
    handles.push_back(create_ok(ids.back(), 0600, 4096));
  }
  for (const std::string& id : ids) REQUIRE(listed(id));
}
