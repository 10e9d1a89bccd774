defmodule Snakepit.SharedMemory.WarmPoolTest do
  # The warm pool of large regions (issue 14): reuse with a fresh id and zeroed
  # contents, never while another process still has the old data open or mapped, never
  # reachable through the old id or the old ref, budget, drain, stats.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Native, WarmPool}
  alias Snakepit.SharedMemory.Test.PythonWorker

  @mib 1024 * 1024
  # A size no other test of this module allocates, so that each test sees only its own
  # pooled objects (the pool is per VM).
  @worker ~S"""
  import json, sys
  import snakepit_shm
  held = {}
  for line in sys.stdin:
      cmd, _, arg = line.strip().partition(" ")
      try:
          if cmd == "attach":
              key, _, ref = arg.partition(" ")
              held[key] = snakepit_shm.attach(json.loads(ref), mode="r")
              print(json.dumps({"ok": True}), flush=True)
          elif cmd == "head":
              key, _, n = arg.partition(" ")
              print(json.dumps({"ok": bytes(held[key].buf[:int(n)]).hex()}), flush=True)
          elif cmd == "view":
              # keep only a numpy view: the Region object is closed, the mapping lives on
              import numpy as np
              key = arg
              r = held.pop(key)
              held[key + "_view"] = np.frombuffer(r.buf, dtype=np.uint8)[:16].copy()
              held[key + "_live"] = r.ndarray(dtype="uint8")
              print(json.dumps({"ok": True}), flush=True)
          elif cmd == "viewhead":
              print(json.dumps({"ok": bytes(held[arg + "_live"][:16]).hex()}), flush=True)
          elif cmd == "close":
              held.pop(arg).close()
              print(json.dumps({"ok": True}), flush=True)
          elif cmd == "try":
              try:
                  r = snakepit_shm.attach(json.loads(arg), mode="r")
                  data = bytes(r.buf[:16]).hex()
                  r.close()
                  print(json.dumps({"attached": data}), flush=True)
              except snakepit_shm.SnakepitShmError as exc:
                  print(json.dumps({"refused": type(exc).__name__, "message": str(exc)}),
                        flush=True)
      except Exception as exc:
          print(json.dumps({"error": repr(exc)}), flush=True)
  """

  setup do
    before = WarmPool.stats()
    # Each test starts from an empty pool with the default budget, and leaves it so.
    :ok = WarmPool.set_budget(0)
    :ok = WarmPool.set_budget(max(before.budget, 64 * @mib))

    on_exit(fn ->
      :ok = WarmPool.set_budget(0)
      :ok = WarmPool.set_budget(WarmPool.default_budget())
    end)

    :ok
  end

  defp fill(id, byte, size) do
    {:ok, m} = SM.map_region(id, access_mode: :read_write)
    :ok = SM.write(m, 0, :binary.copy(<<byte>>, size))
    :ok = SM.unmap_region(m)
  end

  defp head(id, n) do
    {:ok, m} = SM.map_region(id)
    {:ok, bytes} = SM.read(m, 0, n)
    :ok = SM.unmap_region(m)
    bytes
  end

  defp ref_json(id) do
    {:ok, ref} = SM.export_ref(id)
    json!(ref)
  end

  defp json!(term) do
    {:ok, text} = Snakepit.SharedMemory.JSON.encode(term)
    IO.iodata_to_binary(text)
  end

  test "a freed region is reused by the next allocation of its size: new id, zeroed" do
    size = 3 * @mib
    s0 = WarmPool.stats()
    {:ok, a} = SM.allocate_region(size)
    fill(a, 0xAB, size)
    :ok = SM.deallocate_region(a)
    s1 = WarmPool.stats()
    assert s1.returned == s0.returned + 1
    assert s1.bytes_held == s0.bytes_held + size
    assert s1.entries == s0.entries + 1
    # Host tools (mix snakepit.shm.list/cleanup) do not take a pooled object for a
    # leftover region.
    # (Until garbage collection closes its control memfd, the freed region itself may
    # still be listed, as deallocated: that is not the pooled object.)
    assert [] == Enum.filter(Snakepit.SharedMemory.CLI.HostScan.scan(), &leftover?(&1, a))

    {:ok, b} = SM.allocate_region(size)
    s2 = WarmPool.stats()
    assert s2.hits == s1.hits + 1
    assert s2.bytes_held == s1.bytes_held - size
    refute b == a
    # Zeroed like a fresh region, every byte.
    {:ok, m} = SM.map_region(b)
    {:ok, all} = SM.read(m, 0, size)
    assert all == :binary.copy(<<0>>, size)
    :ok = SM.unmap_region(m)
    # The old id names nothing.
    assert {:error, %{reason: :not_found}} = SM.map_region(a)
    # The new region's header names the reused data memfd, and has no holder.
    {:ok, info} = SM.get_region_info(b)
    assert info.id == b
    assert info.reference_count == 0
    # ... and the host scan shows b with its (reused) data memfd, nothing under a.
    scan = Snakepit.SharedMemory.CLI.HostScan.scan()
    assert %{data_path: "/proc/" <> _} = Enum.find(scan, &(&1.id == b))
    assert [] == Enum.filter(scan, &leftover?(&1, a))
    :ok = SM.deallocate_region(b)
  end

  test "sizes that do not fit are misses; sealed and encrypted regions never come back" do
    {:ok, a} = SM.allocate_region(2 * @mib)
    :ok = SM.deallocate_region(a)
    s0 = WarmPool.stats()
    # 4 MiB does not fit a 2 MiB object: a miss, made fresh.
    {:ok, b} = SM.allocate_region(4 * @mib)
    s1 = WarmPool.stats()
    assert s1.misses == s0.misses + 1
    assert s1.entries == s0.entries

    {:ok, c} = SM.allocate_region(4 * @mib)
    :ok = SM.seal(c)
    :ok = SM.deallocate_region(c)
    {:ok, d} = SM.allocate_region(4 * @mib, security_level: :high)
    :ok = SM.deallocate_region(d)
    s2 = WarmPool.stats()
    assert s2.entries == s1.entries
    for id <- [b], do: :ok = SM.deallocate_region(id)
  end

  test "a region a Python worker still maps is not pooled; its bytes never change under it" do
    size = 5 * @mib
    worker = PythonWorker.start(@worker)

    try do
      {:ok, a} = SM.allocate_region(size)
      fill(a, 0x5A, size)
      assert %{"ok" => true} = PythonWorker.ask(worker, "attach a " <> ref_json(a))
      # The worker keeps only an ndarray over the mapping (its Region closed).
      assert %{"ok" => true} = PythonWorker.ask(worker, "view a")
      s0 = WarmPool.stats()
      :ok = SM.deallocate_region(a)
      s1 = WarmPool.stats()
      assert s1.refused == s0.refused + 1
      assert s1.entries == s0.entries

      # The next region of that size is fresh, and writing it changes nothing the
      # worker sees.
      {:ok, b} = SM.allocate_region(size)
      assert WarmPool.stats().misses == s1.misses + 1
      fill(b, 0x77, size)
      assert %{"ok" => hex} = PythonWorker.ask(worker, "viewhead a")
      assert hex == String.duplicate("5a", 16)
      :ok = SM.deallocate_region(b)
    after
      PythonWorker.stop(worker)
    end
  end

  test "a worker that closed its attachment cannot reach the pooled object or its reuse" do
    size = 6 * @mib
    worker = PythonWorker.start(@worker)

    try do
      {:ok, a} = SM.allocate_region(size)
      fill(a, 0x11, size)
      old_ref = ref_json(a)
      assert %{"ok" => true} = PythonWorker.ask(worker, "attach a " <> old_ref)
      assert %{"ok" => "1111"} = PythonWorker.ask(worker, "head a 2")
      assert %{"ok" => true} = PythonWorker.ask(worker, "close a")
      s0 = WarmPool.stats()
      :ok = SM.deallocate_region(a)
      assert WarmPool.stats().entries == s0.entries + 1

      # While pooled: the old ref attaches nothing.
      assert %{"refused" => _} = PythonWorker.ask(worker, "try " <> old_ref)

      # Reused by a new owner who writes secrets: the old ref still attaches nothing.
      {:ok, b} = SM.allocate_region(size)
      assert WarmPool.stats().hits == s0.hits + 1
      fill(b, 0x99, size)
      assert %{"refused" => _} = PythonWorker.ask(worker, "try " <> old_ref)

      # The new owner's ref works (the header names the reused data memfd), and by
      # bare id too.
      assert %{"attached" => hex} = PythonWorker.ask(worker, "try " <> ref_json(b))
      assert hex == String.duplicate("99", 16)

      assert %{"attached" => ^hex} = PythonWorker.ask(worker, "try " <> json!(b))

      # And by the Elixir side's own open of the paths.
      {:ok, ref} = SM.export_ref(b)
      {:ok, r, _info} = Native.open({ref["control_path"], ref["data_path"]}, false)
      {:ok, m} = Native.map(r, :read_only)
      {:ok, <<0x99, 0x99>>} = Native.read(m, 0, 2)
      :ok = Native.unmap(m)
      # ... which holds the data lock: freeing b now does not pool it.
      s1 = WarmPool.stats()
      :ok = SM.deallocate_region(b)
      assert WarmPool.stats().refused == s1.refused + 1
    after
      PythonWorker.stop(worker)
    end
  end

  test "the budget bounds the pool; shrinking it and stopping the application release it" do
    :ok = WarmPool.set_budget(8 * @mib)
    ids = for _ <- 1..3, do: elem(SM.allocate_region(3 * @mib), 1)
    Enum.each(ids, &(:ok = SM.deallocate_region(&1)))
    s = WarmPool.stats()
    # Two fit in 8 MiB, the third is refused.
    assert s.bytes_held == 6 * @mib
    assert s.entries == 2
    :ok = WarmPool.set_budget(4 * @mib)
    s = WarmPool.stats()
    assert s.bytes_held == 3 * @mib
    assert s.entries == 1

    # Application stop gives everything back (the NIF stays loaded after a stop).
    :ok = Snakepit.SharedMemory.Application.stop(nil)
    assert %{bytes_held: 0, entries: 0, budget: 0} = WarmPool.stats()
    # Budget 0: nothing is pooled.
    {:ok, a} = SM.allocate_region(3 * @mib)
    :ok = SM.deallocate_region(a)
    assert WarmPool.stats().entries == 0
  end

  test "stats/0 and the stats mix task show the pool" do
    {:ok, a} = SM.allocate_region(2 * @mib)
    :ok = SM.deallocate_region(a)
    {:ok, stats} = SM.stats()
    assert %{hits: _, misses: _, bytes_held: held, budget: budget} = stats.pool
    assert held >= 2 * @mib
    assert budget > 0
  end

  test "the pool is off for small regions, named and POSIX ones" do
    s0 = WarmPool.stats()
    {:ok, a} = SM.allocate_region(512 * 1024)
    {:ok, b} = SM.allocate_region(2 * @mib, backend: :posix)
    Enum.each([a, b], &(:ok = SM.deallocate_region(&1)))
    assert WarmPool.stats().entries == s0.entries
    assert head(elem(SM.allocate_region(2 * @mib), 1), 1) == <<0>>
  end

  @pooling_vm ~S'''
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM
  {:ok, id} = SM.allocate_region(2 * 1024 * 1024)
  :ok = SM.deallocate_region(id)
  %{entries: 1} = Snakepit.SharedMemory.WarmPool.stats()
  IO.puts("POOLED #{System.pid()} #{id}")
  Process.sleep(:infinity)
  '''

  test "a VM killed with SIGKILL leaves nothing of its pool behind" do
    cmd = Snakepit.SharedMemory.ReliabilityHelpers.elixir_command()

    port =
      Port.open({:spawn_executable, "/bin/sh"}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: ["-c", cmd],
        env: [{~c"SNAKEPIT_SHM_VM_CODE", String.to_charlist(@pooling_vm)}]
      ])

    {os_pid, id} = await_pooled(port)
    on_exit(fn -> Snakepit.SharedMemory.ReliabilityHelpers.kill9(os_pid) end)
    dir = "/proc/#{os_pid}/fd"

    pooled =
      for fd <- File.ls!(dir),
          path = Path.join(dir, fd),
          {:ok, target} <- [File.read_link(path)],
          target == "/memfd:#{id}.data (deleted)",
          do: path

    assert [path] = pooled
    assert Native.pooled_object(path)
    # Host tools see no region of that VM: the pooled object is not a leftover.
    assert [] == Enum.filter(Snakepit.SharedMemory.CLI.HostScan.scan(), &leftover?(&1, id))

    Snakepit.SharedMemory.ReliabilityHelpers.kill9(os_pid)

    assert_receive {^port, {:exit_status, _}}, 30_000
    # The memfd was a descriptor of that VM only: gone with it (no name anywhere for an
    # orphan sweep to find), and no process of ours has it open.
    refute File.exists?(dir)

    refute Enum.any?(
             Snakepit.SharedMemory.CLI.HostScan.scan(),
             &(&1.id == id or os_pid in Map.get(&1, :open_by, []))
           )
  end

  defp leftover?(entry, id), do: entry.id == id and not Map.get(entry, :deallocated, false)

  defp await_pooled(port) do
    receive do
      {^port, {:data, {:eol, "POOLED " <> rest}}} ->
        [pid, id] = String.split(rest)
        {String.to_integer(pid), id}

      {^port, {:data, _}} ->
        await_pooled(port)

      {^port, {:exit_status, status}} ->
        flunk("the pooling VM exited with status #{status}")
    after
      60_000 -> flunk("the pooling VM did not report")
    end
  end

  test "default budget is min(256 MiB, 5 % of RAM)" do
    total =
      "/proc/meminfo"
      |> File.read!()
      |> then(&Regex.run(~r/^MemTotal:\s+(\d+) kB/m, &1))
      |> Enum.at(1)
      |> String.to_integer()
      |> Kernel.*(1024)

    assert WarmPool.default_budget() <= min(256 * @mib, div(total * 5, 100))
    assert WarmPool.budget(:default) == WarmPool.default_budget()
    assert WarmPool.budget(0) == 0
  end
end
