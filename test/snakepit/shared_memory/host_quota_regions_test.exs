Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.HostQuota.RegionsTest do
  # The manager's use of a host quota (config :host_quota) in this VM: every way a
  # region ends gives its reservation back. Two VMs sharing one budget:
  # host_quota_processes_test.exs.
  use ExUnit.Case, async: false

  import Bitwise

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.{Error, Manager, TestSupport}
  alias Snakepit.SharedMemory.HostQuota, as: HQ
  alias Snakepit.SharedMemory.HostQuota.Regions

  @quota "hq_regions_test"

  setup do
    dir =
      Path.join(
        System.tmp_dir!(),
        "spshm_hqr_#{System.pid()}_#{System.unique_integer([:positive])}"
      )

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

  # Returns as soon as fun holds; the deadline is for a loaded machine.
  defp eventually(fun, deadline \\ System.monotonic_time(:millisecond) + 30_000) do
    cond do
      fun.() -> true
      System.monotonic_time(:millisecond) > deadline -> false
      true -> Process.sleep(10) && eventually(fun, deadline)
    end
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

  test "redeclare re-declares regions that lost their reservation (a restarted client)",
       %{client: c} do
    {:ok, a} = SHM.allocate_region(10_000)
    # A region whose reservation is gone (as after a restart of the client).
    [{^a, res}] = :ets.lookup(Regions, a)
    :ok = HQ.release(res)
    :ets.delete(Regions, a)
    assert used(c) == 0

    Regions.redeclare(Snakepit.SharedMemory.Registry.all())
    assert used(c) == 10_000
    assert [{^a, _}] = :ets.lookup(Regions, a)
    :ok = SHM.deallocate_region(a)
    assert used(c) == 0
  end

  test "a caller killed mid-allocation gives its host reservation back, with no manager",
       %{client: c} do
    parent = self()

    TestSupport.with_manager_suspended(fn ->
      # What the allocator holds between the host reservation and the registry insert.
      pid =
        spawn(fn ->
          {:ok, charge} =
            Snakepit.SharedMemory.Quota.reserve(nil, 7_000, Snakepit.SharedMemory.Config.get())

          {:ok, host} = Regions.reserve(7_000, charge)
          send(parent, {:reserved, host})
          Process.sleep(:infinity)
        end)

      assert_receive {:reserved, host}
      assert host != nil
      assert used(c) == 7_000
      Process.exit(pid, :kill)
      assert eventually(fn -> used(c) == 0 end)
    end)
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

  test "host_quota_wait: a caller killed while waiting leaves the line and holds nothing",
       %{client: c} do
    {:ok, a} = SHM.allocate_region(80_000)
    # Far longer than the checks below: the line must empty because the caller died.
    Application.put_env(:snakepit_shm, :host_quota_wait, 600_000)
    {:ok, _} = Snakepit.SharedMemory.Config.load()
    caller = spawn(fn -> SHM.allocate_region(50_000) end)

    assert eventually(fn -> match?({:ok, [%{waiters: [_]}]}, HQ.usage(@quota, client: c)) end)
    Process.exit(caller, :kill)
    # Its request leaves the line at once, and nothing is granted to nobody later.
    assert eventually(fn -> match?({:ok, [%{waiters: []}]}, HQ.usage(@quota, client: c)) end)
    :ok = SHM.deallocate_region(a)
    Process.sleep(100)
    assert used(c) == 0
    assert Enum.filter(HQ.held(client: c), &(&1.name == @quota)) == []
  after
    Application.delete_env(:snakepit_shm, :host_quota_wait)
    {:ok, _} = Snakepit.SharedMemory.Config.load()
  end

  test "a quota directory this VM cannot use does not stop the application from starting;
        allocations say why until it is fixed",
       %{client: c} do
    bad =
      Path.join(
        System.tmp_dir!(),
        "spshm_hqr_bad_#{System.pid()}_#{System.unique_integer([:positive])}"
      )

    File.mkdir!(bad)
    File.chmod!(bad, 0o755)
    on_exit(fn -> File.rm_rf!(bad) end)
    # The application's client, as the application starts it: left out, not a crash.
    :ok = stop_supervised(Snakepit.SharedMemory.HostQuota.Client)
    Process.exit(c, :kill)
    config = Snakepit.SharedMemory.Config.get() |> Map.put(:host_quota_dir, bad)
    [spec] = Regions.children(config)
    assert {:ok, :undefined} = start_supervised(spec)
    Application.put_env(:snakepit_shm, :host_quota_dir, bad)
    {:ok, _} = Snakepit.SharedMemory.Config.load()

    assert {:error, %Error{reason: :permission_denied, message: m}} = SHM.allocate_region(1_000)
    assert m =~ "group/other permissions"
    assert {:error, %Error{reason: :permission_denied}} = HQ.usage(@quota)

    # Fixed: the next allocation starts the manager's client (with its table).
    File.chmod!(bad, 0o700)
    {:ok, a} = SHM.allocate_region(1_000)
    client = Process.whereis(Snakepit.SharedMemory.HostQuota.Client)

    on_exit(fn ->
      # A child of HQ.Supervisor: terminated there, else it would be restarted.
      _ = DynamicSupervisor.terminate_child(HQ.Supervisor, client)

      for {_, pid, _, _} <- DynamicSupervisor.which_children(HQ.Supervisor), is_pid(pid) do
        if :sys.get_state(pid, 1_000)[:dir] == bad,
          do: DynamicSupervisor.terminate_child(HQ.Supervisor, pid)
      end
    end)

    assert used(client) == 1_000
    :ok = SHM.deallocate_region(a)
    assert used(client) == 0
  after
    Application.delete_env(:snakepit_shm, :host_quota_dir)
    {:ok, _} = Snakepit.SharedMemory.Config.load()
  end

  test "a Python worker started by this VM finds the VM's configured quota directory " <>
         "(no SNAKEPIT_SHM_QUOTA_DIR)",
       %{client: c} do
    {:ok, %{dir: dir}} = HQ.info(client: c)
    assert System.get_env("SNAKEPIT_SHM_VM_QUOTA_DIR") == dir

    script = ~S"""
    import sys, snakepit_shm
    print(snakepit_shm.quota.default_dir())
    with snakepit_shm.HostQuota.connect(timeout=10.0) as q:
        print(q.usage(sys.argv[1])[0]["limit"])
    """

    {out, 0} =
      System.cmd("/usr/bin/python3", ["-c", script, @quota],
        env: [
          {"SNAKEPIT_SHM_QUOTA_DIR", nil},
          {"PYTHONPATH", Path.expand("../../../priv/python", __DIR__)}
        ],
        stderr_to_stdout: true
      )

    assert String.split(out, "\n", trim: true) == [dir, "100000"]
  end

  test "config validation" do
    assert {:error, m} = Snakepit.SharedMemory.Config.validate(host_quota: "bad name")
    assert m =~ "host_quota"
    assert {:error, _} = Snakepit.SharedMemory.Config.validate(host_quota_limit: -1)
    assert {:error, _} = Snakepit.SharedMemory.Config.validate(host_quota_wait: :soon)
    # The wire carries a limit in 64 bits and a wait in 32: 2^64 was defined as a limit
    # of 0 (wrapped), and a wait of 2^32 ms made every allocation fail on :wait.
    assert {:error, m} = Snakepit.SharedMemory.Config.validate(host_quota_limit: 1 <<< 64)
    assert m =~ "host_quota_limit"
    assert {:ok, _} = Snakepit.SharedMemory.Config.validate(host_quota_limit: (1 <<< 64) - 1)
    assert {:error, m} = Snakepit.SharedMemory.Config.validate(host_quota_wait: 1 <<< 32)
    assert m =~ "host_quota_wait"
    assert {:ok, _} = Snakepit.SharedMemory.Config.validate(host_quota_wait: 0xFFFF_FFFE)
    assert {:error, _} = Snakepit.SharedMemory.Config.validate(host_quota_dir: "")

    assert {:ok, %{host_quota: nil, host_quota_wait: 0}} =
             Snakepit.SharedMemory.Config.validate([])
  end
end
