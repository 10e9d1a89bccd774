defmodule Snakepit.SharedMemory.HostQuota.Server do
  @moduledoc """
  The per-host quota server: one process that holds every quota, every session and
  every waiter of one host quota directory, and serialises all changes to them.

  Who serves is decided by the kernel: `init/1` binds an abstract Unix socket named
  after the directory's election token (`RuntimeDir.election_name/1`). Only one socket
  can hold that name; it is freed the instant its owner closes it or dies, SIGKILL
  included. The winner removes any stale `quota.sock`, listens there (mode 0600) and
  accepts clients. Losers return `:ignore` and connect as clients.

  A session is one connection. It starts with HELLO (client id, OS pid, kind, label)
  and ends on EOF, a socket error or a malformed message; ending it releases all it
  held and drops its waiters, at once. Nothing is polled: the socket tells.

  The state lives only here. After a takeover the new server starts empty and the
  clients re-declare what they hold (DECLARE is idempotent per `{client id,
  reservation id}`), so nothing is lost or counted twice.

  Robustness: every message is decoded by `Protocol.decode_request/1`, which never
  raises; a bad one closes that session with a logged reason. Replies are sent with
  `:nosuspend`: a client that stops reading is disconnected instead of stalling the
  server. Frames above `Protocol.max_frame/0` bytes are refused by the socket itself.
  """

  use GenServer

  require Logger

  alias Snakepit.SharedMemory.HostQuota.{Protocol, RuntimeDir}

  @active 64
  # How long a new connection may take to say HELLO (tests shorten it through
  # :persistent_term, see hello_timeout/0).
  @hello_timeout_ms 10_000
  @recovery_ms 250
  # How often the server checks that its socket file is still there (see :check_socket).
  @socket_check_ms 1_000

  @doc false
  def child_spec(dir) do
    %{
      id: {__MODULE__, dir},
      start: {__MODULE__, :start_link, [dir]},
      restart: :temporary
    }
  end

  @doc """
  Tries to become the server of `dir`: `{:ok, pid}` if this VM won the election,
  `:ignore` if another process serves.
  """
  @spec start_link(String.t()) :: GenServer.on_start()
  def start_link(dir), do: GenServer.start_link(__MODULE__, dir)

  @doc "Like `start_link/1`, unlinked (for use without a supervisor)."
  @spec start(String.t()) :: GenServer.on_start()
  def start(dir), do: GenServer.start(__MODULE__, dir)

  @doc "The state as `usage/1` reports it (for tests and tools in the serving VM)."
  @spec usage(pid(), String.t() | nil) :: [Protocol.quota_usage()]
  def usage(server, name \\ nil), do: GenServer.call(server, {:usage, name})

  # ---- GenServer ----

  @impl true
  def init(dir) do
    with {:ok, name} <- RuntimeDir.election_name(dir),
         {:ok, lock} <- :gen_tcp.listen(0, [:binary, active: false, ifaddr: {:local, name}]) do
      serve(dir, lock)
    else
      {:error, :eaddrinuse} -> :ignore
      {:error, reason} -> {:stop, reason}
    end
  end

  defp serve(dir, lock) do
    path = RuntimeDir.socket_path(dir)

    case previous_server(path) do
      :alive ->
        # Someone serves the path without holding our election name: a VM in another
        # network namespace sharing this directory (abstract names are per namespace).
        # A live server is never replaced; this VM connects to it as a client.
        :gen_tcp.close(lock)
        :ignore

      previous ->
        # Only the election winner touches the path: a leftover of a dead server goes.
        _ = File.rm(path)
        listen(dir, lock, path, previous == :dead)
    end
  end

  defp previous_server(path) do
    case :gen_tcp.connect({:local, path}, 0, [:binary, active: false], 500) do
      {:ok, socket} ->
        :gen_tcp.close(socket)
        :alive

      {:error, :enoent} ->
        :none

      {:error, _} ->
        :dead
    end
  end

  defp listen(dir, lock, path, takeover?) do
    case open_listener(path) do
      {:ok, listener} ->
        Logger.info("snakepit_shm host quota: serving #{path}")
        Process.send_after(self(), :check_socket, @socket_check_ms)

        {:ok,
         Map.merge(listener, %{
           dir: dir,
           lock: lock,
           sessions: %{},
           quotas: %{},
           label: label(),
           recovering: recovery(takeover?)
         })}

      {:error, reason} ->
        :gen_tcp.close(lock)
        {:stop, {:cannot_listen, path, reason}}
    end
  end

  # Listens at `path` (mode 0600) with an acceptor of its own.
  defp open_listener(path) do
    opts = [
      :binary,
      packet: 4,
      packet_size: Protocol.max_frame(),
      active: false,
      backlog: 1024,
      ifaddr: {:local, path}
    ]

    with {:ok, listen} <- :gen_tcp.listen(0, opts) do
      case File.chmod(path, 0o600) do
        :ok ->
          server = self()
          acceptor = spawn_link(fn -> accept_loop(listen, server) end)
          :ok = :gen_tcp.controlling_process(listen, acceptor)
          {:ok, %{listen: listen, acceptor: acceptor}}

        error ->
          :gen_tcp.close(listen)
          error
      end
    end
  end

  # The socket file was removed (an operator's rm, systemd-tmpfiles ageing the /tmp
  # fallback directory): the server still holds the election name, so no client could
  # ever reach a server again (every call :unavailable) while this VM lives. It listens
  # at the path again, if the directory is still there. A file that is there but is not
  # ours (another server, in another network namespace, took the free path) is left
  # alone.
  defp check_socket(state) do
    path = RuntimeDir.socket_path(state.dir)

    case File.lstat(path) do
      {:error, :enoent} ->
        # Only in the directory as it is (still ours, private): a directory removed
        # with it is not made again here (its clients make it, with a new election).
        with :ok <- RuntimeDir.verify(state.dir),
             {:ok, listener} <- open_listener(path) do
          Logger.warning("snakepit_shm host quota: #{path} was removed; listening there again")
          Process.unlink(state.acceptor)
          :gen_tcp.close(state.listen)
          Map.merge(state, listener)
        else
          _ -> state
        end

      _ ->
        state
    end
  end

  # After a takeover the state is rebuilt from what the live clients re-declare as they
  # reconnect (within milliseconds of the old server's death). Until the grace period
  # ends no reservation is granted, so that one granted early cannot push the total
  # past the limit once everyone has re-declared (like NFS lock recovery).
  defp recovery(false), do: false

  defp recovery(true) do
    Process.send_after(self(), :recovered, @recovery_ms)
    true
  end

  defp accept_loop(listen, server) do
    case :gen_tcp.accept(listen) do
      {:ok, socket} ->
        case :gen_tcp.controlling_process(socket, server) do
          :ok -> send(server, {:accepted, socket})
          _ -> :gen_tcp.close(socket)
        end

        accept_loop(listen, server)

      {:error, reason} when reason in [:emfile, :enfile, :enobufs] ->
        Process.sleep(50)
        accept_loop(listen, server)

      {:error, reason} ->
        exit({:accept_failed, reason})
    end
  end

  @impl true
  def handle_call({:usage, name}, _from, state), do: {:reply, usage_of(state, name), state}

  @impl true
  def handle_info({:accepted, socket}, state) do
    :ok = :inet.setopts(socket, active: @active)
    Process.send_after(self(), {:hello_deadline, socket}, hello_timeout())
    session = %{hello: false, client_id: nil, os_pid: 0, kind: :other, label: "?", held: %{}}
    {:noreply, put_in(state, [:sessions, socket], session)}
  end

  def handle_info({:tcp, socket, data}, state) do
    case Map.fetch(state.sessions, socket) do
      {:ok, session} -> {:noreply, handle_frame(socket, session, data, state)}
      :error -> {:noreply, state}
    end
  end

  def handle_info({:tcp_passive, socket}, state) do
    _ = :inet.setopts(socket, active: @active)
    {:noreply, state}
  end

  def handle_info({:tcp_closed, socket}, state), do: {:noreply, end_session(state, socket, nil)}

  def handle_info({:tcp_error, socket, reason}, state),
    do: {:noreply, end_session(state, socket, "socket error #{inspect(reason)}")}

  def handle_info(:recovered, state), do: {:noreply, recovered(state)}

  def handle_info(:check_socket, state) do
    Process.send_after(self(), :check_socket, @socket_check_ms)
    {:noreply, check_socket(state)}
  end

  # A connection that has not said HELLO by now is not a client of ours (or a stuck one):
  # it holds nothing yet, so closing it costs nobody anything and frees its descriptor.
  def handle_info({:hello_deadline, socket}, state) do
    case Map.fetch(state.sessions, socket) do
      {:ok, %{hello: false}} ->
        {:noreply, end_session(state, socket, "no HELLO within #{hello_timeout()} ms")}

      _ ->
        {:noreply, state}
    end
  end

  def handle_info({:wait_timeout, socket, res_id}, state) do
    {:noreply, wait_timed_out(state, socket, res_id)}
  end

  # Replies of port_command/3 (what gen_tcp:send would wait for).
  def handle_info({:inet_reply, _socket, _status}, state), do: {:noreply, state}

  def handle_info(message, state) do
    Logger.debug("snakepit_shm host quota server: unexpected #{inspect(message)}")
    {:noreply, state}
  end

  # ---- messages ----

  defp handle_frame(socket, session, data, state) do
    case Protocol.decode_request(data) do
      {:ok, {:hello, client_id, os_pid, kind, label}} when not session.hello ->
        session = %{session | hello: true, client_id: client_id, os_pid: os_pid}
        session = %{session | kind: kind, label: printable(label)}
        state = put_in(state, [:sessions, socket], session)
        reply(state, socket, Protocol.welcome(os_pid(), state.label))

      {:ok, {:hello, _, _, _, _}} ->
        end_session(state, socket, "a second HELLO")

      {:ok, _request} when not session.hello ->
        end_session(state, socket, "a request before HELLO")

      {:ok, request} ->
        handle_request(request, socket, state)

      {:error, why} ->
        end_session(state, socket, why)
    end
  end

  defp handle_request({:define, req, mode, name, limit}, socket, state) do
    state =
      case {Map.fetch(state.quotas, name), mode} do
        {:error, _} ->
          put_in(state, [:quotas, name], %{limit: limit, used: 0, queue: :queue.new()})

        {{:ok, _}, :if_absent} ->
          state

        {{:ok, _}, :set} ->
          put_in(state, [:quotas, name, :limit], limit)
      end

    state |> reply(socket, Protocol.ok(req), req) |> refuse_too_big(name) |> pump(name)
  end

  defp handle_request({:reserve, req, res_id, name, amount, wait}, socket, state) do
    session = state.sessions[socket]
    quota = state.quotas[name]

    cond do
      quota == nil ->
        reply_error(state, socket, req, :unknown_quota, unknown(name))

      Map.has_key?(session.held, res_id) ->
        if session.held[res_id] == {name, amount},
          do: reply(state, socket, Protocol.granted(req, quota.limit)),
          else: reply_error(state, socket, req, :conflict, conflict(res_id))

      waiting?(state, socket, res_id) ->
        reply_error(state, socket, req, :conflict, conflict(res_id))

      amount == 0 ->
        reply_error(state, socket, req, :invalid_argument, "the amount must be positive")

      amount > quota.limit ->
        reply_error(state, socket, req, :quota_exceeded, never(name, amount, quota))

      state.recovering ->
        enqueue(state, socket, req, res_id, name, amount, wait)

      :queue.is_empty(quota.queue) and quota.used + amount <= quota.limit ->
        grant(state, socket, req, res_id, name, amount)

      wait == 0 ->
        reply_error(state, socket, req, :quota_exceeded, exceeded(state, name, amount, nil))

      true ->
        enqueue(state, socket, req, res_id, name, amount, wait)
    end
  end

  defp handle_request({:release, req, res_id}, socket, state) do
    session = state.sessions[socket]

    case Map.pop(session.held, res_id) do
      {{name, amount}, held} ->
        # Direct map updates: this is the hot path (put_in/update_in cost ~1 µs more).
        %{sessions: sessions, quotas: quotas} = state
        quota = Map.fetch!(quotas, name)

        %{
          state
          | sessions: Map.put(sessions, socket, %{session | held: held}),
            quotas: Map.put(quotas, name, %{quota | used: quota.used - amount})
        }
        |> reply(socket, Protocol.ok(req), req)
        |> pump(name)

      {nil, _} ->
        # Not held: maybe still waiting (a caller that gave up or died); cancel that.
        state
        |> cancel_waiter(socket, res_id)
        |> reply(socket, Protocol.ok(req), req)
    end
  end

  defp handle_request({:declare, req, res_id, name, amount, limit}, socket, state) do
    state =
      if Map.has_key?(state.quotas, name),
        do: state,
        else: put_in(state, [:quotas, name], %{limit: limit, used: 0, queue: :queue.new()})

    case state.sessions[socket].held do
      %{^res_id => _} ->
        reply(state, socket, Protocol.ok(req), req)

      _ ->
        if waiting?(state, socket, res_id),
          do: reply(state, socket, Protocol.error(req, :conflict, conflict(res_id)), req),
          else: declare(state, socket, req, res_id, name, amount)
    end
  end

  defp handle_request({:usage, req, name}, socket, state) do
    reply(state, socket, Protocol.usage_reply(req, usage_of(state, name)))
  end

  # ---- quota state ----

  # Already held by a live client: counted whatever the limit says.
  defp declare(state, socket, req, res_id, name, amount) do
    state
    |> put_in([:sessions, socket, :held, res_id], {name, amount})
    |> update_in([:quotas, name, :used], &(&1 + amount))
    |> reply(socket, Protocol.ok(req), req)
  end

  # Waiters asking for more than a lowered limit could never be granted, and at the
  # head of the line they would block everyone behind them forever: they fail now,
  # as such a request does when it arrives.
  defp refuse_too_big(state, name) do
    quota = state.quotas[name]
    {refused, kept} = Enum.split_with(:queue.to_list(quota.queue), &(&1.amount > quota.limit))

    if refused == [] do
      state
    else
      for w <- refused, w.timer, do: Process.cancel_timer(w.timer)
      state = put_in(state, [:quotas, name, :queue], :queue.from_list(kept))

      Enum.reduce(refused, state, fn w, state ->
        reply_error(state, w.socket, w.req, :quota_exceeded, never(name, w.amount, quota))
      end)
    end
  end

  defp enqueue(state, socket, req, res_id, name, amount, wait) do
    # wait 0 during recovery: answered when it ends (recovered/1), no timer.
    timer =
      if wait in [0, :infinity],
        do: nil,
        else: Process.send_after(self(), {:wait_timeout, socket, res_id}, wait)

    waiter = %{
      socket: socket,
      req: req,
      res_id: res_id,
      amount: amount,
      since: now(),
      wait: wait,
      timer: timer
    }

    update_in(state, [:quotas, name, :queue], &:queue.in(waiter, &1))
  end

  # The grace period is over: grant what fits in line order, refuse the requests that
  # did not want to wait and do not fit.
  defp recovered(state) do
    state = %{state | recovering: false}
    state = Enum.reduce(Map.keys(state.quotas), state, &pump(&2, &1))

    # Each quota read afresh: a refusal whose send fails ends that session, which
    # changes other quotas' lines (its waiters leave, its releases grant others).
    Enum.reduce(Map.keys(state.quotas), state, fn name, state ->
      quota = state.quotas[name]
      {refused, kept} = Enum.split_with(:queue.to_list(quota.queue), &(&1.wait == 0))

      state = put_in(state, [:quotas, name, :queue], :queue.from_list(kept))

      Enum.reduce(refused, state, fn w, state ->
        reply_error(state, w.socket, w.req, :quota_exceeded, exceeded(state, name, w.amount, 0))
      end)
    end)
  end

  defp grant(state, socket, req, res_id, name, amount) do
    %{sessions: sessions, quotas: quotas} = state
    session = Map.fetch!(sessions, socket)
    quota = Map.fetch!(quotas, name)
    held = Map.put(session.held, res_id, {name, amount})

    %{
      state
      | sessions: Map.put(sessions, socket, %{session | held: held}),
        quotas: Map.put(quotas, name, %{quota | used: quota.used + amount})
    }
    |> reply(socket, Protocol.granted(req, quota.limit))
  end

  # Grants waiters in arrival order while the head fits: strict FIFO, so a large request
  # at the head is never overtaken (and starved) by smaller ones behind it.
  defp pump(%{recovering: true} = state, _name), do: state

  defp pump(state, name) do
    with %{queue: queue, used: used, limit: limit} <- state.quotas[name],
         {{:value, w}, rest} <- :queue.out(queue),
         true <- used + w.amount <= limit do
      if w.timer, do: Process.cancel_timer(w.timer)

      state
      |> put_in([:quotas, name, :queue], rest)
      |> grant(w.socket, w.req, w.res_id, name, w.amount)
      |> pump(name)
    else
      _ -> state
    end
  end

  # Whether this session's `res_id` waits in the line of any quota: granting it later
  # would overwrite what the session holds under that id (counted, never released).
  defp waiting?(state, socket, res_id) do
    Enum.any?(state.quotas, fn {_name, quota} ->
      not :queue.is_empty(quota.queue) and
        Enum.any?(:queue.to_list(quota.queue), &(&1.socket == socket and &1.res_id == res_id))
    end)
  end

  defp wait_timed_out(state, socket, res_id) do
    Enum.reduce(state.quotas, state, fn {name, quota}, state ->
      {gone, kept} =
        Enum.split_with(
          :queue.to_list(quota.queue),
          &(&1.socket == socket and &1.res_id == res_id)
        )

      case gone do
        [] ->
          state

        [w | _] ->
          message =
            exceeded(state, name, w.amount, w.wait) <>
              "; gave up after waiting #{w.wait} ms"

          state
          |> put_in([:quotas, name, :queue], :queue.from_list(kept))
          |> reply_error(socket, w.req, :quota_exceeded, message)
          |> pump(name)
      end
    end)
  end

  defp cancel_waiter(state, socket, res_id) do
    remove_waiters(state, &(&1.socket == socket and &1.res_id == res_id))
  end

  defp remove_waiters(state, match?) do
    # Each quota read afresh: a grant by pump/2 whose send fails ends that session,
    # which changes the other quotas' lines.
    Enum.reduce(Map.keys(state.quotas), state, fn name, state ->
      quota = state.quotas[name]
      {gone, kept} = Enum.split_with(:queue.to_list(quota.queue), match?)

      if gone == [] do
        state
      else
        for w <- gone, w.timer, do: Process.cancel_timer(w.timer)

        state
        |> put_in([:quotas, name, :queue], :queue.from_list(kept))
        |> pump(name)
      end
    end)
  end

  defp hello_timeout, do: :persistent_term.get({__MODULE__, :hello_timeout_ms}, @hello_timeout_ms)

  defp end_session(state, socket, why) do
    case Map.pop(state.sessions, socket) do
      {nil, _} ->
        state

      {session, sessions} ->
        :gen_tcp.close(socket)
        state = %{state | sessions: sessions}

        if why,
          do:
            Logger.warning(
              "snakepit_shm host quota: closing the session of #{who(session)}: #{why}"
            )

        released =
          Enum.reduce(session.held, %{}, fn {_id, {name, amount}}, acc ->
            Map.update(acc, name, amount, &(&1 + amount))
          end)

        if released != %{},
          do:
            Logger.info(
              "snakepit_shm host quota: session of #{who(session)} ended, released " <>
                Enum.map_join(released, ", ", fn {n, a} -> "#{a} of #{inspect(n)}" end)
            )

        state =
          Enum.reduce(released, state, fn {name, amount}, state ->
            update_in(state, [:quotas, name, :used], &(&1 - amount))
          end)

        state = remove_waiters(state, &(&1.socket == socket))
        Enum.reduce(Map.keys(released), state, &pump(&2, &1))
    end
  end

  # ---- usage and messages ----

  defp usage_of(state, name) do
    quotas =
      case name do
        nil -> Enum.sort_by(state.quotas, &elem(&1, 0))
        name -> Enum.filter([{name, state.quotas[name]}], &elem(&1, 1))
      end

    for {name, quota} <- quotas do
      %{
        name: name,
        limit: quota.limit,
        used: quota.used,
        holders: holders(state, name),
        waiters:
          for w <- :queue.to_list(quota.queue) do
            state.sessions[w.socket]
            |> client()
            |> Map.merge(%{amount: w.amount, waited_ms: now() - w.since})
          end
      }
    end
  end

  defp holders(state, name) do
    for {_socket, session} <- state.sessions,
        held = for({_, {^name, a}} <- session.held, do: a),
        held != [] do
      Map.merge(client(session), %{amount: Enum.sum(held), count: length(held)})
    end
    |> Enum.sort_by(&(-&1.amount))
  end

  defp client(session),
    do: %{os_pid: session.os_pid, kind: session.kind, label: session.label}

  defp exceeded(state, name, amount, _wait) do
    quota = state.quotas[name]
    holders = holders(state, name)
    shown = Enum.take(holders, 5)

    by =
      Enum.map_join(shown, ", ", fn h -> "#{h.amount} by #{describe(h)}" end) <>
        if(length(holders) > 5, do: ", ...", else: "")

    waiters = :queue.len(quota.queue)

    "cannot reserve #{amount} of host quota #{inspect(name)}: #{quota.used} of " <>
      "#{quota.limit} used" <>
      if(by != "", do: " (#{by})", else: "") <>
      ", #{max(quota.limit - quota.used, 0)} left" <>
      if(waiters > 0, do: ", #{waiters} reservation(s) already waiting", else: "") <>
      "; release reservations, raise the limit (define), or wait in line (the wait option)"
  end

  defp never(name, amount, quota),
    do:
      "cannot reserve #{amount} of host quota #{inspect(name)}: more than its whole " <>
        "limit #{quota.limit}; raise the limit with define/2"

  defp unknown(name),
    do:
      "no host quota named #{inspect(name)}: define it first with define(#{inspect(name)}, limit)"

  defp conflict(res_id),
    do: "reservation id #{res_id} is already in use by this client for another request"

  defp describe(%{kind: :beam, label: label, os_pid: pid}), do: "node #{label} (os pid #{pid})"

  defp describe(%{kind: :python, label: label, os_pid: pid}),
    do: "python #{label} (os pid #{pid})"

  defp describe(%{label: label, os_pid: pid}), do: "#{label} (os pid #{pid})"

  defp who(%{hello: false}), do: "a client before HELLO"
  defp who(session), do: describe(session)

  # ---- sending ----

  defp reply_error(state, socket, req, reason, message),
    do: reply(state, socket, Protocol.error(req, reason, message))

  # Request id 0 means "no reply wanted" (fire-and-forget releases and re-declarations).
  defp reply(state, _socket, _data, 0), do: state
  defp reply(state, socket, data, _req), do: reply(state, socket, data)

  defp reply(state, socket, data) do
    if Map.has_key?(state.sessions, socket) do
      try do
        if :erlang.port_command(socket, data, [:nosuspend]),
          do: state,
          else: end_session(state, socket, "it does not read its replies (send buffer full)")
      rescue
        ArgumentError -> end_session(state, socket, nil)
      end
    else
      state
    end
  end

  # Labels end up in log lines and error messages: printable characters only, short.
  defp printable(label) do
    label
    |> String.slice(0, 64)
    |> String.replace(~r/[^[:print:]]/u, "?")
  end

  defp now, do: System.monotonic_time(:millisecond)

  defp os_pid, do: String.to_integer(System.pid())

  defp label, do: Atom.to_string(node())
end
