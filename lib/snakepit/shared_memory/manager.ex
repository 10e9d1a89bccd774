defmodule Snakepit.SharedMemory.Manager do
  @moduledoc """
  The one process that serialises anything, and only what must be serialised:

    * deaths: owners (`{:snakepit_shm_owner_down, id, pid}` from the NIF's monitors),
      API callers (monitors; their mappings are unmapped, their owned regions get their
      policy), OS holders (pidfd watches). An allocation or a free a caller was killed
      in needs no repair: its quota charge gives itself back with its heap
      (`Snakepit.SharedMemory.Quota`), so nothing here waits for callers in flight;
    * OS holders' announcements on the VM's event socket (`Snakepit.SharedMemory.Events`):
      each names one region to look at, coalesced, so discovering a new holder is
      O(the regions that changed), never a poll of every region (a scan every
      `:holder_scan_interval` ms only where the event socket cannot be opened);
    * the periodic cleanup (every `:cleanup_interval` ms: expiry, policies, vanished
      and leaked segments);
    * the orphan sweep when another VM sharing the shm directory dies
      (`Snakepit.SharedMemory.Peers` tells it; deaths told together share one sweep);
    * `cleanup_regions/1`;
    * start-up: rebuild from the segments if the tables are new, orphan sweep,
      re-declaration of host quota reservations lost with a restarted client, owner
      re-check, re-monitoring of callers, a first holder scan.

  Allocation, mapping, reads, writes and deallocation never wait for it. It can be
  killed at any time: the tables live in `Snakepit.SharedMemory.TableOwner`, and
  start-up re-derives everything else.

  On a normal application stop it frees every region, so that nothing of ours is left
  in `/dev/shm`.
  """

  use GenServer

  require Logger

  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{Cleanup, Config, Events, Holders, Registry, Sweep}

  @doc false
  def start_link(_arg), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc "Runs `cleanup_regions/1` with validated options (`Snakepit.SharedMemory.Options.cleanup/1`)."
  @spec cleanup(map()) :: {:ok, [Cleanup.freed()]} | {:error, term()}
  def cleanup(opts), do: call({:cleanup, opts})

  @doc """
  Tells the manager that the VM `peer` (`Snakepit.SharedMemory.Peers`) died: with
  `:orphan_sweep` on, it sweeps the orphans (once for the deaths told at the same time,
  and at the earliest 4 times the previous such sweep's duration after it ended: a
  stream of deaths cannot keep the manager sweeping) and sweeps again later the
  segments of that VM some process still holds.
  """
  @spec peer_down(Snakepit.SharedMemory.Peers.identity()) :: :ok
  def peer_down(peer), do: GenServer.cast(__MODULE__, {:peer_down, peer})

  @doc """
  Waits until the manager has handled every message sent to it before this call
  (owner deaths, caller deaths, ...), then runs a holder scan and the periodic cleanup.
  For tests and tools that need a settled state.
  """
  @spec sync() :: :ok | {:error, term()}
  def sync, do: call(:sync)

  defp call(message) do
    GenServer.call(__MODULE__, message, 60_000)
  catch
    :exit, reason -> {:error, reason}
  end

  # ---- GenServer ----

  @held_recheck_min 1_000
  @held_recheck_max 60_000
  # Sweeps for dead peers keep the manager busy a fifth of the time at most.
  @peer_sweep_spacing 4
  @peer_sweep_max_wait 10_000
  @max_dead_peers 1_024

  @impl true
  def init(nil) do
    Process.flag(:trap_exit, true)
    config = Config.get()

    state = %{
      holders: Holders.new(),
      monitored: MapSet.new(),
      config: config,
      events: open_events(),
      rung: MapSet.new(),
      held_orphans: %{ids: [], at: 0, wait: @held_recheck_min},
      dead_peers: [],
      peer_sweep_next: now_ms()
    }

    unless Registry.flag(:initialized) do
      adopted = Sweep.adopt_own_segments()
      Registry.set_flag(:initialized, true)

      if adopted != [],
        do:
          Logger.warning(
            "snakepit_shm: registry rebuilt, re-adopted #{length(adopted)} region(s)"
          )
    end

    held = if config.orphan_sweep, do: elem(Sweep.sweep_orphans_at_start(), 1), else: []
    Snakepit.SharedMemory.HostQuota.Regions.redeclare(Registry.all())
    Cleanup.check_owners()
    # A manager killed while it freed a region (an owner's death, an expiry) never
    # withdrew it from the cluster directory.
    Snakepit.SharedMemory.Cluster.Directory.reconcile()
    state = Enum.reduce(Registry.callers(), state, &monitor/2)
    state = %{state | holders: Holders.scan(state.holders)}
    state = %{state | held_orphans: %{state.held_orphans | ids: held, at: now_ms()}}
    if state.events == nil, do: schedule(:holder_scan, config.holder_scan_interval)
    schedule(:cleanup, config.cleanup_interval)
    {:ok, state}
  end

  @impl true
  def handle_cast({:monitor_caller, pid}, state), do: {:noreply, monitor(pid, state)}

  # Deaths told together (queued before the :sweep_for_peers message) share one sweep, and
  # a sweep starts at the earliest @peer_sweep_spacing times its predecessor's duration
  # after it ended: each peer that ends (a worker's normal exit included) asks for a sweep
  # of the whole shm directory, and back to back they would keep the manager busy.
  def handle_cast({:peer_down, peer}, %{config: %{orphan_sweep: true}} = state) do
    if state.dead_peers == [] do
      case state.peer_sweep_next - now_ms() do
        wait when wait > 0 -> schedule(:sweep_for_peers, wait)
        _ -> send(self(), :sweep_for_peers)
      end
    end

    # Identities only say which held segments to look at again: a stream of deaths (or
    # of forged hellos) keeps at most @max_dead_peers of them until the sweep.
    if peer in state.dead_peers or length(state.dead_peers) >= @max_dead_peers,
      do: {:noreply, state},
      else: {:noreply, %{state | dead_peers: [peer | state.dead_peers]}}
  end

  def handle_cast({:peer_down, _peer}, state), do: {:noreply, state}

  @impl true
  def handle_call({:cleanup, opts}, _from, state) do
    {:reply, {:ok, cleanup_regions(opts)}, state}
  end

  def handle_call(:sync, _from, state) do
    state = %{state | holders: Holders.scan(state.holders)}
    {:reply, :ok, periodic_cleanup(state)}
  end

  @impl true
  def handle_info({:snakepit_shm_owner_down, id, pid}, state) do
    Cleanup.owner_down(id, pid)
    {:noreply, state}
  end

  def handle_info({:DOWN, _ref, :process, pid, reason}, state) do
    _ = Cleanup.caller_down(pid)
    # Killed (or crashed) between registering a region and announcing it to the cluster
    # directory, or between taking a freed region's record and withdrawing it: the
    # directory re-reads the registry.
    if reason != :normal, do: Snakepit.SharedMemory.Cluster.Directory.reconcile()
    {:noreply, %{state | monitored: MapSet.delete(state.monitored, pid)}}
  end

  def handle_info({:select, watch, ref, :ready_input}, state) do
    {:noreply, %{state | holders: Holders.exited(state.holders, watch, ref)}}
  end

  def handle_info({:udp, socket, _address, _port, data}, %{events: %{socket: socket}} = state) do
    {:noreply, ring(state, Events.parse(data))}
  end

  def handle_info({:udp_passive, socket}, %{events: %{socket: socket} = events} = state) do
    Events.rearm(events)
    {:noreply, state}
  end

  def handle_info(:rung, state) do
    holders = Enum.reduce(state.rung, state.holders, &Holders.rung(&2, &1))
    {:noreply, %{state | holders: holders, rung: MapSet.new()}}
  end

  def handle_info(:sweep_for_peers, state) do
    started = now_ms()
    {_freed, held} = Sweep.sweep_orphans_of(state.dead_peers)
    ended = now_ms()
    next = ended + min((ended - started) * @peer_sweep_spacing, @peer_sweep_max_wait)
    {:noreply, remember_held(%{state | dead_peers: [], peer_sweep_next: next}, held)}
  end

  def handle_info(:holder_scan, state) do
    schedule(:holder_scan, state.config.holder_scan_interval)
    {:noreply, %{state | holders: Holders.scan(state.holders)}}
  end

  def handle_info(:cleanup, state) do
    schedule(:cleanup, state.config.cleanup_interval)
    Snakepit.SharedMemory.Arena.maintain()
    {:noreply, state |> periodic_cleanup() |> sweep_held_orphans()}
  end

  def handle_info({:EXIT, _pid, _reason}, state), do: {:noreply, state}

  def handle_info(message, state) do
    Logger.debug("snakepit_shm manager: unexpected message #{inspect(message)}")
    {:noreply, state}
  end

  @impl true
  def terminate(reason, state) do
    Events.close(state.events)

    # A normal stop frees everything. After a crash of the table owner the tables are
    # gone already (nothing to free: POSIX segments are re-adopted by the next manager).
    if stopping?(reason) and Registry.available?() do
      freed = Enum.flat_map(Registry.ids(), &Cleanup.free(&1, :shutdown))

      if freed != [],
        do: Logger.info("snakepit_shm: freed #{length(freed)} region(s) at shutdown")
    end

    :ok
  end

  defp stopping?(:normal), do: true
  defp stopping?(:shutdown), do: true
  defp stopping?({:shutdown, _}), do: true
  defp stopping?(_), do: false

  # ---- helpers ----

  defp open_events do
    case Events.open() do
      {:ok, events} ->
        events

      {:error, why} ->
        Logger.warning(
          "snakepit_shm: no event socket (#{why}): scanning for OS holders every " <>
            "holder_scan_interval ms instead"
        )

        nil
    end
  end

  defp check_events(%{events: nil} = state), do: state

  defp check_events(state) do
    case Events.check(state.events) do
      nil ->
        # No socket any more: the scan takes over (as if it never opened).
        schedule(:holder_scan, state.config.holder_scan_interval)
        %{state | events: nil}

      events ->
        %{state | events: events}
    end
  end

  # An announced id: only ids of regions this VM holds are kept (no NIF call for the
  # others); repeated ids are coalesced until the :rung message, queued behind the
  # datagrams already in the mailbox, handles them all at once.
  defp ring(state, {_kind, id}) do
    cond do
      MapSet.member?(state.rung, id) ->
        state

      Registry.member?(id) ->
        if MapSet.size(state.rung) == 0, do: send(self(), :rung)
        %{state | rung: MapSet.put(state.rung, id)}

      true ->
        state
    end
  end

  defp ring(state, :error), do: state

  defp monitor(pid, state) do
    if MapSet.member?(state.monitored, pid) do
      state
    else
      Process.monitor(pid)
      %{state | monitored: MapSet.put(state.monitored, pid)}
    end
  end

  defp periodic_cleanup(state) do
    report_dropped_names()
    state = %{state | holders: Holders.retry(state.holders)} |> check_events()
    for {id, reason} <- Cleanup.due(), do: Cleanup.free(id, reason)
    # Callers whose first-use cast was lost (the manager was down) get monitored now.
    Enum.reduce(Registry.callers(), state, &monitor/2)
  end

  # Segments of callers killed mid-allocation or mid-free lose their names by themselves
  # (Snakepit.SharedMemory.Quota); the periodic cleanup reports how many as the :leaked
  # event (health's dead_processes check reads it). One NIF call and one ETS row.
  defp report_dropped_names do
    now = Snakepit.SharedMemory.Native.names_dropped()

    before =
      case :ets.lookup(Registry.meta_table(), :names_dropped) do
        [{_, n}] -> n
        [] -> 0
      end

    if now > before do
      :ets.insert(Registry.meta_table(), {:names_dropped, now})
      Snakepit.SharedMemory.Stats.event(:leaked, %{count: now - before}, %{})
    end
  rescue
    ArgumentError -> :ok
  end

  # Orphans the start-up sweep left because a process held them (a worker of the VM that
  # died): swept again, 1 s after start, then backing off to once a minute while none
  # goes, until none is left.
  defp sweep_held_orphans(%{held_orphans: %{ids: []}} = state), do: state

  defp sweep_held_orphans(%{held_orphans: held} = state) do
    now = now_ms()

    if now - held.at < held.wait do
      state
    else
      {freed, ids} = Sweep.sweep_again(held.ids)
      wait = if freed == [], do: min(held.wait * 2, @held_recheck_max), else: @held_recheck_min
      %{state | held_orphans: %{ids: ids, at: now, wait: wait}}
    end
  end

  # Held segments of a VM that just died join those to sweep again, from the shortest wait.
  defp remember_held(state, []), do: state

  defp remember_held(state, ids) do
    ids = Enum.uniq(ids ++ state.held_orphans.ids) |> Enum.take(Sweep.max_held())
    %{state | held_orphans: %{ids: ids, at: now_ms(), wait: @held_recheck_min}}
  end

  defp now_ms, do: System.monotonic_time(:millisecond)

  defp cleanup_regions(opts) do
    orphans = if opts.orphans, do: Sweep.sweep_orphans(dry_run: opts.dry_run), else: []

    due =
      if opts.expired_only,
        do: Enum.filter(Cleanup.due(), &(elem(&1, 1) == :expired)),
        else: Cleanup.due()

    selected = if opts.expired_only, do: [], else: selected(opts)
    candidates = Enum.uniq_by(due ++ selected, &elem(&1, 0))

    freed =
      if opts.dry_run do
        for {id, reason} <- candidates, record = Registry.lookup(id), record != nil do
          %{region_id: id, reason: reason, size: Registry.region(record, :size)}
        end
      else
        Enum.flat_map(candidates, fn {id, reason} -> Cleanup.free(id, reason) end)
      end

    freed ++ orphans
  end

  defp selected(%{all: false, owner: nil, older_than: nil, ids: nil}), do: []

  defp selected(opts) do
    filter =
      %{owner: opts.owner, older_than: opts.older_than}
      |> Enum.reject(fn {_k, v} -> is_nil(v) end)
      |> Map.new()

    records =
      if opts.all or filter != %{},
        do: Snakepit.SharedMemory.Info.select(filter),
        else: []

    by_ids = for id <- opts.ids || [], record = Registry.lookup(id), record != nil, do: record

    for record <- records ++ by_ids, do: {Registry.region(record, :id), :requested}
  end

  defp schedule(message, ms), do: Process.send_after(self(), message, ms)
end
