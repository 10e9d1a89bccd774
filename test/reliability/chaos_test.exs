defmodule Snakepit.SharedMemory.Reliability.ChaosTest do
  # Kill everything, lose nothing.
  #
  # 1. In this VM: BEAM workers allocate, map, write, read, seal, unmap and free while
  #    the driver kills random workers (Process.exit(pid, :kill)), SIGKILLs random Python
  #    workers that attach and checksum regions, and kills the manager. Afterwards every
  #    region whose owner lives is intact (CRC of its content), every other one is gone,
  #    reference counts equal the live holders, and /dev/shm holds nothing of ours that
  #    the registry does not.
  # 2. A second VM (an OS process) with POSIX regions, one attached by a Python worker,
  #    running the same chaos on POSIX regions (owners and its manager killed), is killed
  #    with SIGKILL; the next VM's start-up sweep removes everything it left, while the
  #    Python worker keeps reading its mapping.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Manager, Native, Registry, ReliabilityChaos, ReliabilityHelpers}
  alias Snakepit.SharedMemory.ShmHelpers

  require Registry

  @moduletag :reliability
  @moduletag :capture_log
  @moduletag timeout: 1_800_000

  @duration_ms ReliabilityHelpers.scale(
                 String.to_integer(System.get_env("SNAKEPIT_SHM_CHAOS_MS", "10000"))
               )
  @workers 12
  @pythons 4
  @manager_kill_every_ms 1_500

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    :ok
  end

  test "owners, Python workers and the manager killed at random: nothing lost, nothing leaked" do
    Manager.sync()
    segments_before = ShmHelpers.our_segments()
    registry_before = MapSet.new(Registry.ids())
    tables = ReliabilityChaos.new_tables()
    seed = ReliabilityHelpers.seed()
    :rand.seed(:exsss, {seed, 1, 2})

    workers = for i <- 1..@workers, do: ReliabilityChaos.start_worker(tables, seed + i)
    pythons = for _ <- 1..@pythons, do: ReliabilityChaos.start_python()
    deadline = System.monotonic_time(:millisecond) + @duration_ms

    acc = %{
      workers: workers,
      pythons: pythons,
      killed: 0,
      sigkilled: 0,
      manager_kills: 0,
      next_manager_kill: System.monotonic_time(:millisecond) + @manager_kill_every_ms
    }

    acc = drive(acc, tables, deadline, seed)

    # Freeze the surviving workers, SIGKILL every Python worker: the end state is then
    # fully determined (owners alive or dead, holds of live BEAM mappings only).
    live_by_worker =
      for pid <- acc.workers,
          live = ReliabilityChaos.freeze(pid),
          live != nil,
          into: %{},
          do: {pid, live}

    for {_port, os_pid} <- acc.pythons, do: ReliabilityHelpers.kill9(os_pid)

    for {_port, os_pid} <- acc.pythons,
        do:
          assert(ShmHelpers.wait_until(fn -> not ReliabilityHelpers.os_alive?(os_pid) end, 5_000))

    ReliabilityChaos.drain_python(tables)
    ensure_manager()

    settled =
      ShmHelpers.wait_until(
        fn ->
          Manager.sync() == :ok and
            end_state_problems(tables, registry_before, segments_before) == []
        end,
        15_000
      )

    problems = end_state_problems(tables, registry_before, segments_before)
    holds = if settled, do: python_holds_problems(tables), else: []
    anomalies = :ets.tab2list(tables.anomalies)

    figures =
      ReliabilityChaos.figures(tables)
      |> Map.merge(%{
        seed: seed,
        duration_ms: @duration_ms,
        owners_killed: acc.killed,
        python_workers_sigkilled: acc.sigkilled + length(acc.pythons),
        manager_kills: acc.manager_kills,
        regions_checked_at_end: :ets.info(tables.expected, :size),
        problems: length(problems),
        anomalies: length(anomalies)
      })

    # Clean up: the frozen workers die, their regions with them.
    for {pid, _} <- live_by_worker, do: Process.exit(pid, :kill)
    Manager.sync()

    freed =
      ShmHelpers.wait_until(
        fn ->
          Manager.sync() == :ok and MapSet.subset?(MapSet.new(Registry.ids()), registry_before)
        end,
        10_000
      )

    leaked = ReliabilityHelpers.remove_own_segments(segments_before)
    ReliabilityHelpers.record("chaos", Map.put(figures, :leaked_segments, length(leaked)))

    assert anomalies == [],
           "seed #{seed}: unexpected results during the chaos: #{inspect(anomalies, limit: 20)}"

    assert settled, "seed #{seed}: end state wrong:\n" <> Enum.join(problems, "\n")
    assert holds == [], "seed #{seed}: Python holds miscounted:\n" <> Enum.join(holds, "\n")

    assert figures.regions_allocated > 50 and acc.killed > 5 and acc.manager_kills >= 2,
           inspect(figures)

    assert figures.python_checks > 10, inspect(figures)

    assert freed,
           "regions left after the owners died: #{inspect(MapSet.difference(MapSet.new(Registry.ids()), registry_before))}"

    assert leaked == []
  end

  # ---- the driver ----

  defp drive(acc, tables, deadline, seed) do
    now = System.monotonic_time(:millisecond)

    if now >= deadline do
      acc
    else
      Process.sleep(10)
      for p <- acc.pythons, do: ReliabilityChaos.feed_python(p, tables)
      ReliabilityChaos.drain_python(tables)

      acc
      |> maybe(:rand.uniform(10) == 1, &kill_worker(&1, tables, seed))
      |> maybe(:rand.uniform(25) == 1, &sigkill_python/1)
      |> maybe(now >= acc.next_manager_kill, &kill_manager/1)
      |> drive(tables, deadline, seed)
    end
  end

  defp maybe(acc, true, fun), do: fun.(acc)
  defp maybe(acc, false, _fun), do: acc

  defp kill_worker(acc, tables, seed) do
    {victim, rest} = List.pop_at(acc.workers, :rand.uniform(length(acc.workers)) - 1)
    Process.exit(victim, :kill)
    fresh = ReliabilityChaos.start_worker(tables, seed + 1000 + acc.killed)
    %{acc | workers: [fresh | rest], killed: acc.killed + 1}
  end

  defp sigkill_python(acc) do
    {{_port, os_pid}, rest} = List.pop_at(acc.pythons, :rand.uniform(length(acc.pythons)) - 1)
    ReliabilityHelpers.kill9(os_pid)
    %{acc | pythons: [ReliabilityChaos.start_python() | rest], sigkilled: acc.sigkilled + 1}
  end

  defp kill_manager(acc) do
    case Process.whereis(Manager) do
      nil -> :ok
      pid -> Process.exit(pid, :kill)
    end

    %{
      acc
      | manager_kills: acc.manager_kills + 1,
        next_manager_kill: System.monotonic_time(:millisecond) + @manager_kill_every_ms
    }
  end

  defp ensure_manager do
    assert ShmHelpers.wait_until(fn -> is_pid(Process.whereis(Manager)) end, 5_000),
           "the supervisor did not restart the manager"
  end

  # ---- the end state ----

  defp end_state_problems(tables, registry_before, segments_before) do
    expected =
      for {id, owner, crc, size} <- :ets.tab2list(tables.expected) do
        check_expected(id, owner, crc, size)
      end

    new_ids = MapSet.difference(MapSet.new(Registry.ids()), registry_before)

    owners =
      for id <- new_ids,
          Registry.region(owner: owner) = Registry.lookup(id) || Registry.region(),
          not (is_pid(owner) and Process.alive?(owner)),
          do: "#{id} is registered but its owner #{inspect(owner)} is dead"

    refcounts = for id <- new_ids, problem = refcount_problem(id), do: problem

    unknown =
      for id <- ReliabilityHelpers.own_segments(segments_before),
          not Registry.available?() or Registry.lookup(id) == nil,
          do: "#{id} is in /dev/shm but not in the registry"

    Enum.reject(expected, &is_nil/1) ++ owners ++ refcounts ++ unknown
  end

  defp check_expected(id, owner, crc, size) do
    registered = Registry.lookup(id) != nil

    cond do
      Process.alive?(owner) and not registered ->
        "#{id}: its owner lives but the region is gone"

      Process.alive?(owner) ->
        case read_all(id, size) do
          {:ok, data} -> if :erlang.crc32(data) == crc, do: nil, else: "#{id}: content changed"
          other -> "#{id}: cannot read it back: #{inspect(other)}"
        end

      registered ->
        "#{id}: its owner is dead but the region is registered"

      File.exists?("/dev/shm/" <> id) ->
        "#{id}: its owner is dead but its segment is in /dev/shm"

      true ->
        nil
    end
  end

  defp read_all(id, size) do
    with {:ok, m} <- SharedMemory.map_region(id, access_mode: :read_only) do
      result = SharedMemory.read(m, 0, size)
      SharedMemory.unmap_region(m)
      with {:ok, data} <- result, do: {:ok, :binary.copy(data)}
    end
  end

  # The header's reference count equals the live BEAM mappings of the region (every
  # Python worker is dead), and every holder in the header is this VM.
  defp refcount_problem(id) do
    me = Native.self_info().os_pid

    with Registry.region(ref: ref) <- Registry.lookup(id),
         {:ok, header} <- Native.header(ref) do
      mappings = length(Registry.mappings_of(id))
      others = for h <- header.holders, h.pid != me, do: h.pid

      cond do
        header.refcount != mappings ->
          "#{id}: refcount #{header.refcount}, live mappings #{mappings}"

        others != [] ->
          "#{id}: held by dead OS processes #{inspect(others)}"

        true ->
          nil
      end
    else
      _ -> nil
    end
  end

  @python_holder """
  import json, sys, time, warnings
  warnings.simplefilter("ignore")
  import snakepit_shm
  regions = [snakepit_shm.attach(ref) for ref in json.loads(sys.argv[1])]
  print("ATTACHED", len(regions), flush=True)
  time.sleep(120)
  """

  # Live OS holders count too: a Python worker attaches a few surviving regions (one
  # hold each in the header), then is SIGKILLed (its holds must be released).
  defp python_holds_problems(tables) do
    ids =
      for {id, owner, _crc, _size} <- :ets.tab2list(tables.expected),
          Process.alive?(owner),
          do: id

    ids = Enum.take(ids, 5)
    refs = for id <- ids, {:ok, ref} = SharedMemory.export_ref(id), do: ref
    {:ok, json} = Snakepit.SharedMemory.JSON.encode(refs)

    port =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 4096},
        args: ["-c", @python_holder, json],
        env: ReliabilityHelpers.python_env()
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    count = Integer.to_string(length(ids))
    assert_receive {^port, {:data, {:eol, "ATTACHED " <> ^count}}}, 10_000
    held = for id <- ids, problem = holds_problem(id, 1), do: "while attached: " <> problem
    ReliabilityHelpers.kill9(os_pid)

    released =
      ShmHelpers.wait_until(fn -> Enum.all?(ids, &(holds_problem(&1, 0) == nil)) end, 5_000)

    gone =
      if released,
        do: [],
        else: for(id <- ids, p = holds_problem(id, 0), do: "after SIGKILL: " <> p)

    held ++ gone
  end

  defp holds_problem(id, python_holds) do
    with Registry.region(ref: ref) <- Registry.lookup(id),
         {:ok, header} <- Native.header(ref) do
      expected = length(Registry.mappings_of(id)) + python_holds

      if header.refcount == expected,
        do: nil,
        else: "#{id}: refcount #{header.refcount}, expected #{expected}"
    else
      _ -> "#{id}: gone"
    end
  end

  # ---- the second VM ----

  @vm1 """
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory
  sizes = [4096, 65_536, 1_048_576]
  ids =
    for i <- 1..20 do
      size = Enum.at(sizes, rem(i, 3))
      {:ok, id} = SharedMemory.allocate_region(size, backend: :posix, cleanup_policy: Enum.at([:automatic, :manual, :reference_counted], rem(i, 3)))
      {:ok, m} = SharedMemory.map_region(id)
      :ok = SharedMemory.write(m, 0, :binary.copy(<<i>>, size))
      id
    end
  {:ok, ref} = SharedMemory.export_ref(hd(ids))
  {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)
  IO.puts("PID " <> System.pid())
  IO.puts("REF " <> json)
  IO.puts("READY " <> Enum.join(ids, ","))
  # Then the same chaos as in the test VM, on POSIX regions: owners killed, the manager
  # killed, while the test waits to SIGKILL this whole VM.
  alias Snakepit.SharedMemory.ReliabilityChaos
  tables = ReliabilityChaos.new_tables()
  start = fn i -> ReliabilityChaos.start_worker(tables, i, [:posix]) end
  workers = for i <- 1..6, do: start.(i)
  Enum.reduce(Stream.iterate(7, &(&1 + 1)), workers, fn i, workers ->
    Process.sleep(10)
    if rem(i, 100) == 0, do: Process.whereis(Snakepit.SharedMemory.Manager) |> then(&(&1 && Process.exit(&1, :kill)))
    if rem(i, 5) == 0 do
      {victim, rest} = List.pop_at(workers, rem(i, length(workers)))
      Process.exit(victim, :kill)
      [start.(i) | rest]
    else
      workers
    end
  end)
  """

  @holder """
  import json, sys, time, warnings, zlib
  warnings.simplefilter("ignore")
  import snakepit_shm
  region = snakepit_shm.attach(json.loads(sys.argv[1]))
  print("ATTACHED", flush=True)
  for line in sys.stdin:
      print("CRC", zlib.crc32(region.buf) & 0xFFFFFFFF, region.size, flush=True)
  """

  test "a VM killed with SIGKILL leaves POSIX segments that the next VM's start sweeps" do
    before = ShmHelpers.our_segments()

    vm1 =
      Port.open({:spawn_executable, "/bin/sh"}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 65_536},
        args: ["-c", ReliabilityHelpers.elixir_command()],
        env: [{~c"SNAKEPIT_SHM_VM_CODE", String.to_charlist(@vm1)}]
      ])

    lines = collect_until(vm1, "READY ", 60_000)
    vm1_pid = lines |> line_value("PID ") |> String.to_integer()
    ref_json = line_value(lines, "REF ")
    ids = lines |> line_value("READY ") |> String.split(",")

    holder =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 4096},
        args: ["-c", @holder, ref_json],
        env: ReliabilityHelpers.python_env()
      ])

    {:os_pid, holder_pid} = Port.info(holder, :os_pid)
    assert_receive {^holder, {:data, {:eol, "ATTACHED"}}}, 10_000

    try do
      Process.sleep(1_500)
      ReliabilityHelpers.kill9(vm1_pid)
      assert_receive {^vm1, {:exit_status, _}}, 10_000
      left = ShmHelpers.our_segments() -- before
      assert Enum.all?(ids, &(&1 in left)), "the killed VM's POSIX segments should outlive it"

      # A segment whose header was never completed (the VM was killed inside create) is
      # left alone by a sweep while younger than 10 s (kCreationGraceNs in inspect.cpp: a
      # live creator may still be sizing it): let the killed VM's segments age past that,
      # so that the sweep below judges every one of them.
      wait_past_creation_grace(left)

      # The next VM: its manager's start-up sweep removes every orphan.
      code = """
      {:ok, _} = Application.ensure_all_started(:snakepit_shm)
      IO.puts("SWEPT")
      """

      {out, 0} = ReliabilityHelpers.elixir_vm(code)
      assert out =~ "SWEPT"
      # Only what the killed VM made counts (other VMs may run on a developer machine).
      details =
        for id <- ShmHelpers.our_segments() -- before,
            do: {id, Native.inspect_path("/dev/shm/" <> id)}

      remaining =
        for {id, result} <- details,
            match?({:ok, %{creator_pid: ^vm1_pid}}, result) or
              ReliabilityHelpers.header_less?(id),
            do: id

      # A VM killed inside create leaves a header-less segment: the sweep removes it too
      # once no process has it open (a creator of another VM still at work is left).
      {incomplete, with_header} = Enum.split_with(remaining, &ReliabilityHelpers.header_less?/1)
      incomplete = Enum.reject(incomplete, &held_open?/1)

      ReliabilityHelpers.record("vm_kill", %{
        segments_left_by_killed_vm: length(left),
        remaining_after_sweep: length(with_header),
        header_less_left: length(incomplete)
      })

      # The segment the Python worker attached is in use (its liveness lock): the sweep
      # leaves it, name and all; every other one is gone.
      attached = hd(ids)

      # (Named regions of the killed VM that this VM's own chaos opened are in use too.)
      in_use = fn id -> match?({:ok, %{in_use: true}}, Native.inspect_path("/dev/shm/" <> id)) end
      assert attached in with_header

      assert Enum.reject(with_header ++ incomplete, in_use) == [],
             "left after the next start's sweep: #{inspect(details, limit: 10)}"

      # The Python worker still reads the memory it mapped.
      Port.command(holder, "crc\n")
      assert_receive {^holder, {:data, {:eol, "CRC " <> crc}}}, 5_000
      [crc, size] = String.split(crc)
      assert String.to_integer(crc) == :erlang.crc32(:binary.copy(<<1>>, String.to_integer(size)))
    after
      ReliabilityHelpers.kill9(holder_pid)
      if Port.info(vm1) != nil, do: Port.close(vm1)
      # Its last user gone, the attached segment is an orphan: swept.
      ShmHelpers.wait_until(fn -> not ReliabilityHelpers.os_alive?(holder_pid) end, 5_000)
      Snakepit.SharedMemory.Sweep.sweep_orphans()
    end
  end

  # What a creator killed between shm_open and publishing the header leaves.
  # True if a live process has the segment open (a creator still at work).
  defp held_open?(id) do
    target = "/dev/shm/" <> id

    Enum.any?(Path.wildcard("/proc/[0-9]*/fd/*"), fn fd ->
      match?(
        {:ok, ^target},
        :file.read_link(fd)
        |> then(fn
          {:ok, t} -> {:ok, List.to_string(t)}
          e -> e
        end)
      )
    end)
  end

  defp collect_until(port, prefix, timeout, acc \\ []) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        acc = [line | acc]

        if String.starts_with?(line, prefix),
          do: Enum.reverse(acc),
          else: collect_until(port, prefix, timeout, acc)

      {^port, {:exit_status, status}} ->
        flunk("the VM exited with #{status}: #{Enum.join(Enum.reverse(acc), "\n")}")
    after
      timeout -> flunk("the VM did not print #{prefix}: #{Enum.join(Enum.reverse(acc), "\n")}")
    end
  end

  defp line_value(lines, prefix) do
    Enum.find_value(lines, fn line ->
      if String.starts_with?(line, prefix), do: String.replace_prefix(line, prefix, "")
    end)
  end

  defp wait_past_creation_grace(ids) do
    newest =
      ids
      |> Enum.map(&File.stat(Path.join("/dev/shm", &1), time: :posix))
      |> Enum.flat_map(fn
        {:ok, %File.Stat{mtime: mtime}} -> [mtime]
        _ -> []
      end)
      |> Enum.max(fn -> 0 end)

    wait_ms = (newest + 11 - System.os_time(:second)) * 1000
    if wait_ms > 0, do: Process.sleep(wait_ms)
  end
end
