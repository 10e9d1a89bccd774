defmodule SnakepitShm.Bench.Stats do
  @moduledoc """
  Summaries of repeated measurements: median and spread, percentiles of latency
  samples, and ratios of paired runs (each ratio is taken inside one round, where both
  sides ran back to back, and the ratios are then summarised).
  """

  @type summary :: %{
          median: float(),
          min: float(),
          max: float(),
          p25: float(),
          p75: float(),
          n: non_neg_integer()
        }

  @doc "Median, quartiles and extremes of a non-empty list of numbers."
  @spec summary([number()]) :: summary()
  def summary([_ | _] = values) do
    sorted = Enum.sort(values)

    %{
      median: percentile_sorted(sorted, 50),
      p25: percentile_sorted(sorted, 25),
      p75: percentile_sorted(sorted, 75),
      min: hd(sorted) * 1.0,
      max: List.last(sorted) * 1.0,
      n: length(sorted)
    }
  end

  @doc "Percentile `p` (0..100) of a list of numbers, linear interpolation."
  @spec percentile([number()], number()) :: float()
  def percentile([_ | _] = values, p), do: values |> Enum.sort() |> percentile_sorted(p)

  @doc "Percentile of an already sorted list."
  @spec percentile_sorted([number()], number()) :: float()
  def percentile_sorted(sorted, p) do
    count = length(sorted)
    rank = p / 100 * (count - 1)
    low = floor(rank)
    high = min(low + 1, count - 1)
    frac = rank - low
    a = Enum.at(sorted, low)
    b = Enum.at(sorted, high)
    (a + (b - a) * frac) * 1.0
  end

  @doc """
  Ratios `numerator_i / denominator_i` of paired samples (same round), summarised.
  For times, pass the slower path as numerator to get a speed-up.
  """
  @spec paired_ratio([number()], [number()]) :: summary()
  def paired_ratio(numerators, denominators) when length(numerators) == length(denominators) do
    numerators
    |> Enum.zip(denominators)
    |> Enum.map(fn {n, d} -> n / max(d, 1.0e-12) end)
    |> summary()
  end

  @doc "Spread of a summary as a percentage of its median: (max - min) / median."
  @spec spread_pct(summary()) :: float()
  def spread_pct(%{median: m, min: lo, max: hi}) when m > 0, do: (hi - lo) / m * 100
  def spread_pct(_), do: 0.0
end
