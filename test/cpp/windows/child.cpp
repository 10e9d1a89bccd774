// The second process of the two-process tests: core_tests.exe started again with
// `--spshm-child <command> <args>` (run_child), doing one thing to a region that the
// parent created and reporting through its exit code. Messages go to stderr.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "win_test.hpp"

using namespace spshm;

namespace spshm_wintest {

namespace {

// Exit codes of child commands.
constexpr int kOk = 0;
constexpr int kUsage = 2;
constexpr int kFailed = 3;    // an operation that had to work failed
constexpr int kMismatch = 4;  // it worked, but what it saw is wrong

bool quiet = false;  // --quiet: the parent expects a failure; keep its output clean

int fail(int code, const std::string& message) {
  if (!quiet) std::fprintf(stderr, "child: %s\n", message.c_str());
  return code;
}

std::uint64_t number(const char* text) { return std::strtoull(text, nullptr, 10); }

/// verify <id> <size> <seed>: opens read-only, checks size, backend, that the data view
/// is read-only memory, and that the data is pattern(size, seed).
int verify(char* argv[]) {
  std::uint64_t size = number(argv[1]);
  auto r = Region::open(OpenTarget{argv[0], {}, {}}, false);
  if (!r) return fail(kFailed, "open " + std::string(argv[0]) + ": " + r.error().message);
  if (r->size() != size || r->backend() != BackendKind::windows || r->writable())
    return fail(kMismatch, "size, backend or access differ from what the parent created");
  if (page_protection(r->data()) != PAGE_READONLY)
    return fail(kMismatch, "the data of a read-only open is mapped writable");
  std::vector<std::uint8_t> data(size);
  if (auto rd = r->read(0, data.data(), data.size()); !rd) return fail(kFailed, rd.error().message);
  if (data != spshm_test::pattern(size, static_cast<std::uint32_t>(number(argv[2]))))
    return fail(kMismatch, "the data differs from the parent's pattern");
  return kOk;
}

/// write <id> <offset> <length> <seed>: opens read-write and writes pattern(length, seed).
int write(char* argv[]) {
  auto r = Region::open(OpenTarget{argv[0], {}, {}}, true);
  if (!r) return fail(kFailed, "open " + std::string(argv[0]) + ": " + r.error().message);
  auto bytes = spshm_test::pattern(number(argv[2]), static_cast<std::uint32_t>(number(argv[3])));
  if (auto w = r->write(number(argv[1]), bytes.data(), bytes.size()); !w)
    return fail(kFailed, w.error().message);
  return kOk;
}

/// hold <id>: takes a writable hold and exits without releasing it, as a crash would.
int hold_and_die(char* argv[]) {
  auto r = Region::open(OpenTarget{argv[0], {}, {}}, true);
  if (!r) return fail(kFailed, "open " + std::string(argv[0]) + ": " + r.error().message);
  auto start = process_start_time(self_pid());
  if (!start) return fail(kFailed, start.error().message);
  if (auto h = hold(r->header(), self_pid(), *start, true); !h)
    return fail(kFailed, h.error().message);
  std::fflush(stderr);
  ::ExitProcess(kOk);  // no destructors, no release: the hold outlives this process
}

/// sealed <id>: a sealed region refuses a writable open and opens read-only.
int sealed(char* argv[]) {
  auto rw = Region::open(OpenTarget{argv[0], {}, {}}, true);
  if (rw) return fail(kMismatch, "a sealed region opened read-write");
  if (rw.error().code != Errc::permission_denied && rw.error().code != Errc::sealed)
    return fail(kMismatch, "unexpected error: " + rw.error().message);
  auto ro = Region::open(OpenTarget{argv[0], {}, {}}, false);
  if (!ro) return fail(kFailed, "read-only open of a sealed region: " + ro.error().message);
  if (!ro->sealed()) return fail(kMismatch, "the header does not say sealed");
  return kOk;
}

/// boot_id <hex>: this process computes the same boot id as the parent.
int same_boot_id(char* argv[]) {
  std::string mine = hex16(boot_id());
  if (mine != argv[0]) return fail(kMismatch, "boot id " + mine + " differs from " + argv[0]);
  return kOk;
}

/// missing <id>: the region does not exist (any more) for another process.
int missing(char* argv[]) {
  auto r = Region::open(OpenTarget{argv[0], {}, {}}, false);
  if (r) return fail(kMismatch, std::string(argv[0]) + " still exists");
  if (r.error().code != Errc::not_found) return fail(kMismatch, r.error().message);
  return kOk;
}

}  // namespace

int child_main(int argc, char* argv[]) {
  struct Command {
    const char* name;
    int arguments;
    int (*run)(char* argv[]);
  };
  static const Command commands[] = {{"verify", 3, verify},        {"write", 4, write},
                                     {"hold", 1, hold_and_die},    {"sealed", 1, sealed},
                                     {"boot_id", 1, same_boot_id}, {"missing", 1, missing}};
  if (argc >= 1 && std::string(argv[0]) == "--quiet") {
    quiet = true;
    --argc;
    ++argv;
  }
  if (argc < 1) return fail(kUsage, "no command");
  for (const Command& c : commands) {
    if (std::string(argv[0]) != c.name) continue;
    if (argc - 1 != c.arguments) return fail(kUsage, std::string(c.name) + ": wrong arguments");
    return c.run(argv + 1);
  }
  return fail(kUsage, "unknown command " + std::string(argv[0]));
}

int run_child(const std::vector<std::string>& args) {
  wchar_t self[MAX_PATH];
  DWORD length = ::GetModuleFileNameW(nullptr, self, MAX_PATH);
  if (length == 0 || length == MAX_PATH) return -1;
  // Arguments are ids, numbers and hex: no quoting is needed beyond the program path.
  std::wstring command = L"\"" + std::wstring(self, length) + L"\" ";
  for (char c : std::string(kChildFlag)) command += static_cast<wchar_t>(c);
  for (const std::string& a : args) {
    command += L' ';
    for (char c : a) command += static_cast<wchar_t>(static_cast<unsigned char>(c));
  }
  STARTUPINFOW startup{};
  startup.cb = sizeof startup;
  PROCESS_INFORMATION process{};
  if (!::CreateProcessW(nullptr, command.data(), nullptr, nullptr, FALSE, 0, nullptr, nullptr,
                        &startup, &process))
    return -1;
  spshm::platform::Handle thread(reinterpret_cast<std::intptr_t>(process.hThread));
  spshm::platform::Handle guard(reinterpret_cast<std::intptr_t>(process.hProcess));
  if (::WaitForSingleObject(process.hProcess, 60000) != WAIT_OBJECT_0) {
    ::TerminateProcess(process.hProcess, 1);
    return -1;
  }
  DWORD code = 1;
  ::GetExitCodeProcess(process.hProcess, &code);
  return static_cast<int>(code);
}

std::string hex16(const std::array<std::uint8_t, 16>& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (std::uint8_t b : bytes) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

DWORD page_protection(const void* address) {
  MEMORY_BASIC_INFORMATION info{};
  if (::VirtualQuery(address, &info, sizeof info) != sizeof info) return 0;
  return info.Protect;
}

}  // namespace spshm_wintest
