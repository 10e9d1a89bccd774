Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.ReaperSweepSlicesTest do
  @moduledoc """
  Issue 12, Seen 9: one call that keeps a core busy for tens of milliseconds lets the
  VM's normal schedulers lose the CPU (bench/FINDINGS.md section 7). Two such calls are
  cut into pieces here:

    * the reaper thread unmaps a large data area 16 MiB at a time, and frees the pages
      of a memfd data object nobody else uses in 16 MiB holes before its last close,
      pausing 1 ms after each 1 ms of CPU this work costs (`Native.reaper_stats/0`
      counts the pieces and the pauses);
    * the orphan sweep removes a segment's name and frees its pages in 8 MiB dirty steps
      (`Native.sweep_segment_begin/1`, `Native.release_pages_step/1`), each a call that
      returns to a normal scheduler; a sweeper killed midway leaves the rest to the reaper.

  The guarantees the pieces must not weaken: another holder's bytes survive (its open
  holds the data object's liveness byte: no hole is punched), a sealed object is never
  punched, an orphan in use is neither removed nor touched.
  """
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory.{Allocator, Native, ShmHelpers, Sweep, TestSupport}

  @mib 1_048_576
  @size 64 * @mib

  setup do
    # No warm pool here: it would keep (and hand back, already allocated) the data
    # objects these tests watch being freed or allocated.
    %{budget: budget} = Native.pool_stats()
    :ok = Native.pool_configure(0)
    quiet_reaper()

    on_exit(fn ->
      :ok = Native.pool_configure(budget)
      :erlang.trace(self(), false, [:call])
      :erlang.trace_pattern({Native, :_, :_}, false, [])
      TestSupport.free_everything()
    end)

    :ok
  end

  defp opts(backend), do: ShmHelpers.create_opts(%{backend: backend})

  # A region of `size` bytes created and written by a process that then waits for
  # `:die` (so its only reference dies with it); `{pid, info}`.
  defp owned_region(backend, size, fun \\ fn _region, _mapping -> :ok end) do
    parent = self()

    pid =
      spawn(fn ->
        {:ok, region, info} = Native.create(size, opts(backend))
        {:ok, m} = Native.map(region, :read_write)
        :ok = Native.write_dirty(m, 0, :binary.copy(<<0xA5>>, @mib))
        :ok = Native.write_dirty(m, size - 4, "last")
        fun.(region, m)
        send(parent, {:ready, self(), info})

        receive do
          :die -> :ok
        end
      end)

    receive do
      {:ready, ^pid, info} -> {pid, info}
    after
      60_000 -> flunk("the region's owner did not start")
    end
  end

  defp kill_and_wait(pid) do
    ref = Process.monitor(pid)
    Process.exit(pid, :kill)

    receive do
      {:DOWN, ^ref, _, _, _} -> :ok
    end
  end

  # Waits until the reaper thread has nothing left from earlier tests (its counts stay
  # still for 300 ms), so that a test sees only its own pieces.
  defp quiet_reaper(last \\ nil, tries \\ 100) do
    now = Native.reaper_stats()

    if now == last or tries == 0 do
      :ok
    else
      Process.sleep(300)
      quiet_reaper(now, tries - 1)
    end
  end

  # Polls `fun` until it returns a truthy value (the machine is loaded: generous).
  defp eventually(fun, ms \\ 20_000) do
    deadline = System.monotonic_time(:millisecond) + ms
    poll(fun, deadline)
  end

  defp poll(fun, deadline) do
    case fun.() do
      v when v not in [nil, false] ->
        v

      _ ->
        if System.monotonic_time(:millisecond) > deadline, do: flunk("timed out")
        Process.sleep(10)
        poll(fun, deadline)
    end
  end

  # A POSIX orphan of `@size` bytes: its creator is dead, nobody holds its lock.
  defp orphan do
    {pid, info} = owned_region(:posix, @size)
    kill_and_wait(pid)
    eventually(fn -> Native.sweep_segment(info.id, true) == {:ok, :removed} end)
    info.id
  end

  defp traced_steps(fun, mfa \\ {Native, :release_pages_step, 1}) do
    {result, events} = TestSupport.trace_calls([mfa], [{:_, [], [{:return_trace}]}], fun)
    {result, Enum.flat_map(events, &step_event/1)}
  end

  defp step_event({:trace, _, :return_from, {Native, _, _}, value}), do: [{:return, value}]
  defp step_event({:trace, _, :call, {Native, _, args}}), do: [{:call, args}]
  defp step_event(_other), do: []

  describe "the orphan sweep frees a large segment's pages in slices" do
    test "name removed first, then at most 8 MiB per dirty call, down to 0" do
      id = orphan()
      path = Path.join("/dev/shm", id)
      assert {:ok, :removed, unlinked} = Native.sweep_segment_begin(id)
      assert is_reference(unlinked)
      refute File.exists?(path), "the name is removed before any page is freed"

      {:ok, events} = traced_steps(fn -> Sweep.release_pages(unlinked) end)
      results = for {:return, v} <- events, do: v
      lefts = for {:ok, left} <- results, do: left
      assert length(lefts) == length(results), "every step succeeded: #{inspect(results)}"
      assert List.last(lefts) == 0
      assert length(lefts) >= div(@size, 8 * @mib)

      # each step frees at most 8 MiB: the bytes left fall by no more than that
      [first | _] = lefts
      assert first >= @size - 8 * @mib

      for [a, b] <- Enum.chunk_every(lefts, 2, 1, :discard) do
        assert a > b and a - b <= 8 * @mib, "a step freed #{a - b} bytes"
      end

      # done: further steps are harmless
      assert {:ok, 0} = Native.release_pages_step(unlinked)
    end

    test "a segment in use is neither removed nor touched" do
      {pid, info} = owned_region(:posix, @size)
      assert {:ok, :in_use, nil} = Native.sweep_segment_begin(info.id)
      assert File.exists?(Path.join("/dev/shm", info.id))
      {:ok, region, _} = Native.open(info.id, false)
      {:ok, m} = Native.map(region, :read_only)
      assert {:ok, "last"} = Native.read_dirty(m, @size - 4, 4)
      assert {:ok, <<0xA5, 0xA5>>} = Native.read_dirty(m, 0, 2)
      :ok = Native.unmap(m)
      kill_and_wait(pid)
      assert {:ok, :removed, u} = eventually(fn -> removed(info.id) end)
      assert :ok = Sweep.release_pages(u)
    end

    test "a sweeper killed midway leaves the rest to the reaper thread" do
      id = orphan()
      before = Native.reaper_stats()
      parent = self()

      pid =
        spawn(fn ->
          {:ok, :removed, u} = Native.sweep_segment_begin(id)
          {:ok, left} = Native.release_pages_step(u)
          send(parent, {:left, left})

          receive do
            :never -> :ok
          end
        end)

      assert_receive {:left, left}, 30_000
      assert left > 32 * @mib
      kill_and_wait(pid)
      refute File.exists?(Path.join("/dev/shm", id))
      # the resource's destructor handed the object to the reaper, which frees what was
      # left in 16 MiB pieces before closing it
      eventually(fn ->
        Native.reaper_stats().pieces_released - before.pieces_released >= div(left, 16 * @mib)
      end)
    end

    test "misuse is refused" do
      assert_raise ArgumentError, fn -> Native.release_pages_step(make_ref()) end
      assert_raise ArgumentError, fn -> Native.release_pages_step(:nope) end
      assert {:error, _} = Native.sweep_segment_begin("not an id")
      assert {:error, _} = Native.sweep_segment_begin("spshm_aaaaaaaaaaaaaaaaaaaa")
    end
  end

  defp removed(id) do
    case Native.sweep_segment_begin(id) do
      {:ok, :removed, _} = done -> done
      _ -> nil
    end
  end

  describe "the reaper thread unmaps large regions in pieces" do
    test "a memfd region nobody else maps: unmapped and its pages freed, 16 MiB at a time" do
      before = Native.reaper_stats()
      assert before.pause_ns > 0
      {pid, _info} = owned_region(:memfd, @size)
      kill_and_wait(pid)

      eventually(fn ->
        s = Native.reaper_stats()

        s.pieces_unmapped - before.pieces_unmapped >= div(@size, 16 * @mib) and
          s.pieces_released - before.pieces_released >= div(@size, 16 * @mib)
      end)
    end

    test "it pauses by the CPU its work costs, not once per piece or per region" do
      # 48 regions of 1 MiB (each one unmap and one release piece), then one of 256 MiB
      # written through (its unmapping and freeing cost tens of ms of CPU).
      before = Native.reaper_stats()
      owners = for _ <- 1..48, do: elem(owned_region(:memfd, @mib), 0)
      Enum.each(owners, &kill_and_wait/1)

      small =
        eventually(fn ->
          s = Native.reaper_stats()
          s.pieces_released - before.pieces_released >= 48 && s
        end)

      # A pause per piece (the old pacing) would be 48 at least. Paced by CPU, they are
      # fewer; how many fewer depends on what each piece costs, which grows several-fold
      # on a machine loaded by other work (33 seen at load average 10, ~10 when quiet).
      assert small.pauses - before.pauses < 48, inspect({before, small})

      {pid, _} =
        owned_region(:memfd, 256 * @mib, fn _region, m ->
          for at <- 0..255, do: :ok = Native.write_dirty(m, at * @mib, :binary.copy(<<1>>, @mib))
        end)

      kill_and_wait(pid)

      big =
        eventually(fn ->
          s = Native.reaper_stats()
          s.pieces_released - small.pieces_released >= 16 && s
        end)

      assert big.pauses - small.pauses >= 2, inspect({small, big})
    end

    test "another holder's bytes survive: its open keeps the pages until it goes" do
      {pid, info} = owned_region(:memfd, @size)
      parent = self()

      holder =
        spawn(fn ->
          # writable: a read-only open cannot punch holes (its last close frees the pages)
          {:ok, region, _} = Native.open({info.control_path, info.data_path}, true)
          {:ok, m} = Native.map(region, :read_only)
          send(parent, {:holding, self()})

          receive do
            :read ->
              send(
                parent,
                {:read, Native.read_dirty(m, @size - 4, 4), Native.read_dirty(m, 0, @mib)}
              )
          end

          receive do
            :never -> :ok
          end
        end)

      assert_receive {:holding, ^holder}, 30_000
      before = Native.reaper_stats()
      kill_and_wait(pid)

      eventually(fn ->
        Native.reaper_stats().pieces_unmapped - before.pieces_unmapped >= div(@size, 16 * @mib)
      end)

      # give the reaper the time it would take to punch, then check nothing was
      Process.sleep(200)
      assert Native.reaper_stats().pieces_released == before.pieces_released
      send(holder, :read)
      assert_receive {:read, {:ok, "last"}, {:ok, data}}, 30_000
      assert data == :binary.copy(<<0xA5>>, @mib)

      # the last (writable) holder gone, the pages are freed in pieces
      kill_and_wait(holder)

      eventually(fn ->
        Native.reaper_stats().pieces_released - before.pieces_released >= div(@size, 16 * @mib)
      end)
    end

    test "a sealed region's object is never punched" do
      {pid, _info} = owned_region(:memfd, @size, fn region, m -> seal(region, m) end)
      before = Native.reaper_stats()
      kill_and_wait(pid)

      eventually(fn ->
        Native.reaper_stats().pieces_unmapped - before.pieces_unmapped >= div(@size, 16 * @mib)
      end)

      Process.sleep(200)
      assert Native.reaper_stats().pieces_released == before.pieces_released
    end
  end

  defp seal(region, m) do
    :ok = Native.unmap(m)
    :ok = Native.seal(region)
  end

  describe "zeroing at deallocation in slices" do
    test "at most 16 MiB per dirty call, contiguous from 0, and every byte is zero after" do
      {:ok, region, info} = Native.create(@size, opts(:memfd))
      {:ok, m} = Native.map(region, :read_write)
      :ok = Native.write_dirty(m, 20 * @mib, :binary.copy(<<0x5A>>, @mib))
      :ok = Native.write_dirty(m, @size - 4, "last")
      :ok = Native.unmap(m)
      # our own descriptor of the data memfd, to look at the bytes afterwards
      {:ok, keep} = :file.open(info.data_path, [:read, :raw, :binary])

      {:ok, events} =
        traced_steps(fn -> Allocator.deallocate_in_slices(region) end, {Native, :zero_step, 2})

      calls = for {:call, [_, offset]} <- events, do: offset
      nexts = for {:return, {:ok, next}} <- events, do: next
      assert length(calls) == length(nexts)
      assert hd(calls) == 0
      capacity = List.last(nexts)
      assert capacity >= @size
      assert length(calls) >= div(@size, 16 * @mib)

      for {offset, next} <- Enum.zip(calls, nexts) do
        assert next - offset <= 16 * @mib, "a slice zeroed #{next - offset} bytes"
      end

      # each call starts where the previous one ended
      assert tl(calls) == Enum.drop(nexts, -1)

      {:ok, zeros} = :file.pread(keep, 20 * @mib, @mib)
      assert zeros == :binary.copy(<<0>>, @mib)
      {:ok, tail} = :file.pread(keep, @size - 4, 4)
      assert tail == <<0, 0, 0, 0>>
      :ok = :file.close(keep)
      assert {:error, {:deallocated, _, _}} = Native.deallocate(region, true)
    end

    test "between the steps: reads, writes, seal and a second deallocation are refused" do
      {:ok, region, _info} = Native.create(@size, opts(:memfd))
      {:ok, m} = Native.map(region, :read_write)
      :ok = Native.deallocate_begin(region)
      assert {:error, {:deallocated, _, _}} = Native.read(m, 0, 4)
      assert {:error, {:deallocated, _, _}} = Native.write(m, 0, "x")
      assert {:error, {:deallocated, _, _}} = Native.read_dirty(m, 0, 4)
      assert {:error, {:busy, _, _}} = Native.deallocate(region, true)
      assert {:error, {:busy, _, _}} = Native.deallocate_begin(region)
      assert {:error, {:deallocated, _, _}} = Native.seal(region)
      # out of order, or finishing early, is refused
      assert {:error, {:invalid_argument, _, _}} = Native.zero_step(region, 4096)
      assert {:error, {:invalid_argument, _, _}} = Native.deallocate_finish(region)
      assert {:ok, next} = Native.zero_step(region, 0)
      assert next == 16 * @mib
      assert {:error, {:invalid_argument, _, _}} = Native.zero_step(region, 0)
      assert :ok = zero_rest(region, next)
      assert :ok = Native.deallocate_finish(region)
      assert {:error, {:invalid_argument, _, _}} = Native.deallocate_finish(region)
      assert {:error, {:invalid_argument, _, _}} = Native.zero_step(region, 0)
      assert {:error, {:deallocated, _, _}} = Native.deallocate_begin(region)
    end

    test "misuse is refused" do
      {:ok, region, _} = Native.create(@mib, opts(:memfd))
      assert {:error, {:invalid_argument, _, _}} = Native.zero_step(region, 0)
      assert {:error, {:invalid_argument, _, _}} = Native.deallocate_finish(region)
      assert_raise ArgumentError, fn -> Native.zero_step(region, -1) end
      assert_raise ArgumentError, fn -> Native.zero_step(:nope, 0) end
      assert_raise ArgumentError, fn -> Native.deallocate_begin(make_ref()) end
      assert_raise ArgumentError, fn -> Native.deallocate_finish("x") end
      :ok = Native.deallocate(region, false)
    end

    test "a caller killed midway: the reaper thread zeroes the rest and removes the name" do
      parent = self()

      pid =
        spawn(fn ->
          {:ok, region, info} = Native.create(@size, opts(:posix))
          {:ok, m} = Native.map(region, :read_write)
          :ok = Native.write_dirty(m, 40 * @mib, :binary.copy(<<0x5A>>, @mib))
          :ok = Native.write_dirty(m, @size - 4, "last")
          send(parent, {:created, info})

          receive do
            :go -> :ok
          end

          :ok = Native.deallocate_begin(region)
          {:ok, next} = Native.zero_step(region, 0)
          send(parent, {:zeroed_to, next})

          receive do
            :never -> :ok
          end
        end)

      assert_receive {:created, info}, 30_000
      path = Path.join("/dev/shm", info.id)
      # our own descriptor of the segment: the bytes stay readable after the name goes
      {:ok, keep} = :file.open(path, [:read, :raw, :binary])
      send(pid, :go)
      assert_receive {:zeroed_to, next}, 30_000
      assert next < 40 * @mib
      kill_and_wait(pid)
      eventually(fn -> not File.exists?(path) end)
      base = info.data_offset

      eventually(fn ->
        {:ok, tail} = :file.pread(keep, base + @size - 4, 4)
        tail == <<0, 0, 0, 0>>
      end)

      {:ok, middle} = :file.pread(keep, base + 40 * @mib, @mib)
      assert middle == :binary.copy(<<0>>, @mib)
      :ok = :file.close(keep)
    end
  end

  defp zero_rest(region, offset) do
    case Native.zero_step(region, offset) do
      {:ok, ^offset} -> :ok
      {:ok, next} -> zero_rest(region, next)
    end
  end

  describe "creating a large memfd region in slices" do
    defp deferred(size) do
      {:ok, region, info} = Native.create(size, Map.put(opts(:memfd), :defer_allocate, true))
      {region, info}
    end

    test "pages allocated at most 8 MiB per dirty call, in order, then published" do
      {region, _info} = deferred(@size)

      {:ok, events} =
        traced_steps(fn -> Allocator.allocate_pages(region, 0) end, {Native, :allocate_step, 2})

      calls = for {:call, [_, offset]} <- events, do: offset
      nexts = for {:return, {:ok, next}} <- events, do: next
      assert length(calls) == length(nexts)
      assert hd(calls) == 0
      assert length(calls) >= div(@size, 8 * @mib)
      assert List.last(nexts) >= @size
      assert tl(calls) == Enum.drop(nexts, -1)

      for {offset, next} <- Enum.zip(calls, nexts) do
        assert next - offset <= 8 * @mib
      end

      {:ok, m} = Native.map(region, :read_write)
      assert :ok = Native.write_dirty(m, @size - 4, "last")
      assert {:ok, "last"} = Native.read_dirty(m, @size - 4, 4)
      :ok = Native.unmap(m)
      :ok = Native.deallocate(region, false)
    end

    test "unusable and unopenable before it is published" do
      {region, info} = deferred(@size)
      {:ok, m} = Native.map(region, :read_write)
      assert {:error, {:busy, _, _}} = Native.write(m, 0, "x")
      assert {:error, {:busy, _, _}} = Native.read(m, 0, 1)
      assert {:error, {:invalid_argument, _, _}} = Native.publish(region)
      assert {:ok, next} = Native.allocate_step(region, 0)
      assert next == 8 * @mib
      # another opener (here through our own descriptors) is refused
      assert {:error, _} = Native.open({info.control_path, info.data_path}, false)
      # out of order, or again, is refused
      assert {:error, {:invalid_argument, _, _}} = Native.allocate_step(region, 0)
      assert {:error, {:invalid_argument, _, _}} = Native.allocate_step(region, 16 * @mib)
      assert :ok = Allocator.allocate_pages(region, next)
      assert {:error, {:invalid_argument, _, _}} = Native.allocate_step(region, 0)
      assert :ok = Native.write(m, 0, "x")
      assert {:ok, other, _} = Native.open({info.control_path, info.data_path}, false)
      {:ok, om} = Native.map(other, :read_only)
      assert {:ok, "x"} = Native.read(om, 0, 1)
      :ok = Native.unmap(om)
      :ok = Native.unmap(m)
      :ok = Native.deallocate(region, false)
    end

    test "misuse is refused" do
      {:ok, plain, _} = Native.create(@mib, opts(:memfd))
      assert {:error, {:invalid_argument, _, _}} = Native.allocate_step(plain, 0)
      assert {:error, {:invalid_argument, _, _}} = Native.init_chunks(plain, 0, 1)
      assert_raise ArgumentError, fn -> Native.allocate_step(plain, -1) end
      assert_raise ArgumentError, fn -> Native.allocate_step(:nope, 0) end
      :ok = Native.deallocate(plain, false)
      assert {:error, {:deallocated, _, _}} = Native.allocate_step(plain, 0)
      # encrypted: deferred only with defer_chunks (create would otherwise write every
      # page), and its chunks only once every page is allocated
      enc_opts = %{opts(:memfd) | encrypted: true, security_level: 2}
      {:ok, enc, _} = Native.create(@size, Map.put(enc_opts, :defer_allocate, true))
      assert {:error, {:invalid_argument, _, _}} = Native.allocate_step(enc, 0)
      :ok = Native.deallocate(enc, false)

      {:ok, enc, _} =
        Native.create(@size, Map.merge(enc_opts, %{defer_allocate: true, defer_chunks: true}))

      assert {:error, {:invalid_argument, _, _}} = Native.init_chunks(enc, 0, 16)
      assert {:ok, _} = Native.allocate_step(enc, 0)
      assert {:error, {:invalid_argument, _, _}} = Native.init_chunks(enc, 0, 16)
      :ok = Native.deallocate(enc, false)
    end

    test "a creator killed midway leaves nothing behind" do
      parent = self()

      pid =
        spawn(fn ->
          {region, info} = deferred(@size)
          {:ok, _} = Native.allocate_step(region, 0)
          send(parent, {:created, info})

          receive do
            :never -> :ok
          end
        end)

      assert_receive {:created, info}, 30_000
      assert {:ok, target} = File.read_link(info.data_path)
      assert target =~ info.id
      kill_and_wait(pid)

      # its data memfd is closed (by the reaper thread): the descriptor is gone or reused
      eventually(fn ->
        case File.read_link(info.data_path) do
          {:ok, t} -> not String.contains?(t, info.id)
          {:error, _} -> true
        end
      end)

      refute File.exists?(Path.join("/dev/shm", info.id))
    end
  end
end
