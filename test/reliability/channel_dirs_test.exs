Code.require_file("../mix/support/task_helpers.exs", __DIR__)

defmodule Snakepit.SharedMemory.Reliability.ChannelDirsTest do
  # Attack run 4 (A): a VM that halts (System.halt at the end of a script, SIGKILL, a
  # crash) while one of its channels still listens left the channel's private socket
  # directory `spshm-ch-XXXXXX` and its `ctl` socket in /tmp for ever. The owner now holds
  # a shared flock on the directory while it exists, and every orphan sweep removes the
  # directories whose lock is free (Sweep.sweep_channel_dirs/0, docs/CHANNEL.md).
  use Snakepit.SharedMemory.ReliabilityCase, async: false

  alias Snakepit.SharedMemory.{Channel, Native, ReliabilityHelpers, Sweep, TaskHelpers}

  setup do
    n = System.unique_integer([:positive])
    # $TMPDIR of both VMs for the test, and (empty) the shm directory of this VM while it
    # sweeps: the orphan sweeps must not take segments other suites on this machine keep
    # in /dev/shm on purpose.
    base = Path.join(System.tmp_dir!(), "spshm_chdirs_#{n}")
    shm = Path.join(System.tmp_dir!(), "spshm_chdirs_shm_#{n}")
    custom = Path.join(System.tmp_dir!(), "spshm_chdirs_custom_#{n}")
    for dir <- [base, shm, custom], do: File.mkdir_p!(dir)
    File.chmod!(base, 0o700)

    on_exit(fn ->
      for dir <- [base, shm, custom], do: File.rm_rf!(dir)
    end)

    %{base: base, shm: shm, custom: custom}
  end

  # A VM that opens listening channels (three in $TMPDIR, one in `custom`) and halts
  # without closing them.
  @halting_vm """
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory.Channel

  for opts <- [[], [], [], [socket_dir: System.fetch_env!("CUSTOM_DIR")]] do
    {:ok, ch} = Channel.open(opts)
    IO.puts("PATH=" <> Channel.export_ref(ch)["path"])
  end

  System.halt(0)
  """

  test "a halted VM's channel directories are removed by the orphan sweeps once 10 s old; " <>
         "a live channel's and a custom socket_dir's are kept",
       %{base: base, shm: shm, custom: custom} do
    {out, 0} =
      ReliabilityHelpers.elixir_vm(@halting_vm,
        env: [{"TMPDIR", base}, {"XDG_RUNTIME_DIR", nil}, {"CUSTOM_DIR", custom}]
      )

    paths = for [_, p] <- Regex.scan(~r/^PATH=(.*)$/m, out), do: p
    assert length(paths) == 4, out
    [a, b, c, in_custom] = Enum.map(paths, &Path.dirname/1)

    for dir <- [a, b, c] do
      assert String.starts_with?(dir, Path.join(base, "spshm-ch-"))
    end

    assert String.starts_with?(in_custom, Path.join(custom, "spshm-ch-"))
    # The leak: the VM is gone, its sockets are not.
    for p <- paths, do: assert({:ok, %File.Stat{type: :other}} = File.lstat(p))

    # System.put_env/2 changes the VM's copy of the environment, which the sweep reads
    # too (channels are made where getenv(3) says: this VM's process environment).
    with_env(%{"TMPDIR" => base, "XDG_RUNTIME_DIR" => nil}, fn ->
      with_shm_dir(shm, fn ->
        # Live channels: one where this VM makes them by default, one in `base`.
        {:ok, live} = Channel.open()
        {:ok, live_in_base} = Channel.open(socket_dir: base)
        live_path = Channel.export_ref(live)["path"]
        live_dir = Path.dirname(live_path)
        live_base_path = Channel.export_ref(live_in_base)["path"]
        live_base_dir = Path.dirname(live_base_path)
        assert Path.basename(live_dir) =~ ~r/^spshm-ch-/
        assert String.starts_with?(live_base_dir, Path.join(base, "spshm-ch-"))

        # Young (a channel between mkdtemp and its lock looks the same): kept.
        Sweep.sweep_orphans()
        for dir <- [a, b, c, in_custom, live_dir, live_base_dir], do: assert(File.dir?(dir))

        # Old: a dead VM's goes, a live channel's stays however old.
        age([a, live_dir, live_base_dir, in_custom])
        Sweep.sweep_orphans()
        refute File.exists?(a)
        assert {:ok, %File.Stat{type: :other}} = File.lstat(live_path)
        assert {:ok, %File.Stat{type: :other}} = File.lstat(live_base_path)
        for dir <- [b, c, in_custom], do: assert(File.dir?(dir))

        # A dry run removes nothing.
        age([b])
        Sweep.sweep_orphans(dry_run: true)
        assert File.dir?(b)

        # The start-up sweep and the sweep after peers died do it too.
        Sweep.sweep_orphans_at_start()
        refute File.exists?(b)
        assert File.dir?(c)
        age([c])
        Sweep.sweep_orphans_of([])
        refute File.exists?(c)

        # The live ones are still listening, and remove their directories when they
        # close.
        assert is_integer(Sweep.sweep_channel_dirs())

        for {ch, path} <- [{live, live_path}, {live_in_base, live_base_path}] do
          assert %{state: :listening} = Channel.stats(ch)
          assert File.exists?(path)
          :ok = Channel.close(ch)
          refute File.exists?(Path.dirname(path))
        end
      end)
    end)

    assert File.ls!(base) == []
    # A custom :socket_dir is not swept (docs/CHANNEL.md): still there, removed by hand.
    assert File.dir?(in_custom)
    assert File.ls!(in_custom) == ["ctl"]
  end

  test "Native.channel_sweep_dirs/0 leaves a directory with anything but the socket in it",
       %{base: base, shm: _shm} do
    with_env(%{"TMPDIR" => base, "XDG_RUNTIME_DIR" => nil}, fn ->
      extra = Path.join(base, "spshm-ch-extra1")
      File.mkdir_p!(extra)
      File.chmod!(extra, 0o700)
      File.write!(Path.join(extra, "ctl"), "not a socket")
      wide = Path.join(base, "spshm-ch-wide01")
      File.mkdir_p!(wide)
      File.chmod!(wide, 0o755)
      link = Path.join(base, "spshm-ch-link01")
      :ok = File.ln_s(extra, link)
      empty = Path.join(base, "spshm-ch-empty1")
      File.mkdir_p!(empty)
      File.chmod!(empty, 0o700)
      age([extra, wide, empty])

      assert Native.channel_sweep_dirs() >= 1
      refute File.exists?(empty)
      assert File.read!(Path.join(extra, "ctl")) == "not a socket"
      assert File.dir?(wide)
      assert {:ok, %File.Stat{type: :symlink}} = File.lstat(link)
    end)
  end

  test "mix snakepit.shm.cleanup (offline) removes a dead VM's channel directory; not with " <>
         "--dry-run or a filter",
       %{base: base, shm: shm} do
    # What a channel of a killed VM leaves: a private directory with its listening
    # socket's name in it, nobody holding the directory's lock.
    dead = Path.join(base, "spshm-ch-dead01")
    File.mkdir_p!(dead)
    File.chmod!(dead, 0o700)
    {:ok, listener} = :gen_tcp.listen(0, ifaddr: {:local, Path.join(dead, "ctl")})
    :ok = :gen_tcp.close(listener)
    age([dead])

    with_env(%{"TMPDIR" => base, "XDG_RUNTIME_DIR" => nil}, fn ->
      with_shm_dir(shm, fn ->
        {out, _err, 0} = TaskHelpers.run_task("snakepit.shm.cleanup", ["--dry-run"])
        refute out =~ "channel socket director"
        {_out, _err, 0} = TaskHelpers.run_task("snakepit.shm.cleanup", ["--owner", "1"])
        assert File.dir?(dead)

        {out, _err, 0} = TaskHelpers.run_task("snakepit.shm.cleanup", [])
        assert out =~ ~r/Removed \d+ stale channel socket director(y|ies) \(left by/
        refute File.exists?(dead)

        {out, _err, 0} = TaskHelpers.run_task("snakepit.shm.cleanup", ["--format", "json"])
        assert {:ok, %{"channel_dirs_removed" => n}} = Snakepit.SharedMemory.JSON.decode(out)
        assert is_integer(n)
      end)
    end)
  end

  defp age(dirs) do
    old = System.os_time(:second) - 3600
    for dir <- dirs, do: File.touch!(dir, old)
  end

  defp with_env(vars, fun) do
    saved = for {k, _} <- vars, into: %{}, do: {k, System.get_env(k)}
    Enum.each(vars, &put_env/1)

    try do
      fun.()
    after
      Enum.each(saved, &put_env/1)
    end
  end

  defp put_env({k, nil}), do: System.delete_env(k)
  defp put_env({k, v}), do: System.put_env(k, v)

  defp with_shm_dir(dir, fun) do
    saved = Native.shm_dir()
    :ok = Native.set_shm_dir(dir)

    try do
      fun.()
    after
      :ok = Native.set_shm_dir(saved)
    end
  end
end
