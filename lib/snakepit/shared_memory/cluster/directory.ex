defmodule Snakepit.SharedMemory.Cluster.Directory do
  @moduledoc """
  The cluster-wide region directory: which node holds which region.

  One directory process per node joins the `:pg` group `#{inspect(:managers)}` of the
  scope `#{inspect(:snakepit_shm_cluster)}` (started by the application's supervisor),
  so the group's members are the snakepit_shm managers of the cluster, one per node.

  ## Sharding

  The directory is sharded by region id over the group's member nodes with rendezvous
  (highest random weight) hashing: the shard of `id` is the member node with the
  largest `:erlang.phash2({id, node}, 2^32)` (ties broken by node order). Every node
  computes the same shard from the same member list, so a lookup is:

    * a region of this node: found in the local registry, no remote call;
    * a region whose shard is this node: one ETS lookup, no remote call;
    * any other region: exactly one `:erpc.call/5` to the shard's node, which answers
      from its ETS table (no process of that node is involved).

  ## Keeping it current

    * Allocation and deallocation (in `Snakepit.SharedMemory.Allocator`) cast
      `{:added, id}` / `{:removed, id}` to the local directory, which forwards the entry
      to the id's shard (one message; nothing is broadcast).
    * Membership changes come from `:pg.monitor/2` (join and leave of members) and from
      `:net_kernel.monitor_nodes/1` (`nodedown`). On every change each directory drops
      the entries of nodes that left, and sends every member the ids of its own regions
      (read from the registry, the source of truth) whose shard that member now is; the
      member replaces with them every entry of the sender it had. Only ids whose shard
      changed move in a rendezvous scheme, but re-sending every local id keeps the
      protocol free of hand-offs: a shard that moved away is simply rebuilt by the
      regions' own nodes, and whatever a node announced under an older view (to a node
      that has moved on) is replaced at its next change, never left behind.

    * A process killed between registering a region and announcing it (or between
      taking a freed region's record and withdrawing it) sends nothing: the manager,
      seeing that process die other than normally (and at each of its own restarts),
      asks for `reconcile/0`, which replaces this node's entries at every shard with
      what the registry holds.

    * Messages to other members never block: one whose connection is busy (a node that
      stopped reading, frozen by SIGSTOP or swapped out) is dropped, and that member gets
      a full replacement of this node's entries of its shard 500 ms later (again until
      it goes through).

  Between a membership change and the end of that re-registration (a few milliseconds
  on a LAN) a lookup of a region whose shard just moved can answer `:not_found`: the
  directory is eventually consistent, the registry of each node is authoritative
  (`fetch/2` asks the region's node, which checks its registry).
  """

  use GenServer

  require Logger

  alias Snakepit.SharedMemory.Registry

  @scope :snakepit_shm_cluster
  @group :managers
  @table :snakepit_shm_cluster_directory
  @meta :snakepit_shm_cluster_meta
  @range 4_294_967_296
  @reconcile_delay 200
  @catch_up_ms 500

  @doc false
  def scope, do: @scope
  @doc false
  def group, do: @group

  @doc false
  def start_link(_arg), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc "The member nodes of the group as this node sees them, sorted (this node included)."
  @spec members() :: [node()]
  def members do
    case :ets.lookup(@meta, :members) do
      [{:members, nodes}] ->
        if node() in nodes do
          nodes
        else
          # This VM became a distributed node (or changed its name) since the last
          # membership change: no event says so; the directory re-registers under the
          # new name, and until then this node alone is the directory.
          notify(:renamed)
          [node()]
        end

      [] ->
        [node()]
    end
  rescue
    ArgumentError -> [node()]
  end

  @doc "The node holding the directory shard of `id` among `nodes` (rendezvous hashing)."
  @spec shard(String.t(), [node()]) :: node()
  def shard(_id, []), do: node()

  def shard(id, nodes) do
    {_weight, node} = nodes |> Enum.map(&{:erlang.phash2({id, &1}, @range), &1}) |> Enum.max()
    node
  end

  @doc """
  The node of `id` according to this node's shard table: `{:ok, node}` or `:error`.
  Called by other nodes through `:erpc`; reads ETS only.
  """
  @spec shard_lookup(String.t()) :: {:ok, node()} | :error
  def shard_lookup(id) do
    case :ets.lookup(@table, id) do
      [{^id, node} | _] -> {:ok, node}
      [] -> :error
    end
  rescue
    ArgumentError -> :error
  end

  @doc "Every `{id, node}` entry of this node's shard (for tests and tools)."
  @spec shard_entries() :: [{String.t(), node()}]
  def shard_entries do
    :ets.tab2list(@table)
  rescue
    ArgumentError -> []
  end

  @doc "Called by the allocator when a region of this node was registered."
  @spec added(String.t()) :: :ok
  def added(id), do: notify({:added, id})

  @doc "Called by the allocator when a region of this node was freed."
  @spec removed(String.t()) :: :ok
  def removed(id), do: notify({:removed, id})

  defp notify(message) do
    case Process.whereis(__MODULE__) do
      nil -> :ok
      pid -> send(pid, message)
    end

    :ok
  end

  @doc """
  Makes the directory's entries of this node's regions match the registry again, at
  every shard: each member node gets the full list of this node's ids it holds the
  shard of, and replaces with it every entry of this node it had. Called by the
  manager when a process that called into the registry died other than normally (or the
  manager restarted): such a process may have been killed between registering a region
  and announcing it, or between taking a freed region's record and withdrawing it, and
  its message never comes. Requests within 200 ms are served by one reconciliation;
  `sync/0` makes a waiting one first.
  """
  @spec reconcile() :: :ok
  def reconcile, do: notify(:reconcile)

  @doc """
  Waits until this node's directory has handled everything sent to it before, then
  returns the member nodes it sees. For tests and tools that need a settled state.
  """
  @spec sync() :: [node()]
  def sync, do: GenServer.call(__MODULE__, :sync, 30_000)

  # ---- GenServer ----

  @impl true
  def init(nil) do
    # A bag: a named POSIX region opened by two nodes of one host is on both.
    :ets.new(@table, [:bag, :protected, :named_table, {:read_concurrency, true}])
    :ets.new(@meta, [:set, :protected, :named_table, {:read_concurrency, true}])
    :ok = :net_kernel.monitor_nodes(true)
    {ref, pids} = :pg.monitor(@scope, @group)
    :ok = :pg.join(@scope, @group, self())

    state = %{
      pg_ref: ref,
      pids: MapSet.new([self() | pids]),
      nodes: [],
      reconcile: nil,
      behind: MapSet.new(),
      catch_up: nil
    }

    {:ok, rebalance(state)}
  end

  @impl true
  # A reconciliation still waiting is made first: what was asked before is done.
  def handle_call(:sync, _from, state) do
    state = if state.reconcile, do: reconcile_now(state), else: state
    {:reply, state.nodes, state}
  end

  @impl true
  def handle_info({:added, id}, state) do
    {:noreply, register(id, node(), state)}
  end

  def handle_info({:removed, id}, state) do
    {:noreply, unregister(id, node(), state)}
  end

  # From other nodes' directories (or this one): entries of this shard. Only well-formed
  # ones (a node name and region ids): anything else, sent by a node of another version
  # or by any process of a connected node, is dropped (logged at debug level) instead of
  # crashing this process (each crash restarted the :pg scope and emptied every table).
  def handle_info({:register, from_node, ids}, state) when is_atom(from_node) do
    if ids?(ids),
      do: :ets.insert(@table, Enum.map(ids, &{&1, from_node})),
      else: malformed({:register, from_node, ids})

    {:noreply, state}
  end

  def handle_info({:unregister, from_node, id}, state)
      when is_atom(from_node) and is_binary(id) do
    :ets.delete_object(@table, {id, from_node})
    {:noreply, state}
  end

  # Every entry `from_node` has here, replaced by `ids` (its ids of this shard).
  def handle_info({:replace, from_node, ids}, state) when is_atom(from_node) do
    if ids?(ids), do: replace(from_node, ids), else: malformed({:replace, from_node, ids})
    {:noreply, state}
  end

  # Requests within @reconcile_delay are served by one reconciliation: a storm of crashing
  # callers costs at most a few walks of the registry a second.
  def handle_info(:reconcile, %{reconcile: nil} = state) do
    {:noreply, %{state | reconcile: Process.send_after(self(), :reconcile_now, @reconcile_delay)}}
  end

  def handle_info(:reconcile, state), do: {:noreply, state}

  def handle_info(:reconcile_now, state), do: {:noreply, reconcile_now(state)}

  def handle_info(:catch_up, state), do: {:noreply, catch_up(%{state | catch_up: nil})}

  def handle_info({ref, :join, @group, pids}, %{pg_ref: ref} = state) do
    {:noreply, rebalance(%{state | pids: MapSet.union(state.pids, MapSet.new(pids))})}
  end

  def handle_info({ref, :leave, @group, pids}, %{pg_ref: ref} = state) do
    {:noreply, rebalance(%{state | pids: MapSet.difference(state.pids, MapSet.new(pids))})}
  end

  def handle_info({:nodedown, down}, state) do
    # Its entries, even if this node never saw it join the group.
    :ets.match_delete(@table, {:_, down})
    pids = state.pids |> Enum.reject(&(node(&1) == down)) |> MapSet.new()
    {:noreply, rebalance(%{state | pids: pids})}
  end

  def handle_info({:nodeup, _node}, state), do: {:noreply, rebalance(state)}

  def handle_info(:renamed, state), do: {:noreply, rebalance(state)}

  def handle_info(message, state) do
    malformed(message)
    {:noreply, state}
  end

  # ---- helpers ----

  defp malformed(message) do
    Logger.debug(
      "snakepit_shm cluster directory: unexpected message #{inspect(message, limit: 10)}"
    )
  end

  # A proper list of region ids (strings).
  defp ids?([]), do: true
  defp ids?([id | rest]) when is_binary(id), do: ids?(rest)
  defp ids?(_), do: false

  defp register(id, from_node, state) do
    case shard(id, state.nodes) do
      me when me == node() ->
        :ets.insert(@table, {id, from_node})
        state

      other ->
        forward(state, other, {:register, from_node, [id]})
    end
  end

  defp unregister(id, from_node, state) do
    case shard(id, state.nodes) do
      me when me == node() ->
        :ets.delete_object(@table, {id, from_node})
        state

      other ->
        forward(state, other, {:unregister, from_node, id})
    end
  end

  # To another member's directory, never blocking: a node that stopped reading (frozen by
  # SIGSTOP, swapped out) fills its distribution buffer, and a plain send then suspended
  # this process until the connection dropped (net_ticktime, about a minute) while every
  # allocation of this node queued one more message here (280 000 after 200 000
  # allocations). A message that would block is dropped instead, and the member is
  # brought back in line by a full replacement of this node's entries there (catch_up/1).
  defp forward(state, member, message) do
    case :erlang.send({__MODULE__, member}, message, [:nosuspend]) do
      :nosuspend -> behind(state, member)
      _sent -> state
    end
  end

  defp behind(state, member) do
    state = %{state | behind: MapSet.put(state.behind, member)}

    if state.catch_up,
      do: state,
      else: %{state | catch_up: Process.send_after(self(), :catch_up, @catch_up_ms)}
  end

  # Every member that missed a message gets this node's ids of its shard, replacing what
  # it had (as at a membership change); tried again later while its connection is busy.
  defp catch_up(state) do
    members = state.behind |> MapSet.intersection(MapSet.new(state.nodes)) |> MapSet.to_list()
    state = %{state | behind: MapSet.new()}

    if members == [] do
      state
    else
      by_shard = Enum.group_by(Registry.ids(), &shard(&1, state.nodes))

      Enum.reduce(members, state, fn member, acc ->
        forward(acc, member, {:replace, node(), Map.get(by_shard, member, [])})
      end)
    end
  end

  # Without a gap: entries that stay are never deleted, so a lookup racing a
  # replacement still finds every live region.
  defp replace(from_node, ids) do
    keep = MapSet.new(ids)

    for [id] <- :ets.match(@table, {:"$1", from_node}),
        not MapSet.member?(keep, id),
        do: :ets.delete_object(@table, {id, from_node})

    :ets.insert(@table, Enum.map(ids, &{&1, from_node}))
  end

  defp reconcile_now(state) do
    if state.reconcile, do: Process.cancel_timer(state.reconcile)

    receive do
      :reconcile_now -> :ok
    after
      0 -> :ok
    end

    announce_all(%{state | reconcile: nil})
  end

  defp rebalance(state) do
    nodes = state.pids |> Enum.map(&node/1) |> Enum.uniq() |> Enum.sort()

    if nodes == state.nodes do
      state
    else
      :ets.insert(@meta, {:members, nodes})
      purge(state.nodes -- nodes, MapSet.new(nodes))
      announce_all(%{state | nodes: nodes})
    end
  end

  # Entries of nodes that left the group, and of nodes neither members nor connected (a
  # node that announced regions and died before this one saw it join). Not entries whose
  # shard moved elsewhere: another node's view may be newer than this one's, and what it
  # sent under that view must stay; each node's own announce_all/1 (at its every view
  # change) replaces whatever it announced before, here as everywhere.
  defp purge(left, live) do
    connected = MapSet.new([node() | Node.list()])

    for {id, at} <- :ets.tab2list(@table),
        at in left or not (MapSet.member?(live, at) or MapSet.member?(connected, at)),
        do: :ets.delete_object(@table, {id, at})
  end

  # Every member gets this node's ids of its shard (an empty list included) and replaces
  # with them every entry of this node it had: entries sent under an older view (to a
  # node that is not their shard any more, where a later withdrawal would never reach
  # them) go too.
  defp announce_all(state) do
    by_shard = Enum.group_by(Registry.ids(), &shard(&1, state.nodes))

    Enum.reduce(state.nodes, state, fn member, acc ->
      ids = Map.get(by_shard, member, [])

      if member == node() do
        replace(node(), ids)
        acc
      else
        forward(acc, member, {:replace, node(), ids})
      end
    end)
  end
end
