// A process under RLIMIT_FSIZE (ulimit -f, systemd LimitFSIZE=) that sizes a segment, a
// memfd or an arena past the limit got SIGXFSZ, whose default action ends it: the BEAM
// keeps that default, so allocate_region/2 killed the VM. The core refuses first.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "arena.hpp"
#include "helpers.hpp"

using namespace spshm;
using namespace spshm_test;

namespace {
// 0: refused with too_large naming the limit; 1: created; 2: another error.
int try_create(BackendKind backend, std::uint64_t size, bool encrypted) {
  CreateOptions o = options(backend, size);
  o.encrypted = encrypted;
  if (encrypted) o.security_level = 1;
  auto r = Region::create(o);
  if (r.ok()) {
    (void)r->deallocate(false);
    return 1;
  }
  return r.error().code == Errc::too_large &&
                 r.error().message.find("RLIMIT_FSIZE") != std::string::npos
             ? 0
             : 2;
}
}  // namespace

TEST_CASE("sizes above RLIMIT_FSIZE are refused with too_large, not SIGXFSZ", "[linux]") {
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::signal(SIGXFSZ, SIG_DFL);  // the BEAM's disposition (the test runner's may differ)
    struct rlimit rl {
      1 << 20, 1 << 20
    };
    if (::setrlimit(RLIMIT_FSIZE, &rl) != 0) _exit(10);
    int code = 0;
    for (auto backend : {BackendKind::memfd, BackendKind::posix}) {
      for (bool encrypted : {false, true}) {
        if (try_create(backend, 4u << 20, encrypted) != 0) code = 11;
        if (try_create(backend, 64u << 10, encrypted) != 1) code = 12;  // below: fine
      }
    }
    ArenaSet arenas;
    arenas.configure(2u << 20, std::chrono::milliseconds(0));
    auto chunk = arenas.allocate(4096);  // a new 2 MiB arena: above the limit
    if (chunk.ok() || chunk.error().code != Errc::too_large) code = 13;
    _exit(code);
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  INFO("signalled: " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0));
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
}
