Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.DirtySlicesTest do
  @moduledoc """
  Issue 12, Seen 9: one long dirty NIF call lets normal schedulers sleep through their
  timers for as long as it runs (bench/FINDINGS.md section 7). Large reads and writes
  therefore go to the dirty scheduler in slices of at most 1 MiB (a read fills one
  binary, handed over without a copy), each inside one 1 MiB
  block of the region (so an encrypted region's 64 KiB chunks are never split), and
  come back to a normal scheduler between slices. These tests trace the NIF calls the
  facade makes and check the bytes that come back.
  """
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  import Bitwise

  alias Snakepit.SharedMemory.{Error, Native, TestSupport}

  @mib 1_048_576

  setup do
    on_exit(fn ->
      :erlang.trace(self(), false, [:call])
      :erlang.trace_pattern({Native, :_, :_}, false, [])
      TestSupport.free_everything()
    end)

    :ok
  end

  # Runs `fun` with call tracing of Native.write_dirty/3, read_into/5 and init_chunks/3;
  # returns `{result, [{function, offset, length}]}` in call order.
  defp traced(fun) do
    mfas = [{Native, :write_dirty, 3}, {Native, :read_into, 5}, {Native, :init_chunks, 3}]
    {result, events} = TestSupport.trace_calls(mfas, true, fun)
    {result, Enum.flat_map(events, &slice_call/1)}
  end

  defp slice_call({:trace, _, :call, {Native, :write_dirty, [_, offset, data]}}),
    do: [{:write_dirty, offset, byte_size(data)}]

  defp slice_call({:trace, _, :call, {Native, :read_into, [_, offset, _buffer, _at, length]}}),
    do: [{:read_into, offset, length}]

  defp slice_call({:trace, _, :call, {Native, :init_chunks, [_, first, count]}}),
    do: [{:init_chunks, first, count}]

  # Trace patterns are global: functions another suite traced are not this test's.
  defp slice_call(_other), do: []

  defp assert_sliced(calls, function, offset, length, slice) do
    mine = for {^function, o, l} <- calls, do: {o, l}
    assert length(mine) > 1, "#{function}: expected several slices, got #{inspect(mine)}"

    for {o, l} <- mine do
      assert l <= slice, "#{function} slice of #{l} bytes"
      # never across a slice boundary of the region
      assert div(o, slice) == div(o + l - 1, slice), "#{function} slice #{o}+#{l}"
    end

    # contiguous, in order, covering exactly [offset, offset + length)
    ends = Enum.reduce(mine, offset, fn {o, l}, at -> assert(o == at) && at + l end)
    assert ends == offset + length
  end

  # Encrypted regions: 1 MiB slices (about 1 ms of encryption); plain ones: 8 MiB (about
  # 1 ms of memcpy).
  for {label, opts, slice} <-
        [
          plain: [[], 8 * 1_048_576],
          posix: [[backend: :posix], 8 * 1_048_576],
          encrypted: [[security_level: :high], 1_048_576]
        ]
        |> Enum.map(fn {label, [opts, slice]} -> {label, opts, slice} end) do
    test "a large write and read of a #{label} region go in slices of <= #{div(slice, @mib)} MiB" do
      slice = unquote(slice)
      size = 6 * slice
      {:ok, id} = SM.allocate_region(size, unquote(opts))
      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      assert Snakepit.SharedMemory.Access.slice_size(m) == slice
      offset = 70_001
      data = :crypto.strong_rand_bytes(5 * slice + 12_345)

      {result, calls} = traced(fn -> SM.write(m, offset, data) end)
      assert result == :ok
      assert_sliced(calls, :write_dirty, offset, byte_size(data), slice)

      {{:ok, back}, calls} = traced(fn -> SM.read(m, offset, byte_size(data)) end)
      assert back == data
      assert_sliced(calls, :read_into, offset, byte_size(data), slice)

      # what lies around the write is untouched (zeros), across slice boundaries too
      assert {:ok, <<0::size(70_001)-unit(8)>>} = SM.read(m, 0, offset)
      tail = size - offset - byte_size(data)
      assert {:ok, zeros} = SM.read(m, offset + byte_size(data), tail)
      assert zeros == :binary.copy(<<0>>, tail)

      # a read that starts and ends in the middle of slices
      assert {:ok, part} = SM.read(m, offset + @mib - 7, 2 * @mib + 9)
      assert part == binary_part(data, @mib - 7, 2 * @mib + 9)
    end

    test "an out-of-bounds large write of a #{label} region writes nothing" do
      size = 3 * @mib
      {:ok, id} = SM.allocate_region(size, unquote(opts))
      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      data = :binary.copy(<<7>>, 2 * @mib)

      {result, calls} = traced(fn -> SM.write(m, 2 * @mib, data) end)
      assert {:error, %Error{reason: :out_of_bounds}} = result
      # refused in one call, before any byte moved
      assert [{:write_dirty, _, _}] = calls
      assert {:ok, back} = SM.read(m, 0, size)
      assert back == :binary.copy(<<0>>, size)

      assert {:error, %Error{reason: :out_of_bounds}} = SM.read(m, @mib, 2 * @mib + 1)
    end
  end

  test "a write to a read-only mapping is refused before any slice is written" do
    {:ok, id} = SM.allocate_region(3 * @mib, security_level: :high)
    {:ok, ro} = SM.map_region(id, access_mode: :read_only)
    assert {:error, %Error{}} = SM.write(ro, 0, :binary.copy(<<1>>, 2 * @mib))
    {:ok, rw} = SM.map_region(id, access_mode: :read_write)
    assert {:ok, back} = SM.read(rw, 0, 3 * @mib)
    assert back == :binary.copy(<<0>>, 3 * @mib)
  end

  describe "the read buffer NIFs refuse misuse" do
    test "take twice, fill after take, out of the buffer, wrong terms, huge sizes" do
      {:ok, id} = SM.allocate_region(2 * @mib, security_level: :high)
      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      :ok = SM.write(m, 0, :binary.copy(<<9>>, 2 * @mib))
      {:ok, buffer} = Native.read_buffer(1000)

      assert {:error, {:out_of_bounds, _, _}} = Native.read_into(m.ref, 0, buffer, 999, 2)
      assert {:error, {:out_of_bounds, _, _}} = Native.read_into(m.ref, 2 * @mib, buffer, 0, 1)
      assert :ok = Native.read_into(m.ref, @mib - 500, buffer, 0, 1000)
      assert {:ok, bin} = Native.read_buffer_take(buffer)
      assert bin == :binary.copy(<<9>>, 1000)
      assert {:error, {:closed, _, _}} = Native.read_buffer_take(buffer)
      assert {:error, {:closed, _, _}} = Native.read_into(m.ref, 0, buffer, 0, 1)
      # the binary handed over is not changed by later calls on the buffer
      assert bin == :binary.copy(<<9>>, 1000)

      assert_raise ArgumentError, fn -> Native.read_buffer(-1) end
      assert_raise ArgumentError, fn -> Native.read_buffer_take(m.ref) end
      assert_raise ArgumentError, fn -> Native.read_into(buffer, 0, buffer, 0, 1) end
      assert {:error, {:no_space, _, _}} = Native.read_buffer(1 <<< 60)

      # a buffer never taken is freed with its last reference
      {:ok, _} = Native.read_buffer(4 * @mib)
      :erlang.garbage_collect()

      :ok = SM.unmap_region(m)

      assert {:error, {:closed, _, _}} =
               Native.read_into(m.ref, 0, elem(Native.read_buffer(8), 1), 0, 8)
    end
  end

  describe "encrypted regions are created in slices" do
    test "allocate_region initialises the chunks 16 at a time, in order, then publishes" do
      size = 5 * @mib + 1
      {{:ok, id}, calls} = traced(fn -> SM.allocate_region(size, security_level: :high) end)
      inits = for {:init_chunks, first, count} <- calls, do: {first, count}
      chunks = div(size + 65_535, 65_536)
      assert length(inits) == div(chunks + 15, 16)
      assert Enum.map(inits, &elem(&1, 0)) == Enum.map(0..(length(inits) - 1), &(&1 * 16))
      assert Enum.all?(inits, fn {_, count} -> count == 16 end)

      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      assert {:ok, zeros} = SM.read(m, 0, size)
      assert zeros == :binary.copy(<<0>>, size)
      :ok = SM.write(m, size - 3, "end")
      assert {:ok, "end"} = SM.read(m, size - 3, 3)
    end

    test "a deferred region refuses access until published; misuse is refused" do
      opts = %{
        backend: :memfd,
        name: nil,
        open_mode: :create,
        mode: 0o600,
        security_level: 1,
        encrypted: true,
        lock_memory: false,
        metadata: "{}",
        idle_timeout_ms: 0,
        defer_chunks: true
      }

      size = 40 * 65_536
      {:ok, region, _info} = Native.create_cpu(size, opts)
      {:ok, m} = Native.map(region, :read_write)
      assert {:error, {:busy, _, _}} = Native.write(m, 0, "x")
      assert {:error, {:busy, _, _}} = Native.read(m, 0, 1)
      assert {:error, {:invalid_argument, _, _}} = Native.publish(region)
      assert {:error, {:invalid_argument, _, _}} = Native.init_chunks(region, 5, 16)
      # at most 16 chunks per call, whatever is asked
      assert {:ok, 24} = Native.init_chunks(region, 0, 1000)
      assert {:ok, 8} = Native.init_chunks(region, 16, 16)
      assert {:error, {:invalid_argument, _, _}} = Native.publish(region)
      assert {:ok, 0} = Native.init_chunks(region, 32, 16)
      assert :ok = Native.publish(region)
      assert {:error, {:invalid_argument, _, _}} = Native.publish(region)
      assert {:error, {:invalid_argument, _, _}} = Native.init_chunks(region, 40, 1)
      assert :ok = Native.write(m, 0, "x")
      assert {:ok, "x"} = Native.read(m, 0, 1)
      assert {:ok, zeros} = Native.read_dirty(m, 1, size - 1)
      assert zeros == :binary.copy(<<0>>, size - 1)

      # a region created without the option has nothing to initialise
      {:ok, plain, _} = Native.create_cpu(size, %{opts | defer_chunks: false})
      assert {:error, {:invalid_argument, _, _}} = Native.init_chunks(plain, 0, 1)
      assert {:error, {:invalid_argument, _, _}} = Native.publish(plain)
      assert_raise ArgumentError, fn -> Native.init_chunks(m, 0, 1) end
      assert_raise ArgumentError, fn -> Native.create_cpu(size, %{opts | defer_chunks: 1}) end

      :ok = Native.unmap(m)
      :ok = Native.deallocate(region, false)
      :ok = Native.deallocate(plain, false)
    end
  end
end
