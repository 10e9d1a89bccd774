Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.ManagerTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Manager, Quota, Registry, TableOwner}
  alias Snakepit.SharedMemory.{ShmHelpers, TestSupport}

  setup do
    before = TestSupport.vm_segments()

    on_exit(fn ->
      ensure_started()
      TestSupport.free_everything()
      TestSupport.assert_nothing_live(before)
    end)

    :ok
  end

  defp ensure_started do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    assert ShmHelpers.wait_until(fn -> Process.whereis(Manager) != nil end)
    Manager.sync()
  end

  # Kills `name` and waits for its supervisor to start a new one.
  defp kill_and_await_restart(name) do
    old = Process.whereis(name)
    Process.exit(old, :kill)

    assert ShmHelpers.wait_until(fn ->
             (pid = Process.whereis(name)) != nil and pid != old
           end)

    Manager.sync()
  end

  defp pattern(i), do: :binary.copy(<<i::32>>, 256)

  # Runs allocate/map/write/read/unmap/deallocate cycles until told to stop.
  defp load_worker(parent) do
    spawn_link(fn -> cycle(parent, 1) end)
  end

  defp cycle(parent, i) do
    receive do
      :stop -> send(parent, {:done, self(), i - 1})
    after
      0 ->
        {:ok, id} =
          SM.allocate_region(4096 + rem(i, 7), backend: Enum.at([:memfd, :posix], rem(i, 2)))

        {:ok, m} = SM.map_region(id)
        :ok = SM.write(m, 0, pattern(i))
        {:ok, data} = SM.read(m, 0, 1024)
        ^data = pattern(i)
        :ok = SM.unmap_region(m)
        :ok = SM.deallocate_region(id)
        cycle(parent, i + 1)
    end
  end

  describe "crash safety" do
    @tag timeout: 120_000
    test "killing the manager under load loses nothing" do
      owner = spawn(fn -> Process.sleep(:infinity) end)

      kept =
        for i <- 1..20 do
          backend = if rem(i, 2) == 0, do: :posix, else: :memfd
          policy = Enum.at([:manual, :automatic, :reference_counted], rem(i, 3))
          {:ok, id} = SM.allocate_region(1024, backend: backend, cleanup_policy: policy)
          {:ok, m} = SM.map_region(id)
          :ok = SM.write(m, 0, pattern(i))
          {id, i, m}
        end

      {:ok, watched} = SM.allocate_region(1024, owner: owner)
      parent = self()
      workers = for _ <- 1..8, do: load_worker(parent)

      for _ <- 1..4 do
        Process.sleep(40)
        kill_and_await_restart(Manager)
      end

      for w <- workers, do: send(w, :stop)
      cycles = for w <- workers, do: assert_receive({:done, ^w, n}, 60_000) && n
      assert Enum.sum(cycles) > 100

      for {id, i, m} <- kept do
        assert {:ok, %{reference_count: 1}} = SM.get_region_info(id)
        assert {:ok, data} = SM.read(m, 0, 1024)
        assert data == pattern(i)
      end

      assert Registry.count() == 21
      assert Quota.totals() == %{regions: 21, bytes: 21 * 1024}

      # Owner deaths are still seen by the restarted manager.
      Process.exit(owner, :kill)
      assert ShmHelpers.wait_until(fn -> Registry.lookup(watched) == nil end)

      # And so are deaths that happened while no manager was running.
      owner2 = spawn(fn -> Process.sleep(:infinity) end)
      {:ok, orphaned} = SM.allocate_region(1024, owner: owner2)
      manager = Process.whereis(Manager)
      :ok = Supervisor.terminate_child(Snakepit.SharedMemory.ManagerSupervisor, Manager)
      refute Process.alive?(manager)
      Process.exit(owner2, :kill)
      TestSupport.await_death(owner2)
      {:ok, _} = Supervisor.restart_child(Snakepit.SharedMemory.ManagerSupervisor, Manager)
      Manager.sync()
      assert Registry.lookup(orphaned) == nil
    end

    test "after a table owner crash, POSIX regions of this VM are re-adopted" do
      {:ok, posix} = SM.allocate_region(2048, backend: :posix, metadata: %{tag: "kept"})
      {:ok, m} = SM.map_region(posix)
      :ok = SM.write(m, 0, "survives")
      {:ok, _memfd} = SM.allocate_region(2048, backend: :memfd)

      kill_and_await_restart(TableOwner)
      assert ShmHelpers.wait_until(fn -> Process.whereis(Manager) != nil end)
      Manager.sync()

      assert Registry.ids() == [posix]
      {:ok, info} = SM.get_region_info(posix)
      assert %{adopted: true, cleanup_policy: :manual, owner: nil} = info
      assert info.metadata == %{"tag" => "kept"}
      assert Quota.totals() == %{regions: 1, bytes: 2048}
      {:ok, m2} = SM.map_region(posix)
      assert {:ok, "survives"} = SM.read(m2, 0, 8)
      # The old mapping handle still works on its own (it keeps its resource).
      assert {:ok, "survives"} = SM.read(m, 0, 8)
    end

    test "a normal application stop frees every region" do
      {:ok, posix} = SM.allocate_region(1024, backend: :posix, cleanup_policy: :manual)
      assert File.exists?("/dev/shm/#{posix}")
      :ok = Application.stop(:snakepit_shm)
      refute File.exists?("/dev/shm/#{posix}")
      assert {:error, %{reason: :unavailable}} = SM.allocate_region(10)
      ensure_started()
      assert Registry.count() == 0
    end
  end

  describe "sync/0 and cleanup/1" do
    test "unknown notices are ignored" do
      manager = Process.whereis(Manager)
      send(manager, {:snakepit_shm_owner_down, "spshm_unknownxxxxxxxxxxxxx", self()})
      send(manager, :something_else)
      assert :ok = Manager.sync()
      assert Process.whereis(Manager) == manager
    end
  end
end
