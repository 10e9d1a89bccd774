defmodule Snakepit.SharedMemory.HostQuota.Regions do
  @moduledoc """
  The manager's use of a host quota (`config :snakepit_shm, host_quota: "shm_total"`):
  every region this VM creates is reserved from it, so that all VMs of the host
  configured with the same quota together stay within its limit. The whole
  integration is here; the allocator calls `reserve/1` before creating a segment,
  `bind/3` once the region is registered and `release/1` from `Allocator.free/2`, the
  one place every region ends (deallocation, owner death, expiry, cleanup).

  A region's reservation is held by this VM's session (`owner: nil`): it outlives the
  caller that allocated it, and ends with the region or with the VM. The table
  `region id -> reservation` belongs to this VM's client, so both vanish together if it
  ever dies; the manager (restarted after it) then re-declares every region it holds
  (`recount/1`).

  Only regions this VM created count: a named region opened from another VM is counted
  by its creator.
  """

  require Logger
  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{Config, Error, HostQuota, Registry}
  alias Snakepit.SharedMemory.HostQuota.Client

  @table __MODULE__

  @doc false
  # The application's children for the configured host quota: this VM's client.
  @spec children(Config.t()) :: [Supervisor.child_spec()]
  def children(%{host_quota: nil}), do: []

  def children(config) do
    define =
      if config.host_quota_limit, do: [{config.host_quota, config.host_quota_limit}], else: []

    opts = [name: Client, define: define, table: @table, dir: config.host_quota_dir]
    [Supervisor.child_spec({Client, opts}, id: Client)]
  end

  @doc "Reserves `size` bytes for a region about to be created; `{:ok, nil}` if no host quota."
  @spec reserve(pos_integer()) :: {:ok, HostQuota.Reservation.t() | nil} | {:error, Error.t()}
  def reserve(size) do
    case Config.get() do
      %{host_quota: nil} ->
        {:ok, nil}

      %{host_quota: name, host_quota_wait: wait} ->
        case HostQuota.reserve(name, size, owner: nil, wait: wait) do
          {:error, %Error{reason: :unknown_quota} = error} ->
            {:error,
             %{
               error
               | message:
                   error.message <>
                     " (config :snakepit_shm, host_quota: #{inspect(name)} needs a limit: set " <>
                     "host_quota_limit: bytes on at least one VM of this host)"
             }}

          other ->
            other
        end
    end
  end

  @doc """
  Records that the region `id` holds `res` (`role` `:created`); a region only opened
  (created by another VM) gives its reservation back.
  """
  @spec bind(HostQuota.Reservation.t() | nil, String.t(), atom()) :: :ok
  def bind(nil, _id, _role), do: :ok

  def bind(res, id, :created) do
    :ets.insert(@table, {id, res})
    :ok
  rescue
    # The client (and its table) died since the reservation: its session took the
    # reservation with it, and the restarted manager re-declares the region.
    ArgumentError -> :ok
  end

  def bind(res, _id, _role), do: discard(res)

  @doc "Gives back a reservation that no region took (creation failed or was refused)."
  @spec discard(HostQuota.Reservation.t() | nil) :: :ok
  def discard(nil), do: :ok

  def discard(res) do
    _ = HostQuota.release(res)
    :ok
  end

  @doc "Releases what the region `id` held, if anything."
  @spec release(String.t()) :: :ok
  def release(id) do
    case :ets.whereis(@table) do
      :undefined ->
        :ok

      _ ->
        case :ets.take(@table, id) do
          [{^id, res}] -> discard(res)
          [] -> :ok
        end
    end
  rescue
    ArgumentError -> :ok
  end

  @doc """
  Brings the reservations in line with `records` (the registry): releases reservations
  of regions that are gone or were never registered (a caller killed mid-allocation),
  re-declares regions that have none (after a restart of the client). Only correct
  while no allocation or deallocation is in flight: the manager calls it inside
  `Journal.barrier/2`, next to `Quota.recount/1`.
  """
  @spec recount([Registry.region_record()]) :: :ok
  def recount(records) do
    config = Config.get()

    if config.host_quota != nil and :ets.whereis(@table) != :undefined do
      do_recount(records, config.host_quota)
    else
      :ok
    end
  end

  defp do_recount(records, name) do
    created =
      for r <- records, Registry.region(r, :role) == :created, into: %{} do
        {Registry.region(r, :id), Registry.region(r, :size)}
      end

    bound = Map.new(:ets.tab2list(@table))
    held = for res <- HostQuota.held(), res.owner == nil, res.name == name, do: res
    bound_ids = MapSet.new(Map.values(bound), & &1.id)

    stale =
      for({id, res} <- bound, not Map.has_key?(created, id), do: {id, res}) ++
        for res <- held, not MapSet.member?(bound_ids, res.id), do: {nil, res}

    for {id, res} <- stale do
      if id, do: :ets.delete(@table, id)
      discard(res)
    end

    for {id, size} <- created, not Map.has_key?(bound, id) do
      case Client.call(Client, {:declare, name, size}, 5_000) do
        {:ok, res} ->
          :ets.insert(@table, {id, res})

        {:error, error} ->
          Logger.warning("snakepit_shm: cannot re-declare #{id}: #{error.message}")
      end
    end

    if stale != [],
      do: Logger.info("snakepit_shm: released #{length(stale)} stale host quota reservation(s)")

    :ok
  end
end
