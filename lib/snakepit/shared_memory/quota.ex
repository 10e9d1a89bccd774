defmodule Snakepit.SharedMemory.Quota do
  @moduledoc """
  Limits (`:max_regions`, `:max_total_memory`, `:max_regions_per_process`) checked in
  the caller, without a process: live regions and bytes are two `:atomics` slots, live
  regions per owner an ETS counter. A reservation adds first and checks the result, so
  two callers racing for the last slot cannot both win; a refused or failed allocation
  rolls its additions back.

  A caller killed between its reservation and the registry insert (or between the
  registry delete and its release) would leave these counters off by one region. Such
  callers are seen by the manager (their journal row, see
  `Snakepit.SharedMemory.Journal`), which then recomputes every counter from the
  registry (`recount/1`) while no other allocation or deallocation is in flight, so the
  counters always come back to exactly what the registry holds.
  """

  alias Snakepit.SharedMemory.{Error, Registry}

  require Registry

  @key {__MODULE__, :atomics}
  @count 1
  @bytes 2

  @doc false
  # Called by the table owner when it creates fresh tables.
  @spec setup() :: :ok
  def setup, do: :persistent_term.put(@key, :atomics.new(2, signed: true))

  defp ref, do: :persistent_term.get(@key)

  @doc "Live regions and bytes as counted."
  @spec totals() :: %{regions: integer(), bytes: integer()}
  def totals do
    ref = ref()
    %{regions: :atomics.get(ref, @count), bytes: :atomics.get(ref, @bytes)}
  end

  @doc "Live regions owned by `pid` as counted."
  @spec owned(pid()) :: non_neg_integer()
  def owned(pid) do
    case :ets.lookup(Registry.owners_table(), pid) do
      [{^pid, n}] -> n
      [] -> 0
    end
  end

  @doc "Reserves one region of `size` bytes for `owner` (nil: no owner), or refuses."
  @spec reserve(pid() | nil, pos_integer(), map()) :: :ok | {:error, Error.t()}
  def reserve(owner, size, config) do
    ref = ref()
    count = :atomics.add_get(ref, @count, 1)

    if over?(count, config.max_regions) do
      :atomics.sub(ref, @count, 1)
      region_limit(config.max_regions)
    else
      bytes = :atomics.add_get(ref, @bytes, size)

      if over?(bytes, config.max_total_memory) do
        :atomics.sub(ref, @bytes, size)
        :atomics.sub(ref, @count, 1)
        memory_limit(size, bytes - size, config.max_total_memory)
      else
        reserve_owner(owner, size, config)
      end
    end
  end

  defp reserve_owner(nil, _size, _config), do: :ok

  defp reserve_owner(owner, size, config) do
    owned = :ets.update_counter(Registry.owners_table(), owner, {2, 1}, {owner, 0})

    if over?(owned, config.max_regions_per_process) do
      release(owner, size)
      process_limit(owner, config.max_regions_per_process)
    else
      :ok
    end
  end

  @doc "Corrects the byte count of a reservation (an opened region has its creator's size)."
  @spec adjust_bytes(integer()) :: :ok
  def adjust_bytes(delta), do: :atomics.add(ref(), @bytes, delta)

  @doc "Gives back what `reserve/3` took."
  @spec release(pid() | nil, non_neg_integer()) :: :ok
  def release(owner, size) do
    ref = ref()
    :atomics.sub(ref, @bytes, size)
    :atomics.sub(ref, @count, 1)
    release_owner(owner)
  end

  defp release_owner(nil), do: :ok

  defp release_owner(owner) do
    table = Registry.owners_table()

    if :ets.update_counter(table, owner, {2, -1}, {owner, 0}) <= 0,
      do: :ets.delete_object(table, {owner, 0})

    :ok
  end

  @doc """
  Sets every counter to what `records` hold. Only correct while no allocation or
  deallocation is in flight: the manager calls it inside `Journal.barrier/2`.
  """
  @spec recount([Registry.region_record()]) :: %{regions: integer(), bytes: integer()}
  def recount(records) do
    ref = ref()
    bytes = records |> Enum.map(&Registry.region(&1, :size)) |> Enum.sum()
    :atomics.put(ref, @count, length(records))
    :atomics.put(ref, @bytes, bytes)

    owners =
      records
      |> Enum.map(&Registry.region(&1, :owner))
      |> Enum.reject(&is_nil/1)
      |> Enum.frequencies()

    table = Registry.owners_table()
    :ets.delete_all_objects(table)
    :ets.insert(table, Enum.to_list(owners))
    %{regions: length(records), bytes: bytes}
  end

  defp over?(_value, :infinity), do: false
  defp over?(value, limit), do: value > limit

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
