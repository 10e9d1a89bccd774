defmodule Snakepit.SharedMemory.CLI.Table do
  @moduledoc false
  # Aligned plain-text tables for the mix tasks: a header row, a rule, then the rows.
  # Columns are left-aligned unless listed in `:right` (numbers, sizes, durations).

  @doc """
  Renders `rows` (lists of cells, converted with `to_string/1`) under `headers`.

  Options:
    * `:right` - indexes of right-aligned columns. Defaults to `[]`.
    * `:indent` - spaces before every line. Defaults to `0`.
  """
  @spec render([String.t()], [[term()]], keyword()) :: String.t()
  def render(headers, rows, opts \\ []) do
    right = Keyword.get(opts, :right, [])
    indent = String.duplicate(" ", Keyword.get(opts, :indent, 0))
    cells = Enum.map(rows, fn row -> Enum.map(row, &cell/1) end)
    widths = widths([headers | cells])
    rule = Enum.map(widths, &String.duplicate("-", &1))

    [headers, rule | cells]
    |> Enum.map(fn row -> indent <> line(row, widths, right) end)
    |> Enum.join("\n")
  end

  @doc "Renders `pairs` of `{label, value}` as two aligned columns (`label:  value`)."
  @spec pairs([{String.t(), term()}], keyword()) :: String.t()
  def pairs(pairs, opts \\ []) do
    indent = String.duplicate(" ", Keyword.get(opts, :indent, 0))
    width = pairs |> Enum.map(fn {label, _} -> String.length(label) end) |> Enum.max(fn -> 0 end)

    pairs
    |> Enum.map(fn {label, value} ->
      indent <> String.pad_trailing(label <> ":", width + 2) <> cell(value)
    end)
    |> Enum.join("\n")
  end

  defp cell(nil), do: "-"
  defp cell(value) when is_binary(value), do: value
  defp cell(value), do: to_string(value)

  defp widths(rows) do
    rows
    |> Enum.map(fn row -> Enum.map(row, &String.length/1) end)
    |> Enum.zip_with(&Enum.max/1)
  end

  defp line(row, widths, right) do
    row
    |> Enum.zip(widths)
    |> Enum.with_index()
    |> Enum.map(fn {{text, width}, index} ->
      if index in right,
        do: String.pad_leading(text, width),
        else: String.pad_trailing(text, width)
    end)
    |> Enum.join("  ")
    |> String.trim_trailing()
  end
end
