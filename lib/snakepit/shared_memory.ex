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
  `:timeout` passes, or `deallocate_region/1`. A mapping belongs to the process that
  made it: `unmap_region/1` or that process's death ends it. Zero-copy binaries of a
  sealed region stay valid after unmap and deallocation (they keep the memory mapped).
  """

  alias Snakepit.SharedMemory.{Access, Allocator, Error, Info, Manager, Mapping, Options}
  alias Snakepit.SharedMemory.{Config, Quota, Registry, Security, Stats}

  require Registry

  @type region_id :: String.t()
  @type error :: {:error, Error.t()}

  @doc """
  Allocates a region of `size` bytes. Returns its id, a string such as
  `"spshm_7q2m..."` (or `"spshm_n_<name>"` for a named region).

  Options (keyword list or map):

    * `:permissions` - `%{owner: :read_write | :read_only, group: :read_write |
      :read_only | :none, other: ...}`: the mode of the segment for other OS users.
      Group or other access needs the `:posix` backend. Defaults to owner-only
      read-write.
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
      1792 bytes of JSON. Defaults to `%{}`.
    * `:name` - a well-known name (1-21 characters of `[a-z0-9_-]`) so that other
      processes find the region as `spshm_n_<name>`. Defaults to `nil` (a random id).
    * `:open_mode` - for named regions: `:create` (fail if it exists), `:open_only`,
      `:create_or_open`, `:remove_and_create`. Defaults to `:create`.
    * `:backend` - `:auto`, `:memfd` (Linux: sealed anonymous memory, never visible in
      `/dev/shm`) or `:posix` (`/dev/shm`). `:auto` picks `:posix` when a name or
      group/other permissions need it, else the platform default (`:memfd` on Linux).
      Defaults to the `:default_backend` setting (`:auto`).
    * `:owner` - the pid whose death triggers the `:automatic` policy. Defaults to
      `self()`.

  Errors: `:invalid_size`, `:invalid_option`, `:invalid_metadata`, `:metadata_too_large`,
  `:size_exceeds_limit`, `:memory_limit_exceeded`, `:region_limit_exceeded`,
  `:process_limit_exceeded`, `:already_exists`, `:unsupported`, and native ones such as
  `:no_space` or `:mlock_failed`.
  """
  @spec allocate_region(pos_integer(), keyword() | map()) :: {:ok, region_id()} | error()
  def allocate_region(size, opts \\ []) do
    start = Stats.start()

    result =
      tables(fn ->
        with :ok <- available(),
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

    result =
      tables(fn ->
        with :ok <- available(),
             {:ok, opts} <- Options.map(opts),
             do: Access.map(region_id, opts)
      end)

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

    Stats.stop(
      :unmap,
      start,
      tables(fn -> with(:ok <- available(), do: Access.unmap(mapping)) end)
    )
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
  dirty scheduler. Errors: `:out_of_bounds`, `:sealed`, `:permission_denied` (read-only
  mapping), `:closed`, `:deallocated`.
  """
  @spec write(Mapping.t(), non_neg_integer(), iodata()) :: :ok | error()
  def write(%Mapping{} = mapping, offset, data) when is_integer(offset) and offset >= 0 do
    start = Stats.start()

    Stats.stop(:write, start, Access.write(mapping, offset, data), %{region_id: mapping.region_id})
  end

  def write(%Mapping{}, offset, _data), do: bad_offset(offset)
  def write(other, _offset, _data), do: not_a_mapping(other)

  @doc """
  Reads `length` bytes at `offset`. A sealed, unencrypted region gives a zero-copy
  binary (constant time whatever the length); other regions copy (above 64 KiB on a
  dirty scheduler), and encrypted ones are decrypted and verified (`:tampered` if the
  data was modified outside this VM).
  """
  @spec read(Mapping.t(), non_neg_integer(), non_neg_integer()) :: {:ok, binary()} | error()
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
  Seals a region: its data can no longer change (memfd: `F_SEAL_FUTURE_WRITE`; POSIX:
  mode 0400), writes fail with `:sealed`, and `read/3` returns zero-copy binaries.
  `:busy` while another OS process holds it writable. Irreversible and idempotent.
  """
  @spec seal(region_id()) :: :ok | error()
  def seal(region_id) do
    start = Stats.start()

    Stats.stop(:seal, start, with(:ok <- available(), do: Access.seal(region_id)), %{
      region_id: region_id
    })
  end

  @doc """
  Everything known about a region: `:id`, `:size`, `:backend`, `:name`, `:role`,
  `:created_at`, `:last_accessed` (`DateTime`, from the header: any process's access),
  `:access_count` (accesses through this VM), `:reference_count` (holds in the header:
  BEAM mappings and attached OS processes), `:owner`, `:permissions`,
  `:security_level`, `:cleanup_policy`, `:timeout`, `:access_mode`,
  `:allowed_processes`, `:metadata`, `:sealed`, `:encrypted`, `:adopted`, and
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
  Lists live regions, oldest first, described as by `get_region_info/1`.

  Filter (keyword list or map; every given key must match):

    * `:owner` - a pid. Defaults to any owner.
    * `:backend` - `:posix` or `:memfd`. Defaults to any.
    * `:security_level` - Defaults to any.
    * `:cleanup_policy` - Defaults to any.
    * `:older_than` - milliseconds since allocation. Defaults to any age.
    * `:name` - a well-known name. Defaults to any.
    * `:sealed` - `true` or `false`. Defaults to either.
  """
  @spec list_regions(keyword() | map()) :: {:ok, [Info.t()]} | error()
  def list_regions(filter \\ []) do
    with :ok <- available(), {:ok, filter} <- Options.filter(filter) do
      {:ok, filter |> Info.select() |> Info.describe_all()}
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
        {:error, reason} -> unavailable(reason)
      end
    end
  end

  @doc """
  Counters of this VM: `:allocations`, `:deallocations`, `:active_regions`,
  `:active_bytes`, `:limits`, `:errors` (count by reason), `:operations` (count and
  p50/p90/p99/max in microseconds per operation, from log2 histograms: exact to within
  a factor of two) and `:events` (expiries, owner deaths, orphans swept, ...).
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
       events: Map.drop(events, [:allocations, :deallocations])
     }}
  end

  @doc """
  The reference a Python worker attaches with (`snakepit_shm.attach(ref)`): a map with
  string keys, encodable as JSON (`Snakepit.SharedMemory.JSON.encode/1`): `"v"`,
  `"region_id"`, `"backend"`, `"control_path"`, `"data_path"`, `"data_offset"`,
  `"size"`, `"sealed"`, `"encrypted"`, `"dtype"`, `"shape"`, `"metadata"`, and `"key"`
  only when asked. Nothing else.

  A `:maximum` region must be sealed first (`:not_sealed`): it is shared read-only.

  Options:

    * `:include_key` - add the base64 key of an encrypted region, which lets the holder
      of the ref decrypt it: hand it only to the worker that needs it. Defaults to `false`.
    * `:dtype` - overrides the `dtype` of the metadata. Defaults to the metadata's.
    * `:shape` - overrides the `shape` of the metadata. Defaults to the metadata's.
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

  # ---- helpers ----

  defp available do
    if Registry.available?(), do: :ok, else: unavailable(:not_started)
  end

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

  defp bad_offset(offset),
    do:
      Error.error(
        :invalid_argument,
        "offset must be a non-negative integer, got: #{inspect(offset)}"
      )
end
