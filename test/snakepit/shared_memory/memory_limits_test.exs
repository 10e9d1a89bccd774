defmodule Snakepit.SharedMemory.MemoryLimitsTest do
  # The host and cgroup memory readers, and a real cgroup-limited run: a child VM moved
  # into a fresh memory cgroup with a limit reports that cgroup in its health check.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.MemoryLimits

  @limit 512 * 1024 * 1024

  test "snapshot/0: host memory from /proc/meminfo, and the VM's cgroup if any" do
    %{host: host, cgroup: cgroup} = MemoryLimits.snapshot()
    assert host.total > 0 and host.available > 0 and host.available <= host.total

    if cgroup do
      assert cgroup.version in [1, 2]
      assert File.dir?(cgroup.path)
      assert cgroup.max == :infinity or cgroup.max > 0
      assert cgroup.current > 0
    end
  end

  test "cgroup/1 reads v2 and v1 layouts from a proc-like directory" do
    root = Path.join(System.tmp_dir!(), "i19_cg_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf(root) end)

    # v2: the own cgroup has no limit, its parent has: the parent is the tightest.
    proc = Path.join(root, "proc")
    mnt = Path.join(root, "cg2")
    File.mkdir_p!(proc)
    File.mkdir_p!(Path.join(mnt, "pod/app"))
    File.write!(Path.join(proc, "cgroup"), "0::/pod/app\n")

    File.write!(
      Path.join(proc, "mountinfo"),
      "30 23 0:26 / #{mnt} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    )

    File.write!(Path.join(mnt, "pod/app/memory.max"), "max\n")
    File.write!(Path.join(mnt, "pod/app/memory.current"), "1000\n")
    File.write!(Path.join(mnt, "pod/memory.max"), "4096\n")
    File.write!(Path.join(mnt, "pod/memory.current"), "3000\n")

    assert %{version: 2, path: path, max: 4096, current: 3000} = MemoryLimits.cgroup(proc)
    assert path == Path.join(mnt, "pod")

    # v1: "N:memory:/path" under the memory hierarchy's mount; ~2^63 means no limit.
    mnt1 = Path.join(root, "cg1")
    File.mkdir_p!(Path.join(mnt1, "docker/abc"))
    File.write!(Path.join(proc, "cgroup"), "4:memory:/docker/abc\n0::/\n")

    File.write!(
      Path.join(proc, "mountinfo"),
      "40 31 0:30 / #{mnt1} rw - cgroup cgroup rw,memory\n"
    )

    File.write!(Path.join(mnt1, "docker/abc/memory.limit_in_bytes"), "9223372036854771712\n")
    File.write!(Path.join(mnt1, "docker/abc/memory.usage_in_bytes"), "123\n")
    assert %{version: 1, max: :infinity, current: 123} = MemoryLimits.cgroup(proc)
    File.write!(Path.join(mnt1, "docker/abc/memory.limit_in_bytes"), "1048576\n")
    assert %{version: 1, max: 1_048_576} = MemoryLimits.cgroup(proc)
  end

  @tag timeout: 120_000
  test "a VM in a memory-limited cgroup reports that cgroup in its health check" do
    case make_cgroup() do
      {:skip, why} ->
        IO.puts("\ncgroup-limited run skipped: #{why}")

      {:ok, version, dir} ->
        try do
          run_limited(version, dir)
        after
          # The child has exited: the cgroup is empty and can go.
          Process.sleep(100)
          File.rmdir(dir)
        end
    end
  end

  defp run_limited(version, dir) do
    ebin = Path.expand("_build/test/lib/snakepit_shm/ebin")

    script = """
    Application.put_env(:snakepit_shm, :health_thresholds, %{degraded: 0.5, critical: 99, hysteresis: 0.1})
    r = Snakepit.SharedMemory.Health.run()
    c = Enum.find(r.checks, &(&1.name == :cgroup_memory))
    IO.puts("RESULT " <> inspect({c.status, c.limit, c.measurements[:path], c.measurements[:version], c.message}))
    """

    {out, status} =
      System.cmd(
        "sh",
        [
          "-c",
          ~s(echo $$ > "$1/cgroup.procs" && exec "$2" -pa "$3" -e "$4"),
          "sh",
          dir,
          System.find_executable("elixir"),
          ebin,
          script
        ],
        stderr_to_stdout: true
      )

    assert status == 0, out
    [_, result] = Regex.run(~r/RESULT (.*)/, out)
    {status, limit, path, v, message} = Code.eval_string(result) |> elem(0)
    assert limit == @limit
    assert path == dir
    assert v == version
    assert status == :degraded
    assert message =~ dir and message =~ "512 MiB"
  end

  # A fresh child memory cgroup with a 512 MiB limit: v2 if the memory controller is
  # delegated to a writable v2 hierarchy, else v1; {:skip, reason} otherwise.
  defp make_cgroup do
    name = "i19_health_#{System.unique_integer([:positive])}"

    cond do
      (v2 = v2_root()) != nil ->
        dir = Path.join(v2, name)

        with :ok <- File.mkdir(dir),
             :ok <- File.write(Path.join(dir, "memory.max"), "#{@limit}") do
          {:ok, 2, dir}
        else
          error ->
            File.rmdir(dir)
            {:skip, "cannot create a v2 memory cgroup under #{v2}: #{inspect(error)}"}
        end

      File.exists?("/sys/fs/cgroup/memory/memory.limit_in_bytes") ->
        dir = Path.join("/sys/fs/cgroup/memory", name)

        with :ok <- File.mkdir(dir),
             :ok <- File.write(Path.join(dir, "memory.limit_in_bytes"), "#{@limit}") do
          IO.puts("\n(no cgroup v2 memory delegation here: using the v1 memory hierarchy)")
          {:ok, 1, dir}
        else
          error ->
            File.rmdir(dir)
            {:skip, "no cgroup v2 memory delegation, and v1 is not writable: #{inspect(error)}"}
        end

      true ->
        {:skip, "no cgroup v2 memory delegation and no v1 memory hierarchy on this machine"}
    end
  end

  # A v2 hierarchy whose root enables the memory controller for children.
  defp v2_root do
    with {:ok, text} <- File.read("/proc/self/mountinfo"),
         [_, mount] <- Regex.run(~r/^\S+ \S+ \S+ \/ (\S+) .* - cgroup2 /m, text),
         {:ok, control} <- File.read(Path.join(mount, "cgroup.subtree_control")),
         true <- "memory" in String.split(control) do
      mount
    else
      _ -> nil
    end
  end
end
