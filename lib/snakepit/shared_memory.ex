defmodule Snakepit.SharedMemory do
  @moduledoc """
  Shared memory regions for handing large data to Python worker processes without
  copying it through a pipe, a socket or gRPC.

      {:ok, id} = Snakepit.SharedMemory.allocate_region(byte_size(payload), metadata: %{dtype: "float32", shape: [1024, 256]})
      {:ok, mapping} = Snakepit.SharedMemory.map_region(id, access_mode: :read_write)
      :ok = Snakepit.SharedMemory.write(mapping, 0, payload)
      {:ok, ref} = Snakepit.SharedMemory.export_ref(id)
      # send `ref` (JSON) to a worker: snakepit_shm.attach(ref).ndarray()
      :ok = Snakepit.SharedMemory.unmap_region(mapping)
      :ok = Snakepit.SharedMemory.deallocate_region(id)

  Every function returns `{:ok, value}` (or `:ok`) on success and
  `{:error, %Snakepit.SharedMemory.Error{}}` for bad input, refusals and OS failures;
  none raises for a bad value and none returns a raw errno.

  ## When not to use it

  For payloads of a few kilobytes a message or a port is simpler and as fast; regions
  pay off from roughly a hundred kilobytes, and most when a region is reused (fresh
  pages cost a page fault each on first touch). Regions are local to one machine.

  ## Where the work happens

  Allocation, mapping, reads, writes and deallocation run in the calling process
  (public ETS tables, `:atomics`, NIFs); none waits for a GenServer. The manager
  (`Snakepit.SharedMemory.Manager`) only handles deaths, periodic cleanup and
  `cleanup_regions/1`.

  ## Lifetimes

  A region lives until its cleanup policy frees it (see `allocate_region/2`), its idle
  `:timeout` passes, or `deallocate_region/1`. Expiry is checked by the manager's
  periodic cleanup, every `:cleanup_interval` ms (`config :snakepit_shm`, default 5 000):
  a region with `timeout: 1_000` is freed between 1 and about 6 seconds after its last
  access. A mapping whose region was freed answers `:deallocated`, saying why. A mapping belongs to the process that
  made it: `unmap_region/1` or that process's death ends it. Zero-copy binaries of a
  sealed region stay valid after unmap and deallocation (they keep the memory mapped).
  """

  alias Snakepit.SharedMemory.{Access, Allocator, Error, Info, Manager, Mapping, Options}
  alias Snakepit.SharedMemory.{Config, Quota, Registry, Security, Stats}

  require Registry

  @max_u64 0xFFFF_FFFF_FFFF_FFFF

  @type region_id :: String.t()
  @type error :: {:error, Error.t()}

  @doc """
  Allocates a region of `size` bytes. Returns its id, a string such as
  `"spshm_7q2m..."` (or `"spshm_n_<name>"` for a named region).

  Options (keyword list or map):

    * `:permissions` - a map `%{owner: o, group: g, other: x}`, each one of
      `:read_write`, `:read_only` or `:none` (`:owner`: `:read_write` or `:read_only`):
      the mode of the segment for other OS users. Group or other access needs the
      `:posix` backend. Defaults to owner-only read-write.
    * `:timeout` - milliseconds without access (map, read, write; a worker's attach)
      after which the region expires and is freed, or `:infinity`. A region that some
      process holds (a mapping, an attached worker) is in use and does not expire.
      Defaults to the `:default_timeout` setting (`:infinity`).
    * `:security_level` - `:standard`, `:high` (encrypted at rest, verified on read,
      zeroed on free) or `:maximum` (`:high` plus locked in RAM, kept out of core dumps,
      exported only when sealed, every access audited). Defaults to the `:security_level`
      setting (`:standard`).
    * `:access_mode` - `:read_write`, or `:read_only` to let processes other than the
      owner map it only read-only. Defaults to `:read_write`.
    * `:cleanup_policy` - `:automatic` (freed when the owner dies), `:reference_counted`
      (freed when the last mapping or attached worker lets go, after at least one), or
      `:manual` (freed only by `deallocate_region/1`, `cleanup_regions/1` or expiry).
      Defaults to `:automatic`.
    * `:allowed_processes` - pids (besides the owner) allowed to map, seal, export and
      deallocate it; others get `:permission_denied` (and an audit log entry). Defaults
      to `[]`: every process of this VM.
    * `:metadata` - a JSON-encodable map stored in the region header, visible to workers
      (`dtype` and `shape` are used by `export_ref/2` and `Region.ndarray()`), at most
      1792 bytes of JSON. A `dtype` must be one of numpy's names
      (`Snakepit.SharedMemory.Dtype`) and `shape` x itemsize must fit in `size`
      (`:invalid_metadata` otherwise). Defaults to `%{}`.
    * `:name` - a well-known name (1-21 characters of `[a-z0-9_-]`) so that other
      processes find the region as `spshm_n_<name>`. Defaults to `nil` (a random id).
    * `:open_mode` - for named regions: `:create` (fail if it exists), `:open_only`,
      `:create_or_open`, `:remove_and_create`. Defaults to `:create`. Opening an
      existing region of another size is a `:size_mismatch` error; pass `size` `:any`
      with `:open_only` to take it whatever its size.
    * `:backend` - `:auto`, `:memfd` (Linux: sealed anonymous memory, never visible in
      `/dev/shm`) or `:posix` (`/dev/shm`). `:auto` picks `:posix` when a name or
      group/other permissions need it, else the platform default (`:memfd` on Linux).
      Defaults to the `:default_backend` setting (`:auto`).
    * `:owner` - the pid whose death triggers the `:automatic` policy. Defaults to
      `self()`.
    * `:huge_pages` - memfd regions of at least one huge page (2 MiB): `:auto` takes
      them from the host's hugetlb pool when it has enough free pages (the size rounds
      up to whole huge pages) and silently uses ordinary pages otherwise; `true` fails
      with `:no_space` when it has not; `false` never uses them. A smaller region
      never uses them, whatever the value (a whole huge page for a few KiB). Defaults
      to the `:huge_pages` setting (`:auto`). `mix snakepit.shm.doctor` shows the
      host's pool.

  Large `:standard` memfd regions may come from the warm pool of freed ones
  (`Snakepit.SharedMemory.WarmPool`, setting `:pool_bytes`): they read as zeros like
  fresh ones.

  Errors: `:invalid_size`, `:invalid_option`, `:invalid_metadata`, `:metadata_too_large`,
  `:size_exceeds_limit`, `:memory_limit_exceeded`, `:region_limit_exceeded`,
  `:process_limit_exceeded`, `:already_exists`, `:size_mismatch`, `:unsupported`,
  `:disabled` (the application runs with `enabled: false`), and native ones such as
  `:no_space` or `:mlock_failed`. With a host-wide quota configured (`:host_quota`, see
  `Snakepit.SharedMemory.HostQuota`): `:quota_exceeded` (the message says who holds
  what), `:unknown_quota`, `:unavailable`.
  """
  @spec allocate_region(pos_integer() | :any, keyword() | map()) :: {:ok, region_id()} | error()
  def allocate_region(size, opts \\ []) do
    start = Stats.start()

    result =
      tables(fn ->
        with :ok <- available(),
             :ok <- enabled(),
             {:ok, opts} <- Options.allocate(size, opts),
             do: Allocator.allocate(opts)
      end)

    Stats.stop(:allocate, start, result, %{size: size})
  end

  @doc """
  Maps a region for the calling process and returns a `Snakepit.SharedMemory.Mapping`
  to `read/3` and `write/3` through. Adds one hold to the region's reference count
  until `unmap_region/1` or the death of the calling process.

  Options:

    * `:access_mode` - `:read_write` or `:read_only`. Defaults to `:read_write`, or
      `:read_only` when the region is sealed or allocated `access_mode: :read_only` and
      the caller is not its owner.
  """
  @spec map_region(region_id(), keyword() | map()) :: {:ok, Mapping.t()} | error()
  def map_region(region_id, opts \\ []) do
    start = Stats.start()

    # The hot path checks nothing up front: a missing table reads as "no such region" or
    # raises, and only then does available/1 tell a stopped application apart.
    result =
      tables(fn ->
        with {:ok, opts} <- Options.map(opts), do: Access.map(region_id, opts)
      end)
      |> or_unavailable()

    Stats.stop(:map, start, result, %{region_id: region_id})
  end

  @doc """
  Ends a mapping: removes its hold (a `:reference_counted` region whose count reaches
  zero is freed). Zero-copy binaries read through it stay valid. `:closed` if it was
  already unmapped.
  """
  @spec unmap_region(Mapping.t()) :: :ok | error()
  def unmap_region(%Mapping{region_id: id} = mapping) when is_binary(id) do
    start = Stats.start()

    Stats.stop(:unmap, start, tables(fn -> Access.unmap(mapping) end) |> or_unavailable())
  end

  def unmap_region(other), do: not_a_mapping(other)

  @doc """
  Frees a region now, whatever its cleanup policy: its BEAM mappings end, the header
  is marked deallocated (attached workers see it), `:high` and `:maximum` regions are
  zeroed, and the name leaves `/dev/shm`. Memory still mapped by workers is returned to
  the OS when they close it.
  """
  @spec deallocate_region(region_id()) :: :ok | error()
  def deallocate_region(region_id) do
    start = Stats.start()

    result =
      tables(fn ->
        with :ok <- available(),
             {:ok, record} <- Access.lookup(region_id),
             Registry.region(owner: owner, allowed: allowed, security_level: level) = record,
             :ok <- Security.authorize(region_id, owner, allowed, self(), :deallocate),
             {:ok, _record} <- Allocator.free(region_id, :deallocated) do
          Security.audit(level, region_id, :deallocate, %{})
        end
      end)

    Stats.stop(:deallocate, start, result, %{region_id: region_id})
  end

  @doc """
  Writes `data` (a binary or iodata) at byte `offset`. Payloads above 64 KiB run on a
  dirty scheduler, in slices of at most 1 MiB with a return to a normal scheduler between
  them (one long call would delay other processes' timers): a seal, a deallocation or a
  writer in another process that comes between two slices ends the write with its error,
  the slices before it written. Bounds are checked first: an out-of-bounds write writes
  nothing. Errors: `:out_of_bounds`, `:sealed`, `:permission_denied` (read-only mapping),
  `:closed`, `:deallocated`, `:busy`.
  """
  @spec write(Mapping.t(), non_neg_integer(), iodata()) :: :ok | error()
  def write(%Mapping{region_id: id, size: size} = mapping, offset, _data)
      when is_binary(id) and is_integer(size) and is_integer(offset) and offset > @max_u64,
      do: beyond_end(:write, mapping, offset, nil)

  def write(%Mapping{} = mapping, offset, data) when is_integer(offset) and offset >= 0 do
    start = Stats.start()

    Stats.stop(:write, start, Access.write(mapping, offset, data), %{region_id: mapping.region_id})
  end

  def write(%Mapping{}, offset, _data), do: bad_offset(offset)
  def write(other, _offset, _data), do: not_a_mapping(other)

  @doc """
  Reads `length` bytes at `offset`. An unencrypted region whose seal the kernel enforces
  (memfd) gives a zero-copy binary (constant time whatever the length); other regions copy
  (above 64 KiB on a dirty scheduler) — POSIX regions too, even sealed, since their owner
  can make them writable again — and encrypted ones are decrypted and verified
  (`:tampered` if the data was modified outside this VM; `:busy` while another process
  writes it). `:truncated` if a peer truncated a POSIX segment under the mapping. A copy
  above 1 MiB is made in slices of at most 1 MiB into one binary (no second copy): a
  writer in another process may change the region between two slices.
  """
  @spec read(Mapping.t(), non_neg_integer(), non_neg_integer()) :: {:ok, binary()} | error()
  def read(%Mapping{region_id: id, size: size} = mapping, offset, length)
      when is_binary(id) and is_integer(size) and is_integer(offset) and offset >= 0 and
             is_integer(length) and length >= 0 and (offset > @max_u64 or length > @max_u64),
      do: beyond_end(:read, mapping, offset, length)

  def read(%Mapping{} = mapping, offset, length)
      when is_integer(offset) and offset >= 0 and is_integer(length) and length >= 0 do
    start = Stats.start()

    Stats.stop(:read, start, Access.read(mapping, offset, length), %{region_id: mapping.region_id})
  end

  def read(%Mapping{}, offset, length) when is_integer(offset) and offset >= 0,
    do:
      Error.error(
        :invalid_argument,
        "length must be a non-negative integer, got: #{inspect(length)}"
      )

  def read(%Mapping{}, offset, _length), do: bad_offset(offset)
  def read(other, _offset, _length), do: not_a_mapping(other)

  @doc """
  Seals a region: its data can no longer change, writes fail with `:sealed`. On memfd
  the kernel enforces it for every process (`F_SEAL_WRITE`) and `read/3` then returns
  zero-copy binaries; on POSIX it is mode 0400, a weaker promise, and reads keep copying
  (docs/SECURITY.md). Writes of this VM already running finish first (it may wait, on a
  dirty scheduler). `:busy` — and nothing changes — while another OS process holds or
  maps the data writable (a worker attached "rw", a forked child of one, a raw writable
  mapping). Irreversible and idempotent.
  """
  @spec seal(region_id()) :: :ok | error()
  def seal(region_id) do
    start = Stats.start()

    Stats.stop(:seal, start, with(:ok <- available(), do: Access.seal(region_id)), %{
      region_id: region_id
    })
  end

  @doc """
  Everything known about a region: `:id`, `:node` (the node holding it), `:size`,
  `:backend`, `:name`, `:role`,
  `:created_at`, `:last_accessed` (`DateTime`, from the header: any process's access),
  `:access_count` (accesses through this VM), `:reference_count` (holds in the header:
  BEAM mappings and attached OS processes), `:owner`, `:permissions`,
  `:security_level`, `:cleanup_policy`, `:timeout`, `:access_mode`,
  `:allowed_processes`, `:metadata`, `:sealed`, `:encrypted`, `:adopted` (taken over
  from a worker with `adopt_region/2`, or re-registered after a registry loss), and
  `:mapped_by` (pids with a live mapping, then `%{os_pid, holds, writable}` of other OS
  processes holding it).
  """
  @spec get_region_info(region_id()) :: {:ok, Info.t()} | error()
  def get_region_info(region_id) do
    with :ok <- available(), {:ok, record} <- Access.lookup(region_id) do
      {:ok, Info.describe(record)}
    end
  end

  @doc """
  Lists live regions, oldest first, described as by `get_region_info/1` except for the
  times: `:created_at` and `:last_accessed` are integers, microseconds since the Unix
  epoch (`:last_accessed` is `nil` if the region was never accessed), so that listing
  10 000 regions makes no `DateTime`s. `Snakepit.SharedMemory.Info.to_datetimes/1`
  converts one description (the mix tasks do, for people to read).

  Filter (keyword list or map; every given key must match):

    * `:owner` - a pid. Defaults to any owner.
    * `:backend` - `:posix` or `:memfd`. Defaults to any.
    * `:security_level` - Defaults to any.
    * `:cleanup_policy` - Defaults to any.
    * `:older_than` - milliseconds since allocation. Defaults to any age.
    * `:name` - a well-known name. Defaults to any.
    * `:sealed` - `true` or `false`. Defaults to either.
  """
  @spec list_regions(keyword() | map()) :: {:ok, [Info.listed()]} | error()
  def list_regions(filter \\ []) do
    with :ok <- available(), {:ok, filter} <- Options.filter(filter) do
      {:ok, Info.list(filter)}
    end
  end

  @doc """
  Frees what is due now and, on request, more. Returns what was freed (or, with
  `dry_run: true`, what would be) as `%{region_id, reason, size}` maps. Reasons:
  `:expired`, `:owner_down`, `:unreferenced`, `:vanished`, `:requested` (matched a
  selector below) and `:orphan` (a segment left in `/dev/shm` by a dead VM).

  Options:

    * `:dry_run` - report without freeing. Defaults to `false`.
    * `:expired_only` - only regions whose idle timeout passed. Defaults to `false`.
    * `:orphans` - also sweep segments of dead VMs. Defaults to `true` (unless
      `:expired_only`).
    * `:owner` - also free every region owned by this pid. Defaults to `nil`.
    * `:older_than` - also free every region allocated more than this many ms ago.
      Defaults to `nil`.
    * `:ids` - also free these regions. Defaults to `nil`.
    * `:all` - also free every region. Defaults to `false`.
  """
  @spec cleanup_regions(keyword() | map()) ::
          {:ok, [%{region_id: region_id(), reason: atom(), size: non_neg_integer()}]} | error()
  def cleanup_regions(opts \\ []) do
    with :ok <- available(), {:ok, opts} <- Options.cleanup(opts) do
      case Manager.cleanup(opts) do
        {:ok, freed} -> {:ok, freed}
        {:error, reason} -> manager_gone(reason)
      end
    end
  end

  @doc """
  Counters of this VM: `:allocations`, `:deallocations`, `:active_regions`,
  `:active_bytes`, `:limits`, `:errors` (count by reason), `:operations` (count and
  p50/p90/p99/max in microseconds per operation, from log2 histograms: exact to within
  a factor of two), `:events` (expiries, owner deaths, orphans swept, ...) and `:pool`
  (the warm pool of large regions: `:hits`, `:misses`, `:bytes_held`, ... see
  `Snakepit.SharedMemory.WarmPool.stats/0`).
  """
  @spec stats() :: {:ok, map()}
  def stats do
    %{events: events, errors: errors, operations: operations} = Stats.snapshot()
    config = Config.get()

    {regions, totals} =
      if Registry.available?(), do: {Registry.count(), Quota.totals()}, else: {0, %{bytes: 0}}

    {:ok,
     %{
       allocations: events.allocations,
       deallocations: events.deallocations,
       active_regions: regions,
       active_bytes: totals.bytes,
       limits:
         Map.take(config, [
           :max_regions,
           :max_region_size,
           :max_total_memory,
           :max_regions_per_process
         ]),
       errors: errors,
       operations: operations,
       events: Map.drop(events, [:allocations, :deallocations]),
       pool: Snakepit.SharedMemory.WarmPool.stats()
     }}
  end

  @doc """
  The reference a Python worker attaches with (`snakepit_shm.attach(ref)`): a map with
  string keys, encodable as JSON (`Snakepit.SharedMemory.JSON.encode/1`): `"v"`,
  `"region_id"`, `"backend"`, `"control_path"`, `"data_path"`, `"data_offset"`,
  `"size"`, `"sealed"`, `"encrypted"`, `"dtype"`, `"shape"`, `"format"` (`"numpy"` when a
  dtype is known, `"arrow"` or `"raw"` as the metadata's `format` says, else `"raw"`),
  `"metadata"`, `"node"` (the Erlang node holding the region, for `fetch/2`), `"boot_id"`
  (the host's boot id, 32 hex digits: a worker on another host refuses the ref and says
  to fetch it first), `"key"` only when asked, and `"control_offset"` only for a region
  carved out of an arena (where its control block sits in the arena `"control_path"`
  names; docs/FORMAT.md "Arenas"). Nothing else.

  A `:maximum` region must be sealed first (`:not_sealed`): it is shared read-only.

  Options:

    * `:include_key` - add the base64 key of an encrypted region, which lets the holder
      of the ref decrypt it: hand it only to the worker that needs it. Defaults to `false`.
    * `:dtype` - overrides the `dtype` of the metadata. Defaults to the metadata's.
    * `:shape` - overrides the `shape` of the metadata. Defaults to the metadata's.

  The resulting dtype must be a numpy name and `shape` x itemsize must fit in the
  region (`:invalid_option` otherwise).
  """
  @spec export_ref(region_id(), keyword() | map()) :: {:ok, map()} | error()
  def export_ref(region_id, opts \\ []) do
    start = Stats.start()

    result =
      with :ok <- available(),
           {:ok, opts} <- Options.export(opts),
           do: Access.export(region_id, opts)

    Stats.stop(:export, start, result, %{region_id: region_id})
  end

  @doc """
  The health of this VM's shared memory, checked now: `%{status: :ok | :degraded |
  :critical, checks: [check]}`, the status being the worst of the checks. Each check
  is `%{name, status, value, limit, percent, measurements, message}`; `message` says
  what is wrong and what to do (nil when the check is `:ok`). The same checks run every
  `:health_check_interval` ms and in `mix snakepit.shm.doctor`; see
  `Snakepit.SharedMemory.Health`.
  """
  @spec health() :: Snakepit.SharedMemory.Health.report()
  def health, do: Snakepit.SharedMemory.HealthMonitor.check_now()

  # ---- worker outputs and Snakepit glue ----

  @doc """
  Takes over a region a Python worker created for its output
  (`snakepit_shm.allocate(size, dtype=..., shape=...)` or `snakepit_shm.from_array(a)`,
  whose `.ref` the worker returned). Accepts the ref as a map, its JSON, or wrapped in a
  Snakepit `ZeroCopyRef` marker. Returns the region id, now registered in this VM as if
  allocated here: the owner, cleanup policy, timeout, limits and quotas apply, and
  `map_region/2`, `read/3`, `seal/1` (then zero-copy reads), `export_ref/2` and
  `deallocate_region/1` work on it. The worker's ownership ends (it closes its
  descriptors when it sees the adopted bit).

  `seal/1` answers `:busy` while the worker still has the output attached read-write:
  let the worker close it (leave its `with` block) before it returns the ref. With
  `cleanup_policy: :reference_counted`, the holds the worker had before adoption do not
  count: the region is freed once a holder of it after adoption (a mapping, an attached
  worker) lets go and none is left. If the worker still holds its output when it is
  adopted (a `from_array` result it did not close), counting starts once the worker
  lets go of it.

  Adopt while the worker is alive: a worker that dies before adoption leaves nothing
  behind (memfd regions die with it; POSIX ones are removed by the next orphan sweep),
  and adopting then gives `:not_found`; so does adopting after the output's
  `keep_seconds` (600 s unless the worker gave another): the worker gives up a result
  nobody adopted by then (and warns, `UnadoptedOutputWarning`). Only unencrypted regions; once only
  (`:already_adopted`). Only worker outputs (their header carries the `worker_output`
  flag): the ref of a region another VM allocated, even on this host, is refused
  (`:invalid_argument`); `fetch/2` or map it there instead.

  Options: `:owner` (default `self()`), `:cleanup_policy`, `:timeout` (default: the
  worker's `allocate(..., timeout=...)`, else `:default_timeout`),
  `:allowed_processes`, `:access_mode`, as for `allocate_region/2`.
  """
  @spec adopt_region(map() | String.t(), keyword() | map()) :: {:ok, region_id()} | error()
  def adopt_region(ref, opts \\ []) do
    start = Stats.start()

    result =
      with :ok <- available(),
           :ok <- enabled(),
           do: Snakepit.SharedMemory.Adoption.adopt(ref, opts)

    Stats.stop(:allocate, start, result, %{adopted: true})
  end

  @doc """
  Snakepit's `ZeroCopyRef` wire marker for a region (by id: exported with
  `export_ref/2` first) or for a ref: `%{"__snakepit_zero_copy__" => true, "kind" =>
  "shm", "device" => "cpu", "dtype", "shape", "owner", "ref" => our ref, "copy" =>
  false, "bytes", "metadata"}`. Put it in a tool's arguments;
  `snakepit_shm.attach/resolve` on the worker understand it.
  """
  @spec to_zero_copy_ref(region_id() | map(), keyword() | map()) :: {:ok, map()} | error()
  def to_zero_copy_ref(id_or_ref, export_opts \\ [])

  def to_zero_copy_ref(id, export_opts) when is_binary(id) do
    with {:ok, ref} <- export_ref(id, export_opts),
         do: Snakepit.SharedMemory.ZeroCopy.to_marker(ref)
  end

  def to_zero_copy_ref(ref, _export_opts), do: Snakepit.SharedMemory.ZeroCopy.to_marker(ref)

  @doc """
  Our ref out of a Snakepit `ZeroCopyRef` marker (a map or its JSON) of kind `"shm"`,
  e.g. a worker's answer, ready for `adopt_region/2`. `:unsupported` for other kinds.
  """
  @spec from_zero_copy_ref(map() | String.t()) :: {:ok, map()} | error()
  def from_zero_copy_ref(marker) do
    with {:ok, ref} <- Snakepit.SharedMemory.ZeroCopy.unwrap(marker) do
      if is_binary(ref["region_id"]),
        do: {:ok, ref},
        else:
          Error.error(
            :invalid_argument,
            "the marker carries no ref: #{inspect(marker, limit: 8)}"
          )
    end
  end

  @doc """
  The environment variables a Python worker needs to `import snakepit_shm`:
  `{:ok, %{"PYTHONPATH" => ".../priv/python[:existing]", "SNAKEPIT_SHM_LIB" =>
  ".../priv/libsnakepit_shm.so", "SNAKEPIT_SHM_RUNTIME_DIR" => dir}}` (where this VM
  keeps its runtime index, for bare-id lookups by a worker started with another
  environment), plus `"SNAKEPIT_SHM_PATH"` when `:shm_path` is configured. Give the map to a Snakepit pool as `adapter_env`
  (`Enum.to_list/1` if a list of pairs is wanted), or to `System.cmd/3`'s `:env`.
  """
  @spec python_env() :: {:ok, %{String.t() => String.t()}}
  def python_env, do: {:ok, Snakepit.SharedMemory.ZeroCopy.python_env()}

  @doc """
  The region's contents as an Nx tensor, typed and shaped by its metadata's `dtype`
  and `shape` (`{:f, 32}` for `"float32"`, see `Snakepit.SharedMemory.Dtype`). Needs
  Nx loaded (`:unsupported` otherwise); no compile-time dependency. A sealed region is
  read without copying. It reads without taking a hold: it never frees a
  `:reference_counted` region (only a mapping or a worker letting go does).
  """
  @spec to_nx(region_id()) :: {:ok, term()} | error()
  def to_nx(region_id) do
    # A mapping without a hold: to_nx/1 is a read, not a holder letting go (its unmap
    # freed a :reference_counted region that nothing else held).
    with {:ok, info} <- get_region_info(region_id),
         {:ok, binary} <-
           tables(fn -> Access.with_unheld(region_id, &read(&1, 0, info.size)) end) do
      meta = info.metadata
      dtype = meta["dtype"] || meta[:dtype]
      shape = meta["shape"] || meta[:shape]
      Snakepit.SharedMemory.ZeroCopy.to_nx(binary, dtype, shape)
    end
  end

  @doc """
  The node of the cluster that holds `region_id`: `{:ok, node}`, or
  `{:error, %Error{reason: :not_found}}` if no connected node does.

  A region of this node is answered from the local registry with no remote call; any
  other with at most one: the directory of region ids is sharded over the nodes
  running `:snakepit_shm` (rendezvous hashing of the id over the members of a `:pg`
  group), and only the node holding the id's shard is asked. The directory is updated
  by messages, without making allocation wait: a region allocated on another node a
  moment ago, or whose shard moved because a node joined or left, can be missed for the
  few milliseconds its entry takes to arrive. A ref from `export_ref/2` names its node,
  so `fetch/2` of a ref needs no lookup at all.
  See `Snakepit.SharedMemory.Cluster.Directory`. Errors: `:not_found`,
  `:invalid_argument`, `:nodedown` (the shard's node did not answer).
  """
  @spec locate(region_id()) :: {:ok, node()} | error()
  def locate(region_id) do
    with :ok <- available(), do: Snakepit.SharedMemory.Cluster.locate(region_id)
  end

  @doc """
  Copies a region of another node (a region id, or its ref from `export_ref/2`) into a
  new region of this node, over distributed Erlang, and returns the new id.

  The region is streamed in chunks with a bounded window of unacknowledged chunks (so
  neither VM ever holds more than `window * chunk_size` of it in memory), each chunk
  CRC-32-checked and the whole compared against the sender's digest. The copy gets the
  source's size, metadata, security level and seal; it is owned by the caller
  (cleanup policy `:automatic` unless `:region` says otherwise). If anything fails —
  the other node goes down (`:nodedown`), a check fails (`:corrupt`, `:tampered`), the
  link stalls (`:timeout`), the node runs no `:snakepit_shm` (`:unavailable`) — the
  partial copy is freed before the error is returned; if the caller dies mid-transfer,
  or after it but before it got the result, the copy is freed too (whatever its
  `:region` options: nobody else knows its id).

  Encrypted regions (`:high`, `:maximum`) travel encrypted with a key made for the
  transfer (X25519 + ChaCha20-Poly1305), never with their own key, and arrive in a
  region encrypted with a key of this VM; the copy cannot have a lower security level
  than the source (`:permission_denied`), and a `:maximum` source must be sealed
  (`:not_sealed`), as for `export_ref/2`. The source's `:allowed_processes` applies to
  the caller. See `Snakepit.SharedMemory.Cluster.Wire`.

  Options (keyword list or map):

    * `:node` - the node to copy from. Defaults to the ref's `"node"` if connected,
      else `locate/1`.
    * `:into` - a region of this node (id or ref), at least as large, to write into
      instead of allocating one, such as a region a Python worker is attached to: the
      bytes land straight in its mapping. Not freed on failure (it is not ours); its
      content is then undefined. Defaults to `nil`.
    * `:region` - `allocate_region/2` options for the copy (`:owner`,
      `:cleanup_policy`, `:timeout`, `:metadata`, ...; `:open_mode` only `:create`: the
      copy is always a new region). Defaults to `[]`.
    * `:security_level` - the copy's level, at least the source's. Defaults to the
      source's.
    * `:encrypt` - encrypt the transfer of a `:standard` region too. Defaults to
      `false` (encrypted regions always travel encrypted).
    * `:chunk_size` - bytes per chunk, 4096 to 64 MiB. Defaults to 4 MiB.
    * `:window` - chunks in flight, 1 to 64. Defaults to 4.
    * `:chunk_timeout` - ms without progress before giving up (at most 4294967295).
      Defaults to 30000.
    * `:checksum` - whole-region digest, `:crc32` or `:sha256`. Defaults to `:crc32`.
    * `:progress` - a pid that receives `{:snakepit_shm_fetch_progress, region_id,
      bytes_done, total}` after each chunk. Defaults to `nil`.

  Telemetry: `[:snakepit_shm, :fetch, :progress]` after each chunk (measurements
  `%{bytes, total}`, metadata `%{region_id, node, local_region_id}`) and
  `[:snakepit_shm, :fetch, :stop]` (`%{duration}`, `%{region_id, node, result}`).
  """
  @spec fetch(region_id() | map(), [Snakepit.SharedMemory.Cluster.fetch_option()] | map()) ::
          {:ok, region_id()} | error()
  def fetch(region_id_or_ref, opts \\ []) do
    with :ok <- available(), do: Snakepit.SharedMemory.Cluster.fetch(region_id_or_ref, opts)
  end

  # ---- helpers ----

  defp enabled do
    if Config.get(:enabled),
      do: :ok,
      else:
        Error.error(
          :disabled,
          "shared memory is disabled (config :snakepit_shm, enabled: false, or " <>
            "config :snakepit, :shared_memory, enabled: false): allocations are refused; " <>
            "set enabled: true to use it"
        )
  end

  defp available do
    if Registry.available?(), do: :ok, else: unavailable(:not_started)
  end

  # An error of a call made without available/0 first: :unavailable if the reason was
  # that the application is not running.
  defp or_unavailable({:error, _} = error) do
    case available() do
      :ok -> error
      unavailable -> unavailable
    end
  end

  defp or_unavailable(result), do: result

  # The registry tables live in a process that does nothing (TableOwner), so they outlive
  # any number of manager crashes; they vanish under a running call only when the
  # application stops or that process dies. Such a call returns :unavailable instead of
  # raising the ArgumentError of a missing ETS table.
  defp tables(fun) do
    fun.()
  rescue
    e in ArgumentError ->
      if Registry.available?(), do: reraise(e, __STACKTRACE__), else: unavailable(:tables_gone)
  end

  # The manager exited during the call (killed, crashed; its supervisor restarts it)
  # or was between two lives: the application runs, so "start it" would be wrong.
  defp manager_gone(reason) do
    if Registry.available?() do
      why =
        case reason do
          {why, {GenServer, :call, _}} -> why
          why -> why
        end

      what =
        if why == :noproc,
          do: "was being restarted",
          else: "exited before cleanup_regions/1 finished (#{inspect(why, limit: 5)})"

      Error.error(
        :unavailable,
        "the manager (Snakepit.SharedMemory.Manager) #{what}; its supervisor restarts " <>
          "it. Some of the selected regions may be freed already: call " <>
          "cleanup_regions/1 again (list_regions/1 shows what is left)",
        %{exit: why}
      )
    else
      unavailable(reason)
    end
  end

  defp unavailable(reason) do
    Error.error(
      :unavailable,
      "the :snakepit_shm application is not running (#{inspect(reason)}): start it with " <>
        "Application.ensure_all_started(:snakepit_shm)"
    )
  end

  defp not_a_mapping(other) do
    Error.error(
      :invalid_argument,
      "expected a %Snakepit.SharedMemory.Mapping{} from map_region/2, got: #{inspect(other, limit: 5)}"
    )
  end

  # Offsets and lengths the native layer cannot take (it would saturate them to
  # 2^64 - 1 and name that number in its message): out of bounds, with the caller's own.
  defp beyond_end(operation, mapping, offset, length) do
    start = Stats.start()
    span = if length, do: "offset #{offset} + length #{length}", else: "offset #{offset}"

    result =
      Error.error(
        :out_of_bounds,
        "#{span} exceeds the size of region #{mapping.region_id} (#{mapping.size} bytes)",
        %{region_id: mapping.region_id}
      )

    Stats.stop(operation, start, result, %{region_id: mapping.region_id})
  end

  defp bad_offset(offset),
    do:
      Error.error(
        :invalid_argument,
        "offset must be a non-negative integer, got: #{inspect(offset)}"
      )
end
