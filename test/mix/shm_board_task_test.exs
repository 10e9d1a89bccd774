Code.require_file("support/task_helpers.exs", __DIR__)

defmodule Mix.Tasks.Snakepit.Shm.BoardTaskTest do
  # mix snakepit.shm.board: in this VM, offline (a subprocess reading the segment), and
  # --node (a second, named VM owning the board).
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.TaskHelpers

  alias Snakepit.SharedMemory.{Native, ShmHelpers, StatusBoard}

  @task "snakepit.shm.board"

  setup do
    name = ShmHelpers.unique_name("mb")
    {:ok, board} = StatusBoard.create(name, capacity: 8, stale_after: 60_000)
    {:ok, a} = StatusBoard.join(board, "alpha", state: :idle, queue: 3, memory: 3 * 1024 * 1024)
    {:ok, b} = StatusBoard.join(board, "beta", state: :busy, in_flight: 2, processed: 17)
    on_exit(fn -> StatusBoard.delete(board) end)
    %{board: board, name: name, slots: [a, b]}
  end

  test "--help documents the task; bad usage exits 2" do
    {out, _err, 0} = run_task(@task, ["--help"])
    assert out =~ "mix snakepit.shm.board NAME"
    assert out =~ "## Exit status"
    {_out, err, 2} = run_task(@task, [])
    assert err =~ "give the board's name"
    {_out, err, 2} = run_task(@task, ["x", "--format", "yaml"])
    assert err =~ "--format must be table or json"
    {_out, err, 2} = run_task(@task, ["x", "--interval", "0"])
    assert err =~ "--interval"
    # Past the longest sleep of Process.sleep/1 (2^32 - 1 ms): it raised mid-watch.
    {_out, err, 2} = run_task(@task, ["x", "--interval", "4294967296"])
    assert err =~ "--interval"
    # A malformed name is bad usage (it exited 1, "cannot read status board").
    for bad <- ["../x", "", "UPPER", String.duplicate("a", 22), "spshm_n_", "a b"] do
      {_out, err, 2} = run_task(@task, [bad])
      assert err =~ "is not a board name", bad
    end
  end

  test "a table with one row per worker; json; an unknown board exits 1", c do
    {out, _err, 0} = run_task(@task, [c.name])
    assert out =~ "board #{c.name} (spshm_n_#{c.name}): 2/8 slots in use, stale after 1m"
    assert out =~ ~r/^\s*0\s+alpha\s+idle\s+3\s+0\s+3\.0 MiB\s+0\s+0\s+\d+ms\s+\d+$/m
    assert out =~ ~r/^\s*1\s+beta\s+busy\s+0\s+2\s+0 B\s+17\s+0\s+\d+ms\s+\d+$/m

    {out, _err, 0} = run_task(@task, [c.name, "--format", "json"])
    json = json!(out)
    assert json["capacity"] == 8

    assert [%{"worker_id" => "alpha", "state" => "idle"}, %{"worker_id" => "beta"}] =
             json["entries"]

    {_out, err, 1} = run_task(@task, ["no-such-board"])
    assert err =~ "no status board \"no-such-board\""

    # A region that is not a board.
    {:ok, id} = Snakepit.SharedMemory.allocate_region(4096, name: ShmHelpers.unique_name("nb"))
    {_out, err, 1} = run_task(@task, [id])
    assert err =~ "cannot read status board"
    :ok = Snakepit.SharedMemory.deallocate_region(id)
    assert length(c.slots) == 2
  end

  test "--watch redraws in place", c do
    {out, _err, 0} = run_task(@task, [c.name, "--watch", "--count", "2", "--interval", "10"])
    assert length(String.split(out, IO.ANSI.clear())) == 3
    assert out |> String.split("alpha") |> length() == 3
  end

  test "offline: another OS process reads the segment without a manager", c do
    {out, 0} = mix_cmd([@task, c.name, "--format", "json"], quiet: true)
    json = json!(out)
    assert Enum.map(json["entries"], & &1["worker_id"]) == ["alpha", "beta"]
    assert length(c.slots) == 2
  end

  test "--node reads a board owned by another node" do
    {_, 0} = System.cmd("epmd", ["-daemon"])
    cookie = "c#{System.unique_integer([:positive])}"
    node_name = "shmboard#{System.unique_integer([:positive])}"
    board_name = ShmHelpers.unique_name("nb")

    body = """
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    alias Snakepit.SharedMemory.StatusBoard
    {:ok, b} = StatusBoard.create("#{board_name}", capacity: 4)
    {:ok, s} = StatusBoard.join(b, "remote-worker", state: :idle)
    IO.puts("READY \#{System.pid()} \#{node()}")
    receive do :never -> StatusBoard.leave(s) end
    """

    {_port, [vm, node]} = start_vm(body, ["--sname", node_name, "--cookie", cookie])

    try do
      {out, _err, 0} = run_task(@task, [board_name, "--node", node, "--cookie", cookie])
      assert out =~ ~r/^\s*0\s+remote-worker\s+idle\s/m
    after
      System.cmd("kill", ["-9", vm])
      :net_kernel.stop()
      # A named POSIX board outlives a killed VM: remove it (only if it is ours).
      _ = Native.unlink_segment("spshm_n_" <> board_name)
    end
  end
end
