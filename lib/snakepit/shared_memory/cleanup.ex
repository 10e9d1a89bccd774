defmodule Snakepit.SharedMemory.Cleanup do
  @moduledoc """
  Cleanup policies and sweeps. The manager calls these; every free goes through
  `Snakepit.SharedMemory.Allocator.free/2`.

  ## Policies

    * `:automatic` - freed when the owner process dies.
    * `:reference_counted` - freed when the header's reference count (BEAM mappings and
      OS holders) reaches zero after having been held at least once; also when the owner
      dies while nothing holds it.
    * `:manual` - freed only by `deallocate_region/1`, `cleanup_regions/1` or expiry.

  Every policy also frees a region whose idle `:timeout` passed (`:expired`) or whose
  POSIX segment was removed behind our back (`:vanished`, e.g. systemd `RemoveIPC=yes`).

  ## Sweeps of the shm directory (`/dev/shm` on Linux)

    * orphans (`sweep_orphans/1`): segments of ours that nobody uses, asked of the
      kernel: every user holds a shared open file description lock on the segment
      (byte 0), so a segment whose lock is free has no user anywhere, whatever PID
      namespace or VM. A VM killed with SIGKILL leaves its POSIX segments; the next
      sweep frees them, header-less ones (a kill inside create) included.
    * re-adoption (`adopt_own_segments/0`): when the registry tables were lost (the table
      owner died), POSIX segments created by this very VM are registered again, as
      `:manual` regions without owner (see `docs/SECURITY.md`). memfd regions cannot be
      re-adopted: nothing names them; they die with their last mapping.
    * leaks (`sweep_leaks/1`): a caller killed inside `Native.create/2` (a dirty NIF that
      keeps running) leaves a POSIX segment nobody registered. The manager remembers
      such deaths (size, start time) and frees the matching unregistered segment.
  """

  require Logger
  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{Access, Allocator, Config, JSON, Journal, Native}
  alias Snakepit.SharedMemory.Platform
  alias Snakepit.SharedMemory.{Quota, Registry, Security, Stats}

  import Snakepit.SharedMemory.Registry, only: [region: 1, region: 2]

  @type freed :: %{region_id: String.t(), reason: atom(), size: non_neg_integer()}

  # ---- deaths ----

  @doc "Applies the cleanup policy of region `id` after the death of its owner `pid`."
  @spec owner_down(String.t(), pid()) :: [freed()]
  def owner_down(id, pid) do
    case Registry.lookup(id) do
      region(owner: ^pid) = record ->
        if owner_death_frees?(record), do: free(id, :owner_down), else: []

      _ ->
        []
    end
  end

  defp owner_death_frees?(region(cleanup_policy: :automatic)), do: true

  defp owner_death_frees?(region(cleanup_policy: :reference_counted, ref: ref)),
    do: elem(Native.hold_counts(ref), 1) == 0

  defp owner_death_frees?(_record), do: false

  @doc """
  Everything a dead API caller leaves: its mappings (unmapped, releasing their holds),
  the regions it owned (policies applied), and an operation it died in (returned, for
  the manager to repair: see `repair/1`).
  """
  @spec caller_down(pid()) :: %{freed: [freed()], journal: term() | nil}
  def caller_down(pid) do
    freed_by_unmap =
      pid
      |> Registry.mappings_of_pid()
      |> Enum.flat_map(fn {{id, mapping_id}, _pid, _mode, _ref} -> unmap_dead(id, mapping_id) end)

    freed_as_owner =
      if Quota.owned(pid) > 0,
        do: Enum.flat_map(Registry.owned_by(pid), &owner_down(region(&1, :id), pid)),
        else: []

    Registry.delete_caller(pid)
    %{freed: freed_by_unmap ++ freed_as_owner, journal: Journal.lookup(pid)}
  end

  defp unmap_dead(id, mapping_id) do
    case Registry.take_mapping(id, mapping_id) do
      {_key, _pid, _mode, mapping} ->
        Native.unmap(mapping)

        if Access.free_if_unreferenced(id),
          do: [%{region_id: id, reason: :unreferenced, size: 0}],
          else: []

      nil ->
        []
    end
  end

  @doc """
  Repairs what a process killed inside an allocation or deallocation left: returns a
  pending leak to look for (`{size, started_ns, deadline_ms}`) or nil. The counters are
  fixed separately (`Quota.recount/1`). The manager calls it inside `Journal.barrier/2`.
  """
  @spec repair(term()) :: {pos_integer(), integer(), integer()} | nil
  def repair({:allocate, :creating, size, :posix, started_ns}) do
    # The dirty create may still be running; give it time proportional to its size.
    grace = 2_000 + div(size, 100_000)
    {size, started_ns, System.monotonic_time(:millisecond) + grace}
  end

  def repair({:deallocate, id, :posix, :created}) do
    if Registry.lookup(id) == nil do
      case Native.unlink_segment(id) do
        :ok ->
          Logger.warning("snakepit_shm: removed #{id}, left by a caller killed while freeing it")

        {:error, _} ->
          :ok
      end
    end

    nil
  end

  def repair(_other), do: nil

  @doc "Applies the owner-death policy to every region whose owner is no longer alive."
  @spec check_owners() :: [freed()]
  def check_owners do
    for region(id: id, owner: owner) <- Registry.all(),
        is_pid(owner) and not Process.alive?(owner),
        freed <- owner_down(id, owner),
        do: freed
  end

  @doc """
  Recomputes the quota counters from the registry while no allocation or deallocation
  is in flight. `{:error, :timeout}` if in-flight callers did not finish in time.
  """
  @spec recount() :: {:ok, map()} | {:error, :timeout}
  def recount do
    Journal.barrier(Config.get(:barrier_timeout), fn -> Quota.recount(Registry.all()) end)
  end

  # ---- periodic ----

  @doc """
  Regions that policies, expiry or vanished segments make free-able now, as
  `{id, reason}`: `:expired`, `:owner_down`, `:unreferenced`, `:vanished`.
  """
  @spec due(integer()) :: [{String.t(), atom()}]
  def due(now_ms \\ System.system_time(:millisecond)) do
    # The registry first, the directory second: every region of the snapshot had its
    # segment before the listing, so a name missing from it really vanished. (The other
    # order would take a region registered in between for a vanished one.)
    records =
      Registry.all_with([
        :id,
        :ref,
        :owner,
        :cleanup_policy,
        :timeout,
        :created_at,
        :backend,
        :role
      ])

    present = segment_names()

    for record <- records,
        reason = due_reason(record, now_ms, present),
        reason != nil,
        do: {region(record, :id), reason}
  end

  defp due_reason(record, now_ms, present) do
    region(ref: ref, owner: owner, cleanup_policy: policy) = record

    cond do
      expired?(record, now_ms) -> :expired
      is_pid(owner) and not Process.alive?(owner) and owner_death_frees?(record) -> :owner_down
      policy == :reference_counted and unreferenced?(ref) -> :unreferenced
      vanished?(record, present) -> :vanished
      true -> nil
    end
  end

  @doc """
  True if the region's idle timeout passed (last access from its header) and nothing
  holds it: a region mapped by a process or attached by a worker is in use, however long
  ago it was last touched (a worker reading through a numpy view touches nothing).
  """
  @spec expired?(Registry.region_record(), integer()) :: boolean()
  def expired?(region(timeout: :infinity), _now_ms), do: false

  def expired?(region(timeout: timeout, ref: ref, created_at: created_at), now_ms) do
    last_ms = div(Native.last_access(ref), 1_000_000)
    now_ms - max(last_ms, created_at) > timeout and elem(Native.hold_counts(ref), 1) == 0
  end

  defp unreferenced?(ref) do
    {generation, refcount} = Native.hold_counts(ref)
    generation > 0 and refcount == 0
  end

  # Names in the shm directory, listed once per sweep (nil: this platform has none).
  defp segment_names do
    if Platform.current().shm_dir(), do: MapSet.new(Native.list_segments())
  end

  defp vanished?(region(backend: :posix, role: :created, id: id), %MapSet{} = present),
    do: not MapSet.member?(present, id)

  defp vanished?(_record, _present), do: false

  @doc "Frees `id` for `reason`; the freed entry, or nothing if it was already gone."
  @spec free(String.t(), atom()) :: [freed()]
  def free(id, reason) do
    case Allocator.free(id, reason) do
      {:ok, record} ->
        if reason in [:expired, :owner_down, :unreferenced, :vanished],
          do: Stats.event(reason, %{count: 1}, %{region_id: id})

        Logger.info("snakepit_shm: freed #{id} (#{reason})")
        [%{region_id: id, reason: reason, size: region(record, :size)}]

      {:error, _} ->
        []
    end
  end

  # ---- the shm directory ----

  @doc """
  Removes the segments of ours in the shm directory that nobody uses: no open file
  description anywhere (this VM, another VM in any PID namespace, a Python worker) holds
  their liveness lock (`Native.sweep_segment/2`: the kernel answers, no PID is trusted).
  That covers the segments of VMs that died, segments whose creation was cut short
  (header-less, their creator's lock gone) and segments created for callers killed
  mid-allocation. A segment being created holds its creator's lock from the instant it
  exists, so it is never taken for an orphan. Returns what was (or, with `dry_run: true`,
  would be) removed.
  """
  @spec sweep_orphans(keyword()) :: [freed()]
  def sweep_orphans(opts \\ []) do
    dry_run = Keyword.get(opts, :dry_run, false)
    dir = Platform.current().shm_dir()

    freed =
      for id <- segment_ids(),
          not Registry.member?(id),
          size = segment_size(dir, id),
          {:ok, outcome} when outcome in [:removed, :removed_incomplete] <- [
            Native.sweep_segment(id, dry_run)
          ] do
        reason = if outcome == :removed, do: :orphan, else: :incomplete
        %{region_id: id, reason: reason, size: size}
      end

    if freed != [] and not dry_run do
      Stats.event(:orphans, %{count: length(freed)}, %{
        region_ids: Enum.map(freed, & &1.region_id)
      })

      Logger.info("snakepit_shm: removed #{length(freed)} unused segment(s)")
    end

    freed
  end

  @doc "Ids of the segments of ours in the shm directory (`Native.list_segments/0`)."
  @spec segment_ids() :: [String.t()]
  def segment_ids do
    if Platform.current().shm_dir(), do: Native.list_segments(), else: []
  end

  # lstat only: never opens the name (it may be a FIFO).
  defp segment_size(nil, _id), do: 0

  defp segment_size(dir, id) do
    case File.lstat(Path.join(dir, id)) do
      {:ok, %File.Stat{size: size}} -> max(size - 4096, 0)
      _ -> 0
    end
  end

  @doc """
  Registers again the POSIX segments created by this VM that the registry does not know
  (after a loss of the registry tables). Policy of a re-adopted region: `:manual`, no
  owner, its idle timeout and metadata from its header.
  """
  @spec adopt_own_segments() :: [String.t()]
  def adopt_own_segments do
    me = Native.self_info()

    for {id, header} <- unregistered_segments(), ours?(header, me), adopt(id, header), do: id
  end

  # Created by this VM: pid, start time and boot id all match (mappings of this VM that
  # outlived the tables may still hold it: it is ours, and in use by us).
  defp ours?(header, me) do
    header.creator_pid == me.os_pid and header.creator_start_time == me.start_time and
      header.boot_id == me.boot_id and not header.deallocated
  end

  defp adopt(id, header) do
    with {:ok, ref, info} <- Native.open(id, true) do
      timeout_ms = div(header.idle_timeout_ns, 1_000_000)

      record =
        region(
          id: id,
          ref: ref,
          size: info.size,
          backend: info.backend,
          role: :created,
          name:
            if(String.starts_with?(id, "spshm_n_"), do: String.replace_prefix(id, "spshm_n_", "")),
          owner: nil,
          created_at: div(header.created_at_ns, 1_000_000),
          seq: System.unique_integer([:monotonic]),
          permissions: Security.default_permissions(),
          security_level: Security.level_from_int(header.security_level),
          cleanup_policy: :manual,
          timeout: if(timeout_ms == 0, do: :infinity, else: timeout_ms),
          metadata: decode_metadata(header.metadata),
          counters: Allocator.new_counters(info),
          adopted: true
        )

      adopted = Registry.insert_new(record)
      if adopted, do: Stats.count(:adopted)
      adopted
    else
      _ -> false
    end
  end

  defp decode_metadata(json) do
    case JSON.decode(json) do
      {:ok, map} when is_map(map) -> map
      _ -> %{}
    end
  end

  @doc """
  Removes the segments of callers killed inside `Native.create/2`: the dirty create
  keeps running after its caller died, and the region it returns to nobody is garbage
  collected, which drops its liveness lock; `sweep_orphans/1` then removes it. Returns
  the pendings not past their deadline (the manager calls this again until then).
  """
  @spec sweep_leaks([{pos_integer(), integer(), integer()}]) :: [
          {pos_integer(), integer(), integer()}
        ]
  def sweep_leaks([]), do: []

  def sweep_leaks(pending) do
    for %{region_id: id} <- sweep_orphans() do
      Stats.event(:leaked, %{count: 1}, %{region_id: id})
    end

    now = System.monotonic_time(:millisecond)
    Enum.filter(pending, fn {_size, _started, deadline} -> now < deadline end)
  end

  # Segments in the shm directory that the registry does not know, with their headers.
  # Unreadable ones (being created right now, foreign, corrupt) are skipped, never freed.
  defp unregistered_segments, do: scan_unregistered()

  # Segments in the shm directory that the registry does not know, with their headers.
  # Unreadable ones (being created right now, foreign, corrupt) are skipped, never freed.
  defp scan_unregistered do
    case Platform.current().shm_dir() do
      nil ->
        []

      dir ->
        for id <- segment_ids(),
            not Registry.member?(id),
            {:ok, %{id: ^id} = header} <- [Native.inspect_path(Path.join(dir, id))],
            do: {id, header}
    end
  end
end
