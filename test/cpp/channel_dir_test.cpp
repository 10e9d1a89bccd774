// The channel owner's socket directory (platform_channel.hpp): locked while it exists,
// swept once its owner is gone (a VM that halted while its channel still listened left
// `spshm-ch-XXXXXX/ctl` behind for ever), and nothing else is ever touched.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "catch.hpp"
#include "channel.hpp"
#include "channel_helpers.hpp"
#include "helpers.hpp"
#include "platform_channel.hpp"

using namespace spshm;

namespace {

bool exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

bool is_socket(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

std::string dirname_of(const std::string& path) { return path.substr(0, path.rfind('/')); }

// Sets the atime and mtime of `path` (never following a symlink) `seconds` into the past.
void age(const std::string& path, int seconds = 3600) {
  struct timespec now;
  ::clock_gettime(CLOCK_REALTIME, &now);
  struct timespec times[2] = {{now.tv_sec - seconds, 0}, {now.tv_sec - seconds, 0}};
  REQUIRE(::utimensat(AT_FDCWD, path.c_str(), times, AT_SYMLINK_NOFOLLOW) == 0);
}

// A socket file at `path` that nobody listens on (what a dead owner leaves).
void make_socket_file(const std::string& path) {
  struct sockaddr_un addr;
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  REQUIRE(path.size() < sizeof addr.sun_path);
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  ::close(fd);
}

void make_dir(const std::string& path, mode_t mode) {
  REQUIRE(::mkdir(path.c_str(), 0700) == 0);
  REQUIRE(::chmod(path.c_str(), mode) == 0);  // whatever the umask
}

void make_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  ::close(fd);
}

std::size_t open_fds() {
  std::size_t n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return 0;
  while (struct dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n;
}

// A private base directory (not named like a socket directory), removed with whatever is
// left in it (two levels deep at most) when the test ends.
struct TempBase {
  std::string path;
  TempBase() {
    char templ[] = "/tmp/spshm-cdt-XXXXXX";
    REQUIRE(::mkdtemp(templ) != nullptr);
    path = templ;
  }
  ~TempBase() { remove_tree(path, 0); }
  static void remove_tree(const std::string& dir, int depth) {
    if (DIR* d = ::opendir(dir.c_str())) {
      std::vector<std::string> names;
      while (struct dirent* e = ::readdir(d)) {
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0)
          names.emplace_back(e->d_name);
      }
      ::closedir(d);
      for (const auto& n : names) {
        std::string p = dir + "/" + n;
        struct stat st;
        if (::lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode) && depth < 2) {
          remove_tree(p, depth + 1);
        } else {
          ::unlink(p.c_str());
        }
      }
    }
    ::rmdir(dir.c_str());
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    if (DIR* d = ::opendir(path.c_str())) {
      while (struct dirent* e = ::readdir(d)) {
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0)
          names.emplace_back(e->d_name);
      }
      ::closedir(d);
    }
    return names;
  }
};

std::unique_ptr<channel::Endpoint> listening_owner(const std::string& base) {
  channel::OwnerOptions o;
  o.socket_dir = base;
  auto owner = channel::Endpoint::create_owner(o);
  INFO((owner.ok() ? std::string() : owner.error().message));
  REQUIRE(owner.ok());
  return std::move(owner).value();
}

// A forked child opens a listening owner under `base` and _exit(0)s without closing it
// (a VM that halts): returns the socket path it reported.
std::string dead_owner_socket(const std::string& base) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(fds[0]);
    channel::OwnerOptions o;
    o.socket_dir = base;
    auto owner = channel::Endpoint::create_owner(o);
    if (!owner.ok()) _exit(3);
    const std::string path = owner.value()->socket_path();
    if (::write(fds[1], path.data(), path.size()) != static_cast<ssize_t>(path.size())) _exit(4);
    _exit(0);  // no close, no destructor
  }
  ::close(fds[1]);
  std::string path;
  char buf[256];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) path.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  return path;
}

}  // namespace

TEST_CASE(
    "channel dir: an owner that exits without closing leaves its directory; the sweep "
    "removes it once aged, and keeps a live owner's",
    "[channel]") {
  TempBase base;
  const std::string dead_path = dead_owner_socket(base.path);
  const std::string dead_dir = dirname_of(dead_path);
  REQUIRE(dead_dir.rfind(base.path + "/spshm-ch-", 0) == 0);
  REQUIRE(is_socket(dead_path));  // the leak: nothing removes it

  // Young (its owner may not have locked it yet): kept.
  CHECK(channel::sweep_stale_socket_dirs(base.path) == 0);
  REQUIRE(is_socket(dead_path));

  auto live = listening_owner(base.path);
  const std::string live_dir = dirname_of(live->socket_path());
  age(dead_dir);
  age(live_dir);

  CHECK(channel::sweep_stale_socket_dirs(base.path) == 1);
  CHECK_FALSE(exists(dead_dir));
  CHECK(is_socket(live->socket_path()));  // locked by its owner, however old
  CHECK(live->state() == channel::State::listening);

  // Still reachable: a worker connects to the live one after the sweep.
  spshm_test::OwnerPump pump(*live);
  auto worker = channel::Endpoint::connect(live->socket_path(), live->token_hex(), {});
  for (int i = 0; i < 500 && live->state() == channel::State::listening; ++i) ::usleep(10000);
  pump.stop();
  REQUIRE(worker.ok());
  CHECK(live->state() == channel::State::connected);
  CHECK_FALSE(exists(live_dir));  // removed at the connection, as before
  worker.value().reset();
  live.reset();
  CHECK(base.entries().empty());
}

TEST_CASE("channel dir: the owner holds a shared lock on its directory until it removed it",
          "[channel]") {
  TempBase base;
  const std::size_t fds_before = open_fds();
  auto owner = listening_owner(base.path);
  const std::string dir = dirname_of(owner->socket_path());
  struct stat st;
  REQUIRE(::lstat(dir.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0700);
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  CHECK(::flock(fd, LOCK_EX | LOCK_NB) != 0);
  CHECK(errno == EWOULDBLOCK);
  CHECK(::flock(fd, LOCK_SH | LOCK_NB) == 0);  // shared: other readers are fine
  ::close(fd);
  owner->close();
  CHECK_FALSE(exists(dir));
  owner.reset();
  CHECK(open_fds() == fds_before);  // the directory's descriptor is closed
  CHECK(base.entries().empty());
}

TEST_CASE("channel dir: a failed listen closes the directory's descriptor and removes it",
          "[channel]") {
  TempBase base;
  // mkdtemp works here, but <dir>/spshm-ch-XXXXXX/ctl is longer than sun_path.
  std::string deep = base.path + "/" + std::string(90, 'd');
  REQUIRE(::mkdir(deep.c_str(), 0700) == 0);
  const std::size_t fds_before = open_fds();
  channel::OwnerOptions o;
  o.socket_dir = deep;
  auto owner = channel::Endpoint::create_owner(o);
  REQUIRE_FALSE(owner.ok());
  CHECK(open_fds() == fds_before);
  DIR* d = ::opendir(deep.c_str());
  REQUIRE(d != nullptr);
  int left = 0;
  while (struct dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++left;
  }
  ::closedir(d);
  CHECK(left == 0);
}

TEST_CASE(
    "channel dir: the sweep leaves alone symlinks, foreign modes, extra files, other "
    "users' directories and other names",
    "[channel]") {
  TempBase base;
  const std::string& b = base.path;
  // What a dead owner leaves, but with something more: not ours to judge.
  make_dir(b + "/target", 0700);
  make_socket_file(b + "/target/ctl");
  REQUIRE(::symlink((b + "/target").c_str(), (b + "/spshm-ch-symlnk").c_str()) == 0);
  make_dir(b + "/spshm-ch-mode55", 0755);
  make_socket_file(b + "/spshm-ch-mode55/ctl");
  make_dir(b + "/spshm-ch-extraf", 0700);
  make_socket_file(b + "/spshm-ch-extraf/ctl");
  make_file(b + "/spshm-ch-extraf/other");
  make_dir(b + "/spshm-ch-regctl", 0700);
  make_file(b + "/spshm-ch-regctl/ctl");  // a regular file named ctl: not a socket
  make_dir(b + "/spshm-ch-short", 0700);  // 5 characters
  make_dir(b + "/spshm-ch-sevenchr", 0700);
  make_dir(b + "/spshm-ch-dot.ab", 0700);
  const bool root = ::geteuid() == 0;
  if (root) {
    make_dir(b + "/spshm-ch-others", 0700);
    make_socket_file(b + "/spshm-ch-others/ctl");
    REQUIRE(::chown((b + "/spshm-ch-others").c_str(), 65534, 65534) == 0);
  }
  // What it does remove: a dead owner's directory, with its socket or (killed between
  // mkdtemp and bind) empty.
  make_dir(b + "/spshm-ch-deadAA", 0700);
  make_socket_file(b + "/spshm-ch-deadAA/ctl");
  make_dir(b + "/spshm-ch-dead00", 0700);
  for (const auto& name : base.entries()) age(b + "/" + name);
  age(b + "/target");

  CHECK(channel::sweep_stale_socket_dirs(b) == 2);
  CHECK_FALSE(exists(b + "/spshm-ch-deadAA"));
  CHECK_FALSE(exists(b + "/spshm-ch-dead00"));
  CHECK(is_socket(b + "/target/ctl"));
  struct stat st;
  REQUIRE(::lstat((b + "/spshm-ch-symlnk").c_str(), &st) == 0);
  CHECK(S_ISLNK(st.st_mode));
  CHECK(is_socket(b + "/spshm-ch-mode55/ctl"));
  CHECK(is_socket(b + "/spshm-ch-extraf/ctl"));  // untouched, not even the socket
  CHECK(exists(b + "/spshm-ch-extraf/other"));
  CHECK(exists(b + "/spshm-ch-regctl/ctl"));
  CHECK(exists(b + "/spshm-ch-short"));
  CHECK(exists(b + "/spshm-ch-sevenchr"));
  CHECK(exists(b + "/spshm-ch-dot.ab"));
  if (root) CHECK(is_socket(b + "/spshm-ch-others/ctl"));
  // A base that is not there, or is a file: nothing, no error.
  CHECK(channel::sweep_stale_socket_dirs(b + "/missing") == 0);
  CHECK(channel::sweep_stale_socket_dirs(b + "/spshm-ch-regctl/ctl") == 0);
}

TEST_CASE("channel dir: the default bases are $XDG_RUNTIME_DIR, $TMPDIR and /tmp, each once",
          "[channel]") {
  TempBase base;
  const char* old_xdg = std::getenv("XDG_RUNTIME_DIR");
  const char* old_tmp = std::getenv("TMPDIR");
  const std::string saved_xdg = old_xdg ? old_xdg : "", saved_tmp = old_tmp ? old_tmp : "";
  ::setenv("XDG_RUNTIME_DIR", (base.path + "/missing").c_str(), 1);
  ::setenv("TMPDIR", base.path.c_str(), 1);
  auto bases = channel::os::default_socket_dir_bases();
  CHECK(bases == std::vector<std::string>{base.path, "/tmp"});
  ::setenv("TMPDIR", "/tmp/", 1);
  ::setenv("XDG_RUNTIME_DIR", base.path.c_str(), 1);
  bases = channel::os::default_socket_dir_bases();
  CHECK(bases == std::vector<std::string>{base.path, "/tmp/"});
  // The caller's own view of the variables comes after getenv's, before /tmp.
  ::unsetenv("XDG_RUNTIME_DIR");
  ::setenv("TMPDIR", "/tmp", 1);
  bases = channel::os::default_socket_dir_bases({base.path + "/missing", base.path, "/tmp/"});
  CHECK(bases == std::vector<std::string>{"/tmp", base.path});
  // An owner without socket_dir makes its directory in $TMPDIR then (XDG unset): a base
  // the default sweep covers. (The default sweep itself is not run here: it would sweep
  // the machine's /tmp; test/reliability/channel_dirs_test.exs does, through the VM.)
  ::unsetenv("XDG_RUNTIME_DIR");
  ::setenv("TMPDIR", base.path.c_str(), 1);
  const std::string dead_dir = dirname_of(dead_owner_socket(""));
  CHECK(dead_dir.rfind(base.path + "/spshm-ch-", 0) == 0);
  age(dead_dir);
  CHECK(channel::sweep_stale_socket_dirs(base.path) == 1);
  CHECK_FALSE(exists(dead_dir));
  if (old_xdg) {
    ::setenv("XDG_RUNTIME_DIR", saved_xdg.c_str(), 1);
  } else {
    ::unsetenv("XDG_RUNTIME_DIR");
  }
  if (old_tmp) {
    ::setenv("TMPDIR", saved_tmp.c_str(), 1);
  } else {
    ::unsetenv("TMPDIR");
  }
}
