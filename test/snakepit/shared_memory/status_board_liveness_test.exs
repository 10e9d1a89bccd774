Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.StatusBoardLivenessTest do
  # Liveness of board slot owners from the kernel (issue 16): every owner holds an open
  # file description lock on its slot, which the kernel drops the instant it dies. Real
  # Python workers killed with SIGKILL, the manager held back (so that only the lock can
  # tell), and a slot left busy by an owner killed in the middle of its join.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  import Bitwise

  alias Snakepit.SharedMemory.{Error, JSON, StatusBoard}
  alias Snakepit.SharedMemory.{ShmHelpers, TestSupport}

  @root Path.expand("../../..", __DIR__)
  @data_offset 4096
  @board_header 512
  @slot_size 192

  @worker ~S"""
  import json, sys
  import snakepit_shm
  b = snakepit_shm.StatusBoard.join(json.loads(sys.argv[1]), sys.argv[2])
  b.update(state=sys.argv[3], queue=int(sys.argv[4]))
  print("JOINED", b.index, flush=True)
  sys.stdin.readline()
  """

  setup do: TestSupport.no_leaks()

  defp board!(opts) do
    {:ok, board} = StatusBoard.create(ShmHelpers.unique_name("lv"), opts)
    board
  end

  defp python_worker(board, worker_id, state, queue) do
    {:ok, ref} = StatusBoard.export_ref(board)
    {:ok, json} = JSON.encode(ref)

    port =
      Port.open({:spawn_executable, ShmHelpers.python()}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 65_536},
        args: ["-c", @worker, json, worker_id, state, Integer.to_string(queue)],
        env: [
          {~c"PYTHONPATH", String.to_charlist(Path.join(@root, "priv/python"))},
          {~c"SNAKEPIT_SHM_LIB", String.to_charlist(Path.join(@root, "priv/libsnakepit_shm.so"))},
          {~c"PYTHONDONTWRITEBYTECODE", ~c"1"}
        ]
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)

    receive do
      {^port, {:data, {:eol, "JOINED " <> slot}}} -> {port, os_pid, String.to_integer(slot)}
      {^port, {:data, {:eol, line}}} -> flunk("python worker said: #{line}")
      {^port, {:exit_status, status}} -> flunk("python worker exited with #{status}")
    after
      20_000 -> flunk("python worker did not join")
    end
  end

  # SIGKILL, then wait until the process is gone for good (its port reports the exit).
  defp kill!(port, os_pid) do
    TestSupport.kill9(os_pid)
    assert_receive {^port, {:exit_status, _}}, 10_000
  end

  defp ids(board) do
    {:ok, entries} = StatusBoard.entries(board)
    entries |> Enum.map(& &1.worker_id) |> Enum.sort()
  end

  defp owner_word(board, slot) do
    {:ok, f} = :file.open(~c"/dev/shm/#{board.region_id}", [:read, :raw, :binary])

    {:ok, <<word::little-64>>} =
      :file.pread(f, @data_offset + @board_header + @slot_size * slot, 8)

    :ok = :file.close(f)
    word
  end

  defp put_owner_word(board, slot, word) do
    {:ok, f} = :file.open(~c"/dev/shm/#{board.region_id}", [:read, :write, :raw, :binary])
    :ok = :file.pwrite(f, @data_offset + @board_header + @slot_size * slot, <<word::little-64>>)
    :ok = :file.close(f)
  end

  test "least_loaded(verify: true) never picks a worker SIGKILLed before the call, even " <>
         "before the manager hears of it; the dead slot is freed on the spot" do
    board = board!(capacity: 4)
    {:ok, mine} = StatusBoard.join(board, "elixir-busy", state: :busy, queue: 3)

    TestSupport.with_manager_suspended(fn ->
      {port, os_pid, _slot} = python_worker(board, "python-idle", "idle", 0)
      assert {:ok, "python-idle"} = StatusBoard.least_loaded(board, verify: true)
      assert {:ok, [_, _] = entries} = StatusBoard.entries(board)
      assert Enum.all?(entries, & &1.alive)

      kill!(port, os_pid)

      # Without :verify the manager (held back here) has not freed the slot yet: the
      # dead worker is still the best entry. entries/1 asks the kernel (its lock).
      assert {:ok, "python-idle"} = StatusBoard.least_loaded(board)

      assert {:ok, [%{worker_id: "python-idle", alive: false, stale: true}]} =
               StatusBoard.entries(board)
               |> then(fn {:ok, es} -> {:ok, Enum.reject(es, & &1.alive)} end)

      for _ <- 1..20,
          do: assert({:ok, "elixir-busy"} = StatusBoard.least_loaded(board, verify: true))

      assert ids(board) == ["elixir-busy"]
    end)

    :ok = StatusBoard.leave(mine)
    assert {:error, %Error{reason: :no_worker}} = StatusBoard.least_loaded(board, verify: true)
  end

  test "verify with :exclude, and a board of several workers killed at once" do
    board = board!(capacity: 8)

    TestSupport.with_manager_suspended(fn ->
      workers = for i <- 1..4, do: python_worker(board, "w#{i}", "idle", i)
      {port, os_pid, _} = Enum.at(workers, 3)
      victims = Enum.take(workers, 3)

      for {p, pid, _} <- victims,
          do: TestSupport.kill9(pid) && assert_receive({^p, {:exit_status, _}}, 10_000)

      assert {:ok, "w4"} = StatusBoard.least_loaded(board, verify: true, exclude: ["nobody"])
      assert ids(board) == ["w4"]
      kill!(port, os_pid)
      assert {:error, %Error{reason: :no_worker}} = StatusBoard.least_loaded(board, verify: true)
      assert ids(board) == []
    end)
  end

  test "a slot left busy by an owner killed in the middle of its join is taken over " <>
         "by the next join (Elixir and Python)" do
    board = board!(capacity: 1)

    TestSupport.with_manager_suspended(fn ->
      {port, os_pid, slot} = python_worker(board, "half-joined", "idle", 0)
      kill!(port, os_pid)
      # What a joiner killed between its claim and its first write leaves: the owner
      # word says busy (being claimed), and nobody holds the slot's lock.
      word = owner_word(board, slot)
      put_owner_word(board, slot, (word &&& 0xFFFF_FFFF_0000_0000) ||| 1)
      assert ids(board) == []

      # The board has one slot: the join must recover it, or it would be full for good.
      {:ok, elixir_slot} = StatusBoard.join(board, "recovered", state: :idle)
      assert ids(board) == ["recovered"]
      # And a live owner's slot is never taken over.
      assert {:error, %Error{reason: :board_full}} = StatusBoard.join(board, "intruder")
      :ok = StatusBoard.leave(elixir_slot)

      # The same from Python: a killed Python owner's busy slot is recovered by Python.
      {port, os_pid, slot} = python_worker(board, "half-joined-2", "idle", 0)
      kill!(port, os_pid)
      word = owner_word(board, slot)
      put_owner_word(board, slot, (word &&& 0xFFFF_FFFF_0000_0000) ||| 1)
      {port2, _os_pid2, ^slot} = python_worker(board, "python-recovered", "idle", 0)
      assert ids(board) == ["python-recovered"]
      assert {:error, %Error{reason: :board_full}} = StatusBoard.join(board, "intruder")
      Port.close(port2)
    end)
  end

  test "a forked Python child does not keep its parent's slot alive" do
    board = board!(capacity: 2)
    {:ok, ref} = StatusBoard.export_ref(board)
    {:ok, json} = JSON.encode(ref)

    script = ~S"""
    import json, os, sys, time
    import snakepit_shm
    b = snakepit_shm.StatusBoard.join(json.loads(sys.argv[1]), "parent")
    b.update(state="idle", queue=0)
    child = os.fork()
    if child == 0:
        os.close(0)
        os.close(1)
        time.sleep(60)
        os._exit(0)
    print("CHILD", child, flush=True)
    sys.stdin.readline()
    """

    TestSupport.with_manager_suspended(fn ->
      port =
        Port.open({:spawn_executable, ShmHelpers.python()}, [
          :binary,
          :exit_status,
          {:line, 1024},
          args: ["-c", script, json],
          env: [
            {~c"PYTHONPATH", String.to_charlist(Path.join(@root, "priv/python"))},
            {~c"SNAKEPIT_SHM_LIB",
             String.to_charlist(Path.join(@root, "priv/libsnakepit_shm.so"))}
          ]
        ])

      {:os_pid, os_pid} = Port.info(port, :os_pid)
      assert_receive {^port, {:data, {:eol, "CHILD " <> child}}}, 20_000

      try do
        kill!(port, os_pid)
        # The child (still running) inherited the parent's descriptors, but not its lock.
        assert File.exists?("/proc/#{child}")

        assert {:error, %Error{reason: :no_worker}} =
                 StatusBoard.least_loaded(board, verify: true)
      after
        TestSupport.kill9(String.to_integer(child))
      end
    end)
  end
end
