defmodule Snakepit.SharedMemory.ArenaTest do
  # Small regions carved out of arenas (docs/FORMAT.md "Arenas"): concurrency without
  # overlap, exhaustion and growth, a Python worker whose region never changes while its
  # neighbours are freed and reused, SIGKILL of the VM with arenas live, and the region
  # id as the only thing a user sees (export_ref, attach, info, list, cleanup).
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Arena, Config, JSON, Native}
  alias Snakepit.SharedMemory.ReliabilityHelpers
  alias Snakepit.SharedMemory.Test.PythonWorker

  setup do
    on_exit(fn -> restore_arena_config() end)
    :ok
  end

  defp restore_arena_config do
    config = Config.get()
    Native.arena_configure(config.arena_size, config.arena_grace)
  end

  defp arena_fds do
    for fd <- File.ls!("/proc/self/fd"),
        {:ok, target} <- [:file.read_link_all(~c"/proc/self/fd/" ++ String.to_charlist(fd))],
        String.starts_with?(to_string(target), "/memfd:spshm_arena_"),
        do: fd
  end

  defp filled_region(size, tag) do
    {:ok, id} = SM.allocate_region(size, arena: true)
    {:ok, m} = SM.map_region(id, access_mode: :read_write)
    :ok = SM.write(m, 0, pattern(tag, size))
    :ok = SM.unmap_region(m)
    id
  end

  defp pattern(tag, size), do: :binary.copy(<<tag::32>>, div(size + 3, 4)) |> binary_part(0, size)

  describe "allocation" do
    test "an eligible region goes to an arena; the rest keep dedicated segments" do
      {:ok, small} = SM.allocate_region(4096, arena: true)
      {:ok, ref} = SM.export_ref(small)
      assert is_integer(ref["control_offset"]) and rem(ref["control_offset"], 4096) == 0
      assert ref["data_offset"] == ref["control_offset"] + 4096
      assert ref["control_path"] == ref["data_path"]
      {:ok, target} = :file.read_link_all(String.to_charlist(ref["control_path"]))
      assert to_string(target) =~ ~r"^/memfd:spshm_arena_[a-z2-7]{20} \(deleted\)$"
      {:ok, header} = Native.header(region_ref(small))
      assert Bitwise.band(header.flags, 32) == 32
      assert header.data_offset == 4096

      for opts <- [
            [arena: false],
            [arena: true, security_level: :high],
            [arena: true, name: "arena-t-#{System.unique_integer([:positive])}"],
            [arena: true, permissions: %{group: :read_only}],
            [arena: true, backend: :posix]
          ] do
        {:ok, id} = SM.allocate_region(4096, opts)
        {:ok, ref} = SM.export_ref(id, [])
        refute Map.has_key?(ref, "control_offset"), inspect(opts)
        :ok = SM.deallocate_region(id)
      end

      # Above the threshold: dedicated.
      {:ok, big} = SM.allocate_region(Config.get().arena_threshold + 1, arena: true)
      {:ok, ref} = SM.export_ref(big)
      refute Map.has_key?(ref, "control_offset")
      :ok = SM.deallocate_region(big)
      :ok = SM.deallocate_region(small)
    end

    test "many processes allocate and free concurrently: every region keeps its own bytes" do
      parent = self()

      tasks =
        for p <- 1..8 do
          Task.async(fn ->
            live =
              Enum.reduce(1..150, [], fn i, live ->
                size = 1 + :rand.uniform(65_536 - 1)
                {:ok, id} = SM.allocate_region(size, arena: true, owner: parent)
                {:ok, m} = SM.map_region(id, access_mode: :read_write)
                tag = p * 1_000_000 + i
                :ok = SM.write(m, 0, pattern(tag, size))
                :ok = SM.unmap_region(m)
                live = [{id, tag, size} | live]

                # Free about half, at random, so chunks are reused while others live.
                if :rand.uniform(2) == 1 do
                  {victim, rest} = List.pop_at(live, :rand.uniform(length(live)) - 1)
                  {vid, _, _} = victim
                  :ok = SM.deallocate_region(vid)
                  rest
                else
                  live
                end
              end)

            send(parent, {:done, p})
            live
          end)
        end

      live = tasks |> Enum.map(&Task.await(&1, 120_000)) |> List.flatten()
      assert length(live) > 100

      for {id, tag, size} <- live do
        {:ok, m} = SM.map_region(id)
        assert {:ok, data} = SM.read(m, 0, size)
        assert data == pattern(tag, size), "region #{id} lost its bytes"
        :ok = SM.unmap_region(m)
      end

      # No two live regions share a byte of an arena.
      spans =
        live
        |> Enum.map(fn {id, _, size} ->
          {:ok, ref} = SM.export_ref(id)
          {ref["control_path"], ref["control_offset"], ref["control_offset"] + 4096 + size}
        end)
        |> Enum.sort()

      spans
      |> Enum.chunk_every(2, 1, :discard)
      |> Enum.each(fn [{p1, _s1, e1}, {p2, s2, _e2}] ->
        if p1 == p2, do: assert(e1 <= s2, "overlapping chunks in #{p1}")
      end)

      for {id, _, _} <- live, do: :ok = SM.deallocate_region(id)
    end

    test "exhaustion grows by new arenas, and empty arenas go back to the OS" do
      # 1 MiB arenas and no grace period, for this test only.
      :ok = Native.arena_configure(1_048_576, 0)
      for p <- Process.list(), do: :erlang.garbage_collect(p)
      Arena.maintain()
      before = Arena.stats()
      fds_before = length(arena_fds())

      # Allocate until three new arenas were needed (the arenas other tests left with
      # room are filled first; at most 1000 x 64 KiB).
      ids =
        Enum.reduce_while(1..1000, [], fn i, ids ->
          {:ok, id} = SM.allocate_region(60_000, arena: true)
          {:ok, m} = SM.map_region(id, access_mode: :read_write)
          :ok = SM.write(m, 0, pattern(i, 60_000))
          :ok = SM.unmap_region(m)
          ids = [{id, i} | ids]
          if Arena.stats().created - before.created >= 3, do: {:halt, ids}, else: {:cont, ids}
        end)

      grown = Arena.stats()
      assert grown.created - before.created >= 3
      assert grown.arena_size == 1_048_576
      assert length(arena_fds()) - fds_before >= 3

      for {id, i} <- ids do
        {:ok, m} = SM.map_region(id)
        assert {:ok, pattern(i, 60_000)} == SM.read(m, 0, 60_000)
        :ok = SM.unmap_region(m)
        :ok = SM.deallocate_region(id)
      end

      # The resources are freed asynchronously: the chunks come back, then the arenas.
      # (Every process: a region resource lives until the last term naming it is gone.)
      assert wait_until(
               fn ->
                 for p <- Process.list(), do: :erlang.garbage_collect(p)
                 Arena.maintain()
                 Arena.stats().returned - before.returned >= 3
               end,
               30_000
             ),
             "arenas not returned: #{inspect(Arena.stats())} (before: #{inspect(before)})"
    end
  end

  describe "deallocation" do
    # Every OFD lock call on an arena walks all of its lock records: a freed region's
    # locks must go with deallocate_region/1, not at the next garbage collection of
    # whoever still has its handle (bench/FINDINGS.md, section 3a).
    test "drops the VM's locks of the chunk at once; the chunk is reused only later" do
      id = filled_region(4096, 9)
      {:ok, ref} = SM.export_ref(id)
      path = ref["control_path"]
      offset = ref["control_offset"]
      {:ok, mapping} = SM.map_region(id, access_mode: :read_write)
      # The region's handle stays alive in this process (as a caller's stale record does).
      handle = mapping.ref

      in_use = fn ->
        {:ok, entries} = Native.inspect_arena(path)
        {_, header} = List.keyfind(entries, offset, 0)
        {header.id, header.in_use}
      end

      assert in_use.() == {id, true}
      :ok = SM.deallocate_region(id)
      assert in_use.() == {id, false}

      # Still reserved while the handle lives: new regions go elsewhere.
      others =
        for _ <- 1..8 do
          {:ok, other} = SM.allocate_region(4096, arena: true)
          {:ok, other_ref} = SM.export_ref(other)
          refute other_ref["control_path"] == path and other_ref["control_offset"] == offset
          other
        end

      assert {:error, _} = Native.write(handle, 0, "x")
      Enum.each(others, &SM.deallocate_region/1)
    end
  end

  describe "the offline tools (mix snakepit.shm.list / info / cleanup)" do
    test "see each arena region by its id, never the arena itself" do
      id = filled_region(4096, 7)
      {:ok, ref} = SM.export_ref(id)
      entry = Snakepit.SharedMemory.CLI.HostScan.find(id)
      assert entry.id == id
      assert entry.backend == "memfd"
      assert entry.size == 4096
      assert entry.in_use
      refute entry.orphaned
      assert entry.path =~ ~r"^/proc/\d+/fd/\d+$"
      assert entry.path == ref["control_path"]
      # cleanup (release_holds) opens it where the scan found it.
      assert entry.control_offset == ref["control_offset"]

      assert {:ok, other, %{id: ^id, arena: true}} =
               Native.open({entry.path, entry.path, entry.control_offset}, false)

      {:ok, [{_, header} | _]} = Native.inspect_arena(entry.path)
      assert header.id =~ ~r/^spshm_/
      _ = other
      entries = Snakepit.SharedMemory.CLI.HostScan.scan()
      assert Enum.any?(entries, &(&1.id == id))
      refute Enum.any?(entries, &String.starts_with?(&1.id, "spshm_arena_"))
      :ok = SM.deallocate_region(id)
    end
  end

  @neighbour_worker ~S"""
  import json, sys
  import snakepit_shm

  region = None
  first = None
  for line in sys.stdin:
      cmd, _, arg = line.strip().partition(" ")
      if cmd == "attach":
          region = snakepit_shm.attach(json.loads(arg), "r")
          view = region.buf  # kept: valid whatever the VM does with the region
          first = bytes(view)
          maps = [l for l in open("/proc/self/maps") if "spshm_arena_" in l]
          spans = []
          for l in maps:
              a, b = (int(x, 16) for x in l.split()[0].split("-"))
              spans.append(b - a)
          print(json.dumps({"size": len(first), "arena_mappings": spans}), flush=True)
      elif cmd == "check":
          print(json.dumps({"same": bytes(view) == first}), flush=True)
      elif cmd == "close":
          view.release()
          region.close()
          print(json.dumps({"closed": True}), flush=True)
  """

  describe "a Python worker attached to a small region" do
    test "sees its bytes never change while neighbours are freed and reused" do
      id = filled_region(8192, 42)
      {:ok, ref} = SM.export_ref(id)
      {:ok, json} = JSON.encode(ref)
      worker = PythonWorker.start(@neighbour_worker)

      try do
        reply = PythonWorker.ask(worker, "attach " <> json)
        assert reply["size"] == 8192
        # Its mappings of the arena cover only its own pages: one header page and two
        # data pages, never the whole arena.
        assert Enum.all?(reply["arena_mappings"], &(&1 <= 8192)), inspect(reply)

        for round <- 1..5 do
          neighbours =
            for j <- 1..40 do
              {:ok, n} = SM.allocate_region(4096 * rem(j, 3) + 100, arena: true)
              {:ok, nm} = SM.map_region(n, access_mode: :read_write)
              :ok = SM.write(nm, 0, :binary.copy(<<0xFF>>, 100))
              :ok = SM.unmap_region(nm)
              n
            end

          for n <- neighbours, do: :ok = SM.deallocate_region(n)
          # The region itself is freed too after the first round: its chunk must stay
          # pending (never reused) while the worker holds it.
          if round == 1, do: :ok = SM.deallocate_region(id)
          :erlang.garbage_collect()
          Arena.maintain()
          assert PythonWorker.ask(worker, "check") == %{"same" => true}
        end

        # Once the VM dropped it, the chunk waits for the worker (never reused).
        assert wait_until(fn ->
                 :erlang.garbage_collect()
                 Arena.stats().pending_chunks >= 1
               end)

        assert PythonWorker.ask(worker, "check") == %{"same" => true}
        assert PythonWorker.ask(worker, "close") == %{"closed" => true}

        assert wait_until(fn ->
                 Arena.maintain()
                 Arena.stats().pending_chunks == 0
               end)
      after
        PythonWorker.stop(worker)
      end
    end

    test "attach by ref, holds and reference counts work as for a dedicated region" do
      {:ok, id} = SM.allocate_region(4096, arena: true)
      {:ok, ref} = SM.export_ref(id)
      {:ok, json} = JSON.encode(ref)

      script = ~S"""
      import json, sys
      import snakepit_shm
      ref = json.loads(sys.argv[1])
      with snakepit_shm.attach(ref, "rw") as r:
          r.buf[0:5] = b"hello"
          print(json.dumps({"refcount": r.info()["refcount"]}), flush=True)
          sys.stdin.readline()
      """

      worker = PythonWorker.start(script, [json])

      try do
        assert_receive {_, {:data, {:eol, line}}}, 30_000
        assert {:ok, %{"refcount" => 1}} = JSON.decode(line)
        {:ok, info} = SM.get_region_info(id)
        assert info.reference_count == 1
        {:ok, m} = SM.map_region(id)
        assert {:ok, "hello"} = SM.read(m, 0, 5)
        :ok = SM.unmap_region(m)
        # seal/1 is refused while the worker holds it writable, as for any region.
        assert {:error, %{reason: :busy}} = SM.seal(id)
        PythonWorker.kill9(worker)
        # Its hold dies with it.
        assert wait_until(fn -> match?({:ok, %{reference_count: 0}}, SM.get_region_info(id)) end)
        :ok = SM.seal(id)
        {:ok, m} = SM.map_region(id)
        # No kernel seal of its own: the read copies (docs/ARCHITECTURE.md "Arenas").
        assert {:ok, "hello"} = SM.read(m, 0, 5)
        :ok = SM.unmap_region(m)
      after
        PythonWorker.stop(worker)
      end

      :ok = SM.deallocate_region(id)
    end
  end

  @vm """
  Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM
  ids = for i <- 1..20 do
    {:ok, id} = SM.allocate_region(4096, arena: true)
    {:ok, m} = SM.map_region(id, access_mode: :read_write)
    :ok = SM.write(m, 0, :binary.copy(<<i>>, 4096))
    id
  end
  {:ok, ref} = SM.export_ref(hd(ids))
  {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)
  IO.puts("REF " <> json)
  Process.sleep(:infinity)
  """

  describe "SIGKILL of the VM with arenas live" do
    test "its arenas go with it (and with the last worker that had one open)" do
      vm =
        Port.open({:spawn_executable, "/bin/sh"}, [
          :binary,
          :exit_status,
          :stderr_to_stdout,
          {:line, 65_536},
          args: ["-c", ReliabilityHelpers.elixir_command()],
          env: [{~c"SNAKEPIT_SHM_VM_CODE", String.to_charlist(@vm)}]
        ])

      json = await_ref(vm)
      {:ok, ref} = JSON.decode(json)
      [_, vm_pid] = Regex.run(~r"^/proc/(\d+)/fd/", ref["control_path"])
      vm_pid = String.to_integer(vm_pid)
      {:ok, target} = :file.read_link_all(String.to_charlist(ref["control_path"]))
      arena = to_string(target)
      worker = PythonWorker.start(@neighbour_worker)

      try do
        assert PythonWorker.ask(worker, "attach " <> json)["size"] == 4096
        ReliabilityHelpers.kill9(vm_pid)
        assert_receive {^vm, {:exit_status, _}}, 30_000
        # Nothing of the dead VM in /dev/shm, for an orphan sweep to find or miss.
        assert ReliabilityHelpers.own_segments()
               |> Enum.all?(&(not String.contains?(&1, "arena")))

        {:ok, _} = SM.cleanup_regions(orphans: true)
        # The worker keeps its region, bytes intact, while it holds the arena open...
        assert PythonWorker.ask(worker, "check") == %{"same" => true}
        assert holders_of(arena) == [worker.os_pid]
        PythonWorker.kill9(worker)
        # ... and the kernel frees the arena with the last process that had it.
        assert wait_until(fn -> holders_of(arena) == [] end)
      after
        PythonWorker.stop(worker)
        if ReliabilityHelpers.os_alive?(vm_pid), do: ReliabilityHelpers.kill9(vm_pid)
        if Port.info(vm) != nil, do: Port.close(vm)
      end
    end
  end

  # OS processes of our uid with `arena` (a memfd link target) open.
  defp holders_of(arena) do
    for pid <- File.ls!("/proc"),
        Regex.match?(~r/^\d+$/, pid),
        {:ok, fds} <- [File.ls("/proc/#{pid}/fd")],
        Enum.any?(fds, fn fd ->
          match?({:ok, t} when is_list(t), :file.read_link_all(~c"/proc/#{pid}/fd/#{fd}")) and
            to_string(elem(:file.read_link_all(~c"/proc/#{pid}/fd/#{fd}"), 1)) == arena
        end),
        uniq: true,
        do: String.to_integer(pid)
  end

  defp await_ref(port) do
    receive do
      {^port, {:data, {:eol, "REF " <> json}}} -> json
      {^port, {:data, _}} -> await_ref(port)
      {^port, {:exit_status, status}} -> flunk("the VM exited with #{status}")
    after
      120_000 -> flunk("the VM did not export a ref")
    end
  end

  defp region_ref(id) do
    require Snakepit.SharedMemory.Registry
    Snakepit.SharedMemory.Registry.region(ref: ref) = Snakepit.SharedMemory.Registry.lookup(id)
    ref
  end

  defp wait_until(fun, timeout \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + timeout

    Stream.repeatedly(fn -> fun.() end)
    |> Enum.reduce_while(false, fn ok, _ ->
      cond do
        ok -> {:halt, true}
        System.monotonic_time(:millisecond) > deadline -> {:halt, false}
        true -> Process.sleep(20) && {:cont, false}
      end
    end)
  end
end
