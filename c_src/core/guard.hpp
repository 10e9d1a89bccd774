// Internal: keeps exceptions inside the core. Every public function that returns a
// Result runs its body through guarded(), so that std::bad_alloc (the only exception the
// core can meet: it throws none itself) becomes an error value instead of unwinding into
// a NIF or C caller, where it would take the process down.
#pragma once

#include <cerrno>
#include <new>

#include "error.hpp"

namespace spshm {

template <class Body>
auto guarded(Body&& body) noexcept -> decltype(body()) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Error{Errc::no_space, ENOMEM, "out of memory"};  // short: no allocation
  } catch (...) {
    return Error{Errc::io_error, 0, "internal error"};
  }
}

}  // namespace spshm
