defmodule Snakepit.SharedMemory.Reliability.RuntimeIndexPidnsTest do
  # The runtime index (docs/FORMAT.md, "Runtime index") shared by VMs of one user in
  # different PID namespaces (docker --ipc=container:, pods sharing /dev/shm or the
  # runtime directory). Its entries name /proc/<pid>/fd/<n> paths, which mean nothing in
  # another namespace: a VM there judged our entries stale and removed them at its
  # start-up sweep, and our workers fell back to the /proc scan. Entries now live in a
  # subdirectory per PID namespace (pidns-<inode>), and a sweep touches only its own.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Native, ReliabilityHelpers}

  @moduletag :reliability
  @moduletag timeout: 300_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    :ok
  end

  @other_vm """
  IO.puts("NS " <> elem(File.read_link("/proc/self/ns/pid"), 1))
  IO.puts("SEES_A " <> to_string(File.exists?("/proc/" <> System.get_env("VM_A") <> "/stat")))
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  {:ok, id} = Snakepit.SharedMemory.allocate_region(4096, backend: :memfd)
  {:ok, r} = Snakepit.SharedMemory.Native.runtime_index_sweep()
  IO.puts("DIR " <> r.directory)
  IO.puts("ENTRY " <> Path.join(r.directory, id))
  IO.puts("SWEPT")
  # Killed as a container is: its entry stays behind in its own namespace's directory.
  System.cmd("kill", ["-9", System.pid()])
  """

  test "a VM in another PID namespace leaves our entries alone; our worker still finds the region by bare id" do
    case System.cmd("unshare", ["--pid", "--fork", "--mount-proc", "true"], stderr_to_stdout: true) do
      {_, 0} -> other_namespace()
      {out, _} -> IO.puts("skipped: cannot create a PID namespace here (#{String.trim(out)})")
    end
  end

  defp other_namespace do
    {:ok, %{"SNAKEPIT_SHM_RUNTIME_DIR" => base}} = SM.python_env()
    {:ok, %{directory: ours}} = Native.runtime_index_sweep()
    {:ok, id} = SM.allocate_region(4096, backend: :memfd)
    {:ok, m} = SM.map_region(id)
    :ok = SM.write(m, 0, "found by id")
    entry = Path.join(ours, id)
    assert {:ok, "spshm1 memfd " <> _} = File.read_link(entry)

    {out, status} =
      System.cmd(
        "unshare",
        # sh stays the namespace's init (no exec; pid 1 ignores SIGKILL sent from inside).
        [
          "--pid",
          "--fork",
          "--mount-proc",
          "sh",
          "-c",
          String.replace_prefix(ReliabilityHelpers.elixir_command(), "exec ", "") <> "; true"
        ],
        env: [
          {"SNAKEPIT_SHM_VM_CODE", @other_vm},
          {"SNAKEPIT_SHM_RUNTIME_DIR", base},
          {"VM_A", System.pid()}
        ],
        stderr_to_stdout: true,
        cd: ReliabilityHelpers.root()
      )

    assert out =~ "SWEPT", "status #{status}: #{out}"
    {:ok, our_ns} = File.read_link("/proc/self/ns/pid")
    [_, their_ns] = Regex.run(~r/NS (\S+)/, out)
    assert their_ns != our_ns, "the second VM must run in another PID namespace"
    # Our pid means nothing there: with one shared directory it took our entry for stale.
    assert out =~ "SEES_A false"
    [_, theirs] = Regex.run(~r/DIR (\S+)/, out)
    [_, their_entry] = Regex.run(~r/ENTRY (\S+)/, out)

    try do
      # Both under the same base, each in its own namespace's subdirectory.
      assert Path.dirname(theirs) == base and Path.dirname(ours) == base
      assert theirs != ours
      assert Path.basename(theirs) =~ ~r/^pidns-\d+$/
      # It listed its own region in its own directory (killed: the entry is left).
      assert {:ok, "spshm1 memfd " <> _} = File.read_link(their_entry)

      # Ours survived its sweep, and our worker finds the region by bare id, no scan.
      assert {:ok, "spshm1 memfd " <> _} = File.read_link(entry)

      assert ReliabilityHelpers.python_read_by_index(id, 11) == {0, "found by id"}

      # And our sweep never touches their directory (their entry is stale here too).
      _ = Native.runtime_index_sweep()
      assert {:ok, _} = File.read_link(their_entry)
    after
      File.rm_rf!(theirs)
    end

    :ok = SM.unmap_region(m)
    :ok = SM.deallocate_region(id)
    assert File.read_link(entry) == {:error, :enoent}
  end
end
