Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.AttackS3Test do
  # Attacks on the work merged in session 3 (runtime index, events, kept slot locks,
  # dirty slices, deferred encrypted creation): each test is one break that was found.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.Native
  alias Snakepit.SharedMemory.TestSupport

  @mib 1_048_576

  setup do
    before = TestSupport.vm_segments()

    on_exit(fn ->
      TestSupport.free_everything()
      TestSupport.assert_nothing_live(before)
    end)

    :ok
  end

  describe "read buffers (large reads in slices)" do
    test "never hand out bytes no slice filled (uninitialised VM memory)" do
      {:ok, id} = SM.allocate_region(2 * @mib)
      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      :ok = SM.write(m, 0, :binary.copy(<<7>>, 2 * @mib))

      # Taken before any slice: refused, never a binary of whatever the allocator had.
      {:ok, empty} = Native.read_buffer(4096)
      assert {:error, {:invalid_argument, message, _}} = Native.read_buffer_take(empty)
      assert message =~ "filled"

      # A slice that would leave a hole before it is refused; in order, it completes.
      {:ok, buffer} = Native.read_buffer(1000)
      assert {:error, {:invalid_argument, _, _}} = Native.read_into(m.ref, 0, buffer, 500, 500)
      assert :ok = Native.read_into(m.ref, 0, buffer, 0, 500)
      assert {:error, {:invalid_argument, _, _}} = Native.read_buffer_take(buffer)
      assert :ok = Native.read_into(m.ref, 0, buffer, 500, 500)
      assert {:ok, bin} = Native.read_buffer_take(buffer)
      assert bin == :binary.copy(<<7>>, 1000)

      # A zero-length buffer has nothing to fill.
      {:ok, none} = Native.read_buffer(0)
      assert {:ok, <<>>} = Native.read_buffer_take(none)
      :ok = SM.unmap_region(m)
    end
  end
end
