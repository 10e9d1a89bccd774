Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.QuotaTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{Config, Error, Native, Quota, Registry}
  alias Snakepit.SharedMemory.{ShmHelpers, TestSupport}
  alias Snakepit.SharedMemory, as: SHM
  require Registry

  setup do
    on_exit(fn -> TestSupport.free_everything() end)
    :ok
  end

  defp config(overrides), do: Map.merge(Config.get(), Map.new(overrides))

  describe "reserve/3 and release/1" do
    test "adds, checks, and takes nothing on refusal" do
      base = Quota.totals()
      owner = spawn(fn -> Process.sleep(:infinity) end)

      cfg =
        config(
          max_regions: base.regions + 2,
          max_total_memory: :infinity,
          max_regions_per_process: 1
        )

      assert {:ok, a} = Quota.reserve(owner, 10, cfg)
      assert {:error, %Error{reason: :process_limit_exceeded}} = Quota.reserve(owner, 10, cfg)
      assert {:ok, b} = Quota.reserve(nil, 10, cfg)
      assert {:error, %Error{reason: :region_limit_exceeded}} = Quota.reserve(nil, 10, cfg)
      assert Quota.totals() == %{regions: base.regions + 2, bytes: base.bytes + 20}
      assert Quota.owned(owner) == 1
      Quota.release(a)
      Quota.release(b)
      assert Quota.totals() == base
      assert Quota.owned(owner) == 0
      # Released once: later releases (and the destructor) give nothing back again.
      assert Native.quota_release(a) == false
      Quota.release(a)
      assert Quota.totals() == base
      # The row of a live owner stays (deleting it could split a racing reservation's
      # count); a dead owner's row that counts nothing goes.
      Quota.forget_owner(owner)
      assert :ets.member(Registry.owners_table(), owner)
      Process.exit(owner, :kill)
      Quota.forget_owner(owner)
      refute :ets.member(Registry.owners_table(), owner)
    end

    test "limits of 2^63 and beyond are valid settings and limit nothing" do
      # Found by an attack run: config max_total_memory: 2 ** 70 (or any of the three
      # limits at 2^63 or more) was accepted at start, then every allocate_region/2 raised
      # ArgumentError (the native counters take 64-bit signed limits).
      for key <- [:max_regions, :max_total_memory, :max_regions_per_process],
          value <- [2 ** 63, 2 ** 64, 2 ** 70] do
        TestSupport.with_config([{key, value}], fn ->
          assert {:ok, charge} = Quota.reserve(self(), 4096, Config.get())
          Quota.release(charge)
          assert {:ok, id} = SHM.allocate_region(4096)
          assert :ok = SHM.deallocate_region(id)
        end)
      end
    end

    test "memory limit" do
      cfg = config(max_total_memory: Quota.totals().bytes + 100)

      assert {:error, %Error{reason: :memory_limit_exceeded, details: %{total: total}}} =
               Quota.reserve(nil, 101, cfg)

      assert total == Quota.totals().bytes
      assert {:ok, charge} = Quota.reserve(nil, 100, cfg)
      Quota.release(charge)
    end

    test "resize changes the bytes a charge holds; force ignores the limits" do
      base = Quota.totals()
      {:ok, charge} = Quota.reserve(nil, 0, config([]))
      :ok = Quota.resize(charge, 4096)
      assert Quota.totals() == %{regions: base.regions + 1, bytes: base.bytes + 4096}
      Quota.release(charge)

      forced = Quota.force(nil, 7)
      assert Quota.totals() == %{regions: base.regions + 1, bytes: base.bytes + 7}
      Quota.release(forced)
      assert Quota.totals() == base
    end
  end

  describe "a charge nobody released" do
    test "gives itself back when the last reference dies with its process's heap" do
      base = Quota.totals()
      parent = self()
      owner = self()

      pid =
        spawn(fn ->
          {:ok, _charge} = Quota.reserve(owner, 1000, config([]))
          send(parent, :reserved)
          Process.sleep(:infinity)
        end)

      assert_receive :reserved
      assert Quota.totals() == %{regions: base.regions + 1, bytes: base.bytes + 1000}
      ref = Process.monitor(pid)
      Process.exit(pid, :kill)
      assert_receive {:DOWN, ^ref, :process, ^pid, :killed}
      # ERTS may run the destructor a moment after the DOWN: no manager involved.
      assert ShmHelpers.wait_until(fn -> Quota.totals() == base end)
      assert Quota.owned(owner) == 0
    end

    test "readers of the registry never hold a region's charge" do
      {:ok, id} = Snakepit.SharedMemory.allocate_region(100)
      assert Registry.region(Registry.lookup(id), :quota) == nil
      assert Enum.all?(Registry.all(), &(Registry.region(&1, :quota) == nil))
      assert Enum.all?(Registry.owned_by(self()), &(Registry.region(&1, :quota) == nil))
      assert [record] = :ets.lookup(Registry.regions_table(), id)
      assert Registry.region(record, :quota) != nil
    end
  end
end
