defmodule Snakepit.SharedMemory.Quota do
  @moduledoc """
  Limits (`:max_regions`, `:max_total_memory`, `:max_regions_per_process`) checked in
  the caller, without a process and without a barrier.

  The counters (live regions, live bytes, and live regions per owner) are native atomics
  (`c_src/core/quota.hpp`). A region's share of them is a **charge**, a NIF resource
  that `reserve/3` takes (adding first and checking the result, so two callers racing
  for the last slot cannot both win; a refused charge takes nothing) and that is given
  back exactly once:

    * by `release/1`, called by the one process whose `:ets.take/2` got the region's
      record out of the registry (`Snakepit.SharedMemory.Allocator.free/2`), or on a
      failed allocation;
    * or by its destructor, when the last reference to it dies unreleased.

  The charge lives in the allocating process's heap until the registry record that
  holds it is inserted (one atomic `:ets.insert_new/2`), then in the registry, then in
  the heap of the process that took the record out. Readers of the registry never copy
  it (`Snakepit.SharedMemory.Registry.lookup/1` leaves it out). So a caller killed at any
  instant (`Process.exit(pid, :kill)`) leaves the counters exact: killed before the
  insert or after the take, its heap held the last reference and the charge gives itself
  back as that heap is freed; killed between, the registry holds the charge and the
  region counts, as it should. The counters are always the sum of the live charges, and
  the live charges are those of the registry plus those of callers in the middle of an
  allocation or a free. Nothing has to notice a death, and nothing is ever recounted.

  Per-owner counters are NIF resources too, one per owner in the owners table
  (`{owner_pid, counter}`); a charge keeps its owner's counter alive. A row stays while
  its owner lives (deleting it while another caller reserves for the same owner would
  split the count); the manager deletes the row of a dead owner once its count is 0.
  """

  alias Snakepit.SharedMemory.{Error, Native, Registry}

  @typedoc "A region's share of the counters (a NIF resource)."
  @type charge :: Native.quota_charge()

  @doc false
  # Called by the table owner when it creates fresh tables. The counters are native and
  # follow the charges: the charges of lost tables gave themselves back with them.
  @spec setup() :: :ok
  def setup, do: :ok

  @doc "Live regions and bytes as counted."
  @spec totals() :: %{regions: integer(), bytes: integer()}
  def totals do
    {regions, bytes} = Native.quota_totals()
    %{regions: regions, bytes: bytes}
  end

  @doc "Live regions owned by `pid` as counted."
  @spec owned(pid()) :: non_neg_integer()
  def owned(pid) do
    case :ets.lookup(Registry.owners_table(), pid) do
      [{^pid, counter}] -> Native.quota_owned(counter)
      [] -> 0
    end
  end

  @doc """
  Takes a charge of one region of `size` bytes for `owner` (nil: no owner), or refuses.
  The caller keeps the charge in its heap until the registry record holds it, and
  releases it with `release/1` if the allocation fails.
  """
  @spec reserve(pid() | nil, non_neg_integer(), map()) :: {:ok, charge()} | {:error, Error.t()}
  def reserve(owner, size, config) do
    case Native.quota_reserve(
           owner_counter(owner),
           size,
           limit(config.max_regions),
           limit(config.max_total_memory),
           limit(config.max_regions_per_process)
         ) do
      {:ok, charge} -> {:ok, charge}
      {:error, :regions, _} -> region_limit(config.max_regions)
      {:error, :bytes, before} -> memory_limit(size, before, config.max_total_memory)
      {:error, :owner, _} -> process_limit(owner, config.max_regions_per_process)
    end
  end

  @doc "A charge taken whatever the limits (a region that exists already: re-adoption)."
  @spec force(pid() | nil, non_neg_integer()) :: charge()
  def force(owner, size) do
    {:ok, charge} = Native.quota_reserve(owner_counter(owner), size, -1, -1, -1)
    charge
  end

  @doc "Changes the bytes of a charge not registered yet (an opened region has its creator's size)."
  @spec resize(charge(), non_neg_integer()) :: :ok
  def resize(charge, size), do: Native.quota_resize(charge, size)

  @doc "Gives a charge back (once: later calls, and its destructor, do nothing)."
  @spec release(charge() | nil) :: :ok
  def release(nil), do: :ok

  def release(charge) do
    _ = Native.quota_release(charge)
    :ok
  end

  @doc """
  Deletes the owners-table row of `pid` if it is dead and counts nothing any more (the
  manager, once it has applied the policies of that owner's regions).
  """
  @spec forget_owner(pid()) :: :ok
  def forget_owner(pid) do
    table = Registry.owners_table()

    with false <- Process.alive?(pid),
         [{^pid, counter} = row] <- :ets.lookup(table, pid),
         0 <- Native.quota_owned(counter) do
      :ets.delete_object(table, row)
    end

    :ok
  end

  # The owner's counter: one row per owner, made by whoever reserves first (insert_new
  # decides a race; the loser uses the winner's).
  defp owner_counter(nil), do: nil

  defp owner_counter(owner) do
    table = Registry.owners_table()

    case :ets.lookup(table, owner) do
      [{^owner, counter}] ->
        counter

      [] ->
        counter = Native.quota_owner_new()

        if :ets.insert_new(table, {owner, counter}),
          do: counter,
          else: owner_counter(owner)
    end
  end

  defp limit(:infinity), do: -1
  # The native counters are 64-bit signed: a limit they cannot reach is no limit (a
  # config of 2 ** 64 made every allocation raise ArgumentError).
  defp limit(value) when value > 0x7FFF_FFFF_FFFF_FFFF, do: -1
  defp limit(value), do: value

  defp region_limit(max) do
    Error.error(
      :region_limit_exceeded,
      "#{max} regions are live, the max_regions limit: deallocate regions or raise " <>
        "config :snakepit_shm, max_regions: ...",
      %{max_regions: max}
    )
  end

  defp memory_limit(size, total, max) do
    Error.error(
      :memory_limit_exceeded,
      "allocating #{Error.format_bytes(size)} on top of #{Error.format_bytes(total)} would " <>
        "exceed max_total_memory #{Error.format_bytes(max)}: deallocate regions or raise " <>
        "config :snakepit_shm, max_total_memory: ...",
      %{size: size, total: total, max_total_memory: max}
    )
  end

  defp process_limit(owner, max) do
    Error.error(
      :process_limit_exceeded,
      "#{inspect(owner)} already owns #{max} regions, the max_regions_per_process limit: " <>
        "deallocate some of its regions or raise config :snakepit_shm, " <>
        "max_regions_per_process: ...",
      %{owner: owner, max_regions_per_process: max}
    )
  end
end
