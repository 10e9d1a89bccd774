defmodule SnakepitShm.Bench.Plots do
  @moduledoc """
  Writes the data of each plot to `_build/bench/plot/*.dat` and renders
  `bench/gnuplot/<name>.gp` with gnuplot's pngcairo terminal into `<out>/<name>.png`.
  """

  import Bitwise, only: [<<<: 2]

  alias SnakepitShm.Bench.Stats

  @data_dir "_build/bench/plot"

  @doc "Renders every plot whose part is in `results`; returns the PNG file names made."
  def render(results, out) do
    case System.find_executable("gnuplot") do
      nil ->
        Mix.shell().error("bench: gnuplot not found (apt-get install gnuplot-nox): no plots")
        []

      gnuplot ->
        File.mkdir_p!(@data_dir)

        for {part, name, writer} <- plots(),
            Map.has_key?(results, part),
            writer.(results[part]),
            plot(gnuplot, name, out),
            do: "#{name}.png"
    end
  end

  defp plots do
    [
      {:handoff, "handoff", &handoff/1},
      {:lifecycle, "lifecycle", &lifecycle/1},
      {:concurrency, "concurrency", &concurrency/1},
      {:zero_copy, "zero_copy", &zero_copy/1},
      {:fresh_pages, "fresh_pages", &fresh_pages/1}
    ]
  end

  defp plot(gnuplot, name, out) do
    dir = Path.expand("bench/gnuplot") <> "/"
    png = Path.expand(Path.join(out, "#{name}.png"))

    args = [
      "-e",
      "dir='#{dir}'; datadir='#{Path.expand(@data_dir)}'; out='#{png}'",
      Path.join(dir, "#{name}.gp")
    ]

    case System.cmd(gnuplot, args, stderr_to_stdout: true) do
      {_, 0} ->
        true

      {log, status} ->
        Mix.shell().error("bench: gnuplot #{name}.gp failed (#{status}): #{log}")
        false
    end
  end

  defp write(name, lines) do
    File.write!(Path.join(@data_dir, name), Enum.map(lines, &[Enum.join(&1, " "), "\n"]))
    true
  end

  defp triple(samples, f) do
    s = Stats.summary(Enum.map(samples, f))
    [s.median, s.min, s.max]
  end

  # The columns of handoff.dat, in the order gnuplot/handoff.gp reads them (the pool and
  # huge-page paths are in RESULTS.md's tables only; huge pages are not measured on
  # every host).
  @handoff_plotted [:fresh, :warm, :port, :port_1m, :socket, :reference, :channel]

  defp handoff(rows) do
    write(
      "handoff.dat",
      for row <- rows do
        [
          row.size
          | Enum.flat_map(@handoff_plotted, &triple(row.samples[&1], fn ns -> row.size / ns end))
        ] ++ [tic_label(row.size)]
      end
    )
  end

  defp lifecycle(l) do
    cdf(l.elixir, "lifecycle_elixir.dat") and cdf(l.python, "lifecycle_python.dat")
  end

  # At most 500 points of the empirical distribution, in µs.
  defp cdf(rounds, file) do
    sorted = rounds |> List.flatten() |> Enum.sort()
    n = length(sorted)
    step = max(div(n, 500), 1)

    points =
      sorted
      |> Enum.with_index(1)
      |> Enum.filter(fn {_, i} -> rem(i, step) == 0 or i == n end)
      |> Enum.map(fn {ns, i} -> [ns / 1000, i / n] end)

    write(file, points)
  end

  defp concurrency(%{cycles: cycles}) do
    write("concurrency.dat", for({level, s} <- Enum.sort(cycles), do: [level | triple(s, & &1)]))
  end

  defp zero_copy(rows) do
    write(
      "zero_copy.dat",
      for row <- rows do
        [row.size] ++
          triple(row.zero_copy, &(&1 / 1000)) ++
          triple(row.copy, &(&1 / 1000)) ++ [tic_label(row.size)]
      end
    )
  end

  @doc """
  The x tick label of a size, quoted for gnuplot's `xtic()`: the plots put ticks only
  at the sizes measured in the run (a fixed tick list left empty ticks at sizes a
  profile does not measure).
  """
  def tic_label(bytes) do
    label =
      cond do
        bytes >= 1 <<< 30 and rem(bytes, 1 <<< 30) == 0 -> "#{div(bytes, 1 <<< 30)} GiB"
        bytes >= 1 <<< 20 and rem(bytes, 1 <<< 20) == 0 -> "#{div(bytes, 1 <<< 20)} MiB"
        bytes >= 1 <<< 10 and rem(bytes, 1 <<< 10) == 0 -> "#{div(bytes, 1 <<< 10)} KiB"
        true -> "#{bytes} B"
      end

    "\"#{label}\""
  end

  defp fresh_pages(modes) do
    rows =
      for %{ns: ns, bytes: b, mode: mode} <- modes do
        [
          "\"#{String.replace(mode, "_", "-")}\""
          | triple(ns, &(&1 * 1024 * 1024 * 1024 / b / 1.0e6))
        ]
      end

    rows != [] and write("fresh_pages.dat", rows)
  end
end
