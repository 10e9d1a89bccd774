// NIFs of the status board (c_src/core/board.hpp): terms in, core call, terms out.
//
// Resources:
//   * BoardResource: a validated board::View over a region's data area; keeps the
//     region resource (and so the mapping) alive.
//   * BoardSlotResource: one slot joined by an Erlang process of this VM. The slot is
//     freed by board_leave/1 or by the death of the joining process (monitor `down`
//     callback): atomic updates of the slot, never a wait. Until then the resource pins
//     itself (an extra reference), so dropping the handle does not free the slot nor
//     lose the monitor.
#include <erl_nif.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <new>
#include <string>
#include <vector>

#include "board.hpp"
#include "nif_board.hpp"
#include "nif_functions.hpp"
#include "resources.hpp"
#include "terms.hpp"

namespace spshm::nif {

namespace {

namespace b = spshm::board;

struct BoardResource {
  RegionResource* region = nullptr;  ///< kept
  b::View view;
  bool writable = false;
  /// This handle's own open of the board's segment: the OFD locks of the slots joined
  /// through it, and the kernel's word on other owners' liveness (-1: none).
  int lock_fd = -1;
  b::SlotLocks locks() const noexcept { return b::SlotLocks(lock_fd); }
  /// Round-robin counter of least_loaded: shared by every process using this handle.
  std::atomic<std::uint64_t> rotation{0};
};

struct BoardSlotResource {
  BoardResource* board = nullptr;  ///< kept
  std::uint32_t index = 0;
  std::uint64_t owner = 0;
  std::atomic<bool> left{false};
  std::atomic<bool> pinned{false};  ///< holds an extra reference until left
  /// The handle may be passed between Erlang processes: updates through it are
  /// serialised here (a few instructions held), so the slot keeps a single writer.
  std::atomic<bool> writing{false};

  /// Frees the slot once; true if this call did it.
  bool leave() noexcept;
};

ErlNifResourceType* board_type = nullptr;
ErlNifResourceType* slot_type = nullptr;

void board_dtor(ErlNifEnv*, void* obj) {
  auto* res = static_cast<BoardResource*>(obj);
  if (res->lock_fd >= 0) ::close(res->lock_fd);  // drops the locks of its (left) slots
  if (res->region != nullptr) enif_release_resource(res->region);
  res->~BoardResource();
}

void slot_dtor(ErlNifEnv*, void* obj) {
  auto* s = static_cast<BoardSlotResource*>(obj);
  s->leave();
  if (s->board != nullptr) enif_release_resource(s->board);
  s->~BoardSlotResource();
}

void slot_down(ErlNifEnv*, void* obj, ErlNifPid*, ErlNifMonitor*) {
  static_cast<BoardSlotResource*>(obj)->leave();
}

ErlNifResourceType* open_type(ErlNifEnv* env, const char* name,
                              const ErlNifResourceTypeInit& init) {
  auto flags = static_cast<ErlNifResourceFlags>(ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER);
  return enif_open_resource_type_x(env, name, &init, flags, nullptr);
}

bool get_board(ErlNifEnv* env, ERL_NIF_TERM term, BoardResource** out) {
  return enif_get_resource(env, term, board_type, reinterpret_cast<void**>(out)) != 0;
}

bool get_slot(ErlNifEnv* env, ERL_NIF_TERM term, BoardSlotResource** out) {
  return enif_get_resource(env, term, slot_type, reinterpret_cast<void**>(out)) != 0;
}

ERL_NIF_TERM atom(ErlNifEnv* env, const char* name) { return enif_make_atom(env, name); }

ERL_NIF_TERM view_error(ErlNifEnv* env, b::ViewStatus status) {
  switch (status) {
    case b::ViewStatus::bad_version:
      return make_error(env, Errc::unsupported_version,
                        "the status board was written by a newer version");
    case b::ViewStatus::too_small:
      return make_error(env, Errc::corrupt, "the region is too small to hold a status board");
    case b::ViewStatus::bad_magic:
      return make_error(env, Errc::corrupt, "the region does not hold a status board (bad magic)");
    default:
      return make_error(env, Errc::corrupt,
                        "the status board header is damaged (sizes or capacity out of range)");
  }
}

ERL_NIF_TERM deleted(ErlNifEnv* env) {
  return make_error(env, Errc::deallocated, "the status board was deleted");
}

// A peer truncated the board's POSIX segment: the SIGBUS handler replaced the lost
// pages by private zero pages, so reads would show an empty board and writes would reach
// nobody. Say so instead.
bool damaged(RegionResource* r) { return r->region.damaged(); }

ERL_NIF_TERM truncated(ErlNifEnv* env) {
  return make_error(env, Errc::truncated,
                    "the status board's segment was truncated by another process: its slots "
                    "are gone; delete the board and create it again");
}

bool usable(RegionResource* r) {
  return !r->is_deallocated() && !r->region.encrypted() && r->region.data() != nullptr;
}

// Whether this VM may write the board's slots: a sealed region's data must never change
// again (zero-copy binaries of it may exist), whatever mapping we still have.
bool writable_board(RegionResource* r) {
  return usable(r) && r->region.writable() && (r->region.header().state.load() & kStateSealed) == 0;
}

ERL_NIF_TERM make_u64(ErlNifEnv* env, std::uint64_t v) { return enif_make_uint64(env, v); }

// Whether the writer of an entry still exists: kill(pid, 0) (one cheap system call, on
// the reader's side only). A reused pid reads as alive; the entry then ages into stale.
bool writer_alive(std::uint32_t pid) {
  if (pid == 0 || pid > INT32_MAX) return false;
  if (pid == self_identity.pid) return true;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH;
}

// Whether the owner of live slot `index` is alive: the kernel's word (its slot lock is
// held), not its pid; kill(pid, 0) only where locks cannot tell (no lock descriptor).
bool owner_alive(const BoardResource* res, std::uint32_t index, std::uint32_t pid) {
  if (pid != 0 && pid == self_identity.pid) return true;  // freed by monitors, at once
  int held = res->view.owner_alive(index, res->locks());
  return held < 0 ? writer_alive(pid) : held == 1;
}

// {index, worker_id, state, queue, in_flight, memory, processed, errors, {g0..g3},
//  updated_ns, joined_ns, pid, start_time, stale, alive}
ERL_NIF_TERM make_entry(ErlNifEnv* env, const b::Entry& e, bool alive) {
  const auto& v = e.values;
  ERL_NIF_TERM gauges =
      enif_make_tuple4(env, enif_make_int64(env, v.gauges[0]), enif_make_int64(env, v.gauges[1]),
                       enif_make_int64(env, v.gauges[2]), enif_make_int64(env, v.gauges[3]));
  ERL_NIF_TERM items[] = {
      enif_make_uint(env, e.index), make_binary(env, e.worker_id), enif_make_uint(env, v.state),
      make_u64(env, v.queue),       make_u64(env, v.in_flight),    make_u64(env, v.memory),
      make_u64(env, v.processed),   make_u64(env, v.errors),       gauges,
      make_u64(env, e.updated_ns),  make_u64(env, e.joined_ns),    enif_make_uint(env, e.pid),
      make_u64(env, e.start_time),  make_bool(e.stale || !alive),  make_bool(alive)};
  return enif_make_tuple_from_array(env, items, sizeof items / sizeof items[0]);
}

bool BoardSlotResource::leave() noexcept {
  if (left.exchange(true)) return false;
  // A sealed board's bytes must not change: its slot is then left as it is.
  auto locks = board->locks();
  bool ours = writable_board(board->region) && board->view.leave(index, owner, &locks);
  if (pinned.exchange(false)) enif_release_resource(this);  // may run the destructor later
  return ours;
}

// A new open of the board's segment (never a dup: locks belong to the open): through it
// this handle locks the slots it joins and asks the kernel about other owners. -1 if
// the segment cannot be opened (no locks then: liveness falls back to pids).
int open_lock_fd(RegionResource* r) {
#if defined(__linux__)
  std::string path;
  try {
    path = r->region.control_path();
  } catch (...) {
    return -1;
  }
  int flags = (r->region.writable() ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK;
  int fd = ::open(path.c_str(), flags);
  if (fd < 0 && r->region.writable()) fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  return fd;
#else
  (void)r;
  return -1;
#endif
}

}  // namespace

bool open_board_resource_types(ErlNifEnv* env) {
  ErlNifResourceTypeInit board_init{};
  board_init.dtor = board_dtor;
  ErlNifResourceTypeInit slot_init{};
  slot_init.dtor = slot_dtor;
  slot_init.down = slot_down;
  auto* board = open_type(env, "spshm_board", board_init);
  auto* slot = open_type(env, "spshm_board_slot", slot_init);
  if (board == nullptr || slot == nullptr) return false;
  board_type = board;
  slot_type = slot;
  return true;
}

SPSHM_GUARDED_NIF(nif_board_layout)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  return make_binary(env, b::board_layout_description());
}

// board_init(region, capacity, stale_after_ms, [gauge_name]): the creator writes the
// board header into a fresh region (size checked here too).
SPSHM_GUARDED_NIF(nif_board_init)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* r;
  std::uint64_t capacity = 0, stale = 0;
  unsigned length = 0;
  if (!get_region(env, argv[0], &r) || !get_u64(env, argv[1], &capacity) ||
      !get_u64(env, argv[2], &stale) || !enif_get_list_length(env, argv[3], &length) ||
      length > b::kGaugeCount)
    return enif_make_badarg(env);
  std::vector<std::string> names;
  ERL_NIF_TERM list = argv[3], head;
  while (enif_get_list_cell(env, list, &head, &list)) {
    std::string name;
    if (!get_string(env, head, &name)) return enif_make_badarg(env);
    names.push_back(std::move(name));
  }
  if (!writable_board(r))
    return make_error(env, Errc::permission_denied,
                      "the board's region is not writable here (read-only, sealed or freed)");
  if (capacity == 0 || capacity > b::kMaxCapacity || stale == 0)
    return make_error(env, Errc::invalid_argument, "capacity or stale_after out of range");
  DataAccess access(r);  // the data stays mapped meanwhile (deallocate retires it)
  if (!access.ok() || r->region.data() == nullptr)
    return make_error(env, Errc::deallocated, "the board's region is deallocated");
  if (!b::View::init(r->region.data(), r->region.capacity(), static_cast<std::uint32_t>(capacity),
                     stale, names))
    return make_error(env, Errc::invalid_argument,
                      "cannot lay a status board out in this region (too small, or a gauge name "
                      "is longer than 31 bytes)");
  return atoms.ok;
}

SPSHM_GUARDED_NIF(nif_board_open)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* r;
  if (!get_region(env, argv[0], &r)) return enif_make_badarg(env);
  if (!usable(r))
    return make_error(env, Errc::deallocated, "the board's region is deallocated or encrypted");
  DataAccess access(r);  // the data stays mapped meanwhile (deallocate retires it)
  if (!access.ok() || r->region.data() == nullptr)
    return make_error(env, Errc::deallocated, "the board's region is deallocated");
  b::View view;
  auto status = b::View::make(r->region.data(), r->region.capacity(), &view);
  if (status != b::ViewStatus::ok) return view_error(env, status);
  void* mem = enif_alloc_resource(board_type, sizeof(BoardResource));
  if (mem == nullptr) return enif_make_badarg(env);
  auto* res = new (mem) BoardResource();
  res->view = std::move(view);
  res->writable = r->region.writable();
  res->lock_fd = open_lock_fd(r);
  enif_keep_resource(r);
  res->region = r;
  // Pinned before the access above ends: the data is never retired under this view.
  r->data_pinned.store(true);
  ERL_NIF_TERM term = enif_make_resource(env, res);
  enif_release_resource(res);
  return make_ok(env, term);
}

SPSHM_GUARDED_NIF(nif_board_info)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  BoardResource* res;
  if (!get_board(env, argv[0], &res)) return enif_make_badarg(env);
  const auto& names = res->view.gauge_names();
  std::vector<ERL_NIF_TERM> name_terms;
  for (const auto& n : names) name_terms.push_back(make_binary(env, n));
  ERL_NIF_TERM keys[] = {atoms.capacity, atom(env, "stale_after_ms"), atom(env, "gauge_names"),
                         atom(env, "generation"), atoms.writable};
  ERL_NIF_TERM values[] = {
      enif_make_uint(env, res->view.capacity()), make_u64(env, res->view.stale_after_ms()),
      enif_make_list_from_array(env, name_terms.data(), static_cast<unsigned>(name_terms.size())),
      make_u64(env, res->view.generation()), make_bool(res->writable)};
  return make_map(env, keys, values);
}

// board_join(board, worker_id, os_pid, start_time) -> {:ok, slot, index} | {:full,
// capacity}: the slot is tied to the calling process (freed when it dies).
SPSHM_GUARDED_NIF(nif_board_join)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  BoardResource* res;
  std::string id;
  std::uint64_t os_pid = 0, start = 0;
  if (!get_board(env, argv[0], &res) || !get_string(env, argv[1], &id) ||
      !get_u64(env, argv[2], &os_pid) || !get_u64(env, argv[3], &start) || os_pid > UINT32_MAX)
    return enif_make_badarg(env);
  if (id.empty() || id.size() > b::kWorkerIdCapacity)
    return make_error(env, Errc::invalid_argument, "a worker id is 1 to 64 bytes");
  if (res->region->is_deallocated()) return deleted(env);
  if (!res->writable || !writable_board(res->region))
    return make_error(env, Errc::permission_denied,
                      "the board is not writable here (read-only, sealed or deleted)");
  if (damaged(res->region)) return truncated(env);
  ErlNifPid self;
  if (!enif_self(env, &self)) return enif_make_badarg(env);
  std::uint32_t index = 0;
  std::uint64_t owner = 0;
  if (!res->view.join_locked(id, static_cast<std::uint32_t>(os_pid), start, res->locks(), true,
                             self_identity.pid, &index, &owner)) {
    return enif_make_tuple2(env, atom(env, "full"), enif_make_uint(env, res->view.capacity()));
  }
  void* mem = enif_alloc_resource(slot_type, sizeof(BoardSlotResource));
  if (mem == nullptr) {
    auto locks = res->locks();
    (void)res->view.leave(index, owner, &locks);
    return enif_make_badarg(env);
  }
  auto* slot = new (mem) BoardSlotResource();
  enif_keep_resource(res);
  slot->board = res;
  slot->index = index;
  slot->owner = owner;
  ERL_NIF_TERM term = enif_make_resource(env, slot);
  if (enif_monitor_process(env, slot, &self, nullptr) == 0) {
    slot->pinned.store(true);  // keeps the reference of enif_alloc_resource until left
  } else {
    enif_release_resource(slot);  // no monitor: the handle's lifetime is the slot's
  }
  return enif_make_tuple3(env, atoms.ok, term, enif_make_uint(env, index));
}

// board_update(slot, {state, queue, in_flight, memory, processed, errors, g0, g1, g2, g3})
// where each element is an integer or nil (keep the last published value).
SPSHM_GUARDED_NIF(nif_board_update)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  BoardSlotResource* slot;
  int arity = 0;
  const ERL_NIF_TERM* items;
  if (!get_slot(env, argv[0], &slot) || !enif_get_tuple(env, argv[1], &arity, &items) ||
      arity != 10)
    return enif_make_badarg(env);
  if (slot->left.load()) return make_error(env, Errc::closed, "this board slot was left");
  b::BoardSlot* s = slot->board->view.slot(slot->index);
  if (s == nullptr) return enif_make_badarg(env);
  if (slot->board->region->is_deallocated()) return deleted(env);
  if (!writable_board(slot->board->region))
    return make_error(env, Errc::permission_denied, "the board was sealed or deleted");
  if (damaged(slot->board->region)) return truncated(env);
  while (slot->writing.exchange(true, std::memory_order_acquire)) {
    // another scheduler thread is inside the ~50 ns section below
  }
  b::Values v = b::own_values(*s);
  std::uint64_t* u[] = {nullptr, &v.queue, &v.in_flight, &v.memory, &v.processed, &v.errors};
  for (int k = 0; k < 10; ++k) {
    if (enif_is_identical(items[k], atoms.nil)) continue;
    if (k == 0) {
      unsigned state;
      if (!enif_get_uint(env, items[0], &state) || state >= b::kStateCount) {
        slot->writing.store(false, std::memory_order_release);
        return enif_make_badarg(env);
      }
      v.state = state;
    } else if (k < 6) {
      ErlNifUInt64 x;
      if (!enif_get_uint64(env, items[k], &x)) {
        slot->writing.store(false, std::memory_order_release);
        return enif_make_badarg(env);
      }
      *u[k] = x;
    } else {
      ErlNifSInt64 x;
      if (!enif_get_int64(env, items[k], &x)) {
        slot->writing.store(false, std::memory_order_release);
        return enif_make_badarg(env);
      }
      v.gauges[k - 6] = x;
    }
  }
  bool ok = b::update_slot(*s, slot->owner, v);
  slot->writing.store(false, std::memory_order_release);
  if (!ok) return make_error(env, Errc::closed, "this board slot is no longer ours (reclaimed)");
  return atoms.ok;
}

SPSHM_GUARDED_NIF(nif_board_leave)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  BoardSlotResource* slot;
  if (!get_slot(env, argv[0], &slot)) return enif_make_badarg(env);
  if (slot->left.load()) return make_error(env, Errc::closed, "already left");
  if (!slot->leave())
    return make_error(env, Errc::closed, "this board slot is no longer ours (reclaimed)");
  return atoms.ok;
}

// board_entries(board) -> {now_ns, [unreadable index], [entry]}: every live slot, consistent
// copies; slots still changing after the retry budget are counted, not returned.
SPSHM_GUARDED_NIF(nif_board_entries)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  BoardResource* res;
  if (!get_board(env, argv[0], &res)) return enif_make_badarg(env);
  if (res->region->is_deallocated()) return deleted(env);
  if (damaged(res->region)) return truncated(env);
  std::uint64_t now = b::monotonic_ns();
  std::uint32_t budget = 4096;
  ERL_NIF_TERM list = enif_make_list(env, 0), unreadable = enif_make_list(env, 0);
  for (std::uint32_t i = res->view.capacity(); i-- > 0;) {
    b::Entry e;
    switch (res->view.read(i, now, &e, &budget)) {
      case b::ReadStatus::ok:
        list = enif_make_list_cell(env, make_entry(env, e, owner_alive(res, i, e.pid)), list);
        break;
      case b::ReadStatus::unreadable:
        unreadable = enif_make_list_cell(env, enif_make_uint(env, i), unreadable);
        break;
      case b::ReadStatus::free:
        break;
    }
  }
  if (damaged(res->region)) return truncated(env);  // this scan hit the truncation
  return enif_make_tuple3(env, make_u64(env, now), unreadable, list);
}

// board_least_loaded(board, [excluded_id]) -> {:ok, worker_id} |
// {:none, candidates, unreadable}. Ties go round-robin on the handle's own counter.
SPSHM_GUARDED_NIF(nif_board_least_loaded)(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]) {
  BoardResource* res;
  unsigned n = 0;
  if (!get_board(env, argv[0], &res) || !enif_get_list_length(env, argv[1], &n) || n > 4096)
    return enif_make_badarg(env);
  // board_least_loaded(board, exclude, true): the pick's owner is confirmed alive by the
  // kernel (its slot lock; one F_OFD_GETLK), a dead one is freed and the pick made again.
  bool verify = argc > 2 && enif_is_identical(argv[2], atoms.true_);
  std::vector<std::string> exclude;
  if (n > 0) {
    exclude.reserve(n);
    ERL_NIF_TERM list = argv[1], head;
    while (enif_get_list_cell(env, list, &head, &list)) {
      std::string id;
      if (!get_string(env, head, &id)) return enif_make_badarg(env);
      exclude.push_back(std::move(id));
    }
  }
  if (res->region->is_deallocated()) return deleted(env);
  if (damaged(res->region)) return truncated(env);
  std::uint64_t rotation = res->rotation.fetch_add(1, std::memory_order_relaxed);
  auto pick = n == 0 ? res->view.least_loaded_all(b::monotonic_coarse_ns(), rotation)
                     : res->view.least_loaded(b::monotonic_coarse_ns(), rotation, exclude);
  // At most a few dead owners are skipped per call (each costs a scan); a board full of
  // freshly dead workers answers no_worker only once they are all freed.
  for (int round = 0; verify && pick.found && round < 16; ++round) {
    const b::BoardSlot* slot = res->view.slot(pick.index);
    std::uint32_t pid = slot == nullptr ? 0 : slot->pid.load(std::memory_order_relaxed);
    if (owner_alive(res, pick.index, pid)) break;
    auto locks = res->locks();
    if (!(writable_board(res->region) && res->view.recover_dead(pick.index, locks))) {
      // Cannot free it from here (read-only handle): leave it out of this pick.
      if (pick.worker_id.empty()) pick.worker_id.assign(pick.id, pick.id_length);
      exclude.push_back(pick.worker_id);
      n = static_cast<unsigned>(exclude.size());
    }
    pick = n == 0 ? res->view.least_loaded_all(b::monotonic_coarse_ns(), rotation)
                  : res->view.least_loaded(b::monotonic_coarse_ns(), rotation, exclude);
  }
  if (damaged(res->region)) return truncated(env);  // this scan hit the truncation
  if (!pick.found)
    return enif_make_tuple3(env, atom(env, "none"), enif_make_uint(env, pick.candidates),
                            enif_make_uint(env, pick.unreadable));
  ERL_NIF_TERM id = n == 0 ? make_binary(env, std::string_view(pick.id, pick.id_length))
                           : make_binary(env, pick.worker_id);
  return enif_make_tuple2(env, atoms.ok, id);
}

// board_reclaim(region, os_pid, start_time) -> count: frees the slots of a dead OS
// process if the region holds a board (0 otherwise).
SPSHM_GUARDED_NIF(nif_board_reclaim)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* r;
  std::uint64_t os_pid = 0, start = 0;
  if (!get_region(env, argv[0], &r) || !get_u64(env, argv[1], &os_pid) ||
      !get_u64(env, argv[2], &start) || os_pid > UINT32_MAX)
    return enif_make_badarg(env);
  if (!writable_board(r)) return enif_make_uint(env, 0);
  DataAccess access(r);
  if (!access.ok() || r->region.data() == nullptr) return enif_make_uint(env, 0);
  b::View view;
  if (b::View::make(r->region.data(), r->region.capacity(), &view) != b::ViewStatus::ok)
    return enif_make_uint(env, 0);
  return enif_make_uint(env, view.reclaim(static_cast<std::uint32_t>(os_pid), start));
}

// board_watch_info(region) -> {generation, [{os_pid, start_time}]} | nil: what the
// manager needs to watch the OS processes that joined (nil if not a board).
SPSHM_GUARDED_NIF(nif_board_watch_info)(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  RegionResource* r;
  std::uint64_t known = 0;
  if (!get_region(env, argv[0], &r) || !get_u64(env, argv[1], &known)) return enif_make_badarg(env);
  if (!usable(r)) return atoms.nil;
  DataAccess access(r);
  if (!access.ok() || r->region.data() == nullptr) return atoms.nil;
  b::View view;
  if (b::View::make(r->region.data(), r->region.capacity(), &view) != b::ViewStatus::ok)
    return atoms.nil;
  std::uint64_t generation = view.generation();
  if (generation == known) return enif_make_tuple2(env, make_u64(env, generation), atoms.nil);
  ERL_NIF_TERM list = enif_make_list(env, 0);
  for (const auto& [pid, start] : view.owners())
    list = enif_make_list_cell(
        env, enif_make_tuple2(env, enif_make_uint(env, pid), make_u64(env, start)), list);
  return enif_make_tuple2(env, make_u64(env, generation), list);
}

SPSHM_GUARDED_NIF(nif_board_monotonic_ns)(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  return make_u64(env, b::monotonic_ns());
}

}  // namespace spshm::nif
