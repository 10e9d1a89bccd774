Code.require_file("../test_support.exs", __DIR__)
Code.require_file("../../mix/support/task_helpers.exs", __DIR__)

defmodule Snakepit.SharedMemory.ShmPathTest do
  # config :snakepit_shm, shm_path: POSIX segments in another tmpfs, end to end: the
  # core creates, opens, lists and unlinks them there, refs carry those paths, the
  # tools (list, cleanup) and the orphan sweep follow, the health check measures that
  # tmpfs, and a Python worker attaches by bare id with SNAKEPIT_SHM_PATH.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Config, Native, ReliabilityForge, ReliabilityHelpers, Sweep}
  alias Snakepit.SharedMemory.TaskHelpers

  @mib 1024 * 1024

  setup_all do
    {dir, mounted} = tmpfs_dir()
    on_exit(fn -> remove_dir(dir, mounted) end)
    %{dir: dir, mounted: mounted}
  end

  # A tmpfs of 4 MiB mounted for the test when we may (root), else a directory in
  # /dev/shm (also a tmpfs, but large).
  defp tmpfs_dir do
    dir = "/tmp/i19_shm_path_#{System.unique_integer([:positive])}"
    File.mkdir_p!(dir)

    case System.cmd("mount", ["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", dir],
           stderr_to_stdout: true
         ) do
      {_, 0} ->
        {dir, true}

      {out, _} ->
        IO.puts("shm_path test: cannot mount a tmpfs (#{String.trim(out)}): using /dev/shm/...")
        File.rmdir(dir)
        dir = "/dev/shm/i19_shm_path_#{System.unique_integer([:positive])}"
        File.mkdir_p!(dir)
        {dir, false}
    end
  end

  defp remove_dir(dir, mounted) do
    if mounted, do: System.cmd("umount", ["-l", dir])
    File.rm_rf(dir)
  end

  defp with_shm_path(dir, fun) do
    Application.stop(:snakepit_shm)
    Application.put_env(:snakepit_shm, :shm_path, dir)

    try do
      {:ok, _} = Application.ensure_all_started(:snakepit_shm)
      fun.()
    after
      Application.stop(:snakepit_shm)
      Application.delete_env(:snakepit_shm, :shm_path)
      restart_without_sweep()
    end
  end

  # Back on /dev/shm without sweeping it: other suites on this machine may be keeping
  # orphans there on purpose.
  defp restart_without_sweep do
    saved = Application.fetch_env(:snakepit_shm, :orphan_sweep)
    Application.put_env(:snakepit_shm, :orphan_sweep, false)
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)

    case saved do
      {:ok, value} -> Application.put_env(:snakepit_shm, :orphan_sweep, value)
      :error -> Application.delete_env(:snakepit_shm, :orphan_sweep)
    end

    {:ok, _} = Config.load()
  end

  defp ours_in(dir), do: dir |> File.ls!() |> Enum.filter(&String.starts_with?(&1, "spshm_"))

  defp python(script, args, env) do
    base =
      for {k, v} <- ReliabilityHelpers.python_env(), do: {List.to_string(k), List.to_string(v)}

    System.cmd("/usr/bin/python3", ["-c", script | args], env: base ++ env, stderr_to_stdout: true)
  end

  @attach """
  import sys, snakepit_shm
  try:
      r = snakepit_shm.attach(sys.argv[1])
  except snakepit_shm.errors.RegionNotFound as e:
      print("NOT FOUND", e)
      sys.exit(3)
  print(r.read(0, 11).decode(), r.backend)
  r.close()
  """

  test "the directory is a tmpfs", %{dir: dir} do
    assert {:ok, %{tmpfs: true, total: total}} = Native.fs_stat(dir)
    assert total > 0
  end

  test "segments, refs, workers by bare id, list, cleanup and the sweep follow shm_path",
       %{dir: dir} do
    with_shm_path(dir, fn ->
      assert Native.shm_dir() == dir
      {:ok, id} = SM.allocate_region(8192, backend: :posix)

      {:ok, named} =
        SM.allocate_region(4096, name: "i19_path_#{System.unique_integer([:positive])}")

      assert File.exists?(Path.join(dir, id)) and File.exists?(Path.join(dir, named))
      refute File.exists?(Path.join("/dev/shm", id))
      refute File.exists?(Path.join("/dev/shm", named))

      {:ok, ref} = SM.export_ref(id)
      assert ref["control_path"] == Path.join(dir, id)
      {:ok, mapping} = SM.map_region(id)
      :ok = SM.write(mapping, 0, "hello shm!!")

      # A worker attaching by bare id finds it through SNAKEPIT_SHM_PATH ...
      {out, 0} = python(@attach, [id], [{"SNAKEPIT_SHM_PATH", dir}])
      assert out =~ "hello shm!! posix"
      # ... and, without it, looks in /dev/shm and says so.
      {out, 3} = python(@attach, [id], [])
      assert out =~ "NOT FOUND" and out =~ "/dev/shm/#{id}"
      # A ref carries the path: no variable needed.
      {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)
      {out, 0} = python(@attach, [json], [])
      assert out =~ "hello shm!! posix"
      :ok = SM.unmap_region(mapping)

      # The offline tools look in the same directory. (They also scan every memfd of this
      # uid on the host: other suites' damaged ones may make them exit 1.)
      {out, _err, status} = TaskHelpers.run_task("snakepit.shm.list", ["--format", "json"])
      assert status in [0, 1]
      listed = for r <- TaskHelpers.json!(out)["regions"], do: r["id"]
      assert id in listed and named in listed

      # An orphan of a dead VM in that directory: cleanup (offline) removes it ...
      template = ReliabilityForge.template()
      orphan = forge_orphan(dir, template)
      {out, _err, status} = TaskHelpers.run_task("snakepit.shm.cleanup", ["--dry-run"])
      assert status in [0, 1]
      assert out =~ ~r/^#{orphan}\s+would remove/m
      {out, _err, status} = TaskHelpers.run_task("snakepit.shm.cleanup", [])
      assert status in [0, 1]
      assert out =~ ~r/^#{orphan}\s+removed/m
      refute File.exists?(Path.join(dir, orphan))
      # ... and so does the manager's sweep.
      orphan2 = forge_orphan(dir, template)
      assert orphan2 in Enum.map(Sweep.sweep_orphans(), & &1.region_id)
      refute File.exists?(Path.join(dir, orphan2))

      # The live regions were left alone; freeing them empties the directory.
      assert Enum.sort([id, named]) == Enum.sort(ours_in(dir))
      :ok = SM.deallocate_region(id)
      :ok = SM.deallocate_region(named)
      assert ours_in(dir) == []
    end)

    # Back on /dev/shm.
    assert Native.shm_dir() == "/dev/shm"
  end

  test "the shm_space health check measures that tmpfs", %{dir: dir, mounted: mounted} do
    with_shm_path(dir, fn ->
      check = fn -> Enum.find(SM.health().checks, &(&1.name == :shm_space)) end
      assert check.().measurements.path == dir

      if mounted do
        # 4 MiB: 3.4 MiB of regions (plus headers) fill more than 80 %.
        ids = for _ <- 1..2, do: elem(SM.allocate_region(div(17 * @mib, 10), backend: :posix), 1)
        c = check.()
        assert c.status in [:degraded, :critical], inspect(c)
        assert c.message =~ dir and c.message =~ "shm_path"
        for id <- ids, do: :ok = SM.deallocate_region(id)

        # The tmpfs gets the pages back once the last mapping (the collected resource) goes.
        assert Snakepit.SharedMemory.ShmHelpers.wait_until(
                 fn ->
                   :erlang.garbage_collect()
                   check.().status == :ok
                 end,
                 5_000
               )
      else
        IO.puts("shm_space trip skipped: no small tmpfs could be mounted")
      end
    end)
  end

  test "a directory that is not a tmpfs works, with a warning at start" do
    dir = Path.join(System.tmp_dir!(), "i19_disk_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)

    try do
      case Native.fs_stat(dir) do
        {:ok, %{tmpfs: true}} ->
          IO.puts("skipped: #{dir} is a tmpfs here")

        {:ok, %{tmpfs: false}} ->
          log =
            ExUnit.CaptureLog.capture_log(fn ->
              with_shm_path(dir, fn ->
                {:ok, id} = SM.allocate_region(4096, backend: :posix)
                assert File.exists?(Path.join(dir, id))
                :ok = SM.deallocate_region(id)
              end)
            end)

          assert log =~ "shm_path #{dir} is not a tmpfs"
      end
    after
      File.rm_rf(dir)
    end
  end

  test "a worker started with python_env/0 makes POSIX outputs this VM adopts", %{dir: dir} do
    # Found by an attack run: python_env/0 (what a pool's adapter_env gets) left out
    # SNAKEPIT_SHM_PATH, and the worker's POSIX outputs went to /dev/shm, where this VM
    # could not adopt them.
    alias Snakepit.SharedMemory.Test.PythonWorker

    with_shm_path(dir, fn ->
      assert {:ok, %{"SNAKEPIT_SHM_PATH" => ^dir}} = SM.python_env()

      worker =
        PythonWorker.start("""
        import json, sys, snakepit_shm
        for line in sys.stdin:
            out = snakepit_shm.allocate(4096, backend="posix")
            out.write(0, b"posix out")
            out.close()
            print(json.dumps(out.ref))
        """)

      try do
        ref = PythonWorker.ask(worker, "go")
        assert File.exists?(Path.join(dir, ref["region_id"]))
        assert {:ok, id} = SM.adopt_region(ref)
        {:ok, m} = SM.map_region(id, access_mode: :read_only)
        assert {:ok, "posix out"} = SM.read(m, 0, 9)
        :ok = SM.unmap_region(m)
        :ok = SM.deallocate_region(id)
        refute File.exists?(Path.join(dir, id))
      after
        PythonWorker.stop(worker)
      end
    end)

    assert {:ok, env} = SM.python_env()
    refute Map.has_key?(env, "SNAKEPIT_SHM_PATH")
  end

  test "a directory other users may write without the sticky bit is warned about" do
    # Found by an attack run: shm_path on a 0777 directory (not 1777 like /dev/shm)
    # started silently, although any local user can then delete or rename our segments.
    dir = Path.join(System.tmp_dir!(), "i19_open_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)

    try do
      File.chmod!(dir, 0o777)

      log =
        ExUnit.CaptureLog.capture_log(fn ->
          Snakepit.SharedMemory.Platform.warn_unless_tmpfs(dir)
        end)

      assert log =~ "shm_path #{dir} is writable by other users without the sticky bit"

      # (File.chmod/2 drops the sticky bit.)
      {_, 0} = System.cmd("chmod", ["1777", dir])

      log =
        ExUnit.CaptureLog.capture_log(fn ->
          Snakepit.SharedMemory.Platform.warn_unless_tmpfs(dir)
        end)

      refute log =~ "sticky"
    after
      File.rm_rf(dir)
    end
  end

  test "a missing or relative shm_path fails the start with a message naming it" do
    Application.stop(:snakepit_shm)

    try do
      Application.put_env(:snakepit_shm, :shm_path, "/nonexistent/i19")
      assert {:error, {{:snakepit_shm, message}, _}} = Application.start(:snakepit_shm)
      assert message =~ "shm_path" and message =~ "/nonexistent/i19"

      Application.put_env(:snakepit_shm, :shm_path, "relative/dir")
      assert {:error, {{:snakepit_shm, message}, _}} = Application.start(:snakepit_shm)
      assert message =~ "shm_path: must be"
    after
      Application.delete_env(:snakepit_shm, :shm_path)
      restart_without_sweep()
    end
  end

  defp forge_orphan(dir, template) do
    id = ReliabilityForge.random_id()
    bytes = ReliabilityForge.orphan_bytes(template, id, ReliabilityForge.dead_os_pid())
    path = Path.join(dir, id)
    File.write!(path, bytes)
    File.chmod!(path, 0o600)
    id
  end
end
