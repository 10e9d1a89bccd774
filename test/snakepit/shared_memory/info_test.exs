Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.InfoTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Info, Registry, TestSupport}

  require Registry

  setup do
    on_exit(fn -> TestSupport.free_everything() end)
    :ok
  end

  describe "utc_from_us/2" do
    test "equals DateTime.from_unix!/2" do
      samples = [0, 1, 86_399_999_999, 951_782_400_000_000, 4_102_444_800_000_000]

      for us <- samples ++ Enum.map(1..500, fn _ -> :rand.uniform(253_402_300_799_999_999) end) do
        assert Info.utc_from_us(us, 6) == DateTime.from_unix!(us, :microsecond)
      end

      assert Info.utc_from_us(1_500_000, 3) == DateTime.from_unix!(1500, :millisecond)
    end
  end

  describe "describe/1 and describe_all/1" do
    test "agree, and count BEAM and OS holds apart" do
      {:ok, a} = SM.allocate_region(100)
      {:ok, b} = SM.allocate_region(100, security_level: :high)
      {:ok, _} = SM.map_region(a)
      {:ok, _} = SM.map_region(a)
      records = Enum.map([a, b], &Registry.lookup/1)
      singles = Enum.map(records, &Info.describe/1)
      all = Info.describe_all(records)

      strip = fn info -> Map.drop(info, [:last_accessed]) end
      assert Enum.map(all, &strip.(Info.to_datetimes(&1))) == Enum.map(singles, strip)
      # list_regions/1's times are integers (µs since the Unix epoch), get_region_info's
      # DateTimes of the same instants.
      for {listed, single} <- Enum.zip(all, singles) do
        assert is_integer(listed.created_at)
        assert Info.to_unix_us(single.created_at) == listed.created_at
        assert listed.last_accessed == nil or is_integer(listed.last_accessed)
      end

      [ia, ib] = all
      assert %{mapped_by: [pid], reference_count: 2, encrypted: false} = ia
      assert pid == self()
      assert %{mapped_by: [], reference_count: 0, encrypted: true} = ib
    end
  end

  describe "select/1" do
    test "oldest first; filters" do
      ids = for _ <- 1..5, do: elem(SM.allocate_region(10), 1)
      assert Enum.map(Info.select(%{}), &Registry.region(&1, :id)) == ids
      assert Info.select(%{sealed: true}) == []
      :ok = SM.seal(hd(ids))
      assert [record] = Info.select(%{sealed: true})
      assert Registry.region(record, :id) == hd(ids)
    end
  end

  describe "list/1 (list_regions/1)" do
    # From 1 000 regions the list is built in a helper process with a heap sized for it:
    # the same descriptions, in the same order, as building it in the caller.
    test "with many regions: the helper's list equals the caller's, oldest first, filtered" do
      other = spawn(fn -> Process.sleep(:infinity) end)
      mine = for _ <- 1..1_020, do: elem(SM.allocate_region(64), 1)
      theirs = for _ <- 1..5, do: elem(SM.allocate_region(64, owner: other), 1)
      {:ok, _m} = SM.map_region(hd(mine))

      {:ok, listed} = SM.list_regions()
      ids = mine ++ theirs
      assert Enum.map(listed, & &1.id) |> Enum.filter(&(&1 in ids)) == ids
      assert listed == Info.describe_all(Info.select(%{}))
      assert [%{mapped_by: [pid]} | _] = listed |> Enum.filter(&(&1.id == hd(mine)))
      assert pid == self()

      {:ok, owned} = SM.list_regions(owner: other)
      assert Enum.map(owned, & &1.id) == theirs
      Process.exit(other, :kill)
    end
  end

  describe "Registry.mappings_of/1" do
    test "the rows of one region only, in key order, as a match on the table gives them" do
      {:ok, a} = SM.allocate_region(64)
      {:ok, b} = SM.allocate_region(64)
      for _ <- 1..3, do: {:ok, _} = SM.map_region(a)
      {:ok, _} = SM.map_region(b)
      table = Registry.mappings_table()

      for id <- [a, b, "spshm_", a <> "x", "zzz"] do
        assert Registry.mappings_of(id) == :ets.match_object(table, {{id, :_}, :_, :_, :_})
      end

      assert length(Registry.mappings_of(a)) == 3
      assert length(Registry.mappings_of(b)) == 1
    end
  end
end
