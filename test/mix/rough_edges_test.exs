Code.require_file("support/task_helpers.exs", __DIR__)

defmodule Snakepit.SharedMemory.RoughEdgesTest do
  # Issue 13: the rough edges a new user hit, one test each.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog

  require Logger
  import Snakepit.SharedMemory.TaskHelpers

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.CLI.{Command, Doctor, DoctorPython, Remote}
  alias Snakepit.SharedMemory.Error

  @root Path.expand("../..", __DIR__)

  test "--node without a host names the task's own help" do
    {_out, err, 2} = run_task("snakepit.shm.stats", ["--node", "x"])
    assert err =~ "--node must look like name@host"
    assert err =~ "mix help snakepit.shm.stats`"
    refute err =~ "mix help snakepit.shm`"
  end

  test "info of a malformed id is a usage error (2), of a missing one a failure (1)" do
    {_out, err, 2} = run_task("snakepit.shm.info", ["not-an-id"])
    assert err =~ "is not a region id"
    {_out, _err, 1} = run_task("snakepit.shm.info", ["spshm_aaaaaaaaaaaaaaaaaaaa"])
  end

  test "--python NAME is looked up on PATH" do
    assert Command.executable("python3") == System.find_executable("python3")
    assert Command.executable("/usr/bin/python3") == "/usr/bin/python3"
    assert Command.executable("no-such-python-xyz") == "no-such-python-xyz"
  end

  test "doctor --python python3 runs the python3 of PATH" do
    {out, _err, _status} =
      run_task("snakepit.shm.doctor", ["--python", "python3", "--format", "json"])

    %{"findings" => findings} = json!(out)
    details = Enum.map_join(findings, "\n", & &1["detail"])
    refute details =~ "python3 not found"
    assert details =~ System.find_executable("python3")
  end

  @tag :tmp_dir
  test "doctor: CAP_IPC_LOCK lifts RLIMIT_MEMLOCK", %{tmp_dir: dir} do
    with_cap = Path.join(dir, "with")
    without = Path.join(dir, "without")
    File.write!(with_cap, "Name:\tbeam\nCapEff:\t000001ffffffffff\n")
    File.write!(without, "Name:\tbeam\nCapEff:\t0000000000000000\n")
    assert Doctor.ipc_lock?(with_cap)
    refute Doctor.ipc_lock?(without)
    assert %{status: :ok, detail: detail} = Doctor.memlock_low(8_388_608, 8_388_608, true)
    assert detail =~ "CAP_IPC_LOCK"
    assert %{status: :warn} = Doctor.memlock_low(8_388_608, 8_388_608, false)
  end

  test "doctor: numpy advice fits the interpreter" do
    assert DoctorPython.numpy_fix("/usr/bin/python3", %{"prefix" => "/usr"}) =~
             "apt-get install python3-numpy"

    other = DoctorPython.numpy_fix("/opt/py/bin/python3", %{"prefix" => "/opt/py"})
    assert other =~ "is not Debian's python3"
    assert other =~ "/opt/py/bin/python3 -m pip install numpy"

    venv = DoctorPython.numpy_fix("/v/bin/python", %{"prefix" => "/v", "base_prefix" => "/usr"})
    assert venv =~ "--system-site-packages"
  end

  test "a wrong cookie and a missing node get different messages" do
    cookie = Remote.connect_failure(:app@host, :registered)
    missing = Remote.connect_failure(:app@host, :not_registered)
    no_epmd = Remote.connect_failure(:app@host, :no_epmd)
    assert cookie =~ "cookie does not match"
    assert missing =~ "no node named app runs on host"
    assert no_epmd =~ "cannot reach epmd on host"
    assert length(Enum.uniq([cookie, missing, no_epmd])) == 3
  end

  test "advice is given once: :mlock_failed and cleanup rows" do
    core =
      "cannot lock 4096 bytes in memory (mlock: Cannot allocate memory): RLIMIT_MEMLOCK is " <>
        "8 bytes. Raise it with `ulimit -l <KiB>` ...; or grant the CAP_IPC_LOCK capability"

    message = Error.from_native({:mlock_failed, core, 12}).message
    assert length(String.split(message, "ulimit")) == 2
    assert length(String.split(message, "CAP_IPC_LOCK")) == 2

    by_hand = [
      "  spshm_x: damaged (not removed: check it and delete it by hand if it is garbage)"
    ]

    assert Mix.Tasks.Snakepit.Shm.Cleanup.general_advice(by_hand) == ""
    assert Mix.Tasks.Snakepit.Shm.Cleanup.general_advice(["  spshm_y: odd"]) =~ "by hand"
  end

  test "the :permissions bullet renders in IEx (no code span across lines)" do
    {:docs_v1, _, _, _, _, _, docs} = Code.fetch_docs(Snakepit.SharedMemory)

    [doc] = for {{:function, :allocate_region, 2}, _, _, %{"en" => doc}, _} <- docs, do: doc

    bullet =
      doc
      |> String.split("\n  * ")
      |> Enum.find(&String.starts_with?(&1, "`:permissions`"))

    for line <- String.split(bullet, "\n") do
      ticks = line |> String.graphemes() |> Enum.count(&(&1 == "`"))
      assert rem(ticks, 2) == 0, "a code span crosses a line break: #{line}"
    end
  end

  test "expiry granularity is in the facade's docs" do
    {:docs_v1, _, _, _, %{"en" => moduledoc}, _, _} = Code.fetch_docs(Snakepit.SharedMemory)
    assert moduledoc =~ ":cleanup_interval"
  end

  test "a :high region freed by a policy is logged once" do
    previous = Logger.level()
    Logger.configure(level: :debug)

    {log, id} =
      try do
        with_log([level: :debug], fn ->
          {:ok, id} = SHM.allocate_region(4096, security_level: :high, timeout: 20)
          # The periodic cleanup (every 100 ms in tests) frees it when it expires.
          assert eventually(fn -> match?({:error, _}, SHM.get_region_info(id)) end)
          Process.sleep(300)
          id
        end)
        |> then(fn {id, log} -> {log, id} end)
      after
        Logger.configure(level: previous)
      end

    assert length(String.split(log, "freed #{id}")) == 2, log
  end

  defp eventually(fun, tries \\ 400) do
    cond do
      fun.() -> true
      tries == 0 -> false
      true -> Process.sleep(25) && eventually(fun, tries - 1)
    end
  end

  @tag :tmp_dir
  test "the chaos tests' header_less?/1 never blocks on a FIFO", %{tmp_dir: dir} do
    {_, 0} = System.cmd("mkfifo", [Path.join(dir, "spshm_fifo")])
    File.write!(Path.join(dir, "spshm_empty"), "")
    File.write!(Path.join(dir, "spshm_full"), "SPSHMHDR")
    helpers = Snakepit.SharedMemory.ReliabilityHelpers
    task = Task.async(fn -> helpers.header_less?("spshm_fifo", dir) end)
    assert Task.yield(task, 5_000) == {:ok, false}, "header_less?/1 blocked on a FIFO"
    assert helpers.header_less?("spshm_empty", dir)
    refute helpers.header_less?("spshm_full", dir)
  end

  test "the README says how a worker imports the package and what kill -9 leaves" do
    readme = File.read!(Path.join(@root, "README.md"))
    assert readme =~ "PYTHONPATH"
    assert readme =~ "SNAKEPIT_SHM_LIB"
    assert readme =~ "{:ok, json} = SHM.JSON.encode(ref)"
    assert readme =~ "## Using it from a Snakepit adapter"
    refute readme =~ "Nothing leaks into `/dev/shm`, not even after `kill -9`"
    assert readme =~ "stay in `/dev/shm` until the next orphan"
  end
end
