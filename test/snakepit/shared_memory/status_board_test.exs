Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.StatusBoardTest do
  # The status board (issue 16): seqlock slots written by real Python workers (through
  # the C ABI) and Elixir processes, read in place by least_loaded/2 and entries/1.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  import Bitwise

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Error, JSON, Manager, Native, StatusBoard}
  alias Snakepit.SharedMemory.{ReliabilityHelpers, ShmHelpers, TestSupport}

  @root Path.expand("../../..", __DIR__)

  # A Python worker driven by stdin commands: it joins, prints JOINED <slot>, then obeys.
  @worker ~S"""
  import json, sys, time, os
  import snakepit_shm
  ref = json.loads(sys.argv[1])
  b = snakepit_shm.StatusBoard.join(ref, sys.argv[2])
  print("JOINED", b.index, flush=True)
  for line in sys.stdin:
      cmd = line.split()
      if not cmd:
          continue
      if cmd[0] == "update":
          b.update(**{k: (v if k == "state" else int(v)) for k, v in (a.split("=") for a in cmd[1:])})
          print("OK", flush=True)
      elif cmd[0] == "hammer":
          until = time.monotonic() + float(cmd[1])
          n = 0
          while time.monotonic() < until:
              for _ in range(200):
                  n += 1
                  b.update(state="idle" if n % 2 else "busy", queue=n, in_flight=3 * n,
                           memory=5 * n, processed=7 * n, errors=n ^ 0x5555,
                           g0=-n, g1=n + 1, g2=2 * n, g3=-3 * n)
          print("HAMMERED", n, flush=True)
      elif cmd[0] == "deleted":
          print("DELETED", b.deleted, flush=True)
      elif cmd[0] == "leave":
          b.leave()
          print("LEFT", flush=True)
      elif cmd[0] == "exit_now":
          os._exit(0)
  """

  setup do: TestSupport.no_leaks()

  defp board!(opts \\ []) do
    {:ok, board} = StatusBoard.create(ShmHelpers.unique_name("b"), opts)
    board
  end

  defp python_worker(board, worker_id) do
    {:ok, ref} = StatusBoard.export_ref(board)
    {:ok, json} = JSON.encode(ref)

    port =
      Port.open({:spawn_executable, ShmHelpers.python()}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 65_536},
        args: ["-c", @worker, json, worker_id],
        env: [
          {~c"PYTHONPATH", String.to_charlist(Path.join(@root, "priv/python"))},
          {~c"SNAKEPIT_SHM_LIB", String.to_charlist(Path.join(@root, "priv/libsnakepit_shm.so"))},
          {~c"PYTHONDONTWRITEBYTECODE", ~c"1"}
        ]
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    "JOINED " <> slot = expect(port, "JOINED")
    {port, os_pid, String.to_integer(slot)}
  end

  defp expect(port, prefix, timeout \\ 20_000) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        if String.starts_with?(line, prefix), do: line, else: expect(port, prefix, timeout)

      {^port, {:exit_status, status}} ->
        flunk("python worker exited with #{status} while waiting for #{prefix}")
    after
      timeout -> flunk("python worker did not say #{prefix}")
    end
  end

  defp close(port) do
    Port.close(port)
  rescue
    ArgumentError -> :already_closed
  end

  defp command(port, line), do: Port.command(port, line <> "\n")

  defp ids(board) do
    {:ok, entries} = StatusBoard.entries(board)
    entries |> Enum.map(& &1.worker_id) |> Enum.sort()
  end

  describe "layout" do
    test "the NIF's layout, this module's constants and docs/FORMAT.md agree" do
      {:ok, layout} = JSON.decode(Native.board_layout())
      mine = StatusBoard.__layout__()
      assert layout["header_size"] == mine.header_size
      assert layout["slot_size"] == mine.slot_size
      assert layout["max_capacity"] == mine.max_capacity
      assert layout["gauge_count"] == mine.gauge_count
      assert layout["states"] == Map.new(mine.states, fn {k, v} -> {Atom.to_string(k), v} end)

      doc = File.read!(Path.join(@root, "docs/FORMAT.md"))

      for {section, key} <- [
            {"Status board header", "header_fields"},
            {"Status board slot", "slot_fields"}
          ] do
        [_, body] = String.split(doc, "## " <> section <> "\n", parts: 2)
        [table | _] = String.split(body, "\n## ", parts: 2)

        rows =
          for line <- String.split(table, "\n"),
              [_, offset, size, field] <-
                [Regex.run(~r/^\| \+?(\d+) \| (\d+) \| `(\w+)` \|/, line)],
              into: %{},
              do:
                {field,
                 %{"offset" => String.to_integer(offset), "size" => String.to_integer(size)}}

        assert rows == layout[key], "docs/FORMAT.md § #{section} differs from board.hpp"
      end
    end
  end

  describe "create/2 and the region" do
    test "a board is a named region of the manager, listed and described" do
      board = board!(capacity: 8, gauges: [:gpu_mem, "batch"])
      assert board.capacity == 8
      assert board.stale_after == 30_000
      assert board.gauges == ["gpu_mem", "batch", "gauge2", "gauge3"]
      {:ok, info} = SM.get_region_info(board.region_id)
      assert info.metadata["kind"] == "status_board"
      assert info.size == 512 + 192 * 8
      {:ok, regions} = SM.list_regions(name: board.name)
      assert [%{id: id}] = regions
      assert id == board.region_id
      {:ok, ref} = StatusBoard.export_ref(board)
      assert ref["board"]["gauges"] == board.gauges
      assert :ok = StatusBoard.delete(board)
      assert {:error, %Error{reason: :not_found}} = SM.get_region_info(board.region_id)
      # A handle kept after delete/1 says so instead of routing to a dead board.
      assert {:error, %Error{reason: :deallocated}} = StatusBoard.least_loaded(board)
      assert {:error, %Error{reason: :deallocated}} = StatusBoard.entries(board)
    end

    test "bad options are refused with a clear error" do
      name = ShmHelpers.unique_name("b")

      for {opts, text} <- [
            {[capacity: 0], ":capacity"},
            {[capacity: 65_537], "65536"},
            {[stale_after: 0], ":stale_after"},
            {[gauges: [:a, :b, :c, :d, :e]], ":gauges"},
            {[gauges: [String.duplicate("x", 32)]], ":gauges"},
            {[gauges: [:queue]], ":gauges"},
            {[cleanup_policy: :reference_counted], ":cleanup_policy"},
            {[:oops], "keyword"}
          ] do
        assert {:error, %Error{reason: :invalid_option, message: message}} =
                 StatusBoard.create(name, opts)

        assert message =~ text
      end

      assert {:error, %Error{reason: :invalid_option}} = StatusBoard.create("Bad Name!")
      board = board!()
      assert {:error, %Error{reason: :already_exists}} = StatusBoard.create(board.name)
    end

    test "the largest board (65 536 slots) can be created" do
      board = board!(capacity: 65_536)
      assert board.capacity == 65_536
      assert {:ok, []} = StatusBoard.entries(board)
      assert {:error, %Error{reason: :no_worker}} = StatusBoard.least_loaded(board)
    end
  end

  describe "least_loaded/2" do
    test "prefers idle, then the lowest queue + in_flight; honours :exclude and :score" do
      board = board!(gauges: [:gpu])
      {:ok, s0} = StatusBoard.join(board, "busy0", state: :busy)
      {:ok, s3} = StatusBoard.join(board, "idle3", state: :idle, queue: 2, in_flight: 1, gpu: 1)
      {:ok, w} = StatusBoard.join(board, "idle1", state: :idle, in_flight: 1, gpu: 9)
      {:ok, ss} = StatusBoard.join(board, "starting", queue: 0)
      {:ok, sd} = StatusBoard.join(board, "draining", state: :draining)
      assert {:ok, "idle1"} = StatusBoard.least_loaded(board)
      assert {:ok, "idle3"} = StatusBoard.least_loaded(board, exclude: ["idle1"])
      assert {:ok, "busy0"} = StatusBoard.least_loaded(board, exclude: ["idle1", "idle3"])

      assert {:error, %Error{reason: :no_worker, message: message}} =
               StatusBoard.least_loaded(board, exclude: ["idle1", "idle3", "busy0"])

      assert message =~ "no worker"
      # A score of the decoded entry: lowest gpu gauge wins (busy0 has 0).
      assert {:ok, "busy0"} = StatusBoard.least_loaded(board, score: & &1.gauges["gpu"])

      assert {:ok, "idle3"} =
               StatusBoard.least_loaded(board, score: & &1.gauges["gpu"], exclude: ["busy0"])

      :ok = StatusBoard.update(w, state: :busy)
      assert {:ok, "idle3"} = StatusBoard.least_loaded(board)

      assert {:error, %Error{reason: :invalid_option}} =
               StatusBoard.least_loaded(board, score: :nope)

      assert {:error, %Error{reason: :invalid_option}} =
               StatusBoard.least_loaded(board, exclude: "idle1")

      # (handles kept alive to here: a garbage-collected handle leaves its slot)
      assert length(Enum.uniq([s0.index, s3.index, ss.index, sd.index])) == 4
    end

    test "ties are shared fairly: each of 8 equal workers gets 1/8 of 10 000 picks (±5 %)" do
      board = board!(capacity: 64)
      # Keep the handles: a slot whose handle is garbage collected is left.
      slots = for i <- 1..8, do: elem(StatusBoard.join(board, "w#{i}", state: :idle), 1)

      counts =
        Enum.reduce(1..10_000, %{}, fn _, acc ->
          {:ok, id} = StatusBoard.least_loaded(board)
          Map.update(acc, id, 1, &(&1 + 1))
        end)

      assert map_size(counts) == 8
      for {_id, n} <- counts, do: assert(abs(n - 1250) <= 62, inspect(counts))

      # Concurrent callers share one rotation counter: still fair overall.
      tasks =
        for _ <- 1..4 do
          Task.async(fn ->
            for _ <- 1..2_500, do: elem(StatusBoard.least_loaded(board), 1)
          end)
        end

      counts = tasks |> Enum.flat_map(&Task.await(&1, 30_000)) |> Enum.frequencies()
      assert map_size(counts) == 8
      for {_id, n} <- counts, do: assert(abs(n - 1250) <= 62, inspect(counts))

      # With a :score, ties are shared too.
      counts =
        for(_ <- 1..1_000, do: elem(StatusBoard.least_loaded(board, score: fn _ -> 0 end), 1))
        |> Enum.frequencies()

      for {_id, n} <- counts, do: assert(abs(n - 125) <= 7, inspect(counts))
      assert length(slots) == 8
    end

    test "stale entries are dropped until they are updated again" do
      board = board!(stale_after: 150)
      {:ok, slot} = StatusBoard.join(board, "w", state: :idle)
      assert {:ok, "w"} = StatusBoard.least_loaded(board)
      Process.sleep(300)
      assert {:error, %Error{reason: :no_worker}} = StatusBoard.least_loaded(board)
      assert {:ok, [%{worker_id: "w", stale: true, age_ms: age}]} = StatusBoard.entries(board)
      assert age >= 150
      :ok = StatusBoard.update(slot, queue: 1)
      assert {:ok, "w"} = StatusBoard.least_loaded(board)
      assert {:ok, [%{stale: false, queue: 1}]} = StatusBoard.entries(board)
    end
  end

  describe "joining from Elixir" do
    test "a full board says so with its capacity; a left slot is reused" do
      board = board!(capacity: 2)
      {:ok, a} = StatusBoard.join(board, "a")
      {:ok, b} = StatusBoard.join(board, "b")

      assert {:error, %Error{reason: :board_full, message: message, details: %{capacity: 2}}} =
               StatusBoard.join(board, "c")

      assert message =~ "all 2 slots"
      :ok = StatusBoard.leave(a)
      assert {:error, %Error{reason: :closed}} = StatusBoard.leave(a)
      assert {:error, %Error{reason: :closed}} = StatusBoard.update(a, queue: 1)
      {:ok, c} = StatusBoard.join(board, "c")
      assert c.index == a.index
      assert ids(board) == ["b", "c"]
      assert b.index != c.index
    end

    test "bad ids and values are refused" do
      board = board!()
      assert {:error, %Error{reason: :invalid_argument}} = StatusBoard.join(board, "")
      assert {:error, %Error{reason: :invalid_argument}} = StatusBoard.join(board, <<0xFF>>)

      assert {:error, %Error{reason: :invalid_argument}} =
               StatusBoard.join(board, String.duplicate("x", 65))

      {:ok, s} = StatusBoard.join(board, String.duplicate("x", 64))
      assert {:error, %Error{reason: :invalid_option}} = StatusBoard.update(s, state: :sleepy)
      assert {:error, %Error{reason: :invalid_option}} = StatusBoard.update(s, queue: -1)
      assert {:error, %Error{reason: :invalid_option}} = StatusBoard.update(s, queue: 1 <<< 64)
      assert {:error, %Error{reason: :invalid_option}} = StatusBoard.update(s, nope: 1)
      assert :ok = StatusBoard.update(s, gauge0: -5, memory: (1 <<< 64) - 1)

      assert {:ok, [%{gauges: %{"gauge0" => -5}, memory: 18_446_744_073_709_551_615}]} =
               StatusBoard.entries(board)
    end

    test "the slot of an Elixir process is freed when it dies" do
      board = board!()
      parent = self()

      pid =
        spawn(fn ->
          {:ok, slot} = StatusBoard.join(board, "mortal", state: :idle)
          send(parent, :joined)

          receive do
            :never -> StatusBoard.leave(slot)
          end
        end)

      assert_receive :joined, 5_000
      assert ids(board) == ["mortal"]
      Process.exit(pid, :kill)
      assert ShmHelpers.wait_until(fn -> ids(board) == [] end, 2_000)
    end

    test "a dropped handle keeps its slot until the process dies" do
      board = board!()
      parent = self()

      pid =
        spawn(fn ->
          {:ok, _dropped} = StatusBoard.join(board, "forgetful", state: :idle)
          :erlang.garbage_collect()
          send(parent, :joined)
          Process.sleep(:infinity)
        end)

      assert_receive :joined, 5_000
      :erlang.garbage_collect(pid)
      Process.sleep(50)
      assert ids(board) == ["forgetful"]
      Process.exit(pid, :kill)
      assert ShmHelpers.wait_until(fn -> ids(board) == [] end, 2_000)
    end

    test "one handle shared by several Erlang processes still has one writer at a time" do
      board = board!(gauges: [:g0, :g1, :g2, :g3])
      {:ok, slot} = StatusBoard.join(board, "shared")
      deadline = System.monotonic_time(:millisecond) + 1_500

      writers =
        for w <- 1..4 do
          Task.async(fn ->
            Stream.iterate(w, &(&1 + 4))
            |> Enum.reduce_while(0, fn n, count ->
              if System.monotonic_time(:millisecond) > deadline do
                {:halt, count}
              else
                :ok =
                  StatusBoard.update(slot,
                    state: if(rem(n, 2) == 1, do: :idle, else: :busy),
                    queue: n,
                    in_flight: 3 * n,
                    memory: 5 * n,
                    processed: 7 * n,
                    errors: Bitwise.bxor(n, 0x5555),
                    g0: -n,
                    g1: n + 1,
                    g2: 2 * n,
                    g3: -3 * n
                  )

                {:cont, count + 1}
              end
            end)
          end)
        end

      {checked, _} = check_consistency(board, deadline, 0, 0)
      counts = Enum.map(writers, &Task.await(&1, 10_000))
      assert checked > 100
      assert Enum.all?(counts, &(&1 > 100))
    end

    test "a board of 10 000 slots: every slot joins, is listed and can be picked" do
      board = board!(capacity: 10_000)

      slots =
        for i <- 0..9_999 do
          {:ok, slot} = StatusBoard.join(board, "w#{i}", state: :busy, queue: 10_000 - i)
          slot
        end

      assert {:error, %Error{reason: :board_full, message: message}} =
               StatusBoard.join(board, "one-too-many")

      assert message =~ "10000"
      {:ok, entries} = StatusBoard.entries(board)
      assert length(entries) == 10_000
      assert {:ok, "w9999"} = StatusBoard.least_loaded(board)
      :ok = StatusBoard.update(Enum.at(slots, 4_321), state: :idle)
      assert {:ok, "w4321"} = StatusBoard.least_loaded(board)
    end
  end

  describe "Python workers" do
    test "a worker joins, publishes, and leaves; its slot is reused" do
      board = board!(capacity: 2, gauges: [:gpu])
      {port, os_pid, slot} = python_worker(board, "py-1")
      command(port, "update state=idle queue=4 in_flight=1 memory=1048576 errors=2 gpu=-3")
      expect(port, "OK")

      assert {:ok, [entry]} = StatusBoard.entries(board)

      assert %{
               slot: ^slot,
               worker_id: "py-1",
               state: :idle,
               queue: 4,
               in_flight: 1,
               memory: 1_048_576,
               errors: 2,
               os_pid: ^os_pid,
               stale: false
             } = entry

      assert entry.gauges["gpu"] == -3
      assert {:ok, "py-1"} = StatusBoard.least_loaded(board)
      command(port, "deleted")
      assert expect(port, "DELETED") == "DELETED False"
      :ok = StatusBoard.delete(board)
      command(port, "deleted")
      assert expect(port, "DELETED") == "DELETED True"
      command(port, "leave")
      expect(port, "LEFT")
      Port.close(port)
    end

    test "no torn read while 3 worker processes hammer their slots (3 s, 30 s in soak)" do
      board = board!(capacity: 8, gauges: [:g0, :g1, :g2, :g3])
      workers = for i <- 1..3, do: python_worker(board, "hammer#{i}")
      # 3 s make about a million updates per worker here; the soak runs ten times longer.
      seconds = if ReliabilityHelpers.soak?(), do: 30, else: 3
      for {port, _, _} <- workers, do: command(port, "hammer #{seconds}")
      deadline = System.monotonic_time(:millisecond) + seconds * 1000

      {checked, unreadable} = check_consistency(board, deadline, 0, 0)

      counts =
        for {port, _, _} <- workers do
          "HAMMERED " <> n = expect(port, "HAMMERED", 30_000)
          Port.close(port)
          String.to_integer(n)
        end

      assert checked > 1_000, "only #{checked} entries checked"
      assert Enum.all?(counts, &(&1 > 10_000)), inspect(counts)

      IO.puts(
        "\n  board hammer: #{checked} entries checked, #{unreadable} unreadable, " <>
          "updates #{inspect(counts)}"
      )
    end

    test "a worker killed with SIGKILL loses its slot within 1 s" do
      board = board!(capacity: 4)
      {port, os_pid, _slot} = python_worker(board, "victim")
      {other, _, _} = python_worker(board, "survivor")
      # The manager discovers region holders by a scan; let it arm the pidfd watches.
      Manager.sync()
      assert ids(board) == ["survivor", "victim"]
      t0 = System.monotonic_time(:millisecond)
      TestSupport.kill9(os_pid)
      assert ShmHelpers.wait_until(fn -> ids(board) == ["survivor"] end, 1_000)
      elapsed = System.monotonic_time(:millisecond) - t0
      assert elapsed <= 1_000
      # The slot is reused.
      {:ok, next} = StatusBoard.join(board, "next")
      assert ids(board) == ["next", "survivor"]
      :ok = StatusBoard.leave(next)
      close(port)
      close(other)
    end

    test "a worker that dies before the manager saw it is stale until reclaimed, then freed" do
      board = board!(capacity: 4)

      TestSupport.with_manager_suspended(fn ->
        {port, os_pid, _slot} = python_worker(board, "ephemeral")
        command(port, "update state=idle")
        expect(port, "OK")
        assert {:ok, [%{alive: true, stale: false}]} = StatusBoard.entries(board)
        command(port, "exit_now")
        assert_receive {^port, {:exit_status, 0}}, 10_000
        # Its last entry stays, reported stale (its process is gone), until the manager
        # reclaims the slot.
        assert ShmHelpers.wait_until(fn -> not File.exists?("/proc/#{os_pid}") end, 2_000)

        assert {:ok, [%{worker_id: "ephemeral", alive: false, stale: true}]} =
                 StatusBoard.entries(board)

        assert {:error, %Error{reason: :no_worker}} =
                 StatusBoard.least_loaded(board, score: & &1.queue)
      end)

      assert ShmHelpers.wait_until(fn -> ids(board) == [] end, 2_000)
    end
  end

  describe "many Python processes" do
    @forker ~S"""
    import ctypes, json, os, sys, time
    import snakepit_shm
    ref, n = json.loads(sys.argv[1]), int(sys.argv[2])
    for i in range(n):
        if os.fork() == 0:
            ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG: SIGKILL when the parent dies
            b = snakepit_shm.StatusBoard.join(ref, "fork-%d" % i)
            b.update(state="idle", queue=i)
            os.write(1, b"JOINED %d\n" % os.getpid())  # one write: lines never interleave
            time.sleep(120)
            os._exit(0)
    os.write(1, b"FORKED\n")
    time.sleep(120)
    """

    test "more workers than a region has holder slots (70 processes) join; SIGKILL frees them all" do
      board = board!(capacity: 100)
      {:ok, ref} = StatusBoard.export_ref(board)
      {:ok, json} = JSON.encode(ref)

      port =
        Port.open({:spawn_executable, ShmHelpers.python()}, [
          :binary,
          :exit_status,
          :stderr_to_stdout,
          {:line, 4096},
          args: ["-c", @forker, json, "70"],
          env: [
            {~c"PYTHONPATH", String.to_charlist(Path.join(@root, "priv/python"))},
            {~c"SNAKEPIT_SHM_LIB",
             String.to_charlist(Path.join(@root, "priv/libsnakepit_shm.so"))}
          ]
        ])

      {:os_pid, parent} = Port.info(port, :os_pid)

      try do
        pids = for _ <- 1..70, do: port |> expect("JOINED") |> String.split() |> List.last()
        assert length(ids(board)) == 70
        # The joiners hold no region hold: the manager finds them through the board.
        assert {:ok, %{reference_count: 0}} = SM.get_region_info(board.region_id)
        Manager.sync()
        for pid <- pids, do: TestSupport.kill9(String.to_integer(pid))
        assert ShmHelpers.wait_until(fn -> ids(board) == [] end, 2_000)
      after
        # The children die with their parent (PR_SET_PDEATHSIG), whatever happened.
        TestSupport.kill9(parent)
        close(port)
      end
    end
  end

  describe "hostile writes into the segment" do
    test "a sequence stuck odd, garbage slots and a damaged header never hang or crash a reader" do
      board = board!(capacity: 16)
      slots = for i <- 0..3, do: StatusBoard.join(board, "w#{i}", state: :idle, queue: i)
      {:ok, m} = SM.map_region(board.region_id, access_mode: :read_write)

      # Slot 0 (the best worker) has its sequence stuck odd: skipped and reported.
      {:ok, <<seq::little-64>>} = SM.read(m, 512 + 8, 8)
      :ok = SM.write(m, 512 + 8, <<Bitwise.bor(seq, 1)::little-64>>)
      assert {:ok, "w1"} = StatusBoard.least_loaded(board)
      {:ok, entries} = StatusBoard.entries(board)
      assert [%{slot: 0, state: :unreadable} | _] = entries
      assert length(entries) == 4

      # Every slot live with garbage: bounded, no crash, ids clamped.
      garbage =
        for i <- 0..15, into: <<>> do
          <<2::little-64, 2 * i::little-64>> <>
            :crypto.strong_rand_bytes(96) <>
            <<0xFFFFFFFF::little-32, 0::32>> <> :crypto.strong_rand_bytes(72)
        end

      :ok = SM.write(m, 512, garbage)
      {:ok, entries} = StatusBoard.entries(board)
      assert length(entries) == 16
      assert Enum.all?(entries, &(byte_size(&1.worker_id) <= 64))
      # Tools get printable ids whatever bytes a peer wrote.
      {:ok, snapshot} = StatusBoard.snapshot(board)
      assert {:ok, _} = JSON.encode(Snakepit.SharedMemory.CLI.Command.jsonable(snapshot))
      _ = StatusBoard.least_loaded(board)
      _ = StatusBoard.least_loaded(board, exclude: ["x"], score: & &1.queue)

      # A damaged header: this handle keeps its own copy of the geometry; a new open
      # refuses the board.
      :ok = SM.write(m, 0, :binary.copy(<<0xFF>>, 512))
      assert {:ok, _} = StatusBoard.entries(board)
      assert {:error, %Error{reason: :corrupt}} = StatusBoard.open(board.name)
      :ok = SM.unmap_region(m)
      assert length(slots) == 4
    end

    test "10 000 slots all stuck odd: least_loaded gives up in bounded time" do
      board = board!(capacity: 10_000)
      {:ok, m} = SM.map_region(board.region_id, access_mode: :read_write)
      stuck = :binary.copy(<<2::little-64, 1::little-64, 0::size(176)-unit(8)>>, 10_000)
      :ok = SM.write(m, 512, stuck)
      {micros, result} = :timer.tc(fn -> StatusBoard.least_loaded(board) end)
      assert {:error, %Error{reason: :no_worker, message: message}} = result
      assert message =~ "10000 slot(s) unreadable"
      assert micros < 200_000
      {:ok, entries} = StatusBoard.entries(board)
      assert length(entries) == 10_000
      assert Enum.all?(entries, &(&1.state == :unreadable))
      :ok = SM.unmap_region(m)
    end
  end

  defp check_consistency(board, deadline, checked, unreadable) do
    if System.monotonic_time(:millisecond) >= deadline do
      {checked, unreadable}
    else
      {:ok, entries} = StatusBoard.entries(board)
      _ = StatusBoard.least_loaded(board)

      {c, u} =
        Enum.reduce(entries, {0, 0}, fn
          %{state: :unreadable}, {c, u} ->
            {c, u + 1}

          %{queue: 0}, acc ->
            acc

          %{queue: n} = e, {c, u} ->
            g = e.gauges

            consistent =
              e.in_flight == 3 * n and e.memory == 5 * n and e.processed == 7 * n and
                e.errors == Bitwise.bxor(n, 0x5555) and
                e.state == if(rem(n, 2) == 1, do: :idle, else: :busy) and
                g["g0"] == -n and g["g1"] == n + 1 and g["g2"] == 2 * n and g["g3"] == -3 * n

            assert consistent, "torn entry: #{inspect(e)}"
            {c + 1, u}
        end)

      check_consistency(board, deadline, checked + c, unreadable + u)
    end
  end
end
