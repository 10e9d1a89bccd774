defmodule Snakepit.SharedMemory.CLI.DemoData do
  @moduledoc false
  # The demo's payload and what the worker must find in it.
  #
  # Value i of the payload is float32(i band 0xFFFFFF): exact integers in float32, never
  # periodic within 64 MiB, so a misplaced or stale page changes the xor and the sums.
  # The matrix has 4096 columns; row r holds the values r*4096 .. r*4096+4095 (mod 2^24),
  # so its float64 sum is 4096 * base + 4096*4095/2 exactly.

  import Bitwise

  @mask 0xFFFFFF
  @cols 4096

  @doc "Floats in a payload of `mib` MiB."
  @spec count(pos_integer()) :: pos_integer()
  def count(mib), do: mib * 262_144

  @doc "Shape of the matrix: [rows, 4096]."
  @spec shape(pos_integer()) :: [pos_integer()]
  def shape(mib), do: [div(count(mib), @cols), @cols]

  @doc "The payload: count(mib) little-endian float32 values."
  @spec payload(pos_integer()) :: binary()
  def payload(mib), do: floats(count(mib))

  @doc """
  float32(i band 0xFFFFFF) for i in 0..n-1, little-endian, built at memcpy speed.

  A float32 holding an integer i in [2^k, 2^(k+1)) has the bits
  (127 + k) << 23 | (i - 2^k) << (23 - k): within each such range the bits form an
  arithmetic progression of a power of two, which doubles with `:crypto.exor`
  (S ++ S xor step*len(S)) instead of being built one element at a time.
  """
  @spec floats(pos_integer()) :: binary()
  def floats(n) do
    cycle = @mask + 1
    block = cycle_prefix(min(n, cycle))

    if n <= cycle do
      IO.iodata_to_binary(block)
    else
      block = IO.iodata_to_binary(block)

      IO.iodata_to_binary([
        :binary.copy(block, div(n, cycle)),
        binary_part(block, 0, rem(n, cycle) * 4)
      ])
    end
  end

  # float32(i) for i in 0..count-1 (count <= 2^24), as iodata. The largest range is as
  # big as all smaller ones together: the two halves are built on both cores.
  defp cycle_prefix(count) do
    ranges = for k <- 0..23, 1 <<< k < count, do: {k, min(1 <<< k, count - (1 <<< k))}

    {top, rest} =
      Enum.split_with(ranges, fn {k, _} -> k == elem(List.last(ranges, {0, 0}), 0) end)

    build = fn list -> Enum.map(list, fn {k, len} -> binary_part(range(k), 0, len * 4) end) end
    task = Task.async(fn -> build.(top) end)
    low = build.(rest)
    [<<0::32>>, low, Task.await(task, :infinity)]
  end

  # float32(i) for i in [2^k, 2^(k+1)).
  defp range(k) do
    mantissas =
      Enum.reduce(0..(k - 1)//1, <<0::32>>, fn bit, seq ->
        step = :binary.copy(<<1 <<< (bit + 23 - k)::32-little>>, div(byte_size(seq), 4))
        seq <> :crypto.exor(seq, step)
      end)

    :crypto.exor(mantissas, :binary.copy(<<(127 + k) <<< 23::32-little>>, 1 <<< k))
  end

  @doc "Sum of every value, as an integer (exact in float64)."
  @spec sum(pos_integer()) :: non_neg_integer()
  def sum(mib) do
    n = count(mib)
    cycle = @mask + 1
    full = div(n, cycle)
    left = rem(n, cycle)
    full * div(cycle * (cycle - 1), 2) + div(left * (left - 1), 2)
  end

  @doc "The float64 sum of every row."
  @spec row_sums(pos_integer()) :: [float()]
  def row_sums(mib) do
    [rows, cols] = shape(mib)
    for r <- 0..(rows - 1), do: (cols * band(r * cols, @mask) + div(cols * (cols - 1), 2)) * 1.0
  end

  @doc "XOR of all 64-bit little-endian words of `binary` (its size a multiple of 8)."
  @spec xor64(binary()) :: non_neg_integer()
  def xor64(binary) when rem(byte_size(binary), 8) == 0 do
    <<value::unsigned-little-64>> = fold_xor(binary)
    value
  end

  # Halves the binary with :crypto.exor until 8 bytes are left; an odd word count
  # carries the last word over.
  defp fold_xor(<<_::binary-size(8)>> = word), do: word

  defp fold_xor(binary) do
    words = div(byte_size(binary), 8)
    half = div(words, 2) * 8
    folded = :crypto.exor(binary_part(binary, 0, half), binary_part(binary, half, half))

    if rem(words, 2) == 1,
      do: fold_xor(folded <> binary_part(binary, 2 * half, 8)),
      else: fold_xor(folded)
  end
end
