defmodule SnakepitShm.Bench.Format do
  @moduledoc "Number formatting for the report: sizes, durations, rates, summaries."

  alias SnakepitShm.Bench.Stats

  @doc "4096 -> \"4 KiB\"."
  def bytes(n) when n >= 1024 * 1024 * 1024 and rem(n, 1024 * 1024 * 1024) == 0,
    do: "#{div(n, 1024 * 1024 * 1024)} GiB"

  def bytes(n) when n >= 1024 * 1024 and rem(n, 1024 * 1024) == 0,
    do: "#{div(n, 1024 * 1024)} MiB"

  def bytes(n) when n >= 1024 and rem(n, 1024) == 0, do: "#{div(n, 1024)} KiB"
  def bytes(n), do: "#{n} B"

  @doc "A duration in nanoseconds with a readable unit."
  def time(ns) when ns >= 1.0e9, do: "#{num(ns / 1.0e9)} s"
  def time(ns) when ns >= 1.0e6, do: "#{num(ns / 1.0e6)} ms"
  def time(ns) when ns >= 1.0e3, do: "#{num(ns / 1.0e3)} µs"
  def time(ns), do: "#{num(ns)} ns"

  @doc "Three significant digits, no exponent."
  def num(x) when is_integer(x), do: num(x * 1.0)

  def num(x) do
    cond do
      x == 0 -> "0"
      abs(x) >= 100 -> x |> round() |> Integer.to_string()
      abs(x) >= 10 -> :erlang.float_to_binary(x, decimals: 1)
      abs(x) >= 1 -> :erlang.float_to_binary(x, decimals: 2)
      true -> :erlang.float_to_binary(x, decimals: 3)
    end
  end

  @doc "Median and range of times: \"12.3 ms (11.9–13.0)\"."
  def time_summary(samples) do
    s = Stats.summary(samples)
    "#{time(s.median)} (#{time(s.min)}–#{time(s.max)})"
  end

  @doc "Throughput of `bytes` moved in each of `samples` ns: median and range in GB/s."
  def rate_summary(bytes, samples) do
    s = Stats.summary(Enum.map(samples, &(bytes / &1)))
    "#{num(s.median)} (#{num(s.min)}–#{num(s.max)})"
  end

  @doc "A ratio summary: \"4.8× (4.1–5.2)\"."
  def ratio(nil), do: "–"
  def ratio(%{median: m, min: lo, max: hi}), do: "#{num(m)}× (#{num(lo)}–#{num(hi)})"

  @doc "Plain summary of numbers: \"1.2 M (1.1–1.3 M)\" with a unit suffix."
  def count_summary(samples, unit \\ "") do
    s = Stats.summary(samples)
    "#{big(s.median)}#{unit} (#{big(s.min)}–#{big(s.max)})"
  end

  @doc "1234567 -> \"1.23 M\"."
  def big(x) when x >= 1.0e6, do: "#{num(x / 1.0e6)} M"
  def big(x) when x >= 1.0e4, do: "#{num(x / 1.0e3)} k"
  def big(x), do: num(x)

  @doc "A markdown table from a header row and rows of cells."
  def table(header, rows) do
    line = fn cells -> "| " <> Enum.map_join(cells, " | ", &to_string/1) <> " |" end
    sep = "|" <> Enum.map_join(header, "|", fn _ -> "---" end) <> "|"
    Enum.join([line.(header), sep | Enum.map(rows, line)], "\n") <> "\n"
  end
end
