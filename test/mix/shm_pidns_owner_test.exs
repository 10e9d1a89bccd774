Code.require_file("support/task_helpers.exs", __DIR__)

defmodule Mix.Tasks.Snakepit.Shm.PidnsOwnerTest do
  # The offline tasks judged a region's owner VM alive or dead from the pid and start
  # time in its header, looked up in the lister's PID namespace. A VM in another PID
  # namespace (a container sharing /dev/shm) has a pid that means nothing here (1 in its
  # own): `mix snakepit.shm.list` called that live VM "dead". The owner is now judged from
  # what the kernel holds: the liveness lock, and the process itself found through /proc
  # (its pid in its own namespace, `NSpid`, with its start time); a pid alone never says
  # "dead". Real VMs under `unshare --pid --fork --mount-proc` (root); skipped with the
  # reason printed where no PID namespace can be made. Not async: the scan sees the host.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.TaskHelpers

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.CLI.{Entry, HostCleanup, HostScan}
  alias Snakepit.SharedMemory.{Native, ReliabilityHelpers, ShmHelpers}

  # pid 1 of its own namespace: allocates a POSIX and a memfd region, holds them until
  # its stdin closes, then frees them.
  @vm_in_namespace ~S"""
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SHM
  {:ok, posix} = SHM.allocate_region(4096, backend: :posix)
  {:ok, memfd} = SHM.allocate_region(4096, backend: :memfd)
  {:ok, ns} = File.read_link("/proc/self/ns/pid")
  IO.puts("READY #{System.pid()} #{posix} #{memfd} #{ns}")
  IO.gets("")
  :ok = SHM.deallocate_region(posix)
  :ok = SHM.deallocate_region(memfd)
  System.halt(0)
  """

  setup_all do
    ReliabilityHelpers.check_segments_on_exit()
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    :ok
  end

  defp unshare_available? do
    case System.cmd("unshare", ["--pid", "--fork", "--mount-proc", "true"], stderr_to_stdout: true) do
      {_, 0} ->
        true

      {out, _} ->
        IO.puts("skipped: cannot create a PID namespace here (#{String.trim(out)})")
        false
    end
  rescue
    e in ErlangError ->
      IO.puts("skipped: no unshare here (#{Exception.message(e)})")
      false
  end

  defp vm_command do
    ebin = Path.join(Mix.Project.app_path(), "ebin")
    # No start-up sweep: it must not touch the host's other segments.
    ~s(exec elixir --erl "-snakepit_shm orphan_sweep false" -pa "#{ebin}" -e "$SNAKEPIT_SHM_VM_CODE")
  end

  describe "an owner VM in another PID namespace" do
    test "mix snakepit.shm.list and info show it alive (found by the kernel), never dead" do
      if unshare_available?(), do: owner_in_child_namespace()
    end

    test "seen from inside another namespace: in use, not visible, never dead" do
      if unshare_available?(), do: lister_in_child_namespace()
    end
  end

  test "a header written during another boot names a dead owner" do
    {:ok, id} = SHM.allocate_region(4096, backend: :posix)

    try do
      {:ok, header} = Native.inspect_path("/dev/shm/" <> id)
      context = Entry.context()
      other_boot = %{header | boot_id: :binary.copy(<<7>>, byte_size(header.boot_id))}
      entry = Entry.from_header(other_boot, context, %{path: nil, data_path: nil, open_by: []})
      assert %{alive: false, liveness: :other_boot} = entry.owner
      # Still in use (our lock): nothing to clean, whatever the header's boot says.
      assert entry.in_use and not entry.orphaned

      same = Entry.from_header(header, context, %{path: nil, data_path: nil, open_by: []})
      assert %{alive: true, liveness: :alive} = same.owner
    after
      :ok = SHM.deallocate_region(id)
    end
  end

  defp owner_in_child_namespace do
    port =
      Port.open({:spawn_executable, System.find_executable("unshare")}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: ["--pid", "--fork", "--mount-proc", "sh", "-c", vm_command()],
        env: [{~c"SNAKEPIT_SHM_VM_CODE", String.to_charlist(@vm_in_namespace)}],
        cd: ReliabilityHelpers.root()
      ])

    {:os_pid, unshare_pid} = Port.info(port, :os_pid)
    ids = :ets.new(:ids, [:set, :public])

    try do
      [vm_pid, posix, memfd, their_ns] = await_ready(port)
      :ets.insert(ids, {:posix, posix})
      {:ok, our_ns} = File.read_link("/proc/self/ns/pid")
      assert their_ns != our_ns, "the VM must run in another PID namespace"
      # Its header pid is 1: here, pid 1 is another process (started at another time).
      assert vm_pid == "1"
      {:ok, header} = Native.inspect_path("/dev/shm/" <> posix)
      assert header.creator_pid == 1

      {out, _err, _status} = run_task("snakepit.shm.list", [])
      posix_line = line(out, posix)
      memfd_line = line(out, memfd)
      assert posix_line && memfd_line, out

      for l <- [posix_line, memfd_line] do
        refute l =~ "dead", "a live owner shown dead: #{l}"
        refute l =~ "orphaned", l
        assert l =~ ~r/\b1 alive\b/, l
      end

      {out, _err, _status} = run_task("snakepit.shm.list", ["--format", "json"])
      by_id = Map.new(json!(out)["regions"], &{&1["id"], &1})

      for id <- [posix, memfd] do
        assert %{"alive" => true, "os_pid" => 1, "liveness" => "alive"} = by_id[id]["owner"]
        assert by_id[id]["orphaned"] == false
      end

      {out, _err, 0} = run_task("snakepit.shm.info", [posix])
      assert out =~ ~r/^Owner VM:\s+OS pid 1 .*alive/m
      refute out =~ "gone"
      refute out =~ "DEAD"

      {out, _err, _status} = run_task("snakepit.shm.list", ["--orphaned"])
      refute out =~ posix
      refute out =~ memfd

      # And cleanup keeps its hands off.
      assert HostScan.scan() |> Enum.filter(&(&1.id in [posix, memfd])) |> HostCleanup.plan() ==
               []

      Port.command(port, "\n")

      receive do
        {^port, {:exit_status, 0}} -> :ok
      after
        30_000 -> flunk("the VM in the namespace did not exit")
      end

      refute File.exists?("/dev/shm/" <> posix)
    after
      stop(port, unshare_pid, for({_, id} <- :ets.tab2list(ids), do: id))
    end
  end

  # Our VM owns a POSIX region; `mix snakepit.shm.list` runs in a new PID namespace,
  # where our pid is nobody (or somebody else).
  defp lister_in_child_namespace do
    {:ok, id} = SHM.allocate_region(4096, backend: :posix)

    try do
      script =
        "echo NS $(readlink /proc/self/ns/pid); " <>
          "echo SEES_US $(test -e /proc/#{System.pid()}/stat && echo true || echo false); " <>
          "exec mix snakepit.shm.list --format json"

      {out, _status} =
        System.cmd("unshare", ["--pid", "--fork", "--mount-proc", "sh", "-c", script],
          env: [{"MIX_ENV", "test"}, {"MIX_QUIET", "1"}],
          cd: ReliabilityHelpers.root(),
          stderr_to_stdout: false
        )

      [_, their_ns] = Regex.run(~r/NS (\S+)/, out)
      {:ok, our_ns} = File.read_link("/proc/self/ns/pid")
      assert their_ns != our_ns
      # Our pid means nothing there...
      assert out =~ "SEES_US false"
      [_, json] = Regex.run(~r/SEES_US false\n(.*)\z/s, out)
      entry = Enum.find(json!(json)["regions"], &(&1["id"] == id))
      assert entry, out
      me = String.to_integer(System.pid())
      # ... so there, the owner is in use (the kernel says its lock is held), not dead.
      assert %{"os_pid" => ^me, "liveness" => "in_use"} = entry["owner"]
      refute entry["owner"]["alive"] == false
      assert entry["in_use"] == true
      assert entry["orphaned"] == false
    after
      :ok = SHM.deallocate_region(id)
    end
  end

  defp await_ready(port, log \\ "") do
    receive do
      {^port, {:data, {:eol, "READY " <> rest}}} -> String.split(rest)
      {^port, {:data, {_, line}}} -> await_ready(port, log <> line <> "\n")
      {^port, {:exit_status, status}} -> flunk("the VM exited with #{status}:\n#{log}")
    after
      60_000 -> flunk("the VM did not get ready:\n#{log}")
    end
  end

  # Kills what is left of the namespace (its pid 1 takes every process of it along).
  defp stop(port, unshare_pid, ids) do
    children =
      case File.read("/proc/#{unshare_pid}/task/#{unshare_pid}/children") do
        {:ok, text} -> String.split(text)
        _ -> []
      end

    for pid <- children, do: System.cmd("kill", ["-9", pid], stderr_to_stdout: true)
    if Port.info(port), do: Port.close(port)

    # A killed VM leaves its POSIX segments: nobody holds them once it is gone.
    ShmHelpers.wait_until(
      fn -> not File.exists?("/proc/#{unshare_pid}") or children == [] end,
      10_000
    )

    for id <- ids, do: Native.sweep_segment(id, false)
    assert Enum.filter(ids, &File.exists?("/dev/shm/" <> &1)) == []
  end

  defp line(out, id), do: out |> String.split("\n") |> Enum.find(&String.starts_with?(&1, id))
end
