defmodule Snakepit.SharedMemory.HostQuota.Regions do
  @moduledoc """
  The manager's use of a host quota (`config :snakepit_shm, host_quota: "shm_total"`):
  every region this VM creates is reserved from it, so that all VMs of the host
  configured with the same quota together stay within its limit. The whole
  integration is here; the allocator calls `reserve/2` before creating a segment,
  `bind/3` just before the region is registered and `release/1` from
  `Allocator.free/2`, the one place every region ends (deallocation, owner death,
  expiry, cleanup).

  A caller killed mid-allocation or mid-free gives its reservation back without anyone
  noticing its death: `reserve/2` stamps the reservation on the region's quota charge
  (`Snakepit.SharedMemory.Quota`), whose destructor, if the charge dies unreleased (with
  the killed caller's heap), sends the client one `{:abandon, id}`. The one window left:
  a kill between the client's reply and the stamp (a few instructions) keeps that
  reservation held, too much rather than too little, until this VM's session ends.

  A region's reservation is held by this VM's session (`owner: nil`): it outlives the
  caller that allocated it, and ends with the region or with the VM. The table
  `region id -> reservation` belongs to this VM's client, so both vanish together if it
  ever dies; the manager (restarted after it) then re-declares every region it holds
  (`redeclare/1`).

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
    spec = Supervisor.child_spec({Client, client_opts(config)}, id: Client)
    [%{spec | start: {__MODULE__, :start_client, [client_opts(config)]}}]
  end

  defp client_opts(config) do
    define =
      if config.host_quota_limit, do: [{config.host_quota, config.host_quota_limit}], else: []

    [name: Client, define: define, table: @table, dir: config.host_quota_dir]
  end

  @doc false
  # A quota directory this VM cannot use (another owner, group/other bits: in /tmp
  # another user can plant it) must not stop the whole application from starting:
  # the client is left out with a logged error, and `reserve/1` tries again (and
  # fails with that error) at each allocation until the directory is fixed.
  @spec start_client(keyword()) :: GenServer.on_start()
  def start_client(opts) do
    case Client.start_link(opts) do
      {:error, %Error{} = error} ->
        Logger.error("snakepit_shm host quota: #{error.message}")
        :ignore

      other ->
        other
    end
  end

  @doc false
  # Starts this VM's client with the manager's options if the application left it out
  # (see start_client/1), so that a client started later for any use has the table.
  @spec ensure_client() :: :ok | {:error, Error.t()}
  def ensure_client do
    case Config.get() do
      %{host_quota: nil} -> :ok
      config -> ensure_client(config)
    end
  end

  # The client the application left out (see start_client/1), started now with the
  # same options so that its table and limits are there.
  defp ensure_client(config) do
    with nil <- Process.whereis(Client),
         sup when is_pid(sup) <- Process.whereis(Snakepit.SharedMemory.HostQuota.Supervisor) do
      spec = Supervisor.child_spec({Client, client_opts(config)}, id: Client)

      case DynamicSupervisor.start_child(sup, spec) do
        {:ok, _} ->
          :ok

        {:error, {:already_started, _}} ->
          :ok

        {:error, %Error{} = error} ->
          {:error, error}

        {:error, reason} ->
          Error.error(:unavailable, "cannot start the host quota client: #{inspect(reason)}")
      end
    else
      _ -> :ok
    end
  end

  @doc """
  Reserves `size` bytes for a region about to be created, stamped on its quota `charge`
  (abandoned if the charge dies unreleased); `{:ok, nil}` if no host quota.
  """
  @spec reserve(pos_integer(), Snakepit.SharedMemory.Quota.charge() | nil) ::
          {:ok, HostQuota.Reservation.t() | nil} | {:error, Error.t()}
  def reserve(size, charge \\ nil) do
    with {:ok, res} <- do_reserve(size) do
      stamp(res, charge)
      {:ok, res}
    end
  end

  defp stamp(%HostQuota.Reservation{client: client, id: id}, charge)
       when charge != nil and is_pid(client),
       do: Snakepit.SharedMemory.Native.quota_host(charge, client, id)

  defp stamp(_res, _charge), do: :ok

  defp do_reserve(size) do
    case Config.get() do
      %{host_quota: nil} ->
        {:ok, nil}

      %{host_quota: name, host_quota_wait: wait} = config ->
        case with(
               :ok <- ensure_client(config),
               do: HostQuota.reserve(name, size, owner: nil, wait: wait)
             ) do
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
  (created by another VM) gives its reservation back. Called just before the region is
  registered, so that a registered region always has its row (`redeclare/1`).
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
  Re-declares the regions of `records` (the registry) that have no reservation, after
  a restart of the client (its table went with it), and forgets rows of regions never
  registered whose reservation is gone (their caller was killed; its charge abandoned
  the reservation). Releases nothing a live caller could be using, so it needs no
  barrier: a region freed while this runs gives back what was declared for it (the
  declaration's row is written before the registry is checked again).
  """
  @spec redeclare([Registry.region_record()]) :: :ok
  def redeclare(records) do
    config = Config.get()

    if config.host_quota != nil and :ets.whereis(@table) != :undefined do
      do_redeclare(records, config.host_quota)
    else
      :ok
    end
  rescue
    ArgumentError -> :ok
  end

  defp do_redeclare(records, name) do
    created =
      for r <- records, Registry.region(r, :role) == :created, into: %{} do
        {Registry.region(r, :id), Registry.region(r, :size)}
      end

    bound = Map.new(:ets.tab2list(@table))
    held = MapSet.new(for res <- HostQuota.held(), res.owner == nil, res.name == name, do: res.id)

    for {id, res} <- bound,
        not Map.has_key?(created, id),
        not Registry.member?(id),
        not MapSet.member?(held, res.id),
        do: :ets.delete_object(@table, {id, res})

    for {id, size} <- created, not Map.has_key?(bound, id) do
      case Client.call(Client, {:declare, name, size}, 5_000) do
        {:ok, res} ->
          :ets.insert(@table, {id, res})
          # Freed meanwhile: its free may have found no row to release.
          if not Registry.member?(id), do: release(id)

        {:error, error} ->
          Logger.warning("snakepit_shm: cannot re-declare #{id}: #{error.message}")
      end
    end

    :ok
  end
end
