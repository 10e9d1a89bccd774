Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.CleanupTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Cleanup, Manager, Native, Quota, Registry, Sweep}
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
