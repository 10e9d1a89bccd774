Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.RuntimeIndexTest do
  # The runtime index (issue 14): each memfd region of a VM is listed in a per-user 0700
  # directory so that a worker finds it by bare id without scanning /proc/*/fd; the
  # entry goes with the region, and the orphan sweep removes what dead VMs left.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Native, ReliabilityHelpers, Sweep}

  defp dir do
    {:ok, %{directory: dir}} = Native.runtime_index_sweep()
    dir
  end

  defp entry(dir, id), do: File.read_link(Path.join(dir, id))

  test "allocate lists a memfd region, deallocate removes it; the directory is ours, 0700" do
    dir = dir()
    assert is_binary(dir)
    {:ok, %File.Stat{type: :directory, mode: mode, uid: uid}} = File.lstat(dir)
    assert Bitwise.band(mode, 0o777) == 0o700
    {euid, 0} = System.cmd("id", ["-u"])
    assert Integer.to_string(uid) == String.trim(euid)

    {:ok, id} = SM.allocate_region(10_000, backend: :memfd)
    {:ok, ref} = SM.export_ref(id)

    assert entry(dir, id) ==
             {:ok, "spshm1 memfd #{ref["control_path"]} #{ref["data_path"]} 0 10000"}

    :ok = SM.deallocate_region(id)
    assert entry(dir, id) == {:error, :enoent}
  end

  test "POSIX regions are found by name: no entry" do
    {:ok, id} = SM.allocate_region(4096, backend: :posix)
    assert entry(dir(), id) == {:error, :enoent}
    :ok = SM.deallocate_region(id)
  end

  test "a Python worker attaches by bare id through the index, without the /proc scan" do
    {:ok, id} = SM.allocate_region(4096, backend: :memfd)
    {:ok, mapping} = SM.map_region(id)
    :ok = SM.write(mapping, 0, "indexed")

    assert ReliabilityHelpers.python_read_by_index(id, 7) == {0, "indexed"}
    :ok = SM.unmap_region(mapping)
    :ok = SM.deallocate_region(id)
  end

  test "the sweep removes the entries of a VM killed with SIGKILL, and keeps live ones" do
    dir = dir()
    {:ok, live} = SM.allocate_region(4096, backend: :memfd)

    code = """
    Application.ensure_all_started(:snakepit_shm)
    {:ok, id} = Snakepit.SharedMemory.allocate_region(4096, backend: :memfd)
    IO.puts("ID " <> id)
    System.cmd("kill", ["-9", System.pid()])
    """

    {out, _status} = ReliabilityHelpers.elixir_vm(code)
    [_, dead] = Regex.run(~r/ID (spshm_[a-z2-7]{20})/, out)
    assert {:ok, "spshm1 memfd " <> _} = entry(dir, dead)

    # Not ours to judge: a name that is no region id stays.
    other = Path.join(dir, "not-an-entry")
    File.write!(other, "x")

    assert %{removed: removed} = Sweep.sweep_runtime_index()
    assert removed >= 1
    assert entry(dir, dead) == {:error, :enoent}
    assert {:ok, _} = entry(dir, live)
    assert File.exists?(other)
    File.rm!(other)
    :ok = SM.deallocate_region(live)
  end

  # The naming rule (runtime_index::namespace_dir_name_of, docs/FORMAT.md "Runtime
  # index"), computed here independently of the core.
  defp namespace_dir_name do
    {:ok, link} = File.read_link("/proc/self/ns/pid")
    [_, inode] = Regex.run(~r/^pid:\[(\d+)\]$/, link)
    "pidns-" <> inode
  end

  test "python_env/0 tells workers the base of this VM's index; entries are in its namespace's subdirectory" do
    assert {:ok, %{"SNAKEPIT_SHM_RUNTIME_DIR" => base}} = SM.python_env()
    assert dir() == Path.join(base, namespace_dir_name())
    {:ok, %File.Stat{type: :directory, mode: mode}} = File.lstat(base)
    assert Bitwise.band(mode, 0o777) == 0o700
  end

  test "a VM refuses an index directory that is not its own 0700 directory" do
    base = Path.join(System.tmp_dir!(), "rt_index_#{System.unique_integer([:positive])}")
    File.mkdir_p!(base)
    open = Path.join(base, "open")
    File.mkdir_p!(open)
    File.chmod!(open, 0o755)
    good = Path.join(base, "good")
    File.mkdir_p!(good)
    File.chmod!(good, 0o700)
    link = Path.join(base, "link")
    File.ln_s!(good, link)

    code = """
    Application.ensure_all_started(:snakepit_shm)
    {:ok, id} = Snakepit.SharedMemory.allocate_region(4096, backend: :memfd)
    {:ok, r} = Snakepit.SharedMemory.Native.runtime_index_sweep()
    IO.puts("RESULT \#{inspect(r.directory)} \#{id}")
    """

    try do
      ns_good = Path.join(good, namespace_dir_name())

      for {dir, expected} <- [{open, nil}, {link, nil}, {good, ns_good}] do
        {out, 0} = ReliabilityHelpers.elixir_vm(code, env: [{"SNAKEPIT_SHM_RUNTIME_DIR", dir}])

        [_, shown, id] = Regex.run(~r/RESULT (\S+) (spshm_\w+)/, out)
        assert shown == inspect(expected), out
        # nothing was written into a refused directory (the VM freed its region on exit)
        if expected == nil, do: assert(File.ls!(dir) == [])
        assert File.read_link(Path.join(ns_good, id)) == {:error, :enoent}
      end
    after
      File.rm_rf!(base)
    end
  end
end
