defmodule Snakepit.SharedMemory.HostQuota.Client do
  @moduledoc """
  One session with the host quota server, shared by every process of this VM that uses
  it (the public API is `Snakepit.SharedMemory.HostQuota`).

  It connects to `quota.sock` in the quota directory; when nobody serves there it
  stands for election (starts a `Snakepit.SharedMemory.HostQuota.Server`, which binds
  the election socket or gives way) and connects to whoever won. When the connection
  ends (the serving VM died), it reconnects at once the same way, then re-defines the
  quotas it knows (`:if_absent`), re-declares every reservation it holds, and re-sends
  every request still waiting for an answer (same reservation ids: the server treats
  them idempotently).

  Reservations are kept per owner process: the client monitors each owner and releases
  what it held when it dies. Reservations made with `owner: nil` are held by the
  session itself and end with it (when this VM dies).
  """

  use GenServer

  require Logger

  alias Snakepit.SharedMemory.{Error, Options}
  alias Snakepit.SharedMemory.HostQuota.{Protocol, Reservation, RuntimeDir, Server}

  @max_backoff 50

  @doc false
  def child_spec(opts) do
    %{id: Keyword.get(opts, :name, __MODULE__), start: {__MODULE__, :start_link, [opts]}}
  end

  @doc """
  Starts a client. Options:

    * `:dir` - the quota directory (see `Snakepit.SharedMemory.HostQuota.RuntimeDir`).
      Defaults to the configured or default one.
    * `:name` - a registered name. Defaults to none.
    * `:label` - how the server shows this client. Defaults to the node name.
    * `:define` - `[{quota, limit}]` to set on the first connection. Defaults to `[]`.
    * `:table` - the name of a public ETS table this client owns (for
      `Snakepit.SharedMemory.HostQuota.Regions`). Defaults to none.
  """
  @spec start_link(keyword()) :: GenServer.on_start() | {:error, Error.t()}
  def start_link(opts) do
    with :ok <- check_opts(opts) do
      gen_opts = if opts[:name], do: [name: opts[:name]], else: []
      GenServer.start_link(__MODULE__, opts, gen_opts)
    end
  end

  # Checked before the process starts: a :define the server refuses would close the
  # session at every connection, and the client would reconnect forever.
  defp check_opts(opts) do
    with :ok <- Options.known_keys(opts, [:dir, :name, :label, :define, :table]) do
      cond do
        not (is_nil(opts[:dir]) or (is_binary(opts[:dir]) and opts[:dir] != "")) ->
          bad_opt(":dir must be a directory path, got: #{inspect(opts[:dir])}")

        not (is_nil(opts[:name]) or is_atom(opts[:name])) ->
          bad_opt(":name must be an atom, got: #{inspect(opts[:name])}")

        not (is_nil(opts[:table]) or is_atom(opts[:table])) ->
          bad_opt(":table must be an atom, got: #{inspect(opts[:table])}")

        not valid_define?(opts[:define]) ->
          bad_opt(
            ":define must be a list of {quota name, limit from 0 to 2^64-1}, got: " <>
              inspect(opts[:define])
          )

        true ->
          :ok
      end
    end
  end

  defp valid_define?(nil), do: true

  defp valid_define?(list) when is_list(list) do
    Enum.all?(list, fn
      {name, limit} when is_integer(limit) and limit in 0..0xFFFF_FFFF_FFFF_FFFF ->
        Protocol.valid_name?(name)

      _ ->
        false
    end)
  rescue
    # an improper list
    FunctionClauseError -> false
  end

  defp valid_define?(_), do: false

  defp bad_opt(message), do: Error.error(:invalid_option, message)

  @doc false
  @spec call(GenServer.server(), term(), timeout()) :: term()
  def call(client, message, timeout) do
    GenServer.call(client, message, timeout)
  catch
    :exit, {:timeout, _} ->
      Error.error(
        :unavailable,
        "the host quota server did not answer within #{timeout} ms (is a VM serving?)"
      )

    :exit, reason ->
      Error.error(:unavailable, "the host quota client is not running: #{inspect(reason)}")
  end

  # ---- GenServer ----

  @impl true
  def init(opts) do
    case RuntimeDir.ensure(opts[:dir]) do
      {:ok, dir} ->
        # This VM's own client: workers it starts from now on find the same directory.
        if opts[:name] == __MODULE__, do: RuntimeDir.export_env(dir)

        # A table whose life is this session's (HostQuota.Regions keeps region ->
        # reservation there): if this process dies, table and session end together.
        if opts[:table], do: :ets.new(opts[:table], [:named_table, :public, :set])

        state = %{
          dir: dir,
          path: RuntimeDir.socket_path(dir),
          label: Protocol.cut(label(opts[:label]), 255),
          client_id: :crypto.strong_rand_bytes(8) |> :binary.decode_unsigned(),
          socket: nil,
          welcomed: false,
          backoff: 1,
          next_req: 1,
          pending: %{},
          held: %{},
          limits: %{},
          owners: %{},
          server: nil,
          initial: Map.new(opts[:define] || [])
        }

        # Connecting may start a server under the same supervisor that is starting this
        # client: done after init returns, never inside it.
        {:ok, state, {:continue, :connect}}

      {:error, error} ->
        {:stop, error}
    end
  end

  @impl true
  def handle_continue(:connect, state), do: {:noreply, connect(state)}

  @impl true
  def handle_call({:define, name, limit}, from, state) do
    state = put_in(state, [:limits, name], limit)
    {:noreply, request(state, from, :define, &{:define, &1, :set, name, limit}, nil)}
  end

  def handle_call({:reserve, %Reservation{} = res, wait}, from, state) do
    state = add_owner(state, res.owner)
    make = &{:reserve, &1, res.id, res.name, res.amount, wait}
    # The caller alone learns the reservation: if it dies before the answer (killed
    # while waiting in line), nobody could ever release it, whatever its owner
    # (`owner: nil` would hold it until this VM dies). Its request leaves the line.
    # A `wait: 0` request is answered within a round trip: no monitor, the answer
    # checks that the caller still lives (settle/3) and gives back a grant it missed.
    caller = elem(from, 0)
    ref = if wait == 0, do: nil, else: Process.monitor(caller)
    {:noreply, request(state, from, :reserve, make, res, {caller, ref})}
  end

  def handle_call({:release, %Reservation{} = res}, from, state),
    do: handle_call({:release, res, true}, from, state)

  def handle_call({:release, %Reservation{id: id} = res, sync}, from, state) do
    case Map.pop(state.held, id) do
      {nil, _} ->
        {:reply,
         Error.error(
           :not_found,
           "reservation #{id} of #{inspect(res.name)} is not held (already released, " <>
             "or its owner died)"
         ), state}

      {held_res, held} when sync ->
        # sync: true: answered once the server has applied it: every client sees it
        # after this.
        state = drop_owner(%{state | held: held}, held_res.owner)
        {:noreply, request(state, from, :release, &{:release, &1, id}, held_res)}

      {held_res, held} ->
        # The default, pipelined (request id 0: no answer): the release is final
        # here, the server applies it before anything this session sends later (one
        # ordered socket), and a server that dies meanwhile takes the reservation with
        # it (it is not re-declared). Half the round trips of a reserve + release pair.
        state = drop_owner(%{state | held: held}, held_res.owner)
        {:reply, :ok, send_now(state, {:release, 0, id})}
    end
  end

  def handle_call({:declare, name, amount}, from, state) do
    res = %Reservation{
      id: System.unique_integer([:positive]),
      name: name,
      amount: amount,
      owner: nil,
      client: self()
    }

    make = &{:declare, &1, res.id, name, amount, Map.get(state.limits, name, 0)}
    {:noreply, request(state, from, :declare, make, res)}
  end

  def handle_call({:usage, name}, from, state),
    do: {:noreply, request(state, from, :usage, &{:usage, &1, name}, nil)}

  def handle_call(:held, _from, state), do: {:reply, Map.values(state.held), state}

  def handle_call(:info, _from, state) do
    {:reply,
     %{
       dir: state.dir,
       connected: state.socket != nil,
       serving: state.server != nil and Process.alive?(state.server),
       server: state.server,
       client_id: state.client_id
     }, state}
  end

  @impl true
  def handle_cast({:abandon, id}, state) do
    # A caller gave up waiting (its call timed out): whatever the server decided, let go.
    # Its request may still be pending (a grant arriving later must not be kept) or
    # already granted.
    {waiting, pending} =
      Enum.split_with(state.pending, fn {_req, e} -> e.res != nil and e.res.id == id end)

    state = %{state | pending: Map.new(pending)}

    state =
      Enum.reduce(waiting, state, fn {_, e}, state ->
        _ = caller_alive?(e)
        drop_owner(state, e.res.owner)
      end)

    {held_res, held} = Map.pop(state.held, id)
    state = if held_res, do: drop_owner(%{state | held: held}, held_res.owner), else: state
    {:noreply, send_now(state, {:release, 0, id})}
  end

  @impl true
  def handle_info({:tcp, socket, data}, %{socket: socket} = state) do
    case Protocol.decode_reply(data) do
      {:ok, reply} ->
        {:noreply, handle_reply(reply, state)}

      {:error, why} ->
        Logger.warning(
          "snakepit_shm host quota: bad reply from the server (#{why}): reconnecting"
        )

        :gen_tcp.close(socket)
        {:noreply, disconnected(state)}
    end
  end

  def handle_info({:tcp_closed, socket}, %{socket: socket} = state),
    do: {:noreply, disconnected(state)}

  def handle_info({:tcp_error, socket, _reason}, %{socket: socket} = state) do
    :gen_tcp.close(socket)
    {:noreply, disconnected(state)}
  end

  def handle_info(:reconnect, %{socket: nil} = state), do: {:noreply, connect(state)}
  def handle_info(:reconnect, state), do: {:noreply, state}

  def handle_info({:DOWN, ref, :process, pid, _reason}, state) do
    case Enum.find(state.pending, fn {_, e} -> match?({_, ^ref}, Map.get(e, :caller)) end) do
      {req, entry} -> {:noreply, caller_down(state, req, entry)}
      nil -> {:noreply, owner_down(state, pid)}
    end
  end

  def handle_info(_message, state), do: {:noreply, state}

  # ---- requests and replies ----

  defp request(state, from, kind, make, res, caller \\ nil) do
    req = state.next_req
    frame = Protocol.encode_request(make.(req))
    entry = %{from: from, kind: kind, frame: frame, res: res}
    entry = if caller, do: Map.put(entry, :caller, caller), else: entry
    state = %{state | next_req: next(req), pending: Map.put(state.pending, req, entry)}
    send_now(state, frame)
  end

  defp next(0xFFFF_FFFF), do: 1
  defp next(req), do: req + 1

  defp send_now(state, frame) when is_tuple(frame),
    do: send_now(state, Protocol.encode_request(frame))

  defp send_now(%{socket: nil} = state, _frame), do: state

  # port_command/2 rather than :gen_tcp.send/2: no selective receive of the driver's
  # {:inet_reply, ...} in a mailbox that may hold many calls (those replies are dropped
  # by the catch-all handle_info); a write error shows up as tcp_closed/tcp_error.
  defp send_now(state, frame) do
    :erlang.port_command(state.socket, frame)
    state
  rescue
    ArgumentError ->
      :gen_tcp.close(state.socket)
      disconnected(state)
  end

  defp handle_reply({:welcome, _pid, _label}, state), do: %{state | welcomed: true, backoff: 1}

  defp handle_reply({kind, req, _} = reply, state) when kind in [:granted, :usage],
    do: answer(state, req, reply)

  defp handle_reply({:ok, req} = reply, state), do: answer(state, req, reply)
  defp handle_reply({:error, req, _, _} = reply, state), do: answer(state, req, reply)

  defp answer(state, req, reply) do
    case Map.pop(state.pending, req) do
      {nil, _} -> state
      {entry, pending} -> settle(entry, reply, %{state | pending: pending})
    end
  end

  defp settle(%{kind: :reserve, res: res, from: from} = e, {:granted, _, limit}, state) do
    name = res.name

    state =
      case state.limits do
        %{^name => ^limit} -> state
        limits -> %{state | limits: Map.put(limits, name, limit)}
      end

    if caller_alive?(e) do
      GenServer.reply(from, {:ok, res})
      %{state | held: Map.put(state.held, res.id, res)}
    else
      # Granted after its caller died (its :DOWN not handled yet): give it back.
      state |> drop_owner(res.owner) |> send_now({:release, 0, res.id})
    end
  end

  defp settle(%{kind: :reserve, res: res, from: from} = e, {:error, _, reason, message}, state) do
    _ = caller_alive?(e)
    GenServer.reply(from, error(reason, message, res))
    drop_owner(state, res.owner)
  end

  defp settle(%{kind: :declare, res: res, from: from}, {:ok, _}, state) do
    GenServer.reply(from, {:ok, res})
    %{state | held: Map.put(state.held, res.id, res)}
  end

  defp settle(%{kind: :usage, from: from}, {:usage, _, quotas}, state) do
    GenServer.reply(from, {:ok, quotas})
    state
  end

  defp settle(%{from: from}, {:ok, _}, state) do
    GenServer.reply(from, :ok)
    state
  end

  defp settle(%{from: from}, {:error, _, reason, message}, state) do
    GenServer.reply(from, error(reason, message, nil))
    state
  end

  defp settle(%{from: from}, other, state) do
    GenServer.reply(from, Error.error(:io_error, "unexpected reply #{inspect(other)}"))
    state
  end

  defp error(reason, message, res) do
    details = if res, do: %{quota: res.name, amount: res.amount}, else: %{}
    Error.error(reason, message, details)
  end

  # Stops watching the caller of a settled request; whether it is still alive.
  defp caller_alive?(%{caller: {pid, ref}}) do
    if ref, do: Process.demonitor(ref, [:flush])
    # A caller on another node (a :client pid used remotely) is taken as alive.
    node(pid) != node() or Process.alive?(pid)
  end

  defp caller_alive?(_entry), do: true

  defp caller_down(state, req, entry) do
    state = %{state | pending: Map.delete(state.pending, req)}
    state |> drop_owner(entry.res.owner) |> send_now({:release, 0, entry.res.id})
  end

  # ---- owners ----

  defp add_owner(state, nil), do: state

  defp add_owner(state, pid) do
    case state.owners do
      %{^pid => {ref, n}} = owners -> %{state | owners: %{owners | pid => {ref, n + 1}}}
      owners -> %{state | owners: Map.put(owners, pid, {Process.monitor(pid), 1})}
    end
  end

  defp drop_owner(state, nil), do: state

  defp drop_owner(state, pid) do
    case state.owners do
      %{^pid => {ref, 1}} ->
        Process.demonitor(ref, [:flush])
        %{state | owners: Map.delete(state.owners, pid)}

      %{^pid => {ref, n}} = owners ->
        %{state | owners: %{owners | pid => {ref, n - 1}}}

      _ ->
        state
    end
  end

  defp owner_down(state, pid) do
    state = %{state | owners: Map.delete(state.owners, pid)}
    {gone, kept} = Enum.split_with(state.held, fn {_id, res} -> res.owner == pid end)

    {waiting, pending} =
      Enum.split_with(state.pending, fn {_req, e} -> e.res != nil and e.res.owner == pid end)

    state = %{state | held: Map.new(kept), pending: Map.new(pending)}

    # A caller that reserved for another owner is still waiting for an answer.
    for {_, e} <- waiting do
      _ = caller_alive?(e)

      GenServer.reply(
        e.from,
        Error.error(
          :owner_down,
          "the owner #{inspect(pid)} of this reservation of #{inspect(e.res.name)} died " <>
            "before it was granted"
        )
      )
    end

    ids = Enum.map(gone, &elem(&1, 0)) ++ Enum.map(waiting, fn {_, e} -> e.res.id end)
    Enum.reduce(ids, state, &send_now(&2, {:release, 0, &1}))
  end

  # ---- connection ----

  defp connect(state) do
    opts = [:binary, packet: 4, packet_size: Protocol.max_frame(), active: true]

    case :gen_tcp.connect({:local, state.path}, 0, opts, 1_000) do
      {:ok, socket} ->
        # The backoff is reset by the server's WELCOME, not by the connect: something
        # that accepts and hangs up at once (a server of another protocol version, a
        # squatter) must not be reconnected to in a hot loop.
        connected(%{state | socket: socket, welcomed: false})

      {:error, reason} when reason in [:enoent, :econnrefused] ->
        case elect(state) do
          {:ok, state} -> connect(state)
          {:retry, state} -> retry(state)
        end

      {:error, reason} ->
        # Once per outage, not once per retry.
        if state.backoff == 1,
          do:
            Logger.warning(
              "snakepit_shm host quota: cannot connect to #{state.path}: #{inspect(reason)}"
            )

        retry(state)
    end
  end

  defp retry(state) do
    Process.send_after(self(), :reconnect, state.backoff)
    %{state | backoff: min(state.backoff * 2, @max_backoff)}
  end

  defp elect(state) do
    result =
      case Process.whereis(Snakepit.SharedMemory.HostQuota.Supervisor) do
        nil -> Server.start(state.dir)
        sup -> DynamicSupervisor.start_child(sup, {Server, state.dir})
      end

    case result do
      {:ok, pid} -> {:ok, %{state | server: pid}}
      :ignore -> {:retry, state}
      {:error, reason} -> {:retry, log_election(state, reason)}
    end
  end

  defp log_election(state, reason) do
    if state.backoff == 1,
      do: Logger.warning("snakepit_shm host quota: cannot serve #{state.dir}: #{inspect(reason)}")

    state
  end

  defp connected(state) do
    hello = {:hello, state.client_id, os_pid(), :beam, state.label}
    # Limits given at start are set once (they are this VM's configuration); every
    # limit learned since is only re-created where the new server lacks it.
    redefine =
      for({name, limit} <- state.initial, do: {:define, 0, :set, name, limit}) ++
        for {name, limit} <- state.limits,
            not Map.has_key?(state.initial, name),
            do: {:define, 0, :if_absent, name, limit}

    state = %{state | limits: Map.merge(state.limits, state.initial), initial: %{}}

    declare =
      for {id, res} <- state.held,
          do: {:declare, 0, id, res.name, res.amount, Map.get(state.limits, res.name, 0)}

    frames =
      Enum.map([hello | redefine ++ declare], &Protocol.encode_request/1) ++
        (state.pending |> Enum.sort_by(&elem(&1, 0)) |> Enum.map(&elem(&1, 1).frame))

    Enum.reduce_while(frames, state, fn frame, state ->
      case send_now(state, frame) do
        %{socket: nil} = state -> {:halt, state}
        state -> {:cont, state}
      end
    end)
  end

  defp disconnected(state) do
    # A release in flight is done as far as the caller is concerned: the old server is
    # gone with everything it held, and it is not re-declared.
    {releases, pending} = Enum.split_with(state.pending, fn {_, e} -> e.kind == :release end)
    for {_, e} <- releases, do: GenServer.reply(e.from, :ok)
    state = %{state | socket: nil, pending: Map.new(pending)}
    # A session that ends before its WELCOME was refused, not a server that died:
    # back off instead of reconnecting at once.
    if state.welcomed, do: connect(state), else: retry(state)
  end

  defp os_pid, do: String.to_integer(System.pid())

  defp label(label) when is_binary(label), do: label
  defp label(nil), do: Atom.to_string(node())
  defp label(other), do: inspect(other)
end
