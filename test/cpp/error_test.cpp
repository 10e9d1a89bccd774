// error.cpp: names of codes and the errno mapping.
#include <cerrno>
#include <cstring>

#include "helpers.hpp"

using namespace spshm;

TEST_CASE("errc_name is the enumerator name", "[error]") {
  const char* names[] = {
      "invalid_argument",  "not_found",    "already_exists", "permission_denied",
      "no_space",          "too_large",    "corrupt",        "unsupported_version",
      "not_ours",          "sealed",       "busy",           "expired",
      "deallocated",       "closed",       "out_of_bounds",  "tampered",
      "holder_table_full", "mlock_failed", "unsupported",    "io_error"};
  for (int i = 0; i < 20; ++i) REQUIRE(std::string(errc_name(static_cast<Errc>(i))) == names[i]);
}

TEST_CASE("os_error maps errno and says what failed", "[error]") {
  struct Case {
    int err;
    Errc code;
  };
  for (Case c :
       {Case{ENOENT, Errc::not_found}, Case{EEXIST, Errc::already_exists},
        Case{EACCES, Errc::permission_denied}, Case{EPERM, Errc::permission_denied},
        Case{ENOSPC, Errc::no_space}, Case{ENOMEM, Errc::no_space}, Case{EFBIG, Errc::too_large},
        Case{EINVAL, Errc::invalid_argument}, Case{ENAMETOOLONG, Errc::invalid_argument},
        Case{ELOOP, Errc::not_ours}, Case{EIO, Errc::io_error}}) {
    Error e = os_error("cannot frob segment x", c.err);
    INFO(e.message);
    REQUIRE(e.code == c.code);
    REQUIRE(e.sys_errno == c.err);
    REQUIRE(e.message.rfind("cannot frob segment x: ", 0) == 0);
    REQUIRE(e.message.find(std::strerror(c.err)) != std::string::npos);
  }
  REQUIRE(os_error("x", ENOSPC).message.find("/dev/shm") != std::string::npos);
  REQUIRE(os_error("x", EMFILE).message.find("ulimit -n") != std::string::npos);
}
