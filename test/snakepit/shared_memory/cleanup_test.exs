Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.CleanupTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Cleanup, Error, Manager, Native, Quota, Registry, Sweep}
  alias Snakepit.SharedMemory.{ShmHelpers, TestSupport}

  @kib 1024

  setup do: TestSupport.no_leaks()

  defp gone?(id), do: Registry.lookup(id) == nil

  defp wait_gone(id),
    do: assert(ShmHelpers.wait_until(fn -> gone?(id) end, 3_000), "#{id} not freed")

  defp spawn_sleeper, do: spawn(fn -> Process.sleep(:infinity) end)

  # A process that maps `id` and waits for :unmap (then unmaps) or death.
  defp spawn_mapper(id) do
    parent = self()

    pid =
      spawn(fn ->
        {:ok, m} = SM.map_region(id)
        send(parent, {:mapped, self()})

        receive do
          :unmap -> send(parent, {:unmapped, SM.unmap_region(m)})
        end
      end)

    assert_receive {:mapped, ^pid}
    pid
  end

  describe "owner_down/2 (policies on owner death)" do
    test ":automatic frees when the owner dies, even while others map it" do
      owner = spawn_sleeper()
      {:ok, id} = SM.allocate_region(@kib, owner: owner)
      _mapper = spawn_mapper(id)
      Process.exit(owner, :kill)
      wait_gone(id)
      assert {:ok, stats} = SM.stats()
      assert stats.events.owner_down >= 1
    end

    test ":manual survives its owner" do
      owner = spawn_sleeper()
      {:ok, id} = SM.allocate_region(@kib, owner: owner, cleanup_policy: :manual)
      Process.exit(owner, :kill)
      TestSupport.await_death(owner)
      Manager.sync()
      refute gone?(id)
      assert :ok = SM.deallocate_region(id)
    end

    test ":reference_counted survives a held owner death and goes with the last hold" do
      owner = spawn_sleeper()
      {:ok, id} = SM.allocate_region(@kib, owner: owner, cleanup_policy: :reference_counted)
      mapper = spawn_mapper(id)
      Process.exit(owner, :kill)
      TestSupport.await_death(owner)
      Manager.sync()
      refute gone?(id)
      send(mapper, :unmap)
      assert_receive {:unmapped, :ok}
      wait_gone(id)
    end

    test ":reference_counted with nothing holding it goes with its owner" do
      owner = spawn_sleeper()
      {:ok, id} = SM.allocate_region(@kib, owner: owner, cleanup_policy: :reference_counted)
      Process.exit(owner, :kill)
      wait_gone(id)
    end

    # The caller is the owner (the default): no monitor per region, the manager's
    # monitor of the caller applies the policies (Allocator's watch_owner/3).
    test "the policies apply when the calling owner itself dies, arena and dedicated" do
      parent = self()

      owner =
        spawn(fn ->
          {:ok, small} = SM.allocate_region(@kib)
          {:ok, big} = SM.allocate_region(256 * @kib)
          {:ok, manual} = SM.allocate_region(@kib, cleanup_policy: :manual)
          {:ok, counted} = SM.allocate_region(@kib, cleanup_policy: :reference_counted)
          send(parent, {:ids, [small, big], manual, counted})
          Process.sleep(:infinity)
        end)

      assert_receive {:ids, automatic, manual, counted}
      assert Quota.owned(owner) == 4
      Process.exit(owner, :kill)
      Enum.each([counted | automatic], &wait_gone/1)
      TestSupport.await_death(owner)
      Manager.sync()
      refute gone?(manual)
      assert :ok = SM.deallocate_region(manual)
      assert {:ok, stats} = SM.stats()
      assert stats.events.owner_down >= 3
    end

    test "a stale notice (another owner) changes nothing" do
      {:ok, id} = SM.allocate_region(@kib)
      assert Cleanup.owner_down(id, spawn_sleeper()) == []
      refute gone?(id)
    end
  end

  describe "caller_down/1 (reference counts)" do
    test ":reference_counted is not freed before its first hold, then with the last" do
      {:ok, id} = SM.allocate_region(@kib, cleanup_policy: :reference_counted)
      Manager.sync()
      refute gone?(id)
      a = spawn_mapper(id)
      b = spawn_mapper(id)
      assert {:ok, %{reference_count: 2}} = SM.get_region_info(id)
      send(a, :unmap)
      assert_receive {:unmapped, :ok}
      refute gone?(id)
      # The last holder dies without unmapping: its mapping is released for it.
      Process.exit(b, :kill)
      wait_gone(id)
    end

    test "unmap of the last hold frees at once, in the caller" do
      {:ok, id} = SM.allocate_region(@kib, cleanup_policy: :reference_counted)
      {:ok, m} = SM.map_region(id)
      :ok = SM.unmap_region(m)
      assert gone?(id)
      {:ok, stats} = SM.stats()
      assert stats.events.unreferenced >= 1
    end
  end

  describe "callers killed mid-operation need no repair" do
    test "a caller that died holding a quota charge gives it back, with no manager" do
      parent = self()

      TestSupport.with_manager_suspended(fn ->
        pid =
          spawn(fn ->
            Snakepit.SharedMemory.Registry.register_caller()
            {:ok, _charge} = Quota.reserve(self(), 4096, Snakepit.SharedMemory.Config.get())
            send(parent, :reserved)
            Process.sleep(:infinity)
          end)

        assert_receive :reserved
        assert Quota.totals().regions == 1
        Process.exit(pid, :kill)
        assert ShmHelpers.wait_until(fn -> Quota.totals() == %{regions: 0, bytes: 0} end)
        assert Quota.owned(pid) == 0
      end)
    end

    test "a POSIX segment created for the allocator and dropped unregistered loses its name" do
      opts = ShmHelpers.create_opts(%{backend: :posix}) |> Map.put(:drop_name, true)
      # Without drop_name (tools, tests) a dropped region keeps its name.
      {:ok, kept, kept_info} = Native.create(12_345, ShmHelpers.create_opts(%{backend: :posix}))
      dropped = Native.names_dropped()
      # What a dirty create returns to a caller that was killed meanwhile: a resource
      # nobody references; its destructor hands the name to the reaper thread.
      id =
        Task.async(fn ->
          {:ok, _region, info} = Native.create(12_345, opts)
          info.id
        end)
        |> Task.await()

      assert ShmHelpers.wait_until(fn -> not File.exists?("/dev/shm/#{id}") end)
      # Counted once, reported by the manager's periodic cleanup as :leaked.
      assert Native.names_dropped() == dropped + 1
      :ok = Manager.sync()
      {:ok, stats} = SM.stats()
      assert stats.events.leaked >= 1
      assert File.exists?("/dev/shm/#{kept_info.id}")

      # A named creation dropped unregistered while another open holds it (another VM or
      # a worker opened the name meanwhile): the name stays (no split brain), for the
      # sweeps to judge once nobody holds it.
      named = Map.merge(opts, %{name: "kill_held_#{System.unique_integer([:positive])}"})
      dropped_before = Native.names_dropped()

      parent = self()

      creator =
        spawn(fn ->
          {:ok, _region, info} = Native.create(4096, named)
          send(parent, {:created, info.id})
          Process.sleep(:infinity)
        end)

      assert_receive {:created, named_id}
      {:ok, other, _} = Native.open(named_id, true)
      Process.exit(creator, :kill)
      assert ShmHelpers.wait_until(fn -> Native.names_dropped() > dropped_before end)
      Process.sleep(300)
      assert File.exists?("/dev/shm/#{named_id}")
      :ok = Native.unlink_segment(named_id)
      _ = other

      # keep_name(true) (registered) keeps it; keep_name(false) (a free began) drops it.
      {:ok, held, info} = Native.create(100, opts)
      :ok = Native.keep_name(held, true)
      :ok = Native.keep_name(held, false)
      assert File.exists?("/dev/shm/#{info.id}")
      assert :ok = Native.deallocate(held, false)
      assert :ok = Native.deallocate(kept, false)
    end
  end

  describe "due/1 (expiry and vanished segments)" do
    test "a held region does not expire" do
      {:ok, id} = SM.allocate_region(@kib, timeout: 50, cleanup_policy: :manual)
      {:ok, m} = SM.map_region(id)
      Process.sleep(300)
      refute gone?(id)
      :ok = SM.unmap_region(m)
      wait_gone(id)
    end

    test "idle regions expire under every policy; access keeps them alive" do
      {:ok, idle} = SM.allocate_region(@kib, timeout: 150, cleanup_policy: :manual)
      {:ok, busy} = SM.allocate_region(@kib, timeout: 150, cleanup_policy: :manual)

      # Accessed often, never held between accesses: alive by its accesses only.
      for _ <- 1..6 do
        Process.sleep(50)
        {:ok, m} = SM.map_region(busy)
        {:ok, _} = SM.read(m, 0, 1)
        :ok = SM.unmap_region(m)
      end

      assert gone?(idle)
      refute gone?(busy)
      {:ok, stats} = SM.stats()
      assert stats.events.expired >= 1
    end

    test "regions registered while a sweep runs are never taken for vanished" do
      parent = self()

      allocator =
        spawn_link(fn ->
          for _ <- 1..300,
              do: {:ok, _} = SM.allocate_region(64, backend: :posix, cleanup_policy: :manual)

          send(parent, :allocated)
        end)

      vanished = Stream.repeatedly(fn -> Cleanup.due() end) |> Enum.take(200) |> List.flatten()
      assert_receive :allocated, 30_000
      refute Process.alive?(allocator)
      assert for({id, :vanished} <- vanished, do: id) == []
    end

    test "a POSIX segment removed behind our back is freed as :vanished" do
      {:ok, id} = SM.allocate_region(@kib, backend: :posix, cleanup_policy: :manual)
      {:ok, mapping} = SM.map_region(id)
      assert Cleanup.due() == []
      File.rm!("/dev/shm/#{id}")
      # The periodic cleanup (100 ms in tests) may free it before this due/0 runs: the
      # reason the mapping reports says who freed it either way.
      assert {id, :vanished} in Cleanup.due() or gone?(id)
      wait_gone(id)

      assert {:error, %Error{reason: :deallocated, details: %{freed_because: :vanished}}} =
               SM.read(mapping, 0, 1)
    end
  end

  describe "sweep_orphans/1" do
    @tag timeout: 120_000
    test "segments of a VM killed with SIGKILL are swept" do
      ebin = Path.join(:code.lib_dir(:snakepit_shm), "ebin")

      script = """
      {:ok, _} = Application.ensure_all_started(:snakepit_shm)
      ids = for _ <- 1..50 do
        {:ok, id} = Snakepit.SharedMemory.allocate_region(4096, backend: :posix)
        id
      end
      IO.puts("READY " <> System.pid() <> " " <> Enum.join(ids, ","))
      Process.sleep(:infinity)
      """

      port =
        Port.open({:spawn_executable, System.find_executable("elixir")}, [
          :binary,
          :exit_status,
          {:line, 65_536},
          args: ["-pa", ebin, "-e", script]
        ])

      {os_pid, ids} =
        receive do
          {^port, {:data, {:eol, "READY " <> rest}}} ->
            [os_pid, ids] = String.split(rest, " ")
            {os_pid, String.split(ids, ",")}

          {^port, {:exit_status, status}} ->
            flunk("the second VM exited with #{status}")
        after
          60_000 ->
            {:os_pid, pid} = Port.info(port, :os_pid)
            System.cmd("kill", ["-9", Integer.to_string(pid)])
            flunk("the second VM did not get ready")
        end

      on_exit(fn -> System.cmd("kill", ["-9", os_pid], stderr_to_stdout: true) end)
      assert length(ids) == 50
      assert Enum.all?(ids, &File.exists?("/dev/shm/#{&1}"))
      {:ok, dry} = SM.cleanup_regions(dry_run: true)
      assert Enum.filter(dry, &(&1.region_id in ids)) == []

      System.cmd("kill", ["-9", os_pid])
      assert_receive {^port, {:exit_status, _}}, 10_000

      # (Other VMs' orphans may be found too on a shared machine: look at ours.)
      mine = fn entries -> Enum.sort(for %{region_id: id} <- entries, id in ids, do: id) end
      dry = Sweep.sweep_orphans(dry_run: true)
      assert mine.(dry) == Enum.sort(ids)
      assert Enum.all?(dry, &(&1.reason == :orphan))
      assert Enum.all?(ids, &File.exists?("/dev/shm/#{&1}"))

      # (This VM's manager, or another VM's sweep on a shared machine, may take some of
      # them first: every one must be gone, and this sweep removed no other of ours.)
      swept = Sweep.sweep_orphans()
      assert mine.(swept) -- ids == []
      refute Enum.any?(ids, &File.exists?("/dev/shm/#{&1}"))
      {:ok, stats} = SM.stats()
      assert stats.events.orphans >= length(mine.(swept))
    end

    test "segments of live VMs (this one) are left alone" do
      {:ok, id} = SM.allocate_region(@kib, backend: :posix)
      assert Sweep.sweep_orphans() == []
      assert File.exists?("/dev/shm/#{id}")
    end
  end

  describe "adopt_own_segments/0" do
    test "re-registers unregistered POSIX segments created by this VM as :manual" do
      opts =
        ShmHelpers.create_opts(%{backend: :posix, metadata: ~s({"a":1}), idle_timeout_ms: 60_000})

      {:ok, region, info} = Native.create(300, opts)
      assert info.id in Sweep.adopt_own_segments()
      {:ok, adopted} = SM.get_region_info(info.id)
      assert %{adopted: true, owner: nil, cleanup_policy: :manual, size: 300} = adopted
      assert %{metadata: %{"a" => 1}, timeout: 60_000} = adopted
      # The adopted region is counted at once (a charge taken whatever the limits).
      assert Quota.totals() == %{regions: 1, bytes: 300}
      :ok = SM.deallocate_region(info.id)
      _ = region
    end
  end

  describe "check_owners/0" do
    test "applies policies to regions whose owner died unnoticed" do
      owner = spawn_sleeper()
      {:ok, id} = SM.allocate_region(@kib, owner: owner)
      # Simulate a lost notice: kill the owner while the manager is suspended.
      TestSupport.with_manager_suspended(fn ->
        Process.exit(owner, :kill)
        TestSupport.await_death(owner)
        assert [%{region_id: ^id, reason: :owner_down}] = Cleanup.check_owners()
      end)

      assert gone?(id)
    end
  end
end
