Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.QuotaTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{Config, Error, Quota, Registry}
  alias Snakepit.SharedMemory.TestSupport

  setup do
    on_exit(fn -> TestSupport.free_everything() end)
    :ok
  end

  defp config(overrides), do: Map.merge(Config.get(), Map.new(overrides))

  describe "reserve/3 and release/2" do
    test "adds, checks, and rolls back on refusal" do
      base = Quota.totals()
      owner = spawn(fn -> Process.sleep(:infinity) end)

      cfg =
        config(
          max_regions: base.regions + 2,
          max_total_memory: :infinity,
          max_regions_per_process: 1
        )

      assert :ok = Quota.reserve(owner, 10, cfg)
      assert {:error, %Error{reason: :process_limit_exceeded}} = Quota.reserve(owner, 10, cfg)
      assert :ok = Quota.reserve(nil, 10, cfg)
      assert {:error, %Error{reason: :region_limit_exceeded}} = Quota.reserve(nil, 10, cfg)
      assert Quota.totals() == %{regions: base.regions + 2, bytes: base.bytes + 20}
      assert Quota.owned(owner) == 1
      Quota.release(owner, 10)
      Quota.release(nil, 10)
      assert Quota.totals() == base
      assert Quota.owned(owner) == 0
      refute :ets.member(Registry.owners_table(), owner)
    end

    test "memory limit" do
      cfg = config(max_total_memory: Quota.totals().bytes + 100)
      assert {:error, %Error{reason: :memory_limit_exceeded}} = Quota.reserve(nil, 101, cfg)
      assert :ok = Quota.reserve(nil, 100, cfg)
      Quota.release(nil, 100)
    end
  end

  describe "recount/1" do
    test "sets the counters to what records hold" do
      {:ok, _} = Snakepit.SharedMemory.allocate_region(1000)
      {:ok, _} = Snakepit.SharedMemory.allocate_region(24)
      :atomics.put(:persistent_term.get({Quota, :atomics}), 1, 99)
      assert Quota.recount(Registry.all()) == %{regions: 2, bytes: 1024}
      assert Quota.totals() == %{regions: 2, bytes: 1024}
      assert Quota.owned(self()) == 2
    end
  end
end
