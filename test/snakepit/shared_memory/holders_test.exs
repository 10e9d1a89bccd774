Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.HoldersTest do
  # OS holders: real Python workers (priv/python, Debian's /usr/bin/python3) attach
  # regions; the manager discovers them by scanning headers and watches them by pidfd.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Holders, Manager, Native, Registry}
  alias Snakepit.SharedMemory.{ShmHelpers, TestSupport}

  require Registry

  setup do: TestSupport.no_leaks()

  defp os_holders(id) do
    {:ok, info} = SM.get_region_info(id)
    for %{os_pid: pid} <- info.mapped_by, do: pid
  end

  describe "scan/1 and exited/3" do
    # Was a known bug: Native.hold_counts/1, called by the periodic cleanup and health
    # checks, also reaps dead holder slots, and when it got there before
    # Holders.release_everywhere/1 the release was not counted. The NIF now counts every
    # reaped hold (Native.reaped_holds/0), whoever reaps it.
    test "a worker killed with SIGKILL has its hold released and frees a refcounted region" do
      {:ok, before} = SM.stats()
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :reference_counted)
      {:ok, ref} = SM.export_ref(id)
      {port, os_pid} = TestSupport.python_holder(ref)
      assert ShmHelpers.wait_until(fn -> os_holders(id) == [os_pid] end)
      assert {:ok, %{reference_count: 1}} = SM.get_region_info(id)
      # Let the scan arm the pidfd watch, then kill.
      Manager.sync()
      TestSupport.kill9(os_pid)
      assert_receive {^port, {:exit_status, _}}, 5_000
      assert ShmHelpers.wait_until(fn -> Registry.lookup(id) == nil end, 5_000)
      {:ok, stats} = SM.stats()
      assert stats.events.os_holders_released - before.events.os_holders_released >= 1
    end

    test "a dead worker's hold is counted as released whoever reaps it (hold_counts/1 first)" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      {:ok, ref} = SM.export_ref(id)
      [record] = :ets.lookup(Registry.regions_table(), id)
      region_ref = Registry.region(record, :ref)
      {:ok, before} = SM.stats()

      TestSupport.with_manager_suspended(fn ->
        {port, os_pid} = TestSupport.python_holder(ref)
        TestSupport.kill9(os_pid)
        assert_receive {^port, {:exit_status, _}}, 5_000
        # What a periodic check does: hold_counts/1 reaps the dead slot, before the
        # manager (suspended) could run release_everywhere/1.
        assert {_generation, 0} = Native.hold_counts(region_ref)
        {:ok, stats} = SM.stats()
        assert stats.events.os_holders_released - before.events.os_holders_released >= 1
        # Reaped once, counted once.
        assert {:ok, 0} = Native.reap_holders(region_ref)
      end)

      {:ok, stats} = SM.stats()
      assert stats.events.os_holders_released - before.events.os_holders_released >= 1
      :ok = SM.deallocate_region(id)
    end

    test "a killed worker's hold on a manual region is released, the region stays" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual, backend: :posix)
      {:ok, ref} = SM.export_ref(id)
      {port, os_pid} = TestSupport.python_holder(ref, "rw")
      assert ShmHelpers.wait_until(fn -> os_holders(id) == [os_pid] end)
      Manager.sync()
      TestSupport.kill9(os_pid)
      assert_receive {^port, {:exit_status, _}}, 5_000

      assert ShmHelpers.wait_until(fn ->
               match?({:ok, %{reference_count: 0, mapped_by: []}}, SM.get_region_info(id))
             end)
    end

    test "a holder that died before it was ever watched is released when found" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :reference_counted)
      {:ok, ref} = SM.export_ref(id)

      TestSupport.with_manager_suspended(fn ->
        {port, os_pid} = TestSupport.python_holder(ref)
        TestSupport.kill9(os_pid)
        assert_receive {^port, {:exit_status, _}}, 5_000
        # No manager needed: the dead worker's slot lock is gone, so its hold no longer
        # counts the moment anyone reads the count (the kernel vouches, not a PID).
        assert {:ok, %{reference_count: 0}} = SM.get_region_info(id)
      end)

      assert ShmHelpers.wait_until(fn -> Registry.lookup(id) == nil end, 3_000)
    end

    test "changed/2 ignores this VM's own holds" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      [record] = :ets.lookup(Registry.regions_table(), id)
      ref = Registry.region(record, :ref)
      {:ok, _mapping} = SM.map_region(id)
      assert Holders.changed(Holders.new(), ref).watches == %{}
    end
  end

  describe "new/0" do
    test "knows this VM's OS pid (whose holds are BEAM mappings, not OS holders)" do
      assert Holders.new().self_os_pid == String.to_integer(System.pid())
    end
  end
end
