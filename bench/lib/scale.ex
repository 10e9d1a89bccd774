defmodule SnakepitShm.Bench.Scale do
  @moduledoc """
  Issue 6, part 6: `profile.scale_regions` live regions (POSIX backend: one object per
  region; memfd would use two descriptors each, and RLIMIT_NOFILE is checked and
  reported) - the time of `list_regions/1`, of an orphan sweep among them
  (`cleanup_regions(orphans: true)` with `profile.scale_orphans` segments left by a
  dead process, and with none), and the BEAM memory each region costs.
  """

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.Native
  alias SnakepitShm.Bench.Programs

  @size 4096

  def run(profile, programs) do
    count = profile.scale_regions
    # First, before the POSIX regions (whose descriptors close asynchronously).
    default_backend = default_backend_fds(count)
    :erlang.garbage_collect()
    before = :erlang.memory()
    {alloc_ns, ids} = timed(fn -> for _ <- 1..count, do: allocate!() end)
    :erlang.garbage_collect()
    after_alloc = :erlang.memory()

    vanished_before = vanished_count()

    try do
      lists = for _ <- 1..profile.scale_reps, do: time_list()
      empty_sweep = for _ <- 1..profile.scale_reps, do: time_sweep(0, programs)

      sweeps = for _ <- 1..profile.scale_reps, do: time_sweep(profile.scale_orphans, programs)

      %{
        regions: count,
        backend: :posix,
        nofile_limit: nofile_limit(),
        allocate_ns: alloc_ns,
        beam_bytes_per_region: (after_alloc[:total] - before[:total]) / count,
        ets_bytes_per_region: (after_alloc[:ets] - before[:ets]) / count,
        list_ns: Enum.map(lists, & &1.ns),
        floors: floors(ids, profile.scale_reps),
        listed: Enum.map(lists, & &1.listed),
        vanished: vanished_count() - vanished_before,
        sweep_ns: Enum.map(empty_sweep, & &1.ns),
        orphan_sweep_ns: Enum.map(sweeps, & &1.ns),
        orphans: profile.scale_orphans,
        orphans_freed: Enum.map(sweeps, & &1.freed),
        deallocate_ns: elem(timed(fn -> Enum.each(ids, &SM.deallocate_region/1) end), 0)
      }
    after
      Enum.each(ids, &SM.deallocate_region/1)
    end
    |> Map.put(:default_backend, default_backend)
  end

  # Issue 14: the same number of 4 KiB regions with the default options (arenas when
  # the configuration has them on), counting this VM's file descriptors before and
  # with all of them live. Stops at the first refusal (EMFILE with dedicated memfds).
  defp default_backend_fds(count) do
    for pid <- Process.list(), do: :erlang.garbage_collect(pid)
    fds_before = fd_count()
    arenas_before = Snakepit.SharedMemory.Arena.stats()

    {ns, ids} =
      timed(fn ->
        Enum.reduce_while(1..count, [], fn _, ids ->
          case SM.allocate_region(@size) do
            {:ok, id} -> {:cont, [id | ids]}
            {:error, _} -> {:halt, ids}
          end
        end)
      end)

    fds_live = fd_count()
    arenas = Snakepit.SharedMemory.Arena.stats()
    Enum.each(ids, &SM.deallocate_region/1)

    %{
      regions: length(ids),
      asked: count,
      fds: fds_live - fds_before,
      allocate_ns: ns,
      arenas: arenas.arenas - arenas_before.arenas,
      arena_bytes: arenas.arena_bytes - arenas_before.arena_bytes,
      in_arena: arenas.live_chunks - arenas_before.live_chunks
    }
  end

  defp fd_count, do: "/proc/self/fd" |> File.ls!() |> length()

  defp allocate! do
    case SM.allocate_region(@size, backend: :posix) do
      {:ok, id} -> id
      {:error, e} -> raise "allocating region for the scale bench failed: #{e.message}"
    end
  end

  # Counts what was listed instead of failing: on a shared machine another process
  # (a host-wide cleanup, a test) may remove our segments from /dev/shm, and the
  # manager then frees those regions as :vanished. The report shows both counts.
  defp time_list do
    {ns, {:ok, regions}} = timed(fn -> SM.list_regions() end)
    %{ns: ns, listed: length(regions)}
  end

  # Floors measured on the same 10 000 regions (FINDINGS.md, section 5):
  # reading the registry table alone (a registry-only list_regions), one stat per
  # segment through the file server (the vanished check before commit eb6558c), and
  # one directory listing with a set lookup per region (the check since then).
  defp floors(ids, reps) do
    dir = "/dev/shm"
    table = Snakepit.SharedMemory.Registry.regions_table()

    one_stat_each = fn -> Enum.count(ids, &File.exists?(Path.join(dir, &1))) end

    one_listing = fn ->
      present = dir |> File.ls!() |> MapSet.new()
      Enum.count(ids, &MapSet.member?(present, &1))
    end

    %{
      "read the registry table (:ets.tab2list), the floor of a registry-only list" =>
        for(_ <- 1..reps, do: elem(timed(fn -> :ets.tab2list(table) end), 0)),
      "File.exists? per segment (the vanished check before commit eb6558c)" =>
        for(_ <- 1..reps, do: elem(timed(one_stat_each), 0)),
      "one File.ls + MapSet lookups (the vanished check since eb6558c)" =>
        for(_ <- 1..reps, do: elem(timed(one_listing), 0))
    }
  end

  defp vanished_count do
    {:ok, stats} = SM.stats()
    Map.get(stats.events, :vanished, 0)
  end

  # Leaves `orphans` segments by a process that exits, then times one sweep; checks
  # that the sweep freed them all (and only orphans), and removes any it left.
  defp time_sweep(orphans, programs) do
    ids =
      if orphans > 0,
        do: programs.make_orphans |> Programs.run(["#{orphans}", "#{@size}"]) |> String.split(),
        else: []

    try do
      {ns, {:ok, freed}} = timed(fn -> SM.cleanup_regions(orphans: true) end)
      freed_orphans = Enum.count(freed, &(&1.reason == :orphan and &1.region_id in ids))
      %{ns: ns, freed: freed_orphans}
    after
      Enum.each(ids, &Native.unlink_segment/1)
    end
  end

  defp timed(fun) do
    start = System.monotonic_time(:nanosecond)
    result = fun.()
    {System.monotonic_time(:nanosecond) - start, result}
  end

  defp nofile_limit do
    case System.cmd("sh", ["-c", "ulimit -n"]) do
      {out, 0} -> String.trim(out)
      _ -> "unknown"
    end
  end
end
