defmodule Snakepit.SharedMemory.Native do
  @moduledoc false
  # Raw NIF stubs (c_src/nif/). Not for direct use: call Snakepit.SharedMemory.
  #
  # Conventions of every function here:
  #   * a wrong term type raises ArgumentError (badarg): a non-integer, negative or float
  #     size/offset/length/pid, an unknown atom, a non-binary id/name/path (iolists are not
  #     accepted either), an option map missing a key, a resource of the wrong kind;
  #   * every expected failure returns {:error, {reason :: atom, message :: String.t(), errno :: integer}}
  #     where reason is the lower_snake_case name of spshm::Errc (c_src/core/error.hpp);
  #   * functions ending in _dirty run on a dirty scheduler; the facade picks them for
  #     payloads above @dirty_threshold bytes.
  #
  # Range decisions (well-typed values that cannot be used are error tuples, not badarg):
  #   * integers >= 2^64 are well typed: they are treated as "too large" (size: :too_large,
  #     offset/length: :out_of_bounds), never wrapped;
  #   * create/2 size 0 -> :invalid_argument; size > 2^62 -> :too_large;
  #   * offset + length is checked without 64-bit overflow -> :out_of_bounds;
  #   * mode > 0o777, security_level > 2, a timeout whose nanoseconds overflow 64 bits,
  #     an empty id/path or one holding a NUL byte -> :invalid_argument; names and ids are
  #     validated by the core (validate_name, open, inspect, unlink_segment);
  #   * write/3 and read/3 refuse more than 65536 bytes with :invalid_argument
  #     ("use write_dirty ..."): the facade picks the _dirty variant above that.
  #
  # Lifetimes:
  #   * a region resource owns the mapping of the region in this VM: it is unmapped only
  #     when the resource is garbage collected, after every mapping and zero-copy binary;
  #   * map/2 adds a hold of this OS process in the header; unmap/1 (or garbage collection
  #     of the mapping) removes it; a second unmap/1 returns {:error, {:closed, ...}};
  #   * a region whose header this process sees only as a private copy (a sealed POSIX
  #     region of another user, opened read-only) maps :read_only without a hold, and
  #     set_idle_timeout/release_holder refuse it with :permission_denied;
  #   * read_zero_copy/3 needs a sealed, unencrypted region; afterwards deallocate(region,
  #     true) is refused with :busy, because zeroing would change those binaries;
  #   * watch_os_process/3 keeps its pidfd open until cancel_watch/1, or until the process
  #     that created the watch exits: call cancel_watch/1 after the :select message.
  #
  # The NIF leaves RLIMIT_NOFILE alone: the VM sizes its poll set from the limit at boot,
  # so raise it (`ulimit -n`) before starting the VM to keep many memfd regions (2 fds each).
  #
  # SNAKEPIT_SHM_NIF_DIR=<dir> loads <dir>/snakepit_shm_nif.so instead of priv/ (for
  # example priv/asan/ built by `SNAKEPIT_SHM_SANITIZE=1 mix compile`).

  @on_load :load_nif
  for source <- Path.wildcard("c_src/nif/*.{cpp,hpp}") do
    @external_resource source
  end

  @type region :: reference()
  @type mapping :: reference()
  @type watch :: reference()
  @type nif_error :: {:error, {atom(), String.t(), integer()}}
  @type create_opts :: %{
          required(:backend) => :posix | :memfd,
          required(:name) => binary() | nil,
          required(:open_mode) => :create | :open_only | :create_or_open | :remove_and_create,
          required(:mode) => non_neg_integer(),
          required(:security_level) => 0..2,
          required(:encrypted) => boolean(),
          required(:lock_memory) => boolean(),
          required(:metadata) => binary(),
          required(:idle_timeout_ms) => non_neg_integer(),
          optional(:defer_chunks) => boolean(),
          optional(:defer_allocate) => boolean(),
          optional(:arena) => boolean(),
          optional(:huge_pages) => :auto | boolean(),
          optional(:drop_name) => boolean()
        }
  # %{id, backend, size, capacity, control_path, data_path, data_offset, role :: :created | :opened,
  #   encrypted, sealed, os_pid, zero_copy, control_offset, arena} (zero_copy: the kernel
  #   enforces the seal; control_offset: where an arena region's control block sits in
  #   control_path's object, 0 for a dedicated region; data_offset is then absolute)
  @type region_info :: map()

  def load_nif do
    dir =
      case :os.getenv(~c"SNAKEPIT_SHM_NIF_DIR") do
        value when value in [false, []] -> :code.priv_dir(:snakepit_shm)
        value -> value
      end

    :erlang.load_nif(:filename.join(dir, ~c"snakepit_shm_nif"), 0)
  end

  @doc false
  @spec header_layout() :: binary()
  def header_layout, do: :erlang.nif_error(:not_loaded)

  # ---- arenas of small regions (c_src/core/arena.hpp) ----
  # open/2 also takes {arena_path, arena_path, control_offset}: a region in an arena.

  @doc false
  @spec arena_configure(non_neg_integer(), non_neg_integer()) :: :ok | nif_error()
  def arena_configure(_arena_bytes, _grace_ms), do: :erlang.nif_error(:not_loaded)

  @doc false
  @spec arena_maintain() :: non_neg_integer()
  def arena_maintain, do: :erlang.nif_error(:not_loaded)

  @doc false
  @spec arena_stats() :: %{atom() => non_neg_integer()}
  def arena_stats, do: :erlang.nif_error(:not_loaded)

  @doc false
  # Every region in the arena at `path` (offline: the mix tasks): [{control_offset, header}].
  @spec inspect_arena(binary()) :: {:ok, [{non_neg_integer(), map()}]} | nif_error()
  def inspect_arena(_path), do: :erlang.nif_error(:not_loaded)

  @spec create(pos_integer(), create_opts()) :: {:ok, region(), region_info()} | nif_error()
  def create(_size, _opts), do: :erlang.nif_error(:not_loaded)

  @doc """
  create/2 on a normal scheduler, for unnamed regions of at most 65536 bytes (else
  :invalid_argument): saves the dirty-scheduler round trip (~10 us) of small creates.
  """
  @spec create_plain(pos_integer(), create_opts()) ::
          {:ok, region(), region_info()} | nif_error()
  def create_plain(_size, _opts), do: :erlang.nif_error(:not_loaded)

  @doc "create/2 on a dirty CPU scheduler (encrypted regions: creating them is encryption)."
  @spec create_cpu(pos_integer(), create_opts()) :: {:ok, region(), region_info()} | nif_error()
  def create_cpu(_size, _opts), do: :erlang.nif_error(:not_loaded)

  # Encrypted regions created in slices (issue 12): create_cpu/2 with `defer_chunks: true`
  # in the options leaves the chunks and the header to init_chunks/3 (dirty CPU, at most
  # 16 chunks of 64 KiB per call; returns the chunks left) and publish/1.
  @doc "Initialises chunks [first, first + count) of a region created with defer_chunks (internal)."
  @spec init_chunks(region(), non_neg_integer(), non_neg_integer()) ::
          {:ok, non_neg_integer()} | nif_error()
  def init_chunks(_region, _first, _count), do: :erlang.nif_error(:not_loaded)

  @doc "Publishes a region created with defer_chunks once every chunk is initialised (internal)."
  @spec publish(region()) :: :ok | nif_error()
  def publish(_region), do: :erlang.nif_error(:not_loaded)

  @doc """
  A region created with `defer_allocate: true` (unencrypted memfd): allocates the pages of
  its data object from `offset` (where the previous step ended), at most 8 MiB per call
  (dirty IO, about 1 ms), and returns where the next step starts; the same offset once
  every page is allocated (then `publish/1`). Until then other processes cannot open it
  and reads and writes answer `busy` (internal, issue 12).
  """
  @spec allocate_step(region(), non_neg_integer()) :: {:ok, non_neg_integer()} | nif_error()
  def allocate_step(_region, _offset), do: :erlang.nif_error(:not_loaded)

  @doc "Opens an existing region: by id (POSIX) or by {control_path, data_path}."
  @spec open(binary() | {binary(), binary()} | {binary(), binary(), non_neg_integer()}, boolean()) ::
          {:ok, region(), region_info()} | nif_error()
  def open(_target, _writable), do: :erlang.nif_error(:not_loaded)

  @spec info(region()) :: region_info()
  def info(_region), do: :erlang.nif_error(:not_loaded)

  @doc "Snapshot of the header: immutable fields, state, refcount, holders, times."
  @spec header(region()) :: {:ok, map()} | nif_error()
  def header(_region), do: :erlang.nif_error(:not_loaded)

  @doc "{holders_generation, refcount} of the header: two atomic loads, no allocation."
  @spec hold_counts(region()) :: {non_neg_integer(), non_neg_integer()}
  def hold_counts(_region), do: :erlang.nif_error(:not_loaded)

  @doc """
  Maps a region for this VM: one hold of the VM's OS process in the header.
  `:read_only_unheld` maps read-only without a hold, for the VM's own passing reads
  (`to_nx/1`, a fetch's sender), which must not count as holders of a
  `:reference_counted` region.
  """
  @spec map(region(), :read_only | :read_write | :read_only_unheld) ::
          {:ok, mapping()} | nif_error()
  def map(_region, _mode), do: :erlang.nif_error(:not_loaded)

  @doc "Removes the hold of map/2. The memory stays mapped while the region resource lives."
  @spec unmap(mapping()) :: :ok | nif_error()
  def unmap(_mapping), do: :erlang.nif_error(:not_loaded)

  @spec write(mapping(), non_neg_integer(), binary()) :: :ok | nif_error()
  def write(_mapping, _offset, _data), do: :erlang.nif_error(:not_loaded)
  @spec write_dirty(mapping(), non_neg_integer(), binary()) :: :ok | nif_error()
  def write_dirty(_mapping, _offset, _data), do: :erlang.nif_error(:not_loaded)

  @spec read(mapping(), non_neg_integer(), non_neg_integer()) :: {:ok, binary()} | nif_error()
  def read(_mapping, _offset, _length), do: :erlang.nif_error(:not_loaded)

  @spec read_dirty(mapping(), non_neg_integer(), non_neg_integer()) ::
          {:ok, binary()} | nif_error()
  def read_dirty(_mapping, _offset, _length), do: :erlang.nif_error(:not_loaded)

  @doc "Zero-copy read of a kernel-sealed (memfd), unencrypted region: the binary keeps the mapping alive."
  @spec read_zero_copy(mapping(), non_neg_integer(), non_neg_integer()) ::
          {:ok, binary()} | nif_error()
  def read_zero_copy(_mapping, _offset, _length), do: :erlang.nif_error(:not_loaded)

  # Large reads in slices (issue 12): a buffer binary of `length` bytes (not touched),
  # filled by read_into/5 on a dirty CPU scheduler one slice at a time, then handed over
  # whole, without a copy, by read_buffer_take/1.
  @doc "A read buffer of `length` bytes for read_into/5 (internal)."
  @spec read_buffer(non_neg_integer()) :: {:ok, reference()} | nif_error()
  def read_buffer(_length), do: :erlang.nif_error(:not_loaded)

  @doc "Copies (decrypts) `length` bytes at `offset` of the mapping into the buffer at `at` (dirty CPU, internal)."
  @spec read_into(mapping(), non_neg_integer(), reference(), non_neg_integer(), non_neg_integer()) ::
          :ok | nif_error()
  def read_into(_mapping, _offset, _buffer, _at, _length), do: :erlang.nif_error(:not_loaded)

  @doc "The read buffer's binary, without a copy; the buffer is empty afterwards (internal)."
  @spec read_buffer_take(reference()) :: {:ok, binary()} | nif_error()
  def read_buffer_take(_buffer), do: :erlang.nif_error(:not_loaded)

  @spec seal(region()) :: :ok | nif_error()
  def seal(_region), do: :erlang.nif_error(:not_loaded)

  @doc "Frees: marks deallocated, zeroes when asked (dirty), unlinks the name."
  @spec deallocate(region(), boolean()) :: :ok | nif_error()
  def deallocate(_region, _zero), do: :erlang.nif_error(:not_loaded)

  @doc """
  deallocate/2 on a normal scheduler; zeroing (zero: true) only for regions of at most
  65536 bytes of capacity (else :invalid_argument).
  """
  @spec deallocate_plain(region(), boolean()) :: :ok | nif_error()
  def deallocate_plain(_region, _zero), do: :erlang.nif_error(:not_loaded)

  @doc "last_access_ns of the header (CLOCK_REALTIME of the last map/read/write): one atomic load."
  @spec last_access(region()) :: non_neg_integer()
  def last_access(_region), do: :erlang.nif_error(:not_loaded)

  @doc "Sets the idle timeout in the header (0: never expires)."
  @spec set_idle_timeout(region(), non_neg_integer()) :: :ok | nif_error()
  def set_idle_timeout(_region, _ms), do: :erlang.nif_error(:not_loaded)

  @doc "Sets the adopted state bit (adopt_region/2); busy if another VM adopted it first."
  @spec mark_adopted(region()) :: :ok | nif_error()
  def mark_adopted(_region), do: :erlang.nif_error(:not_loaded)

  @doc "The key of an encrypted region (only for export_ref with include_key: true)."
  @spec export_key(region()) :: {:ok, binary()} | nif_error()
  def export_key(_region), do: :erlang.nif_error(:not_loaded)

  @doc "Releases every hold of a dead OS process; returns how many were released."
  @spec release_holder(region(), non_neg_integer(), non_neg_integer()) ::
          {:ok, non_neg_integer()} | nif_error()
  def release_holder(_region, _os_pid, _start_time), do: :erlang.nif_error(:not_loaded)

  @doc """
  Frees the holder slots of dead holders: slots whose lock (held by the holder's open
  file description for as long as it holds the region) is gone. Returns how many holds
  were released. Linux; 0 elsewhere.
  """
  @spec reap_holders(region()) :: {:ok, non_neg_integer()}
  def reap_holders(_region), do: :erlang.nif_error(:not_loaded)

  @doc """
  The holds of dead holders this VM released since it started, whichever call reaped
  them (`reap_holders/1`, `hold_counts/1`, a hold taking over a dead slot): what
  `Snakepit.SharedMemory.stats/0` reports as `os_holders_released`.
  """
  @spec reaped_holds() :: non_neg_integer()
  def reaped_holds, do: :erlang.nif_error(:not_loaded)

  @doc """
  `{holds, last_access_ns}` of each of at most 4096 regions, from the header's refcount
  and access-time words (`list_regions/1`). Does not reap dead holders' slots, unlike
  `hold_counts/1`: a dead holder counts until something reaps it.
  """
  @spec list_counts([region()]) :: [{non_neg_integer(), non_neg_integer()}]
  def list_counts(_regions), do: :erlang.nif_error(:not_loaded)

  @doc "Monitors `pid` from the region resource; on its death the NIF sends {:snakepit_shm_owner_down, region_id, pid} to the registered manager."
  @spec monitor_owner(region(), pid()) :: :ok | nif_error()
  def monitor_owner(_region, _pid), do: :erlang.nif_error(:not_loaded)

  @doc "Watches an OS process with a pidfd: the caller receives {:select, watch, ref, :ready_input} when it exits."
  @spec watch_os_process(non_neg_integer(), non_neg_integer(), reference()) ::
          {:ok, watch()} | nif_error()
  def watch_os_process(_os_pid, _start_time, _ref), do: :erlang.nif_error(:not_loaded)

  @doc "Stops a watch and closes its pidfd. Idempotent."
  @spec cancel_watch(watch()) :: :ok
  def cancel_watch(_watch), do: :erlang.nif_error(:not_loaded)

  @doc "Reads the header of a segment file without mapping it for use (offline tools)."
  @spec inspect_path(binary()) :: {:ok, map()} | nif_error()
  def inspect_path(_path), do: :erlang.nif_error(:not_loaded)

  @doc "Unlinks a POSIX segment by id if, and only if, it is provably ours."
  @spec unlink_segment(binary()) :: :ok | nif_error()
  def unlink_segment(_region_id), do: :erlang.nif_error(:not_loaded)

  @doc """
  Removes the POSIX segment `region_id` if it is ours and no open of it anywhere holds
  its liveness lock (dirty IO); with `dry_run` true only says what it would do.
  `:removed_incomplete`: it never got a header (its creator died creating it); `:young`:
  header-less, unused and under 10 s old (its creator may not have locked it yet, or be an
  older version that takes no locks).
  """
  @spec sweep_segment(binary(), boolean()) ::
          {:ok, :removed | :removed_incomplete | :in_use | :young} | nif_error()
  def sweep_segment(_region_id, _dry_run), do: :erlang.nif_error(:not_loaded)

  @doc """
  Starts a zeroing deallocation in slices (issue 12): the checks of `deallocate(region,
  true)`, then the header is marked deallocated (every later read and write, of any
  process, is refused). Continue with `zero_step/2` from offset 0, end with
  `deallocate_finish/1`. If the caller dies before the end, the NIF's reaper thread
  zeroes the rest and removes the name.
  """
  @spec deallocate_begin(region()) :: :ok | nif_error()
  def deallocate_begin(_region), do: :erlang.nif_error(:not_loaded)

  @doc """
  Zeroes at most 16 MiB of a region's data area from `offset` (where the previous step
  ended; dirty CPU, about 1 ms) and returns where the next step starts: the region's
  capacity once done. `busy` while a seal is being committed (retry).
  """
  @spec zero_step(region(), non_neg_integer()) :: {:ok, non_neg_integer()} | nif_error()
  def zero_step(_region, _offset), do: :erlang.nif_error(:not_loaded)

  @doc """
  Ends a zeroing deallocation once every `zero_step/2` is done: removes the name, gives
  the data area back (dirty IO).
  """
  @spec deallocate_finish(region()) :: :ok | nif_error()
  def deallocate_finish(_region), do: :erlang.nif_error(:not_loaded)

  @doc """
  Waits (dirty IO) up to `timeout_ms` (at most 1000) until no seal of this VM is being
  committed on the region, woken by the commit's end: `:ok`, or `busy` if one still
  runs. A zeroing deallocation refused as "being sealed" waits here, then retries.
  """
  @spec await_seal_commit(region(), 0..1000) :: :ok | nif_error()
  def await_seal_commit(_region, _timeout_ms), do: :erlang.nif_error(:not_loaded)

  @typedoc "An unlinked segment whose pages `release_pages_step/1` frees (issue 12)."
  @opaque unlinked :: reference()

  @doc """
  `sweep_segment(region_id, false)`, except that a removed segment is not closed (its
  last close would free every page in one long call): the third element is the open
  object, whose pages `release_pages_step/1` frees in slices (nil: nothing to free in
  slices, e.g. a sealed segment, closed here). Dirty IO.
  """
  @spec sweep_segment_begin(binary()) ::
          {:ok, :removed | :removed_incomplete | :in_use | :young, unlinked() | nil}
          | nif_error()
  def sweep_segment_begin(_region_id), do: :erlang.nif_error(:not_loaded)

  @doc """
  Frees up to 8 MiB of the pages of an object `sweep_segment_begin/1` handed over (dirty
  IO, about 1 ms) and returns the bytes left; at 0 the object is closed. `busy` while
  another call frees the same object. An object dropped before 0 is freed by the NIF's
  reaper thread.
  """
  @spec release_pages_step(unlinked()) :: {:ok, non_neg_integer()} | nif_error()
  def release_pages_step(_unlinked), do: :erlang.nif_error(:not_loaded)

  @doc """
  What the NIF's reaper thread did since the library was loaded: pieces of large
  mappings it unmapped, pieces of data objects whose pages it freed, the pause it
  takes after each millisecond of CPU spent on them (ns) and how many it took.
  """
  @spec reaper_stats() :: %{
          pieces_unmapped: non_neg_integer(),
          pieces_released: non_neg_integer(),
          pause_ns: non_neg_integer(),
          pauses: non_neg_integer()
        }
  def reaper_stats, do: :erlang.nif_error(:not_loaded)

  @doc """
  Removes the stale entries of the runtime index (the per-user directory where each
  memfd region is listed so that workers find it by bare id) and says what it kept and
  removed (dirty IO). `directory` is `nil` when the index is off.
  """
  @spec runtime_index_sweep() ::
          {:ok, %{directory: binary() | nil, kept: non_neg_integer(), removed: non_neg_integer()}}
  def runtime_index_sweep, do: :erlang.nif_error(:not_loaded)

  @doc """
  Waits up to `timeout_ms` until the runtime index entries of arena regions queued so
  far are written by the index's background writer (dirty IO; tests and benchmarks).
  """
  @spec runtime_index_flush(non_neg_integer()) ::
          :ok | {:error, {atom(), String.t(), integer()}}
  def runtime_index_flush(_timeout_ms), do: :erlang.nif_error(:not_loaded)

  @doc "Names starting with spshm_ in the shm directory, not validated (dirty IO)."
  @spec list_segments() :: [binary()]
  def list_segments, do: :erlang.nif_error(:not_loaded)

  @spec process_start_time(non_neg_integer()) :: {:ok, non_neg_integer()} | nif_error()
  def process_start_time(_os_pid), do: :erlang.nif_error(:not_loaded)

  @spec process_alive(non_neg_integer(), non_neg_integer()) :: boolean()
  def process_alive(_os_pid, _start_time), do: :erlang.nif_error(:not_loaded)

  @doc "%{os_pid, start_time, boot_id} of this VM."
  @spec self_info() :: map()
  def self_info, do: :erlang.nif_error(:not_loaded)

  @doc """
  The contents of up to 64 small files (at most 64 KiB each) in one dirty I/O call:
  `:error` for a file that cannot be read whole. Paths are binaries without NUL bytes.
  """
  @spec read_small_files([String.t()]) :: [binary() | :error]
  def read_small_files(_paths), do: :erlang.nif_error(:not_loaded)

  # ---- shm_path and filesystem space (c_src/nif/nif_health.cpp) ----

  @doc """
  Moves the POSIX segments of this VM (create, open, unlink, list, paths in refs) to
  `dir`, an existing absolute directory (normally a tmpfs). :unsupported off Linux.
  """
  @spec set_shm_dir(binary()) :: :ok | nif_error()
  def set_shm_dir(_dir), do: :erlang.nif_error(:not_loaded)

  @doc "The directory of POSIX segments (\"/dev/shm\" unless moved), nil where they are no files."
  @spec shm_dir() :: binary() | nil
  def shm_dir, do: :erlang.nif_error(:not_loaded)

  @doc "statvfs of `path`: bytes total, free, available to users, and whether it is a tmpfs."
  @spec fs_stat(binary()) ::
          {:ok,
           %{
             total: non_neg_integer(),
             free: non_neg_integer(),
             available: non_neg_integer(),
             tmpfs: boolean()
           }}
          | nif_error()
  def fs_stat(_path), do: :erlang.nif_error(:not_loaded)

  # ---- status board (c_src/nif/nif_board.cpp); used by Snakepit.SharedMemory.StatusBoard ----

  @type board :: reference()
  @type board_slot :: reference()

  @doc "The board layout (c_src/core/board.hpp) as JSON."
  @spec board_layout() :: binary()
  def board_layout, do: :erlang.nif_error(:not_loaded)

  @doc "Writes a fresh board header (capacity, stale_after ms, gauge names) into a region."
  @spec board_init(region(), pos_integer(), pos_integer(), [binary()]) :: :ok | nif_error()
  def board_init(_region, _capacity, _stale_after_ms, _gauges),
    do: :erlang.nif_error(:not_loaded)

  @doc "Validates the board in a region's data area and returns a handle to read/join it."
  @spec board_open(region()) :: {:ok, board()} | nif_error()
  def board_open(_region), do: :erlang.nif_error(:not_loaded)

  @doc "%{capacity, stale_after_ms, gauge_names, generation, writable}."
  @spec board_info(board()) :: map()
  def board_info(_board), do: :erlang.nif_error(:not_loaded)

  @doc "Claims a slot for the calling process (freed when it dies): {:ok, slot, index}."
  @spec board_join(board(), binary(), non_neg_integer(), non_neg_integer()) ::
          {:ok, board_slot(), non_neg_integer()}
          | {:full, pos_integer()}
          | nif_error()
  def board_join(_board, _worker_id, _os_pid, _start_time), do: :erlang.nif_error(:not_loaded)

  @doc "Publishes {state, queue, in_flight, memory, processed, errors, g0, g1, g2, g3} (nil keeps)."
  @spec board_update(board_slot(), tuple()) :: :ok | nif_error()
  def board_update(_slot, _values), do: :erlang.nif_error(:not_loaded)

  @spec board_leave(board_slot()) :: :ok | nif_error()
  def board_leave(_slot), do: :erlang.nif_error(:not_loaded)

  @doc "{now_ns, [unreadable slot index], [entry tuple]} of every live slot."
  @spec board_entries(board()) ::
          {non_neg_integer(), [non_neg_integer()], [tuple()]} | nif_error()
  def board_entries(_board), do: :erlang.nif_error(:not_loaded)

  @spec board_entries_dirty(board()) ::
          {non_neg_integer(), [non_neg_integer()], [tuple()]} | nif_error()
  def board_entries_dirty(_board), do: :erlang.nif_error(:not_loaded)

  @doc "{:ok, worker_id} or {:none, candidates, unreadable}; ties round-robin per handle."
  @spec board_least_loaded(board(), [binary()]) ::
          {:ok, binary()} | {:none, non_neg_integer(), non_neg_integer()} | nif_error()
  def board_least_loaded(_board, _exclude), do: :erlang.nif_error(:not_loaded)

  @doc """
  board_least_loaded/2, and with `verify` true the pick's owner is confirmed alive by
  its slot lock (a dead one is freed and the pick made again).
  """
  @spec board_least_loaded(board(), [binary()], boolean()) ::
          {:ok, binary()} | {:none, non_neg_integer(), non_neg_integer()} | nif_error()
  def board_least_loaded(_board, _exclude, _verify), do: :erlang.nif_error(:not_loaded)

  @doc "Frees the board slots of a dead OS process (0 if the region is not a board)."
  @spec board_reclaim(region(), non_neg_integer(), non_neg_integer()) :: non_neg_integer()
  def board_reclaim(_region, _os_pid, _start_time), do: :erlang.nif_error(:not_loaded)

  @doc """
  {generation, [{os_pid, start_time}] | nil} of the board in a region (nil owners when
  the generation is still `known`), or nil if the region holds no board.
  """
  @spec board_watch_info(region(), non_neg_integer()) ::
          {non_neg_integer(), [{non_neg_integer(), non_neg_integer()}] | nil} | nil
  def board_watch_info(_region, _known), do: :erlang.nif_error(:not_loaded)

  @doc "CLOCK_MONOTONIC nanoseconds (the clock of the board's timestamps)."
  @spec board_monotonic_ns() :: non_neg_integer()
  def board_monotonic_ns, do: :erlang.nif_error(:not_loaded)

  # ---- the message channel (c_src/nif/nif_channel.cpp; see Snakepit.SharedMemory.Channel) ----
  # A channel resource owns the owner end of a channel. channel_select/1 arms enif_select
  # for the calling process, which then receives {:select, ch, :undefined, :ready_input}.
  # channel_send/2 takes a binary of at most inline_max bytes; larger messages go through
  # channel_prepare_region/1 (dirty) and channel_send_region/2. Closed channels answer
  # {:closed, reason}.

  @type channel :: reference()

  @spec channel_layout() :: binary()
  def channel_layout, do: :erlang.nif_error(:not_loaded)

  @spec channel_open(map()) :: {:ok, channel()} | nif_error()
  def channel_open(_opts), do: :erlang.nif_error(:not_loaded)

  @spec channel_info(channel()) :: map()
  def channel_info(_ch), do: :erlang.nif_error(:not_loaded)

  @spec channel_select(channel()) :: :ok | {:closed, atom()} | nif_error()
  def channel_select(_ch), do: :erlang.nif_error(:not_loaded)

  @spec channel_events(channel()) :: :listening | :accept_paused | :connected | {:closed, atom()}
  def channel_events(_ch), do: :erlang.nif_error(:not_loaded)

  @spec channel_send(channel(), binary()) :: :ok | :would_block | {:closed, atom()} | nif_error()
  def channel_send(_ch, _bin), do: :erlang.nif_error(:not_loaded)

  @spec channel_prepare_region(binary()) :: {:ok, reference()} | nif_error()
  def channel_prepare_region(_bin), do: :erlang.nif_error(:not_loaded)

  @spec channel_send_region(channel(), reference()) ::
          :ok | :would_block | {:closed, atom()} | nif_error()
  def channel_send_region(_ch, _prepared), do: :erlang.nif_error(:not_loaded)

  @spec channel_recv(channel(), pos_integer(), non_neg_integer()) ::
          {:ok, [binary()]} | {:closed, atom(), [binary()]} | nif_error()
  def channel_recv(_ch, _max_count, _max_bytes), do: :erlang.nif_error(:not_loaded)

  # One wake-up of a connected channel's process: events, up to max_count messages, and
  # (if fewer were there) the sleep announcement and the re-armed select. armed false:
  # look again now.
  @spec channel_pump(channel(), pos_integer(), non_neg_integer()) ::
          {:ok, [binary()], boolean()} | {:closed, atom(), [binary()]} | nif_error()
  def channel_pump(_ch, _max_count, _max_bytes), do: :erlang.nif_error(:not_loaded)

  # The owner's doorbell as an fd for an fd port (Channel.Server), its close once the port
  # is closed, and the wake-up of an active channel woken by that port.
  @spec channel_doorbell(channel()) :: {:ok, non_neg_integer()} | nif_error()
  def channel_doorbell(_ch), do: :erlang.nif_error(:not_loaded)

  @spec channel_doorbell_close(channel()) :: :ok
  def channel_doorbell_close(_ch), do: :erlang.nif_error(:not_loaded)

  @spec channel_pump_bell(
          channel(),
          pos_integer(),
          non_neg_integer(),
          boolean(),
          non_neg_integer()
        ) ::
          {:ok, [binary()], boolean() | :spin} | {:closed, atom(), [binary()]} | nif_error()
  def channel_pump_bell(_ch, _max_count, _max_bytes, _woke, _spin_ns),
    do: :erlang.nif_error(:not_loaded)

  # The calling process (the channel's) is monitored by the resource: its death closes it.
  @spec channel_guard(channel()) :: :ok | nif_error()
  def channel_guard(_ch), do: :erlang.nif_error(:not_loaded)

  @spec channel_prepare_wait(channel(), boolean(), boolean(), non_neg_integer()) :: boolean()
  def channel_prepare_wait(_ch, _want_data, _want_space, _need),
    do: :erlang.nif_error(:not_loaded)

  @spec channel_flush(channel()) :: :ok
  def channel_flush(_ch), do: :erlang.nif_error(:not_loaded)

  @spec channel_close(channel()) :: :ok
  def channel_close(_ch), do: :erlang.nif_error(:not_loaded)

  @spec channel_monitor(channel(), pid()) :: :ok | nif_error()
  def channel_monitor(_ch, _pid), do: :erlang.nif_error(:not_loaded)

  @spec channel_stats(channel()) :: map()
  def channel_stats(_ch), do: :erlang.nif_error(:not_loaded)

  @doc """
  Removes the socket directories (`spshm-ch-XXXXXX`, with their `ctl` socket) that
  channels of dead VMs left in `$XDG_RUNTIME_DIR`, `$TMPDIR` and `/tmp` (each once, if it
  exists; a custom `:socket_dir` is not swept) and returns how many it removed (dirty
  IO). A live channel holds a shared `flock` on its directory for as long as it exists,
  so only directories whose lock is free are removed (the kernel answers, no PID is
  trusted), and only once they are 10 s old, of this user, mode 0700, and hold nothing
  but the socket (docs/CHANNEL.md). `{:error, _}` only if the NIF ran out of memory.
  """
  @spec channel_sweep_dirs() :: non_neg_integer() | nif_error()
  def channel_sweep_dirs, do: :erlang.nif_error(:not_loaded)

  # Test probe of the ring (c_src/nif/nif_ring_probe.cpp), for the PropEr model.
  @doc false
  def ring_probe_new(_capacity, _ack_mode, _max_batch), do: :erlang.nif_error(:not_loaded)
  @doc false
  def ring_probe_write(_probe, _length, _seed), do: :erlang.nif_error(:not_loaded)
  @doc false
  def ring_probe_read(_probe), do: :erlang.nif_error(:not_loaded)
  @doc false
  def ring_probe_flush(_probe), do: :erlang.nif_error(:not_loaded)
  @doc false
  def ring_probe_indices(_probe), do: :erlang.nif_error(:not_loaded)

  # ---- the warm pool and huge pages (nif_pool.cpp) ----
  @spec pool_configure(non_neg_integer()) :: :ok
  def pool_configure(_budget), do: :erlang.nif_error(:not_loaded)
  @spec pool_drain() :: {:ok, non_neg_integer()}
  def pool_drain, do: :erlang.nif_error(:not_loaded)
  @spec pool_stats() :: map()
  def pool_stats, do: :erlang.nif_error(:not_loaded)

  @spec huge_page_info() :: %{
          page_size: non_neg_integer(),
          total: non_neg_integer(),
          free: non_neg_integer()
        }
  def huge_page_info, do: :erlang.nif_error(:not_loaded)
  @doc "True if the data memfd at `path` (/proc/<pid>/fd/<n>) sits in a VM's warm pool."
  @spec pooled_object(binary()) :: boolean()
  def pooled_object(_path), do: :erlang.nif_error(:not_loaded)

  # ---- quota charges (nif_quota.cpp, c_src/core/quota.hpp) ----
  # A charge is given back once: quota_release/1, or its destructor when the last
  # reference dies (a caller killed mid-allocation or mid-free). Limits: -1 for none.
  @type quota_charge :: reference()
  @type quota_owner :: reference()
  @spec quota_owner_new() :: quota_owner()
  def quota_owner_new, do: :erlang.nif_error(:not_loaded)

  @spec quota_reserve(quota_owner() | nil, non_neg_integer(), integer(), integer(), integer()) ::
          {:ok, quota_charge()} | {:error, :regions | :bytes | :owner, integer()}
  def quota_reserve(_owner, _bytes, _max_regions, _max_bytes, _max_per_owner),
    do: :erlang.nif_error(:not_loaded)

  @spec quota_release(quota_charge()) :: boolean()
  def quota_release(_charge), do: :erlang.nif_error(:not_loaded)
  @spec quota_resize(quota_charge(), non_neg_integer()) :: :ok
  def quota_resize(_charge, _bytes), do: :erlang.nif_error(:not_loaded)
  @spec quota_host(quota_charge(), pid(), pos_integer()) :: :ok
  def quota_host(_charge, _client, _reservation_id), do: :erlang.nif_error(:not_loaded)
  @spec quota_attach(quota_charge(), region()) :: :ok
  def quota_attach(_charge, _region), do: :erlang.nif_error(:not_loaded)
  @spec quota_held(quota_charge()) :: boolean()
  def quota_held(_charge), do: :erlang.nif_error(:not_loaded)
  @spec quota_totals() :: {integer(), integer()}
  def quota_totals, do: :erlang.nif_error(:not_loaded)
  @spec quota_owned(quota_owner()) :: integer()
  def quota_owned(_owner), do: :erlang.nif_error(:not_loaded)
  @doc "Whether dropping the last reference to a POSIX region created here keeps its name."
  @spec keep_name(region(), boolean()) :: :ok
  def keep_name(_region, _keep), do: :erlang.nif_error(:not_loaded)
  @doc "Names removed because a caller was killed mid-allocation or mid-free (since load)."
  @spec names_dropped() :: non_neg_integer()
  def names_dropped, do: :erlang.nif_error(:not_loaded)
end
