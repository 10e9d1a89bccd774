defmodule Snakepit.SharedMemory.Cleanup do
  @moduledoc """
  Cleanup policies: what frees a registered region, and when. The manager calls these; every free goes through
  `Snakepit.SharedMemory.Allocator.free/2`.

  ## Policies

    * `:automatic` - freed when the owner process dies.
    * `:reference_counted` - freed when the header's reference count (BEAM mappings and
      OS holders) reaches zero after having been held at least once; also when the owner
      dies while nothing holds it.
    * `:manual` - freed only by `deallocate_region/1`, `cleanup_regions/1` or expiry.

  Every policy also frees a region whose idle `:timeout` passed (`:expired`) or whose
  POSIX segment was removed behind our back (`:vanished`, e.g. systemd `RemoveIPC=yes`).

  The shm directory itself (orphans, re-adoption, leaks) is swept by
  `Snakepit.SharedMemory.Sweep`.
  """

  require Logger
  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{Access, Allocator, Native}
  alias Snakepit.SharedMemory.Platform
  alias Snakepit.SharedMemory.{Quota, Registry, Stats}

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
  Everything a dead API caller leaves: its mappings (unmapped, releasing their holds)
  and the regions it owned (policies applied). An allocation or a free it was killed in
  needs nothing: its quota charge gave itself back with its heap, and a POSIX segment
  it had created and not registered lost its name with it
  (`Snakepit.SharedMemory.Quota`, `Snakepit.SharedMemory.Allocator`).
  """
  @spec caller_down(pid()) :: %{freed: [freed()]}
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
    Quota.forget_owner(pid)
    %{freed: freed_by_unmap ++ freed_as_owner}
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

  @doc "Applies the owner-death policy to every region whose owner is no longer alive."
  @spec check_owners() :: [freed()]
  def check_owners do
    for region(id: id, owner: owner) <- Registry.all(),
        is_pid(owner) and not Process.alive?(owner),
        freed <- owner_down(id, owner),
        do: freed
  end

  # ---- periodic ----

  @doc """
  Regions that policies, expiry or vanished segments make free-able now, as
  `{id, reason}`: `:expired`, `:owner_down`, `:unreferenced`, `:vanished`.
  """
  @spec due(integer()) :: [{String.t(), atom()}]
  # Wall times here are the OS clock (System.os_time), as the header's last access
  # (CLOCK_REALTIME, written by the core and by workers): the BEAM's system time lags an
  # OS clock step (NTP at a VM's boot) for minutes, and idle regions then never expired.
  def due(now_ms \\ System.os_time(:millisecond)) do
    # Each check selects, inside ETS, only the regions it can concern (a finite idle
    # timeout; a dead owner, found among the owners (`Quota`'s table, one row per owner);
    # `:reference_counted`; POSIX and created here), so a VM of 100 000 default regions
    # (memfd, :automatic, no timeout, live owners) copies nothing and calls no NIF.
    # The registry before the directory: every POSIX region of the snapshot had its
    # segment before the listing, so a name missing from it really vanished (the other
    # order would take a region registered in between for a vanished one).
    posix = select_ids(region(backend: :posix, role: :created, id: :"$1", _: :_), [])

    (expired(now_ms) ++ owners_down() ++ unreferenced() ++ vanished(posix))
    |> Enum.uniq_by(&elem(&1, 0))
  end

  defp select_ids(pattern, guards),
    do: :ets.select(Registry.regions_table(), [{pattern, guards, [:"$1"]}])

  defp expired(now_ms) do
    rows =
      :ets.select(Registry.regions_table(), [
        {region(id: :"$1", ref: :"$2", timeout: :"$3", created_at: :"$4", _: :_),
         [{:"=/=", :"$3", :infinity}], [{{:"$1", :"$2", :"$3", :"$4"}}]}
      ])

    for {id, ref, timeout, created_at} <- rows,
        idle_and_unheld?(ref, timeout, created_at, now_ms),
        do: {id, :expired}
  end

  # A safety net only: an owner's death is an event (the NIF's monitor), and a manager
  # that was down when it came runs check_owners/0 at start-up.
  defp owners_down do
    dead =
      for {owner, _counter} <- :ets.tab2list(Registry.owners_table()),
          not Process.alive?(owner),
          do: owner

    due =
      for owner <- dead,
          record <- Registry.owned_by(owner),
          owner_death_frees?(record),
          do: {region(record, :id), :owner_down}

    # Rows of dead owners that count nothing any more (their regions are gone).
    Enum.each(dead, &Quota.forget_owner/1)
    due
  end

  defp unreferenced do
    rows =
      :ets.select(Registry.regions_table(), [
        {region(
           id: :"$1",
           ref: :"$2",
           cleanup_policy: :reference_counted,
           held_after: :"$3",
           _: :_
         ), [], [{{:"$1", :"$2", :"$3"}}]}
      ])

    for {id, ref, held_after} <- rows, unreferenced?(id, ref, held_after), do: {id, :unreferenced}
  end

  defp vanished([]), do: []

  defp vanished(posix) do
    case segment_names() do
      %MapSet{} = present -> for id <- posix, not MapSet.member?(present, id), do: {id, :vanished}
      nil -> []
    end
  end

  @doc """
  True if the region's idle timeout passed (last access from its header) and nothing
  holds it: a region mapped by a process or attached by a worker is in use, however long
  ago it was last touched (a worker reading through a numpy view touches nothing).
  """
  @spec expired?(Registry.region_record(), integer()) :: boolean()
  def expired?(region(timeout: :infinity), _now_ms), do: false

  def expired?(region(timeout: timeout, ref: ref, created_at: created_at), now_ms),
    do: idle_and_unheld?(ref, timeout, created_at, now_ms)

  defp idle_and_unheld?(ref, timeout, created_at, now_ms) do
    last_ms = div(Native.last_access(ref), 1_000_000)
    now_ms - max(last_ms, created_at) > timeout and elem(Native.hold_counts(ref), 1) == 0
  end

  defp unreferenced?(id, ref, held_after) do
    {generation, refcount} = Native.hold_counts(ref)
    refcount == 0 and Access.held_since?(id, held_after, generation)
  end

  # Names in the shm directory, listed once per sweep (nil: this platform has none),
  # by the one listing there is (`Sweep.segment_ids/0`, `Native.list_segments/0`).
  defp segment_names do
    if Platform.current().shm_dir(), do: MapSet.new(Snakepit.SharedMemory.Sweep.segment_ids())
  end

  @doc "Frees `id` for `reason`; the freed entry, or nothing if it was already gone."
  @spec free(String.t(), atom()) :: [freed()]
  def free(id, reason) do
    case Allocator.free(id, reason) do
      {:ok, record} ->
        if reason in [:expired, :owner_down, :unreferenced, :vanished],
          do: Stats.event(reason, %{count: 1}, %{region_id: id})

        [%{region_id: id, reason: reason, size: region(record, :size)}]

      {:error, _} ->
        []
    end
  end
end
