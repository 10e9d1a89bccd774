Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.ReaperSweepSlicesTest do
  @moduledoc """
  Issue 12, Seen 9: one call that keeps a core busy for tens of milliseconds lets the
  VM's normal schedulers lose the CPU (bench/FINDINGS.md section 7). Two such calls are
  cut into pieces here:

    * the reaper thread unmaps a large data area 16 MiB at a time, and frees the pages
      of a memfd data object nobody else uses in 16 MiB holes before its last close,
      pausing between pieces (`Native.reaper_stats/0` counts the pieces);
    * the orphan sweep removes a segment's name and frees its pages in 8 MiB dirty steps
      (`Native.sweep_segment_begin/1`, `Native.release_pages_step/1`), each a call that
      returns to a normal scheduler; a sweeper killed midway leaves the rest to the reaper.

  The guarantees the pieces must not weaken: another holder's bytes survive (its open
  holds the data object's liveness byte: no hole is punched), a sealed object is never
  punched, an orphan in use is neither removed nor touched.
  """
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory.{Native, Sweep, TestSupport}

  @mib 1_048_576
  @size 64 * @mib

  setup do
    on_exit(fn ->
      :erlang.trace(self(), false, [:call])
      :erlang.trace_pattern({Native, :_, :_}, false, [])
      TestSupport.free_everything()
    end)

    :ok
  end

  defp opts(backend) do
    %{
      backend: backend,
      name: nil,
      open_mode: :create,
      mode: 0o600,
      security_level: 0,
      encrypted: false,
      lock_memory: false,
      metadata: "{}",
      idle_timeout_ms: 0
    }
  end

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

  defp traced_steps(fun) do
    me = self()
    tracer = spawn_link(fn -> collect([]) end)
    spec = [{:_, [], [{:return_trace}]}]
    :erlang.trace_pattern({Native, :release_pages_step, 1}, spec, [:local])
    :erlang.trace(me, true, [:call, {:tracer, tracer}])
    result = fun.()
    :erlang.trace(me, false, [:call])
    ref = :erlang.trace_delivered(me)

    receive do
      {:trace_delivered, ^me, ^ref} -> :ok
    end

    send(tracer, {:calls, me})

    receive do
      {:calls, calls} -> {result, calls}
    end
  end

  defp collect(acc) do
    receive do
      {:trace, _, :return_from, {Native, :release_pages_step, 1}, value} ->
        collect([value | acc])

      {:trace, _, :call, _, _} ->
        collect(acc)

      {:calls, to} ->
        send(to, {:calls, Enum.reverse(acc)})
    end
  end

  describe "the orphan sweep frees a large segment's pages in slices" do
    test "name removed first, then at most 8 MiB per dirty call, down to 0" do
      id = orphan()
      path = Path.join("/dev/shm", id)
      assert {:ok, :removed, unlinked} = Native.sweep_segment_begin(id)
      assert is_reference(unlinked)
      refute File.exists?(path), "the name is removed before any page is freed"

      {:ok, results} = traced_steps(fn -> Sweep.release_pages(unlinked) end)
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
end
