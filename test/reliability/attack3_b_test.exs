defmodule Snakepit.SharedMemory.Reliability.Attack3BTest do
  # Attack run 3 (adoption, orphan sweeps, liveness across PID namespaces): each test
  # reproduces a break found by the run and failed before its fix (docs/RELIABILITY.md).
  # Real Python workers, real sweeps, a real PID namespace (`unshare`, skipped with the
  # reason printed where none can be made).
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SHM

  alias Snakepit.SharedMemory.{
    ClusterHelpers,
    JSON,
    Native,
    PeerVms,
    ReliabilityHelpers,
    ShmHelpers
  }

  alias Snakepit.SharedMemory.Test.PythonWorker

  @moduletag :reliability
  @moduletag timeout: 300_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    ReliabilityHelpers.check_segments_on_exit()
    :ok
  end

  # A worker that makes one POSIX output per line, fills it and closes the Region (the
  # usual `with ... as out:` block) before it hands back the ref.
  @posix_output """
  import json, sys, snakepit_shm
  for line in sys.stdin:
      with snakepit_shm.allocate(4096, backend="posix") as out:
          out.write(0, b"pending output")
      print(json.dumps(out.ref), flush=True)
  """

  defp read_all(id) do
    {:ok, m} = SHM.map_region(id, access_mode: :read_only)
    {:ok, data} = SHM.read(m, 0, 14)
    :ok = SHM.unmap_region(m)
    data
  end

  describe "a pending POSIX worker output (closed, not adopted yet)" do
    test "is in use to every orphan sweep while its worker lives, and is adopted after one" do
      # Found by this run: the worker kept only a plain descriptor of the segment, no
      # liveness lock, so the sweep of any VM starting on the host (or `mix
      # snakepit.shm.cleanup`) removed a live worker's output before the VM adopted it.
      worker = PythonWorker.start(@posix_output)

      try do
        ref = PythonWorker.ask(worker, "go")
        id = ref["region_id"]

        assert {:ok, %{in_use: true}} = Native.inspect_path("/dev/shm/" <> id)
        assert {:ok, :in_use} = Native.sweep_segment(id, true)
        # A real sweep of that segment (not of the whole directory: other suites' orphans).
        assert {:ok, :in_use} = Native.sweep_segment(id, false)
        assert File.exists?("/dev/shm/" <> id)
        assert {:ok, ^id} = SHM.adopt_region(ref, cleanup_policy: :manual)
        assert read_all(id) == "pending output"
        :ok = SHM.deallocate_region(id)
      after
        PythonWorker.stop(worker)
      end
    end

    test "is swept once its worker is SIGKILLed (the lock was the worker's)" do
      worker = PythonWorker.start(@posix_output)
      ref = PythonWorker.ask(worker, "go")
      id = ref["region_id"]
      PythonWorker.kill9(worker)

      # Since the presence sockets the worker is connected to every VM sharing /dev/shm
      # (this one included), and they may sweep it first, at once (attack run 4 D saw
      # this test fail so, either way).
      case Native.inspect_path("/dev/shm/" <> id) do
        {:ok, %{in_use: false}} ->
          assert Native.sweep_segment(id, false) in [{:ok, :removed}, {:ok, :in_use}] or
                   not File.exists?("/dev/shm/" <> id)

        {:error, {:not_found, _, _}} ->
          :ok
      end

      assert ShmHelpers.wait_until(fn -> not File.exists?("/dev/shm/" <> id) end, 10_000)
    end
  end

  describe "a VM SIGKILLed while a worker holds its POSIX region" do
    test "the next VM removes the region once the worker lets go, without a restart" do
      # Found by this run: the next VM's start-up sweep left the region (a worker of the
      # dead VM still held it, as after a crash and an immediate restart) and nothing
      # swept it again: it stayed in /dev/shm until yet another VM started. Everything in
      # a private shm_path, so that no sweep here touches other suites' segments.
      dir = "/dev/shm/attack3b_#{System.unique_integer([:positive])}"
      File.mkdir_p!(dir)
      on_exit(fn -> File.rm_rf!(dir) end)

      vm1 = PeerVms.shm_peer("a3dead", dir, false)

      id = :erpc.call(vm1, ClusterHelpers, :filled_region, [65_536, [backend: :posix]], 60_000)

      {:ok, ref} = :erpc.call(vm1, SHM, :export_ref, [id], 60_000)

      expected =
        vm1 |> :erpc.call(ClusterHelpers, :read, [id, 0, 16]) |> Base.encode16(case: :lower)

      worker = PeerVms.holding_worker(dir, ref, expected)
      {_, 0} = System.cmd("kill", ["-9", :erpc.call(vm1, System, :pid, [])])
      assert ShmHelpers.wait_until(fn -> vm1 not in Node.list() end, 30_000)

      _vm2 = PeerVms.shm_peer("a3next", dir, true)
      # Its start-up sweep has run: the worker's hold kept the region.
      assert File.exists?(Path.join(dir, id))
      send(worker, :release)
      assert_receive {:released, ^worker}, 30_000

      assert ShmHelpers.wait_until(fn -> not File.exists?(Path.join(dir, id)) end, 20_000),
             "#{id} outlived its last holder: no sweep of the running VM removed it"
    end
  end

  describe "a worker in another PID namespace" do
    test "its live POSIX output is adopted, not refused as an orphan" do
      # Found by this run: adopt_region/2 judged the worker dead from the pid in the
      # header (1 in the worker's namespace: init here), so a sidecar or sandboxed worker's
      # output was refused as an orphan while the worker lived.
      case System.cmd("unshare", ["--pid", "--fork", "--mount-proc", "true"],
             stderr_to_stdout: true
           ) do
        {_, 0} ->
          other_namespace_output()

        {out, _} ->
          IO.puts("skipped: cannot create a PID namespace here (#{String.trim(out)})")
      end
    end
  end

  # A FUSE filesystem whose server never answers (not even FUSE_INIT): every statvfs(2)
  # of the mount blocks until the server exits. Prints "mounted"; exits at end of stdin.
  @hung_fs ~S'''
  import ctypes, os, sys
  d = sys.argv[1]
  fd = os.open("/dev/fuse", os.O_RDWR)
  libc = ctypes.CDLL(None, use_errno=True)
  opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
  if libc.mount(b"hung", d.encode(), b"fuse", 0, opts) != 0:
      print("mount failed: " + os.strerror(ctypes.get_errno()), flush=True)
      sys.exit(0)
  print("mounted", flush=True)
  sys.stdin.readline()
  '''

  describe "health with a shm_path whose filesystem hangs" do
    test "answers within seconds (critical), and never piles up stuck calls" do
      # Found by this run: the monitor's statvfs of shm_path never returned, so
      # health/0 waited 30 s for it and then ran the checks itself and hung for good,
      # each call holding one more dirty I/O scheduler.
      dir = "/tmp/attack3b_hung_#{System.unique_integer([:positive])}"
      File.mkdir_p!(dir)
      node = PeerVms.shm_peer("a3hung", dir, false)

      fuse =
        Port.open({:spawn_executable, "/usr/bin/python3"}, [
          :binary,
          {:line, 1000},
          args: ["-c", @hung_fs, dir]
        ])

      try do
        receive do
          {^fuse, {:data, {:eol, "mounted"}}} ->
            for round <- 1..3 do
              {us, report} = :timer.tc(fn -> :erpc.call(node, SHM, :health, [], 45_000) end)
              check = Enum.find(report.checks, &(&1.name == :shm_space))
              assert check.status == :critical, inspect(check)
              assert check.message =~ "did not answer"
              assert report.status == :critical
              # The first waits for the probe's deadline; the later ones find it stuck.
              assert us < if(round == 1, do: 15_000_000, else: 2_000_000)
            end

          {^fuse, {:data, {:eol, "mount failed: " <> why}}} ->
            IO.puts("skipped: cannot mount a FUSE filesystem here (#{why})")
        after
          10_000 -> flunk("the FUSE server did not start")
        end
      after
        Port.close(fuse)
        System.cmd("umount", ["-l", dir], stderr_to_stdout: true)
        File.rm_rf!(dir)
      end
    end
  end

  # Runs as pid 1 of a new PID namespace: adopts the POSIX output of a worker that is pid
  # 1 of another one.
  @pid_one_vm ~S'''
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SHM
  IO.puts("VM_PID " <> System.pid())
  {:ok, env} = SHM.python_env()
  env = for {k, v} <- env, do: {String.to_charlist(k), String.to_charlist(v)}
  script = """
  import json, sys, snakepit_shm
  with snakepit_shm.allocate(4096, backend="posix") as out:
      out.write(0, b"pid one output")
  print(json.dumps(out.ref), flush=True)
  sys.stdin.readline()
  """
  port = Port.open({:spawn_executable, System.find_executable("unshare")}, [:binary, {:line, 100_000},
    args: ["--pid", "--fork", "--mount-proc", "/usr/bin/python3", "-u", "-c", script], env: env])
  ref = receive do
    {^port, {:data, {:eol, line}}} -> elem(Snakepit.SharedMemory.JSON.decode(line), 1)
  after 60_000 -> raise "no ref from the worker"
  end
  IO.puts("WORKER_PID #{ref["creator_pid"]}")
  case SHM.adopt_region(ref, cleanup_policy: :manual) do
    {:ok, id} ->
      {:ok, m} = SHM.map_region(id, access_mode: :read_only)
      {:ok, data} = SHM.read(m, 0, 14)
      IO.puts("ADOPTED " <> data)
      :ok = SHM.unmap_region(m)
      :ok = SHM.deallocate_region(id)
    {:error, error} ->
      IO.puts("REFUSED " <> error.message)
      File.rm("/dev/shm/" <> ref["region_id"])
  end
  Port.close(port)
  '''

  describe "a VM and a worker each pid 1 of its own PID namespace (two containers)" do
    test "the worker's output is adopted, not taken for the VM's own region" do
      # Found by this run: adopt_region/2 compared the header's creator pid alone with
      # the VM's, so the output of a sidecar worker that is pid 1 of its container, as
      # the VM is of its own, was refused: "created by this VM, not by a worker".
      case System.cmd("unshare", ["--pid", "--fork", "--mount-proc", "true"],
             stderr_to_stdout: true
           ) do
        {_, 0} ->
          {out, status} =
            System.cmd(
              "unshare",
              [
                "--pid",
                "--fork",
                "--mount-proc",
                "sh",
                "-c",
                ReliabilityHelpers.elixir_command()
              ],
              env: [{"SNAKEPIT_SHM_VM_CODE", @pid_one_vm}],
              stderr_to_stdout: true,
              cd: ReliabilityHelpers.root()
            )

          assert status == 0, out
          assert out =~ "VM_PID 1\n"
          assert out =~ "WORKER_PID 1\n"
          assert out =~ "ADOPTED pid one output\n", out

        {out, _} ->
          IO.puts("skipped: cannot create a PID namespace here (#{String.trim(out)})")
      end
    end
  end

  defp other_namespace_output do
    {:ok, env} = SHM.python_env()
    env = for {k, v} <- env, do: {String.to_charlist(k), String.to_charlist(v)}
    script = @posix_output

    port =
      Port.open({:spawn_executable, System.find_executable("unshare")}, [
        :binary,
        :exit_status,
        {:line, 1_000_000},
        args: ["--pid", "--fork", "--mount-proc", "/usr/bin/python3", "-u", "-c", script],
        env: env
      ])

    try do
      Port.command(port, "go\n")

      ref =
        receive do
          {^port, {:data, {:eol, line}}} ->
            {:ok, ref} = JSON.decode(line)
            ref

          {^port, {:exit_status, status}} ->
            flunk("the worker exited with #{status}")
        after
          60_000 -> flunk("no ref from the worker")
        end

      id = ref["region_id"]
      # The worker is pid 1 of its namespace: nothing here says it is alive but the lock.
      assert ref["creator_pid"] == 1
      assert {:ok, %{creator_alive: false, in_use: true}} = Native.inspect_path("/dev/shm/" <> id)

      assert {:ok, ^id} = SHM.adopt_region(ref, cleanup_policy: :manual)
      assert read_all(id) == "pending output"
      :ok = SHM.deallocate_region(id)
      refute File.exists?("/dev/shm/" <> id)
    after
      if Port.info(port), do: Port.close(port)
    end
  end
end
