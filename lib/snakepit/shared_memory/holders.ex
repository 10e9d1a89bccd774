defmodule Snakepit.SharedMemory.Holders do
  @moduledoc """
  OS processes (Python workers) that hold regions: discovery and death.

  A worker that attaches a region adds a hold to the header's holder table, in a slot
  whose lock its own open of the region holds: when the worker dies, at any instant, the
  kernel drops that lock and the slot is dead for everyone (`Native.reap_holders/1`,
  and every `Native.hold_counts/1`, free such slots). What the manager adds is
  promptness, by events only:

    * discovery: the worker announces its hold on the VM's event socket
      (`Snakepit.SharedMemory.Events`); `rung/2` then reads that one region (its hold
      counts, and its full header only if its holder generation changed) and arms a
      pidfd watch (`Native.watch_os_process/3`, `enif_select`) on each new holding OS
      process. A full `scan/1` runs only at manager start-up and in `Manager.sync/0`
      (or every `holder_scan_interval` ms where the event socket is unavailable);
    * death: the watch fires; the dead process's slots are reaped in the regions it
      was seen holding (not in every region), which may free `:reference_counted`
      regions. A watch that could not be armed (out of descriptors: EMFILE) is
      retried on the next event or cleanup.

  A released hold is announced too, so a `:reference_counted` region whose count
  dropped to zero without a BEAM call (a worker closing it) is freed at once.
  """

  require Logger
  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{Access, Native, Registry, Stats}

  import Snakepit.SharedMemory.Registry, only: [region: 1]

  defstruct generations: %{},
            watches: %{},
            refs: %{},
            retry: MapSet.new(),
            held: %{},
            prune_at: 4_096,
            self_os_pid: nil

  @type holder :: {pos_integer(), non_neg_integer()}
  @type t :: %__MODULE__{
          generations: %{(String.t() | {:board, String.t()}) => non_neg_integer()},
          watches: %{holder() => {reference(), reference()}},
          refs: %{reference() => holder()},
          retry: MapSet.t(holder()),
          held: %{holder() => MapSet.t(String.t())},
          prune_at: pos_integer(),
          self_os_pid: pos_integer() | nil
        }

  @doc "A fresh state (after a manager restart every watch is re-armed by the next scan)."
  @spec new() :: t()
  def new, do: %__MODULE__{self_os_pid: Native.self_info().os_pid}

  @doc "Scans every registered region; arms watches for new holders."
  @spec scan(t()) :: t()
  def scan(state) do
    rows =
      :ets.select(Registry.regions_table(), [
        {region(id: :"$1", ref: :"$2", cleanup_policy: :"$3", _: :_), [],
         [{{:"$1", :"$2", :"$3"}}]}
      ])

    {pairs, state} =
      Enum.map_reduce(rows, state, fn {id, ref, policy}, acc ->
        {generation, refcount} = Native.hold_counts(ref)

        acc =
          case state.generations do
            %{^id => ^generation} -> acc
            _ -> changed(acc, ref, id)
          end

        if policy == :reference_counted and generation > 0 and refcount == 0,
          do: Access.free_if_unreferenced(id)

        {{id, generation}, acc}
      end)

    # Status boards: OS processes that joined one (they hold a slot, not the region)
    # get the same pidfd watch; their death frees their slots (release_everywhere/1).
    {board_pairs, state} =
      Snakepit.SharedMemory.StatusBoard.watch_joiners(state.generations, state, &watch/2)

    generations = Map.new(pairs ++ board_pairs)
    rearm(%{state | generations: generations})
  end

  @doc "Tries again the watches that could not be armed (EMFILE...); O(1) if none."
  @spec retry(t()) :: t()
  def retry(state), do: rearm(state)

  # Watches that failed (EMFILE...) are tried again; a holder gone meanwhile is reaped.
  defp rearm(%{retry: retry} = state) do
    if MapSet.size(retry) == 0 do
      state
    else
      Enum.reduce(retry, %{state | retry: MapSet.new()}, fn {pid, start}, acc ->
        arm(pid, start, acc)
      end)
    end
  end

  @doc """
  Handles an announcement for region (or status board) `id`: reads that region's hold
  counts, its header if its holder generation changed (watching new holders), frees
  it if it is `:reference_counted` and nothing holds it any more, and watches the new
  joiners of a status board. Ids this VM does not hold cost one ETS lookup.
  """
  @spec rung(t(), String.t()) :: t()
  def rung(state, id) do
    case Registry.policy_and_ref(id) do
      nil ->
        state

      {policy, ref} ->
        {generation, refcount} = Native.hold_counts(ref)

        state =
          case state.generations do
            %{^id => ^generation} ->
              state

            generations ->
              changed(%{state | generations: Map.put(generations, id, generation)}, ref, id)
          end

        if policy == :reference_counted and generation > 0 and refcount == 0,
          do: Access.free_if_unreferenced(id)

        state
        |> board_rung(id)
        |> rearm()
        |> maybe_prune()
    end
  end

  # Announcements add entries for regions that are freed later, by anyone: once the
  # generations map doubled since the last pruning, drop what the registry no longer
  # holds (amortised O(1) per announcement, and bounded by the live regions).
  defp maybe_prune(%{generations: generations, prune_at: at} = state) do
    if map_size(generations) < at do
      state
    else
      live? = fn
        {{:board, id}, _} -> Registry.member?(id)
        {id, _} -> Registry.member?(id)
      end

      generations = generations |> Enum.filter(live?) |> Map.new()

      held =
        for {holder, ids} <- state.held,
            ids = MapSet.filter(ids, &Registry.member?/1),
            MapSet.size(ids) > 0,
            into: %{},
            do: {holder, ids}

      %{
        state
        | generations: generations,
          held: held,
          prune_at: max(4_096, 2 * map_size(generations))
      }
    end
  end

  defp board_rung(state, id) do
    {pairs, state} =
      Snakepit.SharedMemory.StatusBoard.watch_joiners_of(id, state.generations, state, &watch/2)

    %{state | generations: Map.merge(state.generations, Map.new(pairs))}
  end

  @doc "Reads the holders of a region whose generation changed; watches the new ones."
  @spec changed(t(), reference(), String.t() | nil) :: t()
  def changed(state, ref, id \\ nil) do
    case Native.header(ref) do
      {:ok, %{holders: holders}} ->
        holders
        |> Enum.map(&{&1.pid, &1.start_time})
        |> Enum.reject(fn {pid, _} -> pid == state.self_os_pid end)
        |> Enum.reduce(state, fn holder, acc -> watch(holder, held(acc, holder, id)) end)

      _ ->
        state
    end
  end

  defp held(state, _holder, nil), do: state

  defp held(state, holder, id),
    do: %{state | held: Map.update(state.held, holder, MapSet.new([id]), &MapSet.put(&1, id))}

  defp watch({os_pid, start} = holder, state) do
    if Map.has_key?(state.watches, holder), do: state, else: arm(os_pid, start, state)
  end

  defp arm(os_pid, start, state) do
    holder = {os_pid, start}
    ref = make_ref()

    case Native.watch_os_process(os_pid, start, ref) do
      {:ok, watch} ->
        %{
          state
          | watches: Map.put(state.watches, holder, {watch, ref}),
            refs: Map.put(state.refs, ref, holder)
        }

      {:error, {:not_found, _, _}} ->
        # Already gone: release its holds now.
        release_everywhere(holder, Map.get(state.held, holder))
        %{state | held: Map.delete(state.held, holder)}

      {:error, {_reason, message, _}} ->
        unless MapSet.member?(state.retry, holder),
          do:
            Logger.warning(
              "snakepit_shm: cannot watch OS process #{os_pid} (retrying): #{message}"
            )

        %{state | retry: MapSet.put(state.retry, holder)}
    end
  end

  @doc "Handles `{:select, watch, ref, :ready_input}`: the watched OS process exited."
  @spec exited(t(), reference(), reference()) :: t()
  def exited(state, watch, ref) do
    Native.cancel_watch(watch)

    case Map.pop(state.refs, ref) do
      {nil, _} ->
        state

      {holder, refs} ->
        release_everywhere(holder, Map.get(state.held, holder))

        %{
          state
          | refs: refs,
            watches: Map.delete(state.watches, holder),
            held: Map.delete(state.held, holder)
        }
    end
  end

  # The slots of a dead process are those whose lock is gone: reaped by the kernel's
  # word, not by its pid (which may be reused, or name another process in another PID
  # namespace). Only in the regions it was seen holding (`ids`): O(its regions), not
  # O(all regions); a hold it took unannounced is reaped by the next hold count of
  # that region (every `Native.hold_counts/1` reaps dead slots). A status board's
  # joiner that holds no region has no ids (nil): its board slots are reclaimed below.
  defp release_everywhere({os_pid, start}, ids) do
    rows = for id <- ids || [], {_policy, ref} <- [Registry.policy_and_ref(id)], do: {id, ref}

    released =
      for {id, ref} <- rows,
          {:ok, n} when n > 0 <- [Native.reap_holders(ref)],
          do: {id, n}

    total = released |> Enum.map(&elem(&1, 1)) |> Enum.sum()
    # Status board slots it still held are freed too (it cannot leave() any more).
    _ = Snakepit.SharedMemory.StatusBoard.reclaim_os_process(os_pid, start)

    if total > 0 do
      # Only the telemetry event: the counter of stats/0 is kept by the NIF, which counts
      # every reaped hold, also those a concurrent hold_counts/1 reaped before us (then
      # `total` here misses them, and so does this event).
      Stats.telemetry([:snakepit_shm, :region, :os_holders_released], %{count: total}, %{
        os_pid: os_pid
      })

      Logger.info("snakepit_shm: OS process #{os_pid} exited holding #{total} hold(s): released")
    end

    # Counted first, freed second: whoever sees the region gone also sees the release.
    for {id, _n} <- released, do: Access.free_if_unreferenced(id)
    :ok
  end
end
