defmodule Snakepit.SharedMemory.HostQuota do
  @moduledoc """
  Quotas shared by every process of one host (BEAM VMs and Python workers), held by
  sessions and released when a client dies.

      :ok = HostQuota.define("gpu0", 16 * 1024 * 1024 * 1024)
      {:ok, res} = HostQuota.reserve("gpu0", 4 * 1024 * 1024 * 1024, wait: 5_000)
      # ... use the 4 GiB ...
      :ok = HostQuota.release(res)

  A per-host server (one of the VMs, elected by the kernel) tracks what each client
  session holds. A reservation ends with `release/1`, with the death of its owner
  process (the caller by default, see `:owner`), or with its client's session: when a
  VM or a Python worker dies, even by SIGKILL, its socket closes and the server
  releases everything it held at once. There is no shared table, no robust mutex and no
  PID scan; see `docs/QUOTA.md` for the protocol, the election and the takeover.

  Python workers use the same quotas through `snakepit_shm.HostQuota`.

  A reserve + release pair costs one socket round trip: `release/2` does not wait for
  the server by default (every later request of this VM sees the release; other
  clients within microseconds; `sync: true` waits until everyone does).

  Every function takes a `:client` option: the pid of a client started with
  `Snakepit.SharedMemory.HostQuota.Client.start_link/1` (tests and tools use one per
  quota directory). Defaults to this VM's client, started on first use for the quota
  directory of `Snakepit.SharedMemory.HostQuota.RuntimeDir`.

  With `config :snakepit_shm, host_quota: "shm_total"` the manager reserves every
  region it creates from that quota (see `Snakepit.SharedMemory.Config`).
  """

  alias Snakepit.SharedMemory.{Error, Options}
  alias Snakepit.SharedMemory.HostQuota.{Client, Protocol, Reservation}

  @type name :: String.t()
  @type usage :: Protocol.quota_usage()

  @call_margin 5_000

  @doc """
  Defines the quota `name` (1-64 characters of `[A-Za-z0-9_.:-]`) with `limit` units
  (bytes, slots, licences: the server only adds and compares), or changes the limit of
  an existing one. Lowering a limit below what is held revokes nothing: new
  reservations wait (or fail) until enough is released.

  Options: `:client` (see the module doc).
  """
  @spec define(name(), non_neg_integer(), keyword()) :: :ok | {:error, Error.t()}
  def define(name, limit, opts \\ [])

  def define(name, limit, opts) when is_map(opts) and not is_struct(opts),
    do: define(name, limit, Map.to_list(opts))

  def define(_name, _limit, opts) when not is_list(opts), do: bad_opts(opts)

  def define(name, limit, opts) do
    with :ok <- Options.known_keys(opts, [:client]),
         :ok <- check_name(name),
         :ok <- check_u64(limit, "limit", 0),
         {:ok, client} <- client(opts) do
      Client.call(client, {:define, name, limit}, @call_margin)
    end
  end

  @doc """
  Reserves `amount` units of quota `name`.

  Returns `{:ok, reservation}`, or `{:error, %Error{reason: :quota_exceeded}}` whose
  message says how much is used, by whom (OS pid, node name or program) and how much is
  left; `:unknown_quota` if nobody defined it; `:unavailable` if no server answers.

  Options:

    * `:wait` - milliseconds to wait in line for capacity instead of failing at once,
      or `:infinity`. Waiters are granted strictly in arrival order (a large request at
      the head is not overtaken by smaller ones). Defaults to `0`.
    * `:owner` - the pid whose death releases the reservation, or `nil` to tie it only
      to this VM's session. Defaults to `self()`.
    * `:client` - see the module doc.
  """
  @spec reserve(name(), pos_integer(), keyword()) :: {:ok, Reservation.t()} | {:error, Error.t()}
  def reserve(name, amount, opts \\ [])

  def reserve(name, amount, opts) when is_map(opts) and not is_struct(opts),
    do: reserve(name, amount, Map.to_list(opts))

  def reserve(_name, _amount, opts) when not is_list(opts), do: bad_opts(opts)

  def reserve(name, amount, opts) do
    wait = Keyword.get(opts, :wait, 0)
    owner = Keyword.get(opts, :owner, self())

    with :ok <- Options.known_keys(opts, [:wait, :owner, :client]),
         :ok <- check_name(name),
         :ok <- check_u64(amount, "amount", 1),
         :ok <- check_wait(wait),
         :ok <- check_owner(owner),
         {:ok, client} <- client(opts) do
      res = %Reservation{
        id: System.unique_integer([:positive]),
        name: name,
        amount: amount,
        owner: owner,
        client: client
      }

      # A receive timeout is at most 2^32 - 1 ms: past it, the call waits without one.
      timeout =
        if wait == :infinity or wait + @call_margin > 0xFFFF_FFFF,
          do: :infinity,
          else: wait + @call_margin

      case Client.call(client, {:reserve, res, wait}, timeout) do
        {:error, %Error{reason: :unavailable}} = error ->
          # Whatever the server decides later, this reservation must not stay held.
          GenServer.cast(client, {:abandon, res.id})
          error

        other ->
          other
      end
    end
  end

  @doc """
  Releases a reservation. `{:error, %Error{reason: :not_found}}` if it is not held
  any more (released before, or its owner died).

  By default the release is pipelined: it returns once this VM's client has dropped
  the reservation and written the RELEASE frame to its session (no answer is awaited,
  one socket round trip less per reserve + release pair). The release is final when
  this returns: the reservation is never re-declared, and a server that dies before
  reading the frame takes the reservation with it. What others observe:

    * every later request of this VM's session (any process of this VM: they share
      one session, one ordered socket) is applied after it: a `reserve/3` or `usage/2`
      made after `release/1` returns sees the amount free;
    * another client (another VM, a Python process, or another `:client` of this VM)
      may, for the microseconds the frame takes to reach the server, still see the
      amount as used: its `wait: 0` reserve could fail, a waiting one is granted when
      the frame arrives.

  Options:

    * `:sync` - `true` to wait for the server's answer: every client of the host sees
      the amount free once this returns. Use it before telling another process that
      the amount is free. Defaults to `false`.
  """
  @spec release(Reservation.t(), keyword()) :: :ok | {:error, Error.t()}
  def release(res, opts \\ [])

  def release(%Reservation{} = res, opts) when is_map(opts) and not is_struct(opts),
    do: release(res, Map.to_list(opts))

  def release(%Reservation{client: client} = res, opts) when is_pid(client) and is_list(opts) do
    with :ok <- Options.known_keys(opts, [:sync]) do
      case Keyword.get(opts, :sync, false) do
        sync when is_boolean(sync) ->
          Client.call(client, {:release, res, sync}, @call_margin)

        other ->
          Error.error(:invalid_option, ":sync must be true or false, got: #{inspect(other)}")
      end
    end
  end

  def release(%Reservation{}, opts) when not is_list(opts),
    do:
      Error.error(
        :invalid_option,
        "options must be a keyword list or a map, got: #{inspect(opts)}"
      )

  def release(other, _opts),
    do:
      Error.error(
        :invalid_option,
        "release/1 takes a reservation returned by reserve/3, got: #{inspect(other)}"
      )

  @doc """
  What the server knows of quota `name` (`nil`: every quota): limit, total used, each
  holder (OS pid, kind `:beam | :python | :other`, label = node name or program, amount,
  number of reservations) and each waiter in line order. `{:ok, []}` for an unknown
  name.
  """
  @spec usage(name() | nil, keyword()) :: {:ok, [usage()]} | {:error, Error.t()}
  def usage(name \\ nil, opts \\ [])

  def usage(name, opts) when is_map(opts) and not is_struct(opts),
    do: usage(name, Map.to_list(opts))

  def usage(_name, opts) when not is_list(opts), do: bad_opts(opts)

  def usage(name, opts) do
    with :ok <- Options.known_keys(opts, [:client]),
         :ok <- if(name == nil, do: :ok, else: check_name(name)),
         {:ok, client} <- client(opts) do
      Client.call(client, {:usage, name}, @call_margin)
    end
  end

  @doc "The reservations this client holds (all owners)."
  @spec held(keyword()) :: [Reservation.t()]
  def held(opts \\ []) do
    case client(opts) do
      {:ok, client} -> GenServer.call(client, :held)
      {:error, _} -> []
    end
  catch
    :exit, _ -> []
  end

  @doc """
  About this VM's client: its quota directory, whether it is connected, whether this
  VM serves.
  """
  @spec info(keyword()) :: {:ok, map()} | {:error, Error.t()}
  def info(opts \\ []) do
    with {:ok, client} <- client(opts), do: {:ok, GenServer.call(client, :info)}
  catch
    :exit, reason ->
      Error.error(:unavailable, "the host quota client is not running: #{inspect(reason)}")
  end

  @doc false
  # The default client of this VM, started on first use.
  @spec client(keyword()) :: {:ok, pid()} | {:error, Error.t()}
  def client(opts) when is_map(opts) and not is_struct(opts), do: client(Map.to_list(opts))
  def client(opts) when not is_list(opts), do: bad_opts(opts)

  def client(opts) do
    case Keyword.get(opts, :client) do
      pid when is_pid(pid) -> {:ok, pid}
      nil -> default_client(opts)
      other -> Error.error(:invalid_option, ":client must be a pid, got: #{inspect(other)}")
    end
  end

  defp default_client(_opts) do
    case Process.whereis(Client) do
      nil ->
        # With config :host_quota, the client must be the manager's (with its table).
        with :ok <- Snakepit.SharedMemory.HostQuota.Regions.ensure_client() do
          case Process.whereis(Client) do
            nil -> start_default([])
            pid -> {:ok, pid}
          end
        end

      pid ->
        {:ok, pid}
    end
  end

  @doc false
  # Starts this VM's client under the application (`define` gives limits to set on the
  # first connection).
  @spec start_default(keyword()) :: {:ok, pid()} | {:error, Error.t()}
  def start_default(define) do
    spec = {Client, name: Client, define: define}

    result =
      case Process.whereis(Snakepit.SharedMemory.HostQuota.Supervisor) do
        nil -> Client.start_link(name: Client, define: define)
        sup -> DynamicSupervisor.start_child(sup, spec)
      end

    case result do
      {:ok, pid} ->
        {:ok, pid}

      {:error, {:already_started, pid}} ->
        {:ok, pid}

      {:error, %Error{} = error} ->
        {:error, error}

      {:error, reason} ->
        Error.error(:unavailable, "cannot start the host quota client: #{inspect(reason)}")
    end
  end

  defp bad_opts(opts),
    do:
      Error.error(
        :invalid_option,
        "options must be a keyword list or a map, got: #{inspect(opts)}"
      )

  defp check_name(name) do
    if Protocol.valid_name?(name),
      do: :ok,
      else:
        Error.error(
          :invalid_option,
          "a host quota name must be 1-64 characters of [A-Za-z0-9_.:-], got: #{inspect(name)}"
        )
  end

  defp check_u64(value, _what, min)
       when is_integer(value) and value >= min and value < 0x1_0000_0000_0000_0000,
       do: :ok

  defp check_u64(value, what, min),
    do:
      Error.error(
        :invalid_option,
        "#{what} must be an integer from #{min} to 2^64-1, got: #{inspect(value)}"
      )

  defp check_wait(:infinity), do: :ok
  defp check_wait(ms) when is_integer(ms) and ms >= 0 and ms < 0xFFFF_FFFF, do: :ok

  defp check_wait(other),
    do:
      Error.error(
        :invalid_option,
        ":wait must be milliseconds (a non-negative integer) or :infinity, got: #{inspect(other)}"
      )

  defp check_owner(nil), do: :ok
  defp check_owner(pid) when is_pid(pid) and node(pid) == node(), do: :ok

  defp check_owner(other),
    do:
      Error.error(
        :invalid_option,
        ":owner must be a local pid or nil, got: #{inspect(other)}"
      )
end
