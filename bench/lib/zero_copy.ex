defmodule SnakepitShm.Bench.ZeroCopy do
  @moduledoc """
  Issue 6, part 4: `read/3` of a whole sealed region (a zero-copy binary over the
  mapping) against `read/3` of the same bytes from an unsealed region (a copy), for
  each of `profile.zero_copy_sizes`, in the same rounds.
  """

  import Bitwise

  alias Snakepit.SharedMemory, as: SM

  # Zero-copy reads are timed in batches of this many calls (they take microseconds).
  @batch 100

  @doc "Returns one map per size: `%{size, zero_copy: [ns per read], copy: [ns per read]}`."
  def run(profile, payload) do
    for size <- profile.zero_copy_sizes, size <= byte_size(payload) do
      data = binary_part(payload, 0, size)
      sealed = region(data, true)
      unsealed = region(data, false)

      try do
        check(sealed, unsealed, data)

        rounds =
          for round <- 1..profile.zero_copy_reps do
            order = if rem(round, 2) == 0, do: [:copy, :zero_copy], else: [:zero_copy, :copy]

            Map.new(order, fn
              :zero_copy -> {:zero_copy, time_reads(sealed.mapping, size, @batch)}
              :copy -> {:copy, time_reads(unsealed.mapping, size, 1)}
            end)
          end

        %{
          size: size,
          zero_copy: Enum.map(rounds, & &1.zero_copy),
          copy: Enum.map(rounds, & &1.copy),
          big_heap: big_heap(sealed.mapping, size, profile.zero_copy_reps)
        }
      after
        release(sealed)
        release(unsealed)
      end
    end
  end

  defp region(data, seal?) do
    {:ok, id} = SM.allocate_region(byte_size(data))
    {:ok, mapping} = SM.map_region(id, access_mode: :read_write)
    :ok = SM.write(mapping, 0, data)

    if seal? do
      :ok = SM.unmap_region(mapping)
      :ok = SM.seal(id)
      {:ok, mapping} = SM.map_region(id, access_mode: :read_only)
      %{id: id, mapping: mapping}
    else
      %{id: id, mapping: mapping}
    end
  end

  # Both reads must return the payload: a fast wrong read is no result.
  defp check(sealed, unsealed, data) do
    size = byte_size(data)
    {:ok, a} = SM.read(sealed.mapping, 0, size)
    {:ok, b} = SM.read(unsealed.mapping, 0, size)

    unless a == data and b == data,
      do: raise("read of a #{size}-byte region did not return what was written")

    :erlang.garbage_collect()
  end

  defp time_reads(mapping, size, batch) do
    start = System.monotonic_time(:nanosecond)

    for _ <- 1..batch do
      {:ok, bin} = SM.read(mapping, 0, size)
      ^size = byte_size(bin)
    end

    elapsed = System.monotonic_time(:nanosecond) - start
    # Drop the binaries now (a copied 1 GiB binary must not linger into the next round).
    :erlang.garbage_collect()
    elapsed / batch
  end

  # A zero-copy binary counts its full size against the reading process's binary
  # virtual heap, so the first reads of big regions in a process trigger garbage
  # collections whose cost grows with the process's live heap (not with the region),
  # until ERTS grows that process's limit. Measured as the first @batch reads of a new
  # process holding @live_terms live terms, with the default `min_bin_vheap_size` and
  # with it raised, one new process per round.
  @live_terms 200_000
  defp big_heap(mapping, size, reps) do
    first_reads = fn raise? ->
      fn ->
        if raise?, do: Process.flag(:min_bin_vheap_size, 1 <<< 36)
        live = Enum.to_list(1..@live_terms)
        ns = time_reads(mapping, size, @batch)
        ^live = live
        ns
      end
      |> Task.async()
      |> Task.await(:infinity)
    end

    %{
      live_terms: @live_terms,
      default: for(_ <- 1..reps, do: first_reads.(false)),
      raised: for(_ <- 1..reps, do: first_reads.(true))
    }
  end

  defp release(%{id: id, mapping: mapping}) do
    SM.unmap_region(mapping)
    SM.deallocate_region(id)
  end
end
