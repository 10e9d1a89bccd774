defmodule Snakepit.SharedMemory.Reliability.FoundBugsTest do
  # Regression tests of bugs the reliability suites found, one test per bug, each
  # reduced to the smallest call that showed it. docs/RELIABILITY.md lists them.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Error, Mapping, Native, ReliabilityForge}

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

  describe "Native.unlink_segment/1 (and mix snakepit.shm.cleanup, which calls it)" do
    # Found by the malformed-segment suite: any file of ours smaller than a header was
    # taken for the leftover of a creator that died before writing the header, and
    # removed once stale, even when it starts with the magic: a region truncated after
    # creation (damaged), which the core's own policy says to leave to the operator.
    test "a stale truncated segment that has a magic is damaged, not incomplete: kept" do
      template = ReliabilityForge.template()
      seg = ReliabilityForge.forge(:truncated, template, ReliabilityForge.dead_os_pid())

      try do
        ReliabilityForge.age!(seg, 3_600)
        assert {:error, {:corrupt, message, _}} = Native.unlink_segment(seg.id)
        assert message =~ "not removed"
        assert ReliabilityForge.present?(seg)
      after
        ReliabilityForge.remove(seg)
      end
    end

    test "a stale empty segment (its creator died before sizing it) is still removed" do
      id = ReliabilityForge.random_id()
      path = Path.join("/dev/shm", id)
      File.write!(path, "")
      seg = %{id: id, path: path, extra: []}

      try do
        ReliabilityForge.age!(seg, 3_600)
        assert :ok = Native.unlink_segment(id)
        refute ReliabilityForge.present?(seg)
      after
        ReliabilityForge.remove(seg)
      end
    end
  end
end
