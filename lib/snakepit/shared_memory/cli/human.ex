defmodule Snakepit.SharedMemory.CLI.Human do
  @moduledoc false
  # Human-readable sizes, durations and rates for the mix tasks, and the parser of
  # durations given on the command line ("30s", "5m", "2h", "1d", "250ms").

  @units [{"ms", 1}, {"s", 1_000}, {"m", 60_000}, {"h", 3_600_000}, {"d", 86_400_000}]

  @doc "Parses \"30s\", \"5m\", \"2h\", \"1d\" or \"250ms\" into milliseconds."
  @spec parse_duration(String.t()) :: {:ok, non_neg_integer()} | :error
  def parse_duration(text) when is_binary(text) do
    case Integer.parse(String.trim(text)) do
      {value, unit} when value >= 0 ->
        case List.keyfind(@units, unit, 0) do
          {_, factor} -> {:ok, value * factor}
          nil -> :error
        end

      _ ->
        :error
    end
  end

  @doc "1536 -> \"1.5 KiB\"; exact bytes below 1 KiB."
  @spec bytes(non_neg_integer() | nil) :: String.t()
  def bytes(nil), do: "-"
  def bytes(n) when n < 1024, do: "#{n} B"

  def bytes(n) do
    {value, unit} =
      Enum.reduce_while(["KiB", "MiB", "GiB", "TiB"], {n / 1024, "KiB"}, fn unit, {v, _} ->
        if v >= 1024 and unit != "TiB",
          do: {:cont, {v / 1024, next_unit(unit)}},
          else: {:halt, {v, unit}}
      end)

    "#{format_float(value)} #{unit}"
  end

  defp next_unit("KiB"), do: "MiB"
  defp next_unit("MiB"), do: "GiB"
  defp next_unit("GiB"), do: "TiB"

  @doc "A duration in milliseconds as \"45s\", \"12m 3s\", \"3h 5m\", \"2d 4h\"; nil -> \"-\"."
  @spec duration_ms(integer() | nil) :: String.t()
  def duration_ms(nil), do: "-"
  def duration_ms(ms) when ms < 0, do: duration_ms(0)
  def duration_ms(ms) when ms < 1_000, do: "#{ms}ms"
  def duration_ms(ms) when ms < 60_000, do: "#{div(ms, 1_000)}s"

  def duration_ms(ms) when ms < 3_600_000,
    do: two(div(ms, 60_000), "m", div(rem(ms, 60_000), 1_000), "s")

  def duration_ms(ms) when ms < 86_400_000,
    do: two(div(ms, 3_600_000), "h", div(rem(ms, 3_600_000), 60_000), "m")

  def duration_ms(ms), do: two(div(ms, 86_400_000), "d", div(rem(ms, 86_400_000), 3_600_000), "h")

  defp two(a, ua, 0, _ub), do: "#{a}#{ua}"
  defp two(a, ua, b, ub), do: "#{a}#{ua} #{b}#{ub}"

  @doc "Microseconds as \"850 µs\", \"12.3 ms\" or \"1.24 s\"."
  @spec micros(number()) :: String.t()
  def micros(us) when us < 1_000, do: "#{round(us)} µs"
  def micros(us) when us < 1_000_000, do: "#{format_float(us / 1_000)} ms"
  def micros(us), do: "#{:erlang.float_to_binary(us / 1_000_000, decimals: 2)} s"

  @doc "Throughput of `bytes` moved in `us` microseconds, in MB/s (10^6 bytes per second)."
  @spec rate(non_neg_integer(), number()) :: String.t()
  def rate(_bytes, us) when us <= 0, do: "-"
  def rate(bytes, us), do: "#{round(bytes / us)} MB/s"

  @doc "Three significant digits at most: 1.50 -> \"1.5\", 64.0 -> \"64.0\", 123.4 -> \"123\"."
  @spec format_float(float()) :: String.t()
  def format_float(v) when v >= 100, do: Integer.to_string(round(v))
  def format_float(v) when v >= 10, do: :erlang.float_to_binary(v * 1.0, decimals: 1)
  def format_float(v), do: :erlang.float_to_binary(v * 1.0, decimals: 1)
end
