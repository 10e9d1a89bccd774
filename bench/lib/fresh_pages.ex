defmodule SnakepitShm.Bench.FreshPages do
  @moduledoc """
  Issue 6, part 7: what the pages of a new region cost per GiB (C++ `fresh_pages`):
  fallocate then touch (the product today), touch alone, MADV_POPULATE_WRITE,
  MAP_POPULATE, transparent and reserved huge pages where the kernel allows them, a
  second mapping of warm pages, and the release of populated pages.
  """

  alias Snakepit.SharedMemory.JSON
  alias SnakepitShm.Bench.Programs

  @doc "Returns a list of `%{mode, bytes, ns: [..]}` or `%{mode, bytes, unavailable: why}`."
  def run(profile, programs) do
    programs.fresh_pages
    |> Programs.run(["#{profile.fresh_pages_size}", "#{profile.fresh_pages_reps}"])
    |> String.split("\n", trim: true)
    |> Enum.map(fn line ->
      {:ok, map} = JSON.decode(line)
      Map.new(map, fn {k, v} -> {String.to_atom(k), v} end)
    end)
  end
end
