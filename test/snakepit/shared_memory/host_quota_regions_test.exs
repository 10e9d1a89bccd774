Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.HostQuota.RegionsTest do
  # The manager's use of a host quota (config :host_quota) in this VM: every way a
  # region ends gives its reservation back. Two VMs sharing one budget:
  # host_quota_processes_test.exs.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.{Error, Manager, TestSupport}
  alias Snakepit.SharedMemory.HostQuota, as: HQ
  alias Snakepit.SharedMemory.HostQuota.Regions

  @quota "hq_regions_test"

  setup do
    dir = Path.join(System.tmp_dir!(), "spshm_hqr_#{System.unique_integer([:positive])}")
    old = Application.get_all_env(:snakepit_shm)
    Application.put_env(:snakepit_shm, :host_quota, @quota)
    Application.put_env(:snakepit_shm, :host_quota_limit, 100_000)
    {:ok, _} = Snakepit.SharedMemory.Config.load()

    [spec] = Regions.children(Snakepit.SharedMemory.Config.get() |> Map.put(:host_quota_dir, dir))
    client = start_supervised!(spec)

    on_exit(fn ->
      TestSupport.free_everything()
      for k <- [:host_quota, :host_quota_limit], do: Application.delete_env(:snakepit_shm, k)
      for {k, v} <- old, do: Application.put_env(:snakepit_shm, k, v)
      {:ok, _} = Snakepit.SharedMemory.Config.load()

      for {_, pid, _, _} <- DynamicSupervisor.which_children(HQ.Supervisor), is_pid(pid) do
        case :sys.get_state(pid, 1_000) do
          %{dir: ^dir, listen: _} -> Process.exit(pid, :kill)
          _ -> :ok
        end
      end

      File.rm_rf!(dir)
    end)

    %{client: client}
  end

  defp used(client) do
    case HQ.usage(@quota, client: client) do
      {:ok, [q]} -> q.used
      {:ok, []} -> 0
    end
  end

  defp eventually(fun) do
    Enum.any?(1..500, fn _ -> fun.() || (Process.sleep(10) && false) end)
  end

  test "allocate reserves, deallocate releases, the limit refuses", %{client: c} do
    {:ok, a} = SHM.allocate_region(60_000)
    assert used(c) == 60_000

    assert {:error, %Error{reason: :quota_exceeded, message: m}} = SHM.allocate_region(50_000)
    assert m =~ "60000 of 100000 used"
    # The refused allocation left nothing behind in this VM's own counters.
    assert SHM.list_regions() |> elem(1) |> length() == 1

    :ok = SHM.deallocate_region(a)
    assert used(c) == 0
    {:ok, b} = SHM.allocate_region(90_000)
    assert used(c) == 90_000
    :ok = SHM.deallocate_region(b)
  end

  test "owner death, expiry and cleanup_regions release too", %{client: c} do
    owner = spawn(fn -> Process.sleep(:infinity) end)
    {:ok, _} = SHM.allocate_region(10_000, owner: owner)
    {:ok, _} = SHM.allocate_region(20_000, timeout: 50)
    {:ok, _} = SHM.allocate_region(30_000, cleanup_policy: :manual)
    assert used(c) == 60_000

    Process.exit(owner, :kill)
    assert eventually(fn -> used(c) == 50_000 end)
    # Expiry is found by the periodic cleanup; sync runs it now.
    Process.sleep(60)
    Manager.sync()
    assert eventually(fn -> used(c) == 30_000 end)
    # orphans: false: other suites on this host may have orphans of their own to look at.
    {:ok, _} = SHM.cleanup_regions(all: true, orphans: false)
    assert used(c) == 0
  end

  test "the manager's recount releases reservations no region holds and re-declares
        regions that lost theirs",
       %{client: c} do
    {:ok, a} = SHM.allocate_region(10_000)
    # A caller killed between its reservation and its region: a reservation of nobody.
    {:ok, _stray} = HQ.reserve(@quota, 5_000, owner: nil)
    # A region whose reservation is gone (as after a restart of the client).
    [{^a, res}] = :ets.lookup(Regions, a)
    :ok = HQ.release(res)
    :ets.delete(Regions, a)
    assert used(c) == 5_000

    Regions.recount(Snakepit.SharedMemory.Registry.all())
    assert used(c) == 10_000
    assert [{^a, _}] = :ets.lookup(Regions, a)
    :ok = SHM.deallocate_region(a)
    assert used(c) == 0
  end

  test "host_quota_wait: an allocation waits in line for a deallocation", %{client: c} do
    {:ok, a} = SHM.allocate_region(80_000)
    Application.put_env(:snakepit_shm, :host_quota_wait, 5_000)
    {:ok, _} = Snakepit.SharedMemory.Config.load()
    test = self()
    spawn(fn -> send(test, {:allocated, SHM.allocate_region(50_000, owner: test)}) end)

    assert eventually(fn -> match?({:ok, [%{waiters: [_]}]}, HQ.usage(@quota, client: c)) end)
    refute_received {:allocated, _}
    :ok = SHM.deallocate_region(a)
    assert_receive {:allocated, {:ok, _b}}, 5_000
    assert used(c) == 50_000
  after
    Application.delete_env(:snakepit_shm, :host_quota_wait)
    {:ok, _} = Snakepit.SharedMemory.Config.load()
  end

  test "config validation" do
    assert {:error, m} = Snakepit.SharedMemory.Config.validate(host_quota: "bad name")
    assert m =~ "host_quota"
    assert {:error, _} = Snakepit.SharedMemory.Config.validate(host_quota_limit: -1)
    assert {:error, _} = Snakepit.SharedMemory.Config.validate(host_quota_wait: :soon)
    assert {:error, _} = Snakepit.SharedMemory.Config.validate(host_quota_dir: "")

    assert {:ok, %{host_quota: nil, host_quota_wait: 0}} =
             Snakepit.SharedMemory.Config.validate([])
  end
end
