defmodule Snakepit.SharedMemory.Allocator do
  @moduledoc """
  Creating and freeing regions, in the calling process.

  Both paths stay exact when their caller is killed at any instant, without anyone
  noticing the death: the region's quota charge (`Snakepit.SharedMemory.Quota`) is held
  by the caller's heap until the registry record holds it, and again once the record
  is taken out, so a killed caller's charge gives itself back with its heap; a POSIX
  segment created here loses its name with the last reference to its region unless it
  is registered (`Native.keep_name/2`). Exactly one process frees a region: the one
  whose `:ets.take/2` returned its record.

  `free/3` is the only place a region is freed, whoever asks: `deallocate_region/1`, the
  cleanup policies, expiry, the manager on owner death, `cleanup_regions/1`.
  """

  require Logger
  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{
    Access,
    Config,
    Error,
    MemoryLimits,
    Native,
    Quota,
    Registry,
    Security,
    Stats
  }

  alias Snakepit.SharedMemory.HostQuota

  import Snakepit.SharedMemory.Registry, only: [region: 1, region: 2]

  # Above this size, a memfd region's pages are allocated in slices (allocate_step/2).
  @allocate_slice 16 * 1024 * 1024

  # Above this size, zeroing at deallocation goes in slices (Native.zero_step/2's bound).
  @zero_slice 16 * 1024 * 1024

  # Largest size the plain (normal-scheduler) create and zeroing NIFs take.
  @plain_limit 65_536

  @doc """
  Allocates (or, for named regions, opens) a region from validated options (see
  `Snakepit.SharedMemory.Options.allocate/2`). Returns `{:ok, region_id}`.
  """
  @spec allocate(map()) :: {:ok, String.t()} | {:error, Error.t()}
  def allocate(opts) do
    Registry.register_caller()

    case named_existing(opts) do
      :none -> reserve_and_create(opts)
      {:existing, id} -> {:ok, id}
      {:remove_first, id} -> remove_then_allocate(id, opts)
      {:error, _} = error -> error
    end
  end

  # A well-known name this VM already registered: answer from the registry rather than
  # opening the segment a second time.
  defp named_existing(%{name: nil}), do: :none

  defp named_existing(%{name: name, open_mode: mode} = opts) do
    id = "spshm_n_" <> name

    case {Registry.lookup(id), mode} do
      {nil, _} ->
        :none

      {_record, :create} ->
        Error.error(
          :already_exists,
          "a region named #{inspect(name)} already exists (#{id}): use open_mode: " <>
            ":create_or_open or :open_only to share it, or :remove_and_create to replace it",
          %{region_id: id}
        )

      {_record, :remove_and_create} ->
        {:remove_first, id}

      {region(size: size), _open} ->
        with :ok <- same_size(id, size, opts.size), do: {:existing, id}
    end
  end

  # open_only / create_or_open finding a region of another size: the caller's idea of
  # the region is wrong, say so (size: :any opts out).
  defp same_size(_id, _size, :any), do: :ok
  defp same_size(_id, size, size), do: :ok

  defp same_size(id, size, wanted) do
    Error.error(
      :size_mismatch,
      "the existing region #{id} has #{size} bytes, not the #{wanted} asked for: pass its " <>
        "size, or size :any with open_mode: :open_only to take it whatever its size",
      %{region_id: id, size: size, requested: wanted}
    )
  end

  defp reserved_size(%{size: :any}), do: 0
  defp reserved_size(%{size: size}), do: size

  defp remove_then_allocate(id, opts) do
    case free(id, :replaced) do
      {:error, %Error{reason: reason}} = error when reason != :not_found -> error
      _ -> reserve_and_create(opts)
    end
  end

  defp reserve_and_create(opts) do
    config = Config.get()
    flags = Security.level_flags(opts.security_level)

    # From the reservation on, a kill leaves nothing behind: the charge (and the host
    # reservation riding on it) gives itself back with this process's heap, and a POSIX
    # segment created here loses its name with its last reference until it is registered.
    # Failures give the host reservation back before the charge (a kill in between:
    # the charge abandons it again, harmlessly).
    with :ok <- memory_headroom(opts.size),
         {:ok, charge} <- Quota.reserve(opts.owner, reserved_size(opts), config),
         :ok <- checkpoint(:reserved),
         {:ok, host} <- host_reserve(opts, charge),
         :ok <- checkpoint(:host_reserved) do
      case create(opts, native_options(opts, flags, config)) do
        {:ok, _ref, %{role: :opened} = info} when info.size != opts.size and opts.size != :any ->
          HostQuota.Regions.discard(host)
          Quota.release(charge)
          same_size(info.id, info.size, opts.size)

        {:ok, ref, info} ->
          register(ref, info, opts, host, charge)

        {:error, native} ->
          HostQuota.Regions.discard(host)
          Quota.release(charge)
          {:error, Error.from_native(native, %{size: opts.size, backend: opts.backend})}
      end
    end
  end

  # A container's memory cgroup, not the host, bounds what this VM may allocate: going
  # past it gets the VM OOM-killed (Snakepit.SharedMemory.MemoryLimits). `size: :any`
  # only opens an existing region: nothing new is charged.
  defp memory_headroom(:any), do: :ok

  defp memory_headroom(size) do
    case MemoryLimits.check(size) do
      :ok -> :ok
      {:error, message} -> Error.error(:no_space, message, %{size: size})
    end
  end

  # The host-wide quota (config :host_quota), after this VM's own limits. `size: :any`
  # only opens an existing region (its creator holds the reservation).
  defp host_reserve(%{size: :any}, _charge), do: {:ok, nil}

  defp host_reserve(opts, charge) do
    case HostQuota.Regions.reserve(opts.size, charge) do
      {:ok, host} ->
        {:ok, host}

      {:error, _} = error ->
        Quota.release(charge)
        error
    end
  end

  # size :any (open_only): the core ignores the size when it opens an existing region.
  defp create(%{size: :any}, native_opts), do: Native.create(1, native_opts)

  # Small memfd regions are created on the calling scheduler: a dirty NIF costs a
  # scheduler round trip (~10 us) even when its work takes less. A POSIX segment is a
  # name in a shared directory: opening it is dirty work, whatever its size.
  defp create(%{size: size, name: nil, backend: :memfd}, native_opts) when size <= @plain_limit,
    do: Native.create_plain(size, native_opts)

  # Creating an encrypted region encrypts every chunk: CPU work, for a CPU scheduler, in
  # slices of 1 MiB that come back to a normal scheduler between them (one call encrypting
  # a large region delayed idle normal schedulers' timers for as long: bench/FINDINGS.md
  # section 7). An opened (existing) region has nothing to initialise.
  # Its pages are allocated in slices first (large memfd regions, as below).
  defp create(opts, %{encrypted: true} = native_opts) do
    native_opts = Map.merge(native_opts, %{defer_chunks: true, defer_allocate: true})

    with {:ok, ref, info} <- Native.create_cpu(opts.size, native_opts) do
      if info.role == :created, do: initialise(ref, info), else: {:ok, ref, info}
    end
  end

  # A large unencrypted memfd region: its data object is sized at once and its pages
  # allocated in dirty calls of 8 MiB, returning to a normal scheduler between them (one
  # fallocate of the whole object kept a core busy for tens of milliseconds:
  # bench/FINDINGS.md section 7); published only then. A caller killed midway leaves
  # nothing: an unpublished memfd dies with its descriptors.
  defp create(%{size: size, name: nil, backend: :memfd}, %{lock_memory: false} = native_opts)
       when size > @allocate_slice do
    with {:ok, ref, info} <- Native.create(size, Map.put(native_opts, :defer_allocate, true)) do
      case allocate_pages(ref, 0) do
        :ok ->
          {:ok, ref, info}

        error ->
          _ = Native.deallocate(ref, false)
          error
      end
    end
  end

  defp create(opts, native_opts), do: Native.create(opts.size, native_opts)

  @doc false
  # Public for the tests: allocates a deferred region's pages step by step and publishes
  # it. A region that was not deferred (its data object came from the warm pool, already
  # allocated) answers invalid_argument at the first step: then it is published as is.
  @spec allocate_pages(Native.region(), non_neg_integer()) :: :ok | Native.nif_error()
  def allocate_pages(ref, offset) do
    with :ok <- allocate_all(ref, offset), do: publish_deferred(ref)
  end

  defp allocate_all(ref, offset) do
    case Native.allocate_step(ref, offset) do
      {:ok, ^offset} -> :ok
      {:ok, next} -> allocate_all(ref, next)
      # not deferred: small, from the warm pool, or not a memfd (allocated at creation)
      {:error, {:invalid_argument, _, _}} when offset == 0 -> :ok
      error -> error
    end
  end

  defp publish_deferred(ref) do
    case Native.publish(ref) do
      :ok -> :ok
      # not deferred (a pooled object): already published
      {:error, {:invalid_argument, _, _}} -> :ok
      error -> error
    end
  end

  defp initialise(ref, info) do
    with :ok <- allocate_all(ref, 0),
         :ok <- init_chunks(ref, 0),
         :ok <- Native.publish(ref) do
      {:ok, ref, info}
    else
      error ->
        _ = Native.deallocate(ref, false)
        error
    end
  end

  @chunks_per_call 16

  defp init_chunks(ref, first) do
    case Native.init_chunks(ref, first, @chunks_per_call) do
      {:ok, 0} -> :ok
      {:ok, _left} -> init_chunks(ref, first + @chunks_per_call)
      error -> error
    end
  end

  defp native_options(opts, flags, config) do
    %{
      arena: Snakepit.SharedMemory.Arena.use?(opts, flags, config),
      backend: opts.backend,
      name: opts.name,
      open_mode: opts.open_mode,
      mode: opts.mode,
      security_level: flags.level,
      encrypted: flags.encrypted,
      lock_memory: flags.lock_memory,
      metadata: opts.metadata_json,
      idle_timeout_ms: if(opts.timeout == :infinity, do: 0, else: opts.timeout),
      huge_pages: Map.get(opts, :huge_pages, false),
      # A POSIX segment created here loses its name with its last reference until it is
      # registered (Native.keep_name/2): a caller killed before that leaves nothing.
      drop_name: true
    }
  end

  defp opened_baseline(ref) do
    case Native.hold_counts(ref) do
      {generation, 0} -> generation
      {_generation, _held} -> nil
    end
  end

  defp register(ref, info, opts, host, charge) do
    checkpoint(:created)
    # An opened named region has the size its creator gave it.
    if info.size != opts.size, do: Quota.resize(charge, info.size)
    # A free of this region cut short by a kill removes its name with the charge.
    Native.quota_attach(charge, ref)

    record =
      region(
        id: info.id,
        ref: ref,
        size: info.size,
        backend: info.backend,
        role: info.role,
        name: opts.name,
        owner: opts.owner,
        created_at: System.os_time(:millisecond),
        seq: System.unique_integer([:monotonic]),
        permissions: opts.permissions,
        security_level: opened_level(info, ref, opts),
        cleanup_policy: opts.cleanup_policy,
        timeout: opts.timeout,
        access_mode: opts.access_mode,
        allowed: opts.allowed,
        metadata: opened_metadata(info, ref, opts),
        counters: new_counters(info),
        quota: charge,
        # An opened named region may have been held by others before: only holds after
        # this open count for :reference_counted (else the first tick dropped it); holds
        # still there count from when they are gone, as for an adopted output.
        held_after: if(info.role == :opened, do: opened_baseline(ref), else: 0)
      )

    # Write order for crash safety: the host reservation's row first (a registered region
    # always has one), then the record (with the charge) in one insert; then the name is
    # kept, then the owner monitor is armed. Once in the registry a region can always be
    # found and freed; an owner dying before its monitor is armed is caught below
    # (monitor_owner answers not_found) or, if this caller is killed right here, by the
    # periodic check of dead owners (Cleanup.due/1).
    HostQuota.Regions.bind(host, info.id, info.role)
    checkpoint(:bound)

    if Registry.insert_new(record) do
      checkpoint(:registered)
      Native.keep_name(ref, true)
      checkpoint(:kept)
      watch_owner(ref, info.id, opts.owner)
      Snakepit.SharedMemory.Cluster.Directory.added(info.id)
      Stats.count(:allocations)
      {:ok, info.id}
    else
      # Only a named region opened concurrently by two callers of this VM gets here: the
      # other caller registered it; drop this second handle and share the first (its
      # host reservation, as an opened region's, was given back by bind/3).
      Quota.release(charge)
      {:ok, info.id}
    end
  end

  @doc false
  # Slot 1: accesses through this VM; slot 2: sealed (see Snakepit.SharedMemory.Access):
  # 1 sealed, 2 sealed by the kernel (zero-copy reads). For an opened or adopted region
  # `zero_copy` comes from the kernel's own seals (F_GET_SEALS), not from the header.
  # Slot 3: why it was freed (Snakepit.SharedMemory.Freed).
  def new_counters(info) do
    counters = :counters.new(Snakepit.SharedMemory.Freed.slots(), [:write_concurrency])
    if info.sealed, do: Access.mark_sealed(counters, Map.get(info, :zero_copy, false))
    counters
  end

  defp opened_level(%{role: :created}, _ref, opts), do: opts.security_level

  defp opened_level(_info, ref, opts) do
    case Native.header(ref) do
      {:ok, header} -> Security.level_from_int(header.security_level)
      _ -> opts.security_level
    end
  end

  defp opened_metadata(%{role: :created}, _ref, opts), do: opts.metadata

  defp opened_metadata(_info, ref, opts) do
    with {:ok, header} <- Native.header(ref),
         {:ok, metadata} when is_map(metadata) <-
           Snakepit.SharedMemory.JSON.decode(header.metadata) do
      metadata
    else
      _ -> opts.metadata
    end
  end

  # The caller owns the region (the default): the manager already monitors every caller
  # (Registry.register_caller/0, called first by allocate/1) and applies the owner-death
  # policy to whatever a dead caller owned (Cleanup.caller_down/1). A resource monitor per
  # region would repeat that at ~5 us a region (the monitor signal, then the demonitor
  # when the resource is destroyed): bench/FINDINGS.md, section 3a. Another owner (the
  # :owner option) is no caller of ours: its death is watched per region.
  defp watch_owner(_ref, _id, owner) when owner == self(), do: :ok

  defp watch_owner(ref, id, owner) do
    case Native.monitor_owner(ref, owner) do
      :ok -> :ok
      # The owner died since the options were validated: report it as the NIF would.
      {:error, _} -> send_owner_down(id, owner)
    end
  end

  defp send_owner_down(id, owner) do
    case Process.whereis(Snakepit.SharedMemory.Manager) do
      nil -> :ok
      manager -> send(manager, {:snakepit_shm_owner_down, id, owner})
    end
  end

  @doc """
  Frees the region `id` for `reason` (an atom recorded in the log and telemetry):
  unmaps its BEAM mappings, marks the header deallocated, zeroes the memory when the
  security level (or `:zero_on_free`) asks for it, removes the name, gives the quota
  back. A region this VM only opened (another VM created it) is released, not
  destroyed. `{:error, :not_found}` if no such region is registered (already freed).
  """
  @spec free(String.t(), atom()) :: {:ok, Registry.region_record()} | {:error, Error.t()}
  def free(id, reason) do
    case Registry.policy_and_ref(id) do
      nil ->
        not_found(id)

      {_policy, ref} ->
        Registry.register_caller()
        # Before the take: if this process is killed once it holds the record, the last
        # reference to a POSIX region created here removes its name (whoever loses the
        # race for the record leaves it to the winner, who deallocates it anyway).
        Native.keep_name(ref, false)
        checkpoint(:unkept)

        case Registry.take(id) do
          nil -> not_found(id)
          record -> {:ok, release(record, reason)}
        end
    end
  end

  defp release(record, reason) do
    region(id: id, role: role, counters: counters, quota: charge) = record
    checkpoint(:taken)
    # Before the mappings end: a read racing this free sees the reason with :closed.
    Snakepit.SharedMemory.Freed.mark(counters, reason)

    # Mappings first: take (not just read) each row, so a concurrent unmap_region/1 and
    # this loop never both unmap one mapping.
    for {{^id, mapping_id}, _pid, _mode, _mapping} <- Registry.mappings_of(id),
        {_key, _pid, _mode, mapping} <- [Registry.take_mapping(id, mapping_id)],
        do: Native.unmap(mapping)

    if role == :created, do: destroy(record)
    checkpoint(:destroyed)
    Snakepit.SharedMemory.Cluster.Directory.removed(id)
    # The host reservation first: killed in between, the charge abandons it again.
    HostQuota.Regions.release(id)
    checkpoint(:host_released)
    Quota.release(charge)
    Stats.event(:deallocations, %{count: 1}, %{region_id: id, reason: reason})
    # The one log line of a free (explicit deallocations at debug, policies at info).
    Logger.log(if(reason == :deallocated, do: :debug, else: :info), fn ->
      "snakepit_shm: freed #{id} (#{reason})"
    end)

    record
  end

  defp destroy(record) do
    region(id: id, security_level: level) = record
    zero = Security.level_flags(level).zero_on_free or Config.get(:zero_on_free)

    case deallocate_waiting_for_seal(record, zero, 0) do
      :ok ->
        :ok

      {:error, {:busy, message, _}} when zero ->
        # Zero-copy binaries of a sealed region may still be alive: they must not change
        # under the VM, so this region is freed without zeroing.
        Logger.warning("snakepit_shm: #{id} freed without zeroing: #{message}")
        deallocate(record, false)

      {:error, {:deallocated, _, _}} ->
        :ok

      {:error, native} ->
        Logger.warning("snakepit_shm: freeing #{id} failed: #{inspect(native)}")
    end
  end

  # A seal committing (it holds the region's gate for a moment, or up to the seal's own
  # 30 s wait) refuses a zeroing free as busy "being sealed": wait for its end (a dirty
  # wait on the gate, woken by the commit's unlock, 100 ms at most per call) rather than
  # free the data unzeroed. Other busy answers (zero-copy binaries alive) are final.
  @seal_wait_ms 100
  defp deallocate_waiting_for_seal(record, true, waited) when waited < 30_000 do
    case deallocate(record, true) do
      {:error, {:busy, message, _}} = busy ->
        if message =~ "being sealed" do
          _ = Native.await_seal_commit(region(record, :ref), @seal_wait_ms)
          deallocate_waiting_for_seal(record, true, waited + @seal_wait_ms)
        else
          busy
        end

      other ->
        other
    end
  end

  defp deallocate_waiting_for_seal(record, zero, _waited), do: deallocate(record, zero)

  # Marking is quick whatever the size; zeroing is not (dirty above 64 KiB, counting the
  # encryption overhead of the capacity, hence the margin); removing a POSIX name opens a
  # path in a shared directory (dirty, whatever the size).
  defp deallocate(region(backend: :memfd, ref: ref), false),
    do: Native.deallocate_plain(ref, false)

  defp deallocate(region(backend: :memfd, ref: ref, size: size), true)
       when size <= div(@plain_limit, 2),
       do: Native.deallocate_plain(ref, true)

  # Zeroing a large region is tens of milliseconds of memset: done in slices of at most
  # 16 MiB, each a dirty call that returns to a normal scheduler (bench/FINDINGS.md §7).
  defp deallocate(region(ref: ref, size: size), true) when size > @zero_slice,
    do: deallocate_in_slices(ref)

  defp deallocate(region(ref: ref), zero), do: Native.deallocate(ref, zero)

  @doc false
  # Public for the tests: the zeroing deallocation in slices.
  @spec deallocate_in_slices(Native.region()) :: :ok | Native.nif_error()
  def deallocate_in_slices(ref) do
    with :ok <- Native.deallocate_begin(ref),
         :ok <- zero_slices(ref, 0, 0) do
      Native.deallocate_finish(ref)
    end
  end

  defp zero_slices(ref, offset, busy) do
    case Native.zero_step(ref, offset) do
      {:ok, ^offset} ->
        :ok

      {:ok, next} ->
        zero_slices(ref, next, 0)

      # a seal being committed (it started before the deallocation): zero_step waited
      # 100 ms for it on its dirty scheduler; again, for 30 s at most
      {:error, {:busy, _, _}} when busy < 300 ->
        zero_slices(ref, offset, busy + 1)

      {:error, _} = error ->
        error
    end
  end

  # Test hook: a process that put a one-argument fun under this key in its dictionary
  # has it called at each step of an allocation or a free, between two state changes
  # (test/snakepit/shared_memory/kill_instants_test.exs parks callers there and kills
  # them). One dictionary read when unset.
  @checkpoint {__MODULE__, :checkpoint}

  @doc false
  def checkpoint_key, do: @checkpoint

  defp checkpoint(point) do
    case Process.get(@checkpoint) do
      nil -> :ok
      fun -> fun.(point) |> then(fn _ -> :ok end)
    end
  end

  defp not_found(id) do
    Error.error(
      :not_found,
      "no region #{inspect(id)} is registered (never allocated, or already freed)",
      %{
        region_id: id
      }
    )
  end
end
