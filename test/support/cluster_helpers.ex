defmodule Snakepit.SharedMemory.ClusterHelpers do
  @moduledoc false
  # Peers for the cluster tests: OTP's :peer starts other VMs on this machine, each with
  # this project's code path, this VM's :snakepit_shm settings and its own manager.

  @doc """
  Makes this VM a distributed node (shortnames) if it is not one yet, starting epmd
  first, so `mix test` works without --sname.
  """
  @spec ensure_distributed!() :: node()
  def ensure_distributed! do
    unless Node.alive?() do
      {_, 0} = System.cmd("epmd", ["-daemon"])
      name = :"shmtest#{System.unique_integer([:positive])}_#{:rand.uniform(1_000_000)}"

      case :net_kernel.start([name, :shortnames]) do
        {:ok, _} -> :ok
        {:error, {:already_started, _}} -> :ok
      end
    end

    node()
  end

  @doc "Starts a peer running :snakepit_shm; returns `{peer_pid, node}`."
  @spec start_peer!(String.t()) :: {pid(), node()}
  def start_peer!(prefix) do
    ensure_distributed!()
    cookie = Node.get_cookie() |> Atom.to_charlist()

    {:ok, peer, node} =
      :peer.start(%{
        name: :peer.random_name(String.to_charlist(prefix)),
        args: [~c"-setcookie", cookie, ~c"-kernel", ~c"prevent_overlapping_partitions", ~c"false"],
        wait_boot: 120_000
      })

    :ok = :erpc.call(node, :code, :add_paths, [:code.get_path()])

    for {key, value} <- Application.get_all_env(:snakepit_shm),
        do: :ok = :erpc.call(node, Application, :put_env, [:snakepit_shm, key, value])

    # A peer must not sweep the orphans other suites on this machine made on purpose.
    :ok = :erpc.call(node, Application, :put_env, [:snakepit_shm, :orphan_sweep, false])
    :ok = :erpc.call(node, Application, :put_env, [:logger, :level, :warning])
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:snakepit_shm])
    {peer, node}
  end

  @doc "Stops a peer if it still runs."
  @spec stop_peer(pid()) :: :ok
  def stop_peer(peer) do
    :peer.stop(peer)
  catch
    :exit, _ -> :ok
  end

  @doc "The OS pid of a node's VM."
  @spec os_pid(node()) :: String.t()
  def os_pid(node), do: :erpc.call(node, System, :pid, [])

  @doc "Calls `Snakepit.SharedMemory.fun(args...)` on `node`."
  @spec shm(node(), atom(), [term()]) :: term()
  def shm(node, fun, args), do: :erpc.call(node, Snakepit.SharedMemory, fun, args, 120_000)

  @doc "Calls `ClusterHelpers.fun(args...)` on `node` (this module is on the peers' path)."
  @spec remote(node(), atom(), [term()]) :: term()
  def remote(node, fun, args), do: :erpc.call(node, __MODULE__, fun, args, 300_000)

  @block 1_048_576

  @doc """
  Allocates a region of `size` bytes (cleanup policy :manual, so it outlives the
  calling process) and fills it with a pattern that differs in every MiB. Returns the
  id. Runs on the node it is called on (use remote/3).
  """
  @spec filled_region(pos_integer(), keyword()) :: String.t()
  def filled_region(size, opts \\ []) do
    alias Snakepit.SharedMemory, as: SHM
    {:ok, id} = SHM.allocate_region(size, Keyword.merge([cleanup_policy: :manual], opts))
    {:ok, m} = SHM.map_region(id, access_mode: :read_write)
    seed = :crypto.strong_rand_bytes(min(size, @block))

    for offset <- 0..(size - 1)//@block do
      len = min(@block, size - offset)
      block = binary_part(seed, 0, len)
      prefix = min(len, 8)
      <<_::binary-size(prefix), rest::binary>> = block
      :ok = SHM.write(m, offset, [binary_part(<<offset::64>>, 0, prefix), rest])
    end

    :ok = SHM.unmap_region(m)
    id
  end

  @doc "SHA-256 of a region's data, read chunk by chunk (on the node it is called on)."
  @spec digest(String.t()) :: binary()
  def digest(id) do
    alias Snakepit.SharedMemory, as: SHM
    {:ok, %{size: size}} = SHM.get_region_info(id)
    {:ok, m} = SHM.map_region(id, access_mode: :read_only)

    ctx =
      Enum.reduce(0..(size - 1)//4 * @block, :crypto.hash_init(:sha256), fn offset, ctx ->
        {:ok, data} = SHM.read(m, offset, min(4 * @block, size - offset))
        :crypto.hash_update(ctx, data)
      end)

    :ok = SHM.unmap_region(m)
    :crypto.hash_final(ctx)
  end

  @doc "Ids of the regions a node's registry holds."
  @spec ids(node()) :: [String.t()]
  def ids(node), do: :erpc.call(node, Snakepit.SharedMemory.Registry, :ids, []) |> Enum.sort()

  @doc "Waits until every node's directory saw `count` members (each directory settled)."
  @spec settle!([node()], pos_integer()) :: :ok
  def settle!(nodes, count) do
    deadline = System.monotonic_time(:millisecond) + 30_000
    do_settle(nodes, count, deadline)
  end

  @doc "Calls :sync on the directory of every member node, from this node."
  @spec sync_all() :: :ok
  def sync_all do
    alias Snakepit.SharedMemory.Cluster.Directory
    for n <- Directory.members(), do: GenServer.call({Directory, n}, :sync, 30_000)
    :ok
  end

  defp do_settle(nodes, count, deadline) do
    alias Snakepit.SharedMemory.Cluster.Directory
    seen = Enum.map(nodes, &:erpc.call(&1, Directory, :sync, []))

    cond do
      Enum.all?(seen, &(length(&1) == count)) ->
        # Every directory has handled what it was sent (and forwarded its entries); then,
        # from each node, a call to every directory: it travels on the same connection
        # as that node's forwards, after them, so once answered they are all in.
        Enum.each(nodes, &:erpc.call(&1, Directory, :sync, []))
        Enum.each(nodes, &:erpc.call(&1, __MODULE__, :sync_all, []))
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        raise "cluster did not settle: #{inspect(seen)}"

      true ->
        Process.sleep(20)
        do_settle(nodes, count, deadline)
    end
  end

  @doc """
  Starts, on the node it is called on, a process that calls `fetch(id, opts)` and sends
  `{:fetch_result, result}` to `report_to`; returns its pid.
  """
  @spec fetch_in_background(String.t(), keyword(), pid()) :: pid()
  def fetch_in_background(id, opts, report_to) do
    spawn(fn -> send(report_to, {:fetch_result, Snakepit.SharedMemory.fetch(id, opts)}) end)
  end

  @doc "The receiving process of a fetch run by `caller` (the one it monitors)."
  @spec receiver_of(pid()) :: pid()
  def receiver_of(caller) do
    {:monitors, [{:process, receiver} | _]} = Process.info(caller, :monitors)
    receiver
  end

  @doc """
  Samples `:erlang.memory(:binary)` of the node it runs on every `interval` ms until
  it receives `:stop`, then sends `{:binary_memory, baseline, peak}` to `parent`.
  """
  @spec sample_binary_memory(pid(), pos_integer()) :: :ok
  def sample_binary_memory(parent, interval \\ 5) do
    :erlang.garbage_collect()
    baseline = :erlang.memory(:binary)
    send(parent, {:sampling, self()})
    peak = sample_loop(baseline, interval)
    send(parent, {:binary_memory, node(), baseline, peak})
    :ok
  end

  defp sample_loop(peak, interval) do
    receive do
      :stop -> max(peak, :erlang.memory(:binary))
    after
      interval -> sample_loop(max(peak, :erlang.memory(:binary)), interval)
    end
  end

  @doc "Waits (up to 30 s) until `fun` returns a truthy value; returns it, or raises."
  @spec eventually((() -> term())) :: term()
  def eventually(fun, deadline \\ nil) do
    deadline = deadline || System.monotonic_time(:millisecond) + 30_000

    case fun.() do
      value when value not in [nil, false] ->
        value

      _ ->
        if System.monotonic_time(:millisecond) > deadline, do: raise("condition never held")
        Process.sleep(20)
        eventually(fun, deadline)
    end
  end

  @doc """
  Locates every id of `ids` over and over for `ms` milliseconds (on the node it is called
  on), then sends `{:locate_loop, lookups, misses}` to `parent` (misses: the ids a lookup
  did not find).
  """
  @spec locate_loop(pid(), [String.t()], pos_integer()) :: :ok
  def locate_loop(parent, ids, ms) do
    deadline = System.monotonic_time(:millisecond) + ms
    {lookups, misses} = locate_rounds(ids, deadline, 0, [])
    send(parent, {:locate_loop, lookups, misses})
    :ok
  end

  defp locate_rounds(ids, deadline, lookups, misses) do
    if System.monotonic_time(:millisecond) > deadline do
      {lookups, misses}
    else
      missed = for id <- ids, not match?({:ok, _}, Snakepit.SharedMemory.locate(id)), do: id
      locate_rounds(ids, deadline, lookups + length(ids), missed ++ misses)
    end
  end

  @doc "Reads `length` bytes at `offset` of a region (on the node it is called on)."
  @spec read(String.t(), non_neg_integer(), non_neg_integer()) :: binary()
  def read(id, offset, length) do
    alias Snakepit.SharedMemory, as: SHM
    {:ok, m} = SHM.map_region(id, access_mode: :read_only)
    {:ok, data} = SHM.read(m, offset, length)
    :ok = SHM.unmap_region(m)
    data
  end

  @doc """
  Loads, on the node it is called on, a stand-in `:telemetry` module that sends every
  event to `sink` as `{:telemetry, name, measurements, metadata}`. Only for peers: it
  would see every event of this VM.
  """
  @spec fake_telemetry(pid()) :: :ok
  def fake_telemetry(sink) do
    Application.put_env(:snakepit_shm_test, :telemetry_sink, sink)

    Code.compile_string("""
    defmodule :telemetry do
      def execute(name, measurements, metadata) do
        case Application.get_env(:snakepit_shm_test, :telemetry_sink) do
          nil -> :ok
          pid -> send(pid, {:telemetry, name, measurements, metadata})
        end
      end
    end
    """)

    :ok
  end

  @doc """
  Suspends `pid` from a process of its own node that keeps it suspended until sent
  `:resume` (a suspension ends with the process that made it, so an :erpc call cannot
  hold one). Sends `{:suspended, holder}` to `parent` once done.
  """
  @spec suspender(pid(), pid()) :: :ok
  def suspender(pid, parent) do
    true = :erlang.suspend_process(pid)
    send(parent, {:suspended, self()})

    receive do
      :resume -> :erlang.resume_process(pid)
    end

    :ok
  end
end
