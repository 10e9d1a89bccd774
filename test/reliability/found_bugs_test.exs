defmodule Snakepit.SharedMemory.Reliability.FoundBugsTest do
  # Regression tests of bugs the reliability suites found, one test per bug, each
  # reduced to the smallest call that showed it. docs/RELIABILITY.md lists them.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Error, Mapping}

  @moduletag :reliability

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    :ok
  end

  describe "unmap_region/1" do
    # Found by the API fuzzer: the :closed message interpolated the region id, so a
    # Mapping whose region_id is not a string raised Protocol.UndefinedError.
    test "a mapping struct with a non-string region id is an error, not an exception" do
      {:ok, id} = SharedMemory.allocate_region(4096)
      {:ok, mapping} = SharedMemory.map_region(id)

      for bad <- [%{a: 1}, self(), 12, fn -> :ok end] do
        forged = %Mapping{mapping | region_id: bad}
        assert {:error, %Error{reason: :invalid_argument}} = SharedMemory.unmap_region(forged)
      end

      assert :ok = SharedMemory.unmap_region(mapping)
      assert :ok = SharedMemory.deallocate_region(id)
    end
  end
end
