defmodule Snakepit.SharedMemory.Channel.Server do
  @moduledoc false
  # The process behind a Snakepit.SharedMemory.Channel (what a port is to :gen_tcp). It is
  # the target of enif_select on the channel's epoll fd: each {:select, ...} message means
  # "the doorbell rang, the control socket has news, or ring space came back". It then
  # drains the incoming ring (NIF calls bounded to 1 MiB / 64 messages each), delivers
  # active-mode messages to the owner, answers passive recv/2 callers and senders waiting
  # for space, and re-arms the select after announcing in the ring what it waits for.
  # It never loops on its own: when something is ready at once it sends itself :poll, so
  # calls (setopts, close) interleave with a busy stream.

  use GenServer

  import Bitwise, only: [<<<: 2]

  alias Snakepit.SharedMemory.{Channel, Error, Native, Stats}

  @registry Snakepit.SharedMemory.ChannelRegistry
  @batch 64
  @recv_bytes 1 <<< 20

  @spec start(pid(), keyword()) :: {:ok, Channel.t()} | {:error, Error.t()}
  def start(owner, opts) do
    case GenServer.start(__MODULE__, {owner, opts}) do
      {:ok, pid} -> first_answer(pid, owner)
      {:error, {:shutdown, %Error{} = error}} -> {:error, error}
      {:error, other} -> Error.error(:io_error, "channel failed to start: #{inspect(other)}")
    end
  end

  # The channel process stops (normally) if the owner dies before it answered: open/1
  # returns the error a dead owner gets rather than exiting its caller.
  defp first_answer(pid, owner) do
    GenServer.call(pid, :channel, :infinity)
  catch
    :exit, _ ->
      Error.error(:not_found, "the channel's owner #{inspect(owner)} died while it opened")
  end

  @spec all() :: [Channel.t()]
  def all do
    if Process.whereis(@registry) do
      for {_pid, ch} <- Registry.lookup(@registry, :channels), do: ch
    else
      []
    end
  end

  @impl true
  def init({owner, opts}) do
    native_opts = %{
      ring_size: opts[:ring_size],
      inline_threshold: opts[:inline_threshold] || 0,
      transport: opts[:transport],
      socket_dir: socket_dir(opts[:socket_dir]),
      ack_mode: opts[:ack_mode],
      max_batch_size: opts[:max_batch_size],
      flush_interval_us: opts[:flush_interval] * 1000,
      max_message_size: opts[:max_message_size],
      simulate_memfd_failure: opts[:simulate_memfd_failure] == true
    }

    with {:ok, res} <- open_native(native_opts),
         :ok <- monitor_native(res, owner),
         :ok <- guard_native(res),
         info = Native.channel_info(res),
         {:ok, bell} <- open_doorbell(res, info.transport) do
      timeout = :atomics.new(1, signed: true)
      :atomics.put(timeout, 1, Channel.encode_timeout(opts[:send_timeout]))

      ch = %Channel{
        id: "spshm_ch_" <> random_id(),
        resource: res,
        server: self(),
        inline_max: info.inline_max,
        send_timeout: timeout
      }

      if Process.whereis(@registry), do: Registry.register(@registry, :channels, ch)

      Stats.telemetry([:snakepit_shm, :channel, :open], %{count: 1}, %{
        id: ch.id,
        transport: info.transport
      })

      state = %{
        ch: ch,
        res: res,
        owner: owner,
        owner_mon: Process.monitor(owner),
        active: normalize_active(opts[:active]),
        recv_q: :queue.new(),
        space: [],
        closed: nil,
        close_detail: nil,
        closed_sent: false,
        connected: false,
        poll_pending: false,
        spin_pending: false,
        spin_ns: opts[:spin] * 1000,
        bell: bell
      }

      {:ok, arm(state)}
    else
      {:error, %Error{} = error} -> {:stop, {:shutdown, error}}
    end
  end

  # The socket's path travels in the ref to a worker that may run in another working
  # directory: a relative :socket_dir is made absolute here (against this VM's).
  defp socket_dir(dir) when dir in [nil, ""], do: ""
  defp socket_dir(dir), do: Path.expand(dir)

  defp open_native(opts) do
    case Native.channel_open(opts) do
      {:ok, res} -> {:ok, res}
      {:error, native} -> {:error, Channel.native_error(native, %{})}
    end
  end

  # The owner's doorbell is read by an fd port instead of the epoll fd under enif_select:
  # the BEAM's schedulers poll the fds of ports themselves (a scheduler that still spins
  # for work sees the doorbell at once), while an enif_select fd waits for the poll
  # thread, whose wake-up costs a thread switch on every round trip (docs/CHANNEL.md).
  defp open_doorbell(res, :shm) do
    case Native.channel_doorbell(res) do
      {:ok, fd} ->
        try do
          {:ok, Port.open({:fd, fd, fd}, [:binary, :in])}
        rescue
          e ->
            Native.channel_close(res)
            Native.channel_doorbell_close(res)
            Error.error(:io_error, "cannot watch the channel's doorbell: #{Exception.message(e)}")
        end

      {:error, native} ->
        Native.channel_close(res)
        {:error, Error.from_native(native)}
    end
  end

  defp open_doorbell(_res, :socket), do: {:ok, nil}

  defp close_doorbell(%{bell: nil}), do: :ok

  defp close_doorbell(%{bell: bell, res: res}) do
    try do
      Port.close(bell)
    rescue
      ArgumentError -> :ok
    end

    Native.channel_doorbell_close(res)
  end

  # The resource monitors this process too: killed, it closes the channel.
  defp guard_native(res) do
    case Native.channel_guard(res) do
      :ok ->
        :ok

      {:error, native} ->
        Native.channel_close(res)
        {:error, Error.from_native(native)}
    end
  end

  defp monitor_native(res, owner) do
    case Native.channel_monitor(res, owner) do
      :ok ->
        :ok

      {:error, _} ->
        Native.channel_close(res)
        Error.error(:not_found, "the channel's owner #{inspect(owner)} is not alive")
    end
  end

  defp random_id do
    :crypto.strong_rand_bytes(10) |> Base.encode32(case: :lower, padding: false)
  end

  defp normalize_active(n) when is_integer(n) and n <= 0, do: false
  defp normalize_active(a), do: a

  # ---- calls ----

  @impl true
  def handle_call(:channel, _from, state), do: {:reply, {:ok, state.ch}, state}

  def handle_call(:owner_info, _from, state) do
    {:reply, {:ok, %{active: state.active, owner: state.owner}}, state}
  end

  def handle_call({:recv, _timeout}, _from, %{active: active} = state) when active != false do
    {:reply, active_mode_error(), state}
  end

  def handle_call({:recv, timeout}, from, state) do
    state = deliver(state)
    first = if :queue.is_empty(state.recv_q), do: take_one(state), else: nil

    cond do
      first != nil ->
        {reply, state} = first
        {:reply, reply, arm(state)}

      state.closed != nil ->
        {:reply, closed_error(state), state}

      timeout == 0 ->
        {:reply, timeout_error(state), state}

      true ->
        timer = start_timer({:recv_timeout, from}, timeout)

        # Monitored: a caller that dies while it waits leaves the queue (else the next
        # message would be taken from the ring for it and lost).
        {pid, _tag} = from
        waiter = {from, timer, Process.monitor(pid)}
        state = %{state | recv_q: :queue.in(waiter, state.recv_q)}
        {:noreply, arm(state)}
    end
  end

  def handle_call({:active, a}, _from, state) do
    active =
      case {a, state.active} do
        {n, cur} when is_integer(n) and is_integer(cur) -> cur + n
        {n, _} -> n
      end

    state = %{state | active: normalize_active(active)}

    if is_integer(active) and active <= 0 do
      send(state.owner, {:snakepit_shm_channel_passive, state.ch})
    end

    # recv/2 callers still waiting would never be answered: the messages now go to the
    # owner. They get the answer a recv/2 in active mode gets.
    state = if state.active != false, do: fail_receivers(state, active_mode_error()), else: state

    {:reply, :ok, process(state)}
  end

  def handle_call({:await_space, need, remaining}, from, state) do
    if state.closed != nil do
      {:reply, closed_error(state), state}
    else
      timer = start_timer({:space_timeout, from}, remaining)

      {:noreply, arm(%{state | space: [{from, need, timer} | state.space]})}
    end
  end

  # The first step of Channel.controlling_process/2: no more deliveries to the caller
  # (active: false) while it moves the messages already in its mailbox to the new owner;
  # answers the active mode to restore once the new owner has them.
  def handle_call({:hand_over_begin, caller, pid}, _from, state) do
    case hand_over_refusal(state, caller, pid) do
      nil -> {:reply, {:ok, state.active}, %{state | active: false}}
      error -> {:reply, error, state}
    end
  end

  def handle_call({:controlling_process, caller, pid}, _from, state) do
    case hand_over_refusal(state, caller, pid) do
      nil ->
        if Native.channel_monitor(state.res, pid) == :ok do
          Process.demonitor(state.owner_mon, [:flush])
          {:reply, :ok, %{state | owner: pid, owner_mon: Process.monitor(pid)}}
        else
          {:reply, Error.error(:not_found, "the new owner #{inspect(pid)} is not alive"), state}
        end

      error ->
        {:reply, error, state}
    end
  end

  def handle_call(:close, _from, state) do
    Native.channel_close(state.res)
    state = fail_waiters(%{state | closed: state.closed || :closed})
    closed_telemetry(state, :closed)
    # Out of the registry before the reply: Channel.list/0 must not show a channel whose
    # close/1 returned (the registry's own cleanup after our exit is asynchronous).
    if Process.whereis(@registry), do: Registry.unregister(@registry, :channels)
    {:stop, :normal, :ok, state}
  end

  # ---- events ----

  @impl true
  # The hot path of an active, connected channel: one NIF call takes the messages and
  # re-arms the select (see Native.channel_pump/3).
  def handle_info(
        {:select, _res, :undefined, :ready_input},
        %{connected: true, closed: nil, active: active, space: []} = state
      )
      when active != false do
    case Native.channel_pump(state.res, batch_count(active), @recv_bytes) do
      {:ok, msgs, armed} ->
        state = deliver_active(state, msgs)
        {:noreply, if(armed, do: state, else: arm(state))}

      {:closed, reason, msgs} ->
        {:noreply, state |> deliver_active(msgs) |> closed(reason)}

      {:error, native} ->
        {:noreply, closed(state, {:io_error, native_message(native)})}
    end
  end

  # The doorbell rang (its fd port read the eventfd): the hot path of an active channel
  # is one NIF call and no system call; :spin is the brief re-check after the last
  # message (Native.channel_pump_bell/5).
  def handle_info({bell, {:data, _}}, %{bell: bell} = state) do
    if hot?(state), do: pump_bell(state, true), else: {:noreply, process(state)}
  end

  def handle_info(:spin, state) do
    state = %{state | spin_pending: false}
    if hot?(state), do: pump_bell(state, false), else: {:noreply, process(state)}
  end

  def handle_info({:select, _res, :undefined, :ready_input}, state) do
    state =
      case Native.channel_events(state.res) do
        :connected when not state.connected ->
          Stats.telemetry([:snakepit_shm, :channel, :connected], %{count: 1}, %{id: state.ch.id})
          %{state | connected: true}

        :accept_paused ->
          # This VM is out of descriptors: a worker's connection waits in the backlog.
          # The listening socket is watched again after a pause (prepare_wait), which
          # the next arm here, 50 ms from now, makes.
          Process.send_after(self(), :retry_accept, 50)
          state

        _ ->
          state
      end

    {:noreply, process(state)}
  end

  def handle_info(:retry_accept, state), do: {:noreply, process(state)}

  def handle_info(:poll, state), do: {:noreply, process(%{state | poll_pending: false})}

  def handle_info({:recv_timeout, from}, state) do
    {hits, rest} = Enum.split_with(:queue.to_list(state.recv_q), fn {f, _, _} -> f == from end)
    for waiter <- hits, do: answer(waiter, timeout_error(state))
    {:noreply, %{state | recv_q: :queue.from_list(rest)}}
  end

  def handle_info({:space_timeout, from}, state) do
    {hits, rest} = Enum.split_with(state.space, fn {f, _, _} -> f == from end)

    if hits != [] do
      GenServer.reply(
        from,
        Error.error(:timeout, "no ring space within :send_timeout: the worker does not read", %{
          channel: state.ch.id
        })
      )
    end

    {:noreply, %{state | space: rest}}
  end

  def handle_info({:DOWN, ref, :process, _pid, _reason}, %{owner_mon: ref} = state) do
    Native.channel_close(state.res)
    closed_telemetry(state, :owner_down)
    {:stop, :normal, fail_waiters(%{state | closed: state.closed || :closed})}
  end

  # A recv/2 caller died while it waited.
  def handle_info({:DOWN, ref, :process, _pid, _reason}, state) do
    {gone, rest} = Enum.split_with(:queue.to_list(state.recv_q), fn {_, _, m} -> m == ref end)
    for {_, timer, _} <- gone, timer != nil, do: Process.cancel_timer(timer)
    {:noreply, %{state | recv_q: :queue.from_list(rest)}}
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    Native.channel_close(state.res)
    close_doorbell(state)
    :ok
  end

  # ---- the work ----

  defp hot?(%{connected: true, closed: nil, active: active, space: []}), do: active != false
  defp hot?(_state), do: false

  defp pump_bell(state, woke) do
    case Native.channel_pump_bell(
           state.res,
           batch_count(state.active),
           @recv_bytes,
           woke,
           state.spin_ns
         ) do
      {:ok, msgs, next} ->
        state = deliver_active(state, msgs)

        case next do
          true -> {:noreply, state}
          false -> {:noreply, poll_soon(state)}
          :spin -> {:noreply, spin_soon(state)}
        end

      {:closed, reason, msgs} ->
        {:noreply, state |> deliver_active(msgs) |> closed(reason)}

      {:error, native} ->
        {:noreply, closed(state, {:io_error, native_message(native)})}
    end
  end

  defp spin_soon(%{spin_pending: true} = state), do: state

  defp spin_soon(state) do
    send(self(), :spin)
    %{state | spin_pending: true}
  end

  defp process(state) do
    state
    |> deliver()
    |> wake_senders()
    |> arm()
  end

  defp deliver(%{closed: closed} = state) when closed != nil, do: state

  defp deliver(%{active: false} = state) do
    if :queue.is_empty(state.recv_q) do
      state
    else
      {{:value, {{pid, _}, timer, mon} = waiter}, q} = :queue.out(state.recv_q)

      if node(pid) == node() and not Process.alive?(pid) do
        # Died while waiting (its :DOWN is not handled yet): nothing is taken for it.
        if timer, do: Process.cancel_timer(timer)
        Process.demonitor(mon, [:flush])
        deliver(%{state | recv_q: q})
      else
        case take_one(state) do
          nil ->
            state

          {{:error, _} = reply, state} ->
            answer(waiter, reply)
            fail_waiters(%{state | recv_q: q})

          {reply, state} ->
            answer(waiter, reply)
            deliver(%{state | recv_q: q})
        end
      end
    end
  end

  defp deliver(state) do
    {msgs, status} = recv(state, batch_count(state.active))
    state = deliver_active(state, msgs)

    case status do
      :open -> state
      reason -> closed(state, reason)
    end
  end

  defp batch_count(n) when is_integer(n), do: min(n, @batch)
  defp batch_count(:once), do: 1
  defp batch_count(true), do: @batch

  # Active mode: the messages go to the owner, the active count goes down.
  defp deliver_active(state, []), do: state

  defp deliver_active(state, msgs) do
    for m <- msgs, do: send(state.owner, {:snakepit_shm_channel, state.ch, m})
    n = length(msgs)

    case state.active do
      :once when n > 0 ->
        %{state | active: false}

      a when is_integer(a) ->
        left = a - n

        if left <= 0 do
          send(state.owner, {:snakepit_shm_channel_passive, state.ch})
          %{state | active: false}
        else
          %{state | active: left}
        end

      _ ->
        state
    end
  end

  # One message for a passive caller: {{:ok, bin} | {:error, e}, state} or nil.
  defp take_one(state) do
    case recv(state, 1) do
      {[m], :open} -> {{:ok, m}, state}
      {[m], reason} -> {{:ok, m}, mark_closed(state, reason)}
      {[], :open} -> nil
      {[], reason} -> state |> mark_closed(reason) |> then(&{closed_error(&1), &1})
    end
  end

  defp recv(state, count) do
    case Native.channel_recv(state.res, count, @recv_bytes) do
      {:ok, msgs} -> {msgs, :open}
      {:closed, reason, msgs} -> {msgs, reason}
      {:error, native} -> {[], {:io_error, native_message(native)}}
    end
  end

  defp native_message({_reason, message, _errno}), do: message

  # reason: a close reason, or {:io_error, detail} for a failure of the NIF itself (the
  # endpoint's own failures leave their detail in its stats: read before closing it).
  defp mark_closed(state, {:io_error, detail}) do
    state = if state.closed == nil, do: %{state | close_detail: detail}, else: state
    mark_closed(state, :io_error)
  end

  defp mark_closed(state, reason) do
    if state.closed == nil do
      detail =
        state.close_detail ||
          if(reason == :io_error, do: Native.channel_stats(state.res).close_detail)

      Native.channel_close(state.res)
      closed_telemetry(state, reason)
      %{state | closed: reason, close_detail: detail}
    else
      state
    end
  end

  defp closed_error(state), do: closed_error(state, state.closed)

  defp closed_error(state, reason) do
    Channel.closed_error(state.ch.id, reason, if(reason == state.closed, do: state.close_detail))
  end

  defp closed(state, reason) do
    state = mark_closed(state, reason)

    if state.closed_sent do
      state
    else
      send(state.owner, {:snakepit_shm_channel_closed, state.ch, state.closed})
      fail_waiters(%{state | closed_sent: true})
    end
  end

  defp fail_waiters(state) do
    reason = state.closed || :closed
    state = fail_receivers(state, closed_error(state, reason))

    for {from, _need, timer} <- state.space do
      if timer, do: Process.cancel_timer(timer)
      GenServer.reply(from, closed_error(state, reason))
    end

    %{state | space: []}
  end

  defp answer({from, timer, mon}, reply) do
    if timer, do: Process.cancel_timer(timer)
    Process.demonitor(mon, [:flush])
    GenServer.reply(from, reply)
  end

  defp fail_receivers(state, reply) do
    for waiter <- :queue.to_list(state.recv_q), do: answer(waiter, reply)

    %{state | recv_q: :queue.new()}
  end

  defp hand_over_refusal(state, caller, pid) do
    cond do
      caller != state.owner ->
        Error.error(:not_owner, "only the channel's owner may hand it over")

      # Its messages would be sent to this process, which drops what it does not know,
      # and nobody could take the channel back (only the owner may hand it over).
      pid == self() ->
        Error.error(
          :invalid_argument,
          "the channel's own process (ch.server) cannot own it: give the process that " <>
            "receives its messages"
        )

      true ->
        nil
    end
  end

  defp active_mode_error do
    Error.error(:active_mode, "recv/2 needs active: false (the channel delivers messages)")
  end

  # erlang:send_after/3 refuses times beyond about 2^44 ms; a timeout that long (over 34
  # years) is waited for as :infinity is, instead of crashing this process.
  @max_timer_ms 1 <<< 40
  defp start_timer(_msg, :infinity), do: nil
  defp start_timer(_msg, ms) when ms > @max_timer_ms, do: nil
  defp start_timer(msg, ms), do: Process.send_after(self(), msg, ms)

  # Senders waiting for space retry (a spurious wake-up costs them one NIF call).
  defp wake_senders(%{space: []} = state), do: state

  defp wake_senders(state) do
    for {from, _need, timer} <- state.space do
      if timer, do: Process.cancel_timer(timer)
      GenServer.reply(from, :retry)
    end

    %{state | space: []}
  end

  defp arm(%{closed: closed} = state) when closed != nil, do: state

  defp arm(state) do
    want_data = state.active != false or not :queue.is_empty(state.recv_q)
    want_space = state.space != []
    need = Enum.reduce(state.space, 0, fn {_, n, _}, acc -> max(n, acc) end)

    if Native.channel_prepare_wait(state.res, want_data, want_space, need) do
      case Native.channel_select(state.res) do
        :ok -> state
        {:closed, reason} -> closed(state, reason)
        {:error, _} -> closed(state, :io_error)
      end
    else
      poll_soon(state)
    end
  end

  defp poll_soon(%{poll_pending: true} = state), do: state

  defp poll_soon(state) do
    send(self(), :poll)
    %{state | poll_pending: true}
  end

  defp timeout_error(state) do
    Error.error(:timeout, "no message within the timeout", %{channel: state.ch.id})
  end

  defp closed_telemetry(state, reason) do
    Stats.telemetry([:snakepit_shm, :channel, :closed], %{count: 1}, %{
      id: state.ch.id,
      reason: reason
    })
  end
end
