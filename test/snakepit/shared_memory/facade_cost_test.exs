Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.FacadeCostTest do
  # Issue 14, "a facade that costs little": the map/unmap fast path keeps every check,
  # the holder slot kept across the VM's 0 <-> 1 transitions, list_counts/1.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Mapping, Native, Registry, ShmHelpers, TestSupport}

  require Registry

  setup do: TestSupport.no_leaks()

  defp ref_of(id), do: Registry.region(Registry.lookup(id), :ref)

  describe "map_region/2 and unmap_region/1 fast path" do
    test "counts stay exact through many map/unmap pairs, also from many processes" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      ref = ref_of(id)

      for _ <- 1..2000 do
        {:ok, m} = SM.map_region(id, access_mode: :read_write)
        :ok = SM.unmap_region(m)
      end

      assert {_, 0} = Native.hold_counts(ref)
      assert {:ok, %{holders: []}} = Native.header(ref)

      parent = self()

      pids =
        for _ <- 1..8 do
          spawn_link(fn ->
            for _ <- 1..500 do
              {:ok, m} = SM.map_region(id)
              :ok = SM.unmap_region(m)
            end

            {:ok, held} = SM.map_region(id, access_mode: :read_only)
            send(parent, {:held, self()})
            receive do: (:stop -> SM.unmap_region(held))
          end)
        end

      for pid <- pids, do: assert_receive({:held, ^pid}, 30_000)
      assert {:ok, %{reference_count: 8, mapped_by: mapped_by}} = SM.get_region_info(id)
      assert Enum.sort(mapped_by) == Enum.sort(pids)
      assert {:ok, %{holders: [%{count: 8}]}} = Native.header(ref)
      for pid <- pids, do: send(pid, :stop)

      assert ShmHelpers.wait_until(fn ->
               match?({:ok, %{reference_count: 0, mapped_by: []}}, SM.get_region_info(id))
             end)
    end

    test "a process that dies holding mappings releases them (the slot is reused after)" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      test = self()

      pid =
        spawn(fn ->
          {:ok, _} = SM.map_region(id)
          {:ok, _} = SM.map_region(id, access_mode: :read_only)
          send(test, :mapped)
          Process.sleep(:infinity)
        end)

      assert_receive :mapped, 5_000
      assert {:ok, %{reference_count: 2}} = SM.get_region_info(id)
      Process.exit(pid, :kill)

      assert ShmHelpers.wait_until(fn ->
               match?({:ok, %{reference_count: 0, mapped_by: []}}, SM.get_region_info(id))
             end)

      {:ok, m} = SM.map_region(id)
      assert {:ok, %{reference_count: 1}} = SM.get_region_info(id)
      :ok = SM.unmap_region(m)
    end

    test "a :reference_counted region is still freed by its last unmap" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :reference_counted)
      {:ok, m1} = SM.map_region(id)
      {:ok, m2} = SM.map_region(id)
      assert %Mapping{cleanup_policy: :reference_counted} = m1
      :ok = SM.unmap_region(m1)
      assert {:ok, _} = SM.get_region_info(id)
      :ok = SM.unmap_region(m2)
      assert {:error, %{reason: :not_found}} = SM.get_region_info(id)
    end

    test "a mapping struct without the policy (made by an older version) still frees" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :reference_counted)
      {:ok, m} = SM.map_region(id)
      :ok = SM.unmap_region(%{m | cleanup_policy: nil})
      assert {:error, %{reason: :not_found}} = SM.get_region_info(id)
    end

    test "bad options, unknown regions and double unmaps still give clear errors" do
      {:ok, id} = SM.allocate_region(64)
      assert {:error, %{reason: :invalid_option}} = SM.map_region(id, access_mode: :write)
      assert {:error, %{reason: :invalid_option}} = SM.map_region(id, colour: :red)
      assert {:error, %{reason: :not_found}} = SM.map_region("spshm_nope")
      assert {:error, %{reason: :invalid_argument}} = SM.map_region(42)
      {:ok, m} = SM.map_region(id, access_mode: :read_only)
      assert {:error, %{reason: :permission_denied}} = SM.write(m, 0, "x")
      :ok = SM.unmap_region(m)
      assert {:error, %{reason: :closed}} = SM.unmap_region(m)
    end

    test "a caller is monitored once per process, and again after a table owner restart" do
      {:ok, id} = SM.allocate_region(64, cleanup_policy: :manual)
      {:ok, m} = SM.map_region(id)
      assert :ets.member(Registry.callers_table(), self())
      # A forgotten row (as after a restart of the tables) is written again only when
      # the incarnation changed: simulate one.
      :ets.delete(Registry.callers_table(), self())
      Registry.new_incarnation()
      {:ok, m2} = SM.map_region(id)
      assert :ets.member(Registry.callers_table(), self())
      :ok = SM.unmap_region(m)
      :ok = SM.unmap_region(m2)
    end

    test "the application stopped: :unavailable, not :not_found" do
      {:ok, id} = SM.allocate_region(64, cleanup_policy: :manual)
      {:ok, m} = SM.map_region(id)

      :ok = Application.stop(:snakepit_shm)

      try do
        assert {:error, %{reason: :unavailable}} = SM.map_region(id)
        assert {:error, %{reason: :unavailable}} = SM.unmap_region(m)
      after
        {:ok, _} = Application.ensure_all_started(:snakepit_shm)
      end
    end
  end

  describe "Native.list_counts/1" do
    test "holds and access times of many regions in one call; bad arguments are badarg" do
      {:ok, a} = SM.allocate_region(64, cleanup_policy: :manual)
      {:ok, b} = SM.allocate_region(64, cleanup_policy: :manual)
      {:ok, m} = SM.map_region(b)
      [{0, ta}, {1, tb}] = Native.list_counts([ref_of(a), ref_of(b)])
      assert ta > 0 and tb >= ta
      assert [] = Native.list_counts([])
      assert_raise ArgumentError, fn -> Native.list_counts(:nope) end
      assert_raise ArgumentError, fn -> Native.list_counts([ref_of(a), m.ref]) end
      assert_raise ArgumentError, fn -> Native.list_counts(List.duplicate(ref_of(a), 4097)) end
      assert length(Native.list_counts(List.duplicate(ref_of(a), 4096))) == 4096
      :ok = SM.unmap_region(m)
    end

    test "list_regions/1 agrees with get_region_info/1 on counts and times" do
      ids = for _ <- 1..5, do: elem(SM.allocate_region(64, cleanup_policy: :manual), 1)
      {:ok, _} = SM.map_region(Enum.at(ids, 2))
      {:ok, listed} = SM.list_regions()
      listed = Enum.filter(listed, &(&1.id in ids))
      assert Enum.map(listed, & &1.id) == ids

      for info <- listed do
        {:ok, single} = SM.get_region_info(info.id)
        assert info.reference_count == single.reference_count
        assert Snakepit.SharedMemory.Info.to_datetimes(info).created_at == single.created_at
      end

      assert Enum.map(listed, & &1.reference_count) == [0, 0, 1, 0, 0]
    end
  end
end
