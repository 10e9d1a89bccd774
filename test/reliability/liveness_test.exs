defmodule Snakepit.SharedMemory.Reliability.LivenessTest do
  # Issue #12: liveness the kernel vouches for. Each test here reproduces one failure seen
  # on 78bae8e (docs/RELIABILITY.md, "Liveness") and fails there:
  #
  #   1. a VM in another PID namespace sweeping at start-up deleted our live regions;
  #   2. split brain on a named region (VM1 killed, VM2 still using it, VM3 starting);
  #   3. operator cleanup removed a region still being created (slow fallocate), `list`
  #      showed a header's id for a file of another name;
  #   4. a FIFO planted by another user hung opens (and deallocate on a normal scheduler);
  #   5. holder slots stuck busy or counted forever after a worker was killed mid-update;
  #   8. a manager crash loop took the application down.
  #
  # Everything runs for real: other VMs (the `elixir` launcher, `unshare` for a PID
  # namespace), Python workers killed with SIGKILL at a parked instant
  # (SNAKEPIT_SHM_TEST_PARK, c_src/core/park.hpp), FIFOs made by uid 65534 (setpriv).
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Error, Manager, Native, ReliabilityHelpers, ShmHelpers, Sweep}
  alias Snakepit.SharedMemory.CLI.{HostCleanup, HostScan}

  @moduletag :reliability
  @moduletag timeout: 300_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    ReliabilityHelpers.check_segments_on_exit()
    :ok
  end

  defp root?, do: match?({"0\n", 0}, System.cmd("id", ["-u"]))

  defp shm(id), do: "/dev/shm/" <> id

  defp inode(id) do
    case File.lstat(shm(id)) do
      {:ok, %File.Stat{inode: inode}} -> inode
      _ -> nil
    end
  end

  # ---- 1 ----

  describe "1. another PID namespace" do
    test "a VM in another PID namespace sweeping at start-up leaves our live regions alone" do
      case System.cmd("unshare", ["--pid", "--fork", "--mount-proc", "true"],
             stderr_to_stdout: true
           ) do
        {_, 0} ->
          pid_namespace_sweep()

        {out, _} ->
          IO.puts("skipped: cannot create a PID namespace here (#{String.trim(out)})")
      end
    end
  end

  defp pid_namespace_sweep do
    {:ok, unnamed} = SM.allocate_region(65_536, backend: :posix, cleanup_policy: :manual)
    name = ShmHelpers.unique_name("ns")
    {:ok, named} = SM.allocate_region(4096, name: name, cleanup_policy: :manual)
    {:ok, m} = SM.map_region(unnamed)
    :ok = SM.write(m, 0, "alive in namespace A")

    code = """
    IO.puts("NS " <> to_string(:file.read_link_all(~c"/proc/self/ns/pid") |> elem(1)))
    IO.puts("SEES_A " <> to_string(File.exists?("/proc/#{System.pid()}/stat")))
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    IO.puts("SWEPT")
    """

    {out, status} =
      System.cmd(
        "unshare",
        ["--pid", "--fork", "--mount-proc", "sh", "-c", ReliabilityHelpers.elixir_command()],
        env: [{"SNAKEPIT_SHM_VM_CODE", code}],
        stderr_to_stdout: true,
        cd: ReliabilityHelpers.root()
      )

    assert status == 0, out
    assert out =~ "SWEPT"
    {:ok, ours} = :file.read_link_all(~c"/proc/self/ns/pid")
    [_, theirs] = Regex.run(~r/NS (\S+)/, out)
    assert theirs != to_string(ours), "the second VM must run in another PID namespace"
    # Our pid means nothing there: 78bae8e took our regions for orphans.
    assert out =~ "SEES_A false"

    assert File.exists?(shm(unnamed)) and File.exists?(shm(named))
    assert {:ok, "alive in namespace A"} = SM.read(m, 0, 20)
    {:ok, m2} = SM.map_region(named)
    :ok = SM.unmap_region(m2)
    :ok = SM.unmap_region(m)
    :ok = SM.deallocate_region(unnamed)
    :ok = SM.deallocate_region(named)
  end

  # ---- 2 ----

  @vm1 """
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  name = System.get_env("SPLIT_NAME")
  {:ok, id} = Snakepit.SharedMemory.allocate_region(65_536, name: name, open_mode: :create_or_open, cleanup_policy: :manual)
  {:ok, m} = Snakepit.SharedMemory.map_region(id)
  :ok = Snakepit.SharedMemory.write(m, 0, "written by vm1")
  IO.puts("READY " <> System.pid())
  Process.sleep(:infinity)
  """

  @vm3 """
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  name = System.get_env("SPLIT_NAME")
  {:ok, id} = Snakepit.SharedMemory.allocate_region(65_536, name: name, open_mode: :create_or_open)
  {:ok, info} = Snakepit.SharedMemory.get_region_info(id)
  {:ok, m} = Snakepit.SharedMemory.map_region(id)
  {:ok, data} = Snakepit.SharedMemory.read(m, 0, 14)
  IO.puts("ROLE " <> to_string(info.role))
  IO.puts("READ " <> data)
  """

  describe "2. split brain on named regions" do
    test "VM1 killed while VM2 uses its named region: VM3's sweep and create_or_open share it" do
      name = ShmHelpers.unique_name("split")
      id = "spshm_n_" <> name

      vm1 =
        Port.open({:spawn_executable, "/bin/sh"}, [
          :binary,
          :exit_status,
          :stderr_to_stdout,
          {:line, 4096},
          args: ["-c", ReliabilityHelpers.elixir_command()],
          env: [
            {~c"SNAKEPIT_SHM_VM_CODE", String.to_charlist(@vm1)},
            {~c"SPLIT_NAME", String.to_charlist(name)}
          ]
        ])

      vm1_pid = ReliabilityHelpers.await_line(vm1, "READY ", 60_000) |> String.to_integer()

      try do
        # VM2 (this VM) opens it and uses it.
        {:ok, ^id} = SM.allocate_region(65_536, name: name, open_mode: :create_or_open)
        {:ok, m} = SM.map_region(id)
        assert {:ok, "written by vm1"} = SM.read(m, 0, 14)
        before = inode(id)

        ReliabilityHelpers.kill9(vm1_pid)
        assert_receive {^vm1, {:exit_status, _}}, 10_000
        # This VM's open holds the liveness lock: in use for everybody.
        assert {:ok, %{in_use: true}} = Native.inspect_path(shm(id)),
               File.read!("/proc/locks") <> inspect(inode(id))

        {out, 0} = ReliabilityHelpers.elixir_vm(@vm3, env: [{"SPLIT_NAME", name}])
        # 78bae8e: VM3's sweep unlinked the name and create_or_open made a new, empty one.
        assert out =~ "ROLE opened", out
        assert out =~ "READ written by vm1", out
        assert inode(id) == before
        :ok = SM.write(m, 0, "still shared!!")
        assert {:ok, "still shared!!"} = SM.read(m, 0, 14)
        :ok = SM.unmap_region(m)
        :ok = SM.deallocate_region(id)
      after
        if Port.info(vm1) != nil, do: Port.close(vm1)
        # This VM only opened it: the name is nobody's now.
        Native.unlink_segment(id)
      end
    end
  end

  # ---- 3 ----

  describe "3. cleanup during a slow creation" do
    test "a header-less segment whose creator is still sizing it is never removed" do
      size = 200_000 + :rand.uniform(100_000)

      # Another VM creates it and is parked between O_EXCL and fallocate (the hook reads
      # the environment the VM started with).
      code = """
      {:ok, _} = Application.ensure_all_started(:snakepit_shm)
      IO.puts("PID " <> System.pid())
      {:ok, id} = Snakepit.SharedMemory.allocate_region(#{size}, backend: :posix)
      {:ok, m} = Snakepit.SharedMemory.map_region(id)
      :ok = Snakepit.SharedMemory.write(m, #{size - 4}, "done")
      {:ok, "done"} = Snakepit.SharedMemory.read(m, #{size - 4}, 4)
      :ok = Snakepit.SharedMemory.deallocate_region(id)
      IO.puts("CREATED " <> id)
      """

      vm =
        Port.open({:spawn_executable, "/bin/sh"}, [
          :binary,
          :exit_status,
          :stderr_to_stdout,
          {:line, 4096},
          args: ["-c", ReliabilityHelpers.elixir_command()],
          env: [
            {~c"SNAKEPIT_SHM_VM_CODE", String.to_charlist(code)},
            {~c"SNAKEPIT_SHM_TEST_PARK", String.to_charlist("create_#{size}=8000")}
          ]
        ])

      try do
        # The NIF writes to stderr directly, the VM's IO.puts goes through its group
        # leader: the two lines may come in either order.
        lines =
          ReliabilityHelpers.await_lines(vm, ["PID ", "snakepit_shm: parked at create_"], 60_000)

        vm_pid = lines["PID "]

        # The segment that VM has open and that is still empty.
        [id] =
          for link <- Path.wildcard("/proc/#{vm_pid}/fd/*"),
              {:ok, target} <- [:file.read_link(link)],
              target = List.to_string(target),
              String.starts_with?(target, "/dev/shm/spshm_"),
              id = String.replace_prefix(target, "/dev/shm/", ""),
              match?({:ok, %File.Stat{size: 0}}, File.lstat(shm(id))),
              uniq: true,
              do: id

        assert Sweep.sweep_orphans() |> Enum.filter(&(&1.region_id == id)) == []
        assert {:ok, :in_use} = Native.sweep_segment(id, false)
        # As if fallocate had been running for an hour (78bae8e went by the mtime alone).
        # Aged only now, and looked at at once: on a shared host, an older version's
        # cleanup running meanwhile would take it for dead, as 78bae8e did.
        File.touch!(shm(id), System.os_time(:second) - 3600)
        entries = Enum.filter(HostScan.scan(), &(&1.id == id))
        actions = entries |> HostCleanup.plan() |> HostCleanup.apply_plan()
        assert actions == [], inspect(actions)
        assert File.exists?(shm(id))

        # The creation completes and the region works (78bae8e: RegionNotFound).
        assert ReliabilityHelpers.await_line(vm, "CREATED ", 60_000) == id
        assert_receive {^vm, {:exit_status, 0}}, 30_000
      after
        if Port.info(vm) != nil, do: Port.close(vm)
      end
    end

    test "list names a segment by its file name, and cleanup reports only what it removed" do
      {:ok, id} = SM.allocate_region(4096, backend: :posix)
      copy = "spshm_" <> String.duplicate("q", 20)
      File.cp!(shm(id), shm(copy))

      try do
        [entry] = Enum.filter(HostScan.scan(), &(&1.id == copy))
        assert entry.status == :corrupt
        assert entry.problem =~ "holds the header of #{id}"
        # Not ours to judge: refused, never removed.
        assert [%{action: :refuse}] = HostCleanup.plan([entry])

        # An orphan someone starts using between plan and apply is kept, and not counted.
        {:ok, orphan, _} = Native.create(4096, ShmHelpers.create_opts(%{backend: :posix}))
        orphan_id = Native.info(orphan).id
        orphan = nil
        _ = orphan
        :erlang.garbage_collect()

        assert ShmHelpers.wait_until(fn ->
                 match?([%{in_use: false}], Enum.filter(HostScan.scan(), &(&1.id == orphan_id)))
               end)

        planned = HostScan.scan() |> Enum.filter(&(&1.id == orphan_id)) |> HostCleanup.plan()
        assert [%{action: :remove}] = planned
        {:ok, user, _} = Native.open(orphan_id, false)
        assert [%{result: :skipped}] = HostCleanup.apply_plan(planned)
        assert File.exists?(shm(orphan_id))
        :ok = Native.deallocate(user, false) |> then(fn _ -> :ok end)
        Native.unlink_segment(orphan_id)
      after
        File.rm(shm(copy))
        SM.deallocate_region(id)
      end
    end
  end

  # ---- 4 ----

  describe "4. FIFOs planted by another user" do
    setup do
      cond do
        not root?() ->
          IO.puts("skipped: planting a FIFO as another user needs root (setpriv)")
          {:ok, skip: true}

        System.find_executable("setpriv") == nil ->
          IO.puts("skipped: setpriv (util-linux) is not installed")
          {:ok, skip: true}

        true ->
          {:ok, skip: false}
      end
    end

    defp plant_fifo(path) do
      {_, 0} =
        System.cmd("setpriv", [
          "--reuid=65534",
          "--regid=65534",
          "--clear-groups",
          "mkfifo",
          "-m",
          "666",
          path
        ])

      {:ok, %File.Stat{uid: 65_534, type: :other}} = File.lstat(path)
      path
    end

    test "opens of a name that is a FIFO fail at once, ten at a time", %{skip: skip} do
      unless skip do
        names = for i <- 1..10, do: ShmHelpers.unique_name("fifo#{i}")
        paths = for name <- names, do: plant_fifo(shm("spshm_n_" <> name))

        try do
          for mode <- [:remove_and_create, :create_or_open, :open_only] do
            tasks =
              for name <- names,
                  do: Task.async(fn -> SM.allocate_region(4096, name: name, open_mode: mode) end)

            for t <- tasks do
              assert {:ok, {:error, %Error{reason: reason}}} =
                       Task.yield(t, 10_000) ||
                         Task.shutdown(t),
                     "#{mode} on a FIFO must fail, not hang"

              assert reason in [:not_ours, :already_exists]
            end
          end

          # The dirty schedulers are free: file I/O and allocation still work.
          assert {:ok, _} = File.read("/proc/self/stat")
          {:ok, id} = SM.allocate_region(4096, backend: :posix)
          :ok = SM.deallocate_region(id)
          # Sweeps refuse them at once, and leave them in place.
          for name <- names,
              do:
                assert(
                  {:error, {:not_ours, _, _}} = Native.sweep_segment("spshm_n_" <> name, false)
                )

          assert Enum.all?(paths, &File.exists?/1)
        after
          Enum.each(paths, &File.rm/1)
        end
      end
    end

    test "deallocating a region whose name was replaced by a FIFO returns at once",
         %{skip: skip} do
      unless skip do
        {:ok, id} = SM.allocate_region(4096, backend: :posix)
        # The FIFO replaces the segment in one rename(2): the name never goes missing,
        # so the periodic cleanup (every 100 ms in tests) cannot take the region for a
        # vanished one and free it first (1 CI run in ~20 did, between an rm and mkfifo).
        tmp = plant_fifo(shm(id) <> ".fifo")
        File.rename!(tmp, shm(id))
        path = shm(id)

        try do
          t = Task.async(fn -> SM.deallocate_region(id) end)
          assert {:ok, :ok} = Task.yield(t, 10_000) || Task.shutdown(t)
          # Not ours: left in place.
          assert {:ok, %File.Stat{type: :other}} = File.lstat(path)
        after
          File.rm(path)
        end
      end
    end
  end

  # ---- 5 ----

  @attach """
  import json, sys, warnings
  warnings.simplefilter("ignore")
  import snakepit_shm
  region = snakepit_shm.attach(json.loads(sys.argv[1]), sys.argv[2])
  print("ATTACHED", flush=True)
  if sys.argv[3] == "close":
      region.close()
      print("CLOSED", flush=True)
      sys.exit(0)
  sys.stdin.read()
  """

  defp python_parked(ref, mode, point, action) do
    {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)

    port =
      Port.open({:spawn_executable, ShmHelpers.python()}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 4096},
        args: ["-c", @attach, json, mode, action],
        env: [
          {~c"SNAKEPIT_SHM_TEST_PARK", String.to_charlist("#{point}=60000")}
          | ReliabilityHelpers.python_env()
        ]
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    expected = "snakepit_shm: parked at " <> point
    assert_receive {^port, {:data, {:eol, ^expected}}}, 20_000
    ReliabilityHelpers.kill9(os_pid)
    assert_receive {^port, {:exit_status, _}}, 10_000
  end

  describe "5. holder slots recover from any death" do
    test "workers killed between claiming a slot and making it live block nothing" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual, backend: :posix)
      {:ok, ref} = SM.export_ref(id)
      for _ <- 1..3, do: python_parked(ref, "rw", "claim", "stay")

      # 78bae8e: seal answered :busy for good (a dead writer's busy slot).
      assert {:ok, %{reference_count: 0}} = SM.get_region_info(id)
      assert :ok = SM.seal(id)
      {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)
      {out, 0} = ReliabilityHelpers.python(@attach, [json, "r", "close"])
      assert out =~ "ATTACHED" and out =~ "CLOSED"
      :ok = SM.deallocate_region(id)
    end

    test "a worker killed inside the release of its last hold leaves no count behind" do
      parent = self()

      owner =
        spawn(fn ->
          {:ok, id} = SM.allocate_region(4096, cleanup_policy: :reference_counted)
          send(parent, {:id, id})
          Process.sleep(:infinity)
        end)

      assert_receive {:id, id}, 5_000
      {:ok, ref} = SM.export_ref(id)
      python_parked(ref, "r", "release", "close")
      Process.exit(owner, :kill)
      # 78bae8e: refcount stayed 1, so a :reference_counted region with a dead owner
      # was never freed.
      assert ShmHelpers.wait_until(fn -> SM.get_region_info(id) |> elem(0) == :error end, 5_000)
    end
  end

  # ---- 7 ----

  # Mappings of `id`'s data in this VM: [{path, bytes}] from /proc/self/maps.
  defp data_mappings(id) do
    for line <- String.split(File.read!("/proc/self/maps"), "\n"),
        String.contains?(line, id),
        [range | _] = String.split(line),
        [from, to] = String.split(range, "-"),
        bytes = String.to_integer(to, 16) - String.to_integer(from, 16),
        # The 4 KiB header of a POSIX region stays mapped (holds are released there).
        bytes > 4096,
        do: bytes
  end

  describe "7. deallocation releases memory at once" do
    # Without the warm pool (which keeps freed memfd data mapped for reuse by design,
    # WarmPoolTest): the memory goes back at once, and each region's data memfd is
    # named after it.
    setup do
      :ok = Snakepit.SharedMemory.WarmPool.set_budget(0)

      on_exit(fn ->
        Snakepit.SharedMemory.WarmPool.set_budget(Snakepit.SharedMemory.WarmPool.default_budget())
      end)
    end

    for backend <- [:memfd, :posix] do
      test "a #{backend} region's data is unmapped by deallocate_region/1, not at the next GC" do
        {:ok, id} = SM.allocate_region(16 * 1024 * 1024, backend: unquote(backend))
        {:ok, m} = SM.map_region(id)
        :ok = SM.write(m, 0, "x")
        assert data_mappings(id) != []
        # `m` (and with it the region resource) stays referenced by this process: 78bae8e
        # kept the memory mapped until this process garbage collected.
        :ok = SM.deallocate_region(id)
        # Unmapped by the NIF's reaper thread (16 MiB is large), right away.
        assert ShmHelpers.wait_until(fn -> data_mappings(id) == [] end, 5_000)
        assert {:error, %Error{reason: reason}} = SM.read(m, 0, 1)
        assert reason in [:deallocated, :closed]
        _ = m
      end
    end

    test "a sealed region read zero-copy keeps its data mapped for the binaries" do
      {:ok, id} = SM.allocate_region(2 * 1024 * 1024, backend: :memfd)
      {:ok, m} = SM.map_region(id)
      :ok = SM.write(m, 0, "kept")
      :ok = SM.seal(id)
      {:ok, bin} = SM.read(m, 0, 4)
      :ok = SM.deallocate_region(id)
      assert data_mappings(id) != []
      assert bin == "kept"
    end
  end

  # ---- 8 ----

  describe "8. a manager crash loop" do
    test "killing the manager every 100 ms under load never takes the application down" do
      sup = Process.whereis(Snakepit.SharedMemory.Supervisor)
      owner = Process.whereis(Snakepit.SharedMemory.TableOwner)
      before = ShmHelpers.our_segments()
      deadline = System.monotonic_time(:millisecond) + 3_000

      killer =
        Task.async(fn ->
          Stream.repeatedly(fn ->
            if pid = Process.whereis(Manager), do: Process.exit(pid, :kill)
            Process.sleep(100)
          end)
          |> Enum.find(fn _ -> System.monotonic_time(:millisecond) > deadline end)
        end)

      workers =
        for i <- 1..6 do
          Task.async(fn -> churn(i, deadline, %{ok: 0, errors: %{}, raised: []}) end)
        end

      Task.await(killer, 30_000)
      results = Enum.map(workers, &Task.await(&1, 60_000))
      assert Enum.flat_map(results, & &1.raised) == []
      assert Enum.sum(Enum.map(results, & &1.ok)) > 0
      assert Process.whereis(Snakepit.SharedMemory.Supervisor) == sup
      assert Process.whereis(Snakepit.SharedMemory.TableOwner) == owner
      assert ShmHelpers.wait_until(fn -> Process.whereis(Manager) != nil end, 5_000)
      :ok = Manager.sync()
      # No segment left behind by the loop (every worker freed what it made).
      assert ShmHelpers.wait_until(
               fn -> ReliabilityHelpers.own_segments(before) == [] end,
               10_000
             ),
             inspect(ReliabilityHelpers.own_segments(before))
    end
  end

  defp churn(i, deadline, acc) do
    if System.monotonic_time(:millisecond) > deadline do
      acc
    else
      acc =
        try do
          backend = if rem(i, 2) == 0, do: :posix, else: :memfd

          with {:ok, id} <- SM.allocate_region(8192, backend: backend),
               {:ok, m} <- SM.map_region(id),
               :ok <- SM.write(m, 0, "x"),
               {:ok, "x"} <- SM.read(m, 0, 1),
               :ok <- SM.unmap_region(m),
               :ok <- SM.deallocate_region(id) do
            %{acc | ok: acc.ok + 1}
          else
            {:error, %Error{reason: reason}} ->
              %{acc | errors: Map.update(acc.errors, reason, 1, &(&1 + 1))}

            other ->
              %{acc | raised: [{:unexpected, other} | acc.raised]}
          end
        rescue
          e -> %{acc | raised: [e | acc.raised]}
        catch
          kind, reason -> %{acc | raised: [{kind, reason} | acc.raised]}
        end

      churn(i, deadline, acc)
    end
  end
end
