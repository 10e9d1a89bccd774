defmodule Snakepit.SharedMemory.Reliability.MemoryCgroupTest do
  # Issue #12, seen 6: allocate_region(512 MiB) inside a 256 MiB memory cgroup ended with
  # the kernel OOM-killing beam.smp (the guard read the host's /proc/meminfo). Here a VM
  # runs inside a real memory cgroup made for the test (v1 or v2, whichever the host has
  # and lets root create), and must refuse the allocation with :no_space, and survive.
  # Skipped, with the reason printed, where no such group can be made.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{MemoryLimits, ReliabilityHelpers}

  @moduletag :reliability
  @moduletag timeout: 120_000

  @limit 300 * 1024 * 1024

  describe "MemoryLimits.snapshot/0" do
    test "reports the host and this process's memory cgroup" do
      %{host: host, cgroup: cgroup} = MemoryLimits.snapshot()
      assert host.total > 0 and host.available > 0 and host.available <= host.total

      if cgroup do
        assert cgroup.version in [1, 2]
        assert String.starts_with?(cgroup.path, "/")
        assert cgroup.max == :infinity or (is_integer(cgroup.max) and cgroup.max > 0)
        assert is_integer(cgroup.current) and cgroup.current >= 0
      end
    end
  end

  describe "the allocation guard" do
    test "a VM in a 300 MiB memory cgroup refuses a 512 MiB region instead of being OOM-killed" do
      in_group(&run_in_group/2)
    end
  end

  describe "a limit set while the VM runs" do
    # With no limit anywhere, the guard reads no file for a second after each check (the
    # limit files cost two reads per allocation); a limit set later applies after that.
    test "applies to allocations a second later" do
      in_group(&run_limited_later/2)
    end
  end

  defp run_limited_later(dir, limit_file) do
    unlimited = if limit_file == "memory.max", do: "max", else: "-1"
    File.write!(Path.join(dir, limit_file), unlimited)

    code = """
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    alias Snakepit.SharedMemory
    {:ok, id} = SharedMemory.allocate_region(2 * 1024 * 1024)
    :ok = SharedMemory.deallocate_region(id)
    File.write!(System.fetch_env!("LIMIT_FILE"), "#{@limit}")
    Process.sleep(1_100)
    case SharedMemory.allocate_region(512 * 1024 * 1024) do
      {:error, %SharedMemory.Error{reason: reason}} -> IO.puts("REFUSED \#{reason}")
      other -> IO.puts("ALLOCATED \#{inspect(other)}")
    end
    IO.puts("ALIVE")
    """

    {out, status} = vm_in_group(dir, code, [{"LIMIT_FILE", Path.join(dir, limit_file)}])

    assert status == 0, "the VM died (OOM-killed?): status #{status}\n#{out}"
    assert out =~ "REFUSED no_space", out
    assert out =~ "ALIVE"
  end

  defp run_in_group(dir, limit_file) do
    File.write!(Path.join(dir, limit_file), Integer.to_string(@limit))

    code = """
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    alias Snakepit.SharedMemory
    IO.puts("CGROUP " <> inspect(Snakepit.SharedMemory.MemoryLimits.snapshot().cgroup))
    for backend <- [:memfd, :posix] do
      case SharedMemory.allocate_region(512 * 1024 * 1024, backend: backend) do
        {:error, %SharedMemory.Error{reason: reason, message: message}} ->
          IO.puts("REFUSED \#{backend} \#{reason} \#{message}")
        other ->
          IO.puts("ALLOCATED \#{backend} \#{inspect(other)}")
      end
    end
    {:ok, id} = SharedMemory.allocate_region(1024 * 1024, backend: :posix)
    :ok = SharedMemory.deallocate_region(id)
    IO.puts("ALIVE")
    """

    {out, status} = vm_in_group(dir, code, [])

    assert status == 0, "the VM died (OOM-killed?): status #{status}\n#{out}"
    assert out =~ "max: #{@limit}"
    assert out =~ ~r/REFUSED memfd no_space .*memory cgroup/
    assert out =~ ~r/REFUSED posix no_space .*memory cgroup/
    assert out =~ "ALIVE"
  end

  # Runs fun.(dir, limit_file) in a new memory cgroup, removed after (or says why not).
  defp in_group(fun) do
    case make_group() do
      {:ok, dir, limit_file} ->
        try do
          fun.(dir, limit_file)
        after
          File.rmdir(dir)
        end

      {:skip, reason} ->
        IO.puts("skipped: #{reason}")
    end
  end

  # A VM running `code` inside the group `dir`: the shell joins the group, then becomes
  # the VM, so every byte it maps is charged there.
  defp vm_in_group(dir, code, env) do
    command =
      "echo $$ > #{Path.join(dir, "cgroup.procs")} && " <> ReliabilityHelpers.elixir_command()

    System.cmd("sh", ["-c", command],
      env: [{"SNAKEPIT_SHM_VM_CODE", code} | env],
      stderr_to_stdout: true,
      cd: ReliabilityHelpers.root()
    )
  end

  # A child group of this process's memory cgroup (v1), or of the v2 root.
  defp make_group do
    name = "spshm_test_#{System.unique_integer([:positive])}"

    case MemoryLimits.snapshot().cgroup do
      nil ->
        {:skip, "this process has no memory cgroup"}

      %{version: 1, path: path} ->
        # (path: the group's directory under the memory hierarchy's mount)
        parent = if File.dir?(path), do: path, else: "/sys/fs/cgroup/memory"
        mkdir(Path.join(parent, name), "memory.limit_in_bytes")

      %{version: 2} ->
        root =
          Enum.find(["/sys/fs/cgroup", "/sys/fs/cgroup/unified"], fn m ->
            File.exists?(Path.join(m, "cgroup.subtree_control"))
          end)

        if root,
          do: mkdir(Path.join(root, name), "memory.max"),
          else: {:skip, "no cgroup v2 mount found"}
    end
  end

  defp mkdir(dir, limit_file) do
    case File.mkdir(dir) do
      :ok ->
        if File.exists?(Path.join(dir, limit_file)) do
          {:ok, dir, limit_file}
        else
          File.rmdir(dir)
          {:skip, "#{dir} has no #{limit_file} (memory controller not enabled there)"}
        end

      {:error, reason} ->
        {:skip, "cannot create a memory cgroup (#{dir}: #{:file.format_error(reason)})"}
    end
  end
end
