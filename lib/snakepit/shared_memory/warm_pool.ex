defmodule Snakepit.SharedMemory.WarmPool do
  @moduledoc """
  The warm pool of large regions, and what the host offers in huge pages.

  When a `:standard` (unencrypted), unnamed, owner-only memfd region of at least 1 MiB
  that was never sealed is deallocated, and no other process (no Python worker, no
  forked child, no other open of this VM) still has its data open or mapped, its data
  memfd and this VM's mapping of it are kept in a pool instead of going back to the OS,
  within a byte budget (`:pool_bytes`). The next allocation of that size (up to a
  quarter larger) takes it: a new id, a new header and holder table, and contents
  zeroed before it is handed out, like a fresh region. A fresh 256 MiB region costs its
  pages (~0.5 s per GiB of page allocation and faults); a pooled one a memset.

  A pooled object is unreachable: its old id names nothing (the old control memfd is
  closed), and every opener of a data memfd (this library, C++ or Python) takes a
  shared lock of it that the pool holds exclusively while the object is pooled, so a
  worker that kept the old ref cannot map it. The pooled memfds are descriptors of this
  VM only: they vanish with it (SIGKILL included), on application stop (`drain/0`) and
  when the budget shrinks (`set_budget/1`). See docs/ARCHITECTURE.md and
  docs/SECURITY.md.
  """

  alias Snakepit.SharedMemory.Native

  @cap 256 * 1024 * 1024

  @typedoc "Counters of the pool (`stats/0`)."
  @type stats :: %{
          hits: non_neg_integer(),
          misses: non_neg_integer(),
          bytes_held: non_neg_integer(),
          entries: non_neg_integer(),
          budget: non_neg_integer(),
          returned: non_neg_integer(),
          refused: non_neg_integer(),
          released: non_neg_integer()
        }

  @doc """
  The default budget: min(256 MiB, 5 % of the host's RAM (MemTotal), or of the memory
  cgroup's limit when that is lower).
  """
  @spec default_budget() :: non_neg_integer()
  def default_budget do
    case memory_total() do
      nil -> @cap
      total -> min(@cap, div(total * 5, 100))
    end
  end

  @doc "The budget a `:pool_bytes` setting means (`:default` or bytes)."
  @spec budget(:default | non_neg_integer()) :: non_neg_integer()
  def budget(:default), do: default_budget()
  def budget(bytes) when is_integer(bytes) and bytes >= 0, do: bytes

  @doc """
  Sets the budget in bytes (0 disables the pool); pooled objects beyond it go back to
  the OS at once.
  """
  @spec set_budget(non_neg_integer()) :: :ok
  def set_budget(bytes) when is_integer(bytes) and bytes >= 0, do: Native.pool_configure(bytes)

  @doc "Gives every pooled object back to the OS; returns how many there were."
  @spec drain() :: {:ok, non_neg_integer()}
  def drain, do: Native.pool_drain()

  @doc """
  `%{hits, misses, bytes_held, entries, budget, returned, refused, released}`: regions
  made from the pool, eligible regions made fresh, bytes and objects pooled now, the
  budget, objects taken in, freed eligible objects refused (still held by another
  process, sealed, over budget) and objects released by a budget change or drain.
  """
  @spec stats() :: stats()
  def stats, do: Native.pool_stats()

  @doc """
  The host's huge pages: `%{page_size: bytes, total: pages, free: pages}` of the default
  hugetlb pool (`vm.nr_hugepages`; zeros where there is none).
  """
  @spec huge_pages() :: %{
          page_size: non_neg_integer(),
          total: non_neg_integer(),
          free: non_neg_integer()
        }
  def huge_pages, do: Native.huge_page_info()

  defp memory_total do
    host =
      case File.read("/proc/meminfo") do
        {:ok, text} ->
          case Regex.run(~r/^MemTotal:\s+(\d+) kB/m, text) do
            [_, kb] -> String.to_integer(kb) * 1024
            _ -> nil
          end

        _ ->
          nil
      end

    cgroup =
      case File.read("/sys/fs/cgroup/memory.max") do
        {:ok, text} ->
          case Integer.parse(String.trim(text)) do
            {n, ""} -> n
            _ -> nil
          end

        _ ->
          nil
      end

    case {host, cgroup} do
      {nil, c} -> c
      {h, nil} -> h
      {h, c} -> min(h, c)
    end
  end
end
