defmodule SnakepitShm.Bench.Cluster do
  @moduledoc """
  Issue 18: `fetch/2` of a region between two nodes of this machine, against
  `:erpc.call/5` returning the same bytes as one binary, in the same rounds.

  The bench VM becomes a distributed node (epmd is started if needed) and starts a peer
  VM with OTP's `:peer`, running `:snakepit_shm` with this VM's code path. The peer
  allocates and fills a region of each size; then, in each round, this VM:

    * `fetch` - `Snakepit.SharedMemory.fetch(id, node: peer)` with the defaults (4 MiB
      chunks, a window of 4, CRC-32 per chunk and of the whole), into a new local
      region, freed after the round;
    * `erpc` - `:erpc.call(peer, ..., :read, [id])`: the peer maps the region, reads it
      whole into one binary and returns it (what one would write without `fetch/2`);
    * `erpc_cached` - `:erpc.call` returning a binary the peer already holds: the
      distribution link alone, the floor of any copy between two VMs.

  Each method's peak of `:erlang.memory(:binary)` above its start, on both VMs, is
  sampled every 2 ms: the point of a window is to keep that flat.
  """

  alias Snakepit.SharedMemory, as: SM

  @helper """
  defmodule SnakepitShm.Bench.ClusterPeer do
    @moduledoc false
    alias Snakepit.SharedMemory, as: SM

    def filled(size) do
      {:ok, id} = SM.allocate_region(size, cleanup_policy: :manual)
      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      block = :crypto.strong_rand_bytes(min(size, 4 * 1024 * 1024))

      for offset <- 0..(size - 1)//byte_size(block),
          do: :ok = SM.write(m, offset, binary_part(block, 0, min(byte_size(block), size - offset)))

      :ok = SM.unmap_region(m)
      id
    end

    def read(id) do
      {:ok, %{size: size}} = SM.get_region_info(id)
      {:ok, m} = SM.map_region(id, access_mode: :read_only)
      {:ok, data} = SM.read(m, 0, size)
      :ok = SM.unmap_region(m)
      data
    end

    def cache(id), do: :persistent_term.put({__MODULE__, id}, read(id))
    def cached(id), do: :persistent_term.get({__MODULE__, id})
    def uncache(id), do: :persistent_term.erase({__MODULE__, id})

    def sampler(parent) do
      :erlang.garbage_collect()
      base = :erlang.memory(:binary)
      send(parent, {:sampler, self()})
      loop(parent, base, base)
    end

    defp loop(parent, base, peak) do
      receive do
        :stop -> send(parent, {:peak, node(), max(peak, :erlang.memory(:binary)) - base})
      after
        2 -> loop(parent, base, max(peak, :erlang.memory(:binary)))
      end
    end
  end
  """

  @doc """
  Returns `%{sizes: [...], rounds: n, by_size: %{size => %{method => %{ns: [..],
  peak_local: [..], peak_peer: [..]}}}}`.
  """
  def run(profile) do
    {peer, node} = start_peer()

    try do
      by_size =
        Map.new(profile.cluster_sizes, fn size ->
          id = :erpc.call(node, SnakepitShm.Bench.ClusterPeer, :filled, [size], :infinity)

          try do
            rounds = for r <- 1..profile.cluster_reps, do: round(node, id, size, r)
            {size, collect(rounds)}
          after
            :erpc.call(node, SM, :deallocate_region, [id])
          end
        end)

      %{sizes: profile.cluster_sizes, rounds: profile.cluster_reps, by_size: by_size}
    after
      :peer.stop(peer)
    end
  end

  defp collect(rounds) do
    for method <- [:fetch, :erpc, :erpc_cached], into: %{} do
      {method,
       %{
         ns: Enum.map(rounds, & &1[method].ns),
         peak_local: Enum.map(rounds, & &1[method].peak_local),
         peak_peer: Enum.map(rounds, & &1[method].peak_peer)
       }}
    end
  end

  # Every method once per round, the order rotated.
  defp round(node, id, size, r) do
    methods = [:fetch, :erpc, :erpc_cached]
    order = Enum.drop(methods, rem(r, 3)) ++ Enum.take(methods, rem(r, 3))
    Map.new(order, fn method -> {method, measure(node, id, size, method)} end)
  end

  defp measure(node, id, size, method) do
    if method == :erpc_cached,
      do: :erpc.call(node, SnakepitShm.Bench.ClusterPeer, :cache, [id], :infinity)

    :erlang.garbage_collect()
    remote = Node.spawn(node, SnakepitShm.Bench.ClusterPeer, :sampler, [self()])
    local = spawn(SnakepitShm.Bench.ClusterPeer, :sampler, [self()])
    for _ <- 1..2, do: receive(do: ({:sampler, _} -> :ok))
    start = System.monotonic_time()
    cleanup = call(node, id, size, method)
    ns = System.convert_time_unit(System.monotonic_time() - start, :native, :nanosecond)
    send(remote, :stop)
    send(local, :stop)
    peaks = for _ <- 1..2, into: %{}, do: receive(do: ({:peak, n, p} -> {n, p}))
    cleanup.()
    if method == :erpc_cached, do: :erpc.call(node, SnakepitShm.Bench.ClusterPeer, :uncache, [id])
    %{ns: ns, peak_local: peaks[node()], peak_peer: peaks[node]}
  end

  defp call(node, id, _size, :fetch) do
    {:ok, local} = SM.fetch(id, node: node)
    fn -> :ok = SM.deallocate_region(local) end
  end

  defp call(node, id, size, :erpc) do
    data = :erpc.call(node, SnakepitShm.Bench.ClusterPeer, :read, [id], :infinity)
    ^size = byte_size(data)
    fn -> :erlang.garbage_collect() end
  end

  defp call(node, id, size, :erpc_cached) do
    data = :erpc.call(node, SnakepitShm.Bench.ClusterPeer, :cached, [id], :infinity)
    ^size = byte_size(data)
    fn -> :erlang.garbage_collect() end
  end

  defp start_peer do
    unless Node.alive?() do
      System.cmd("epmd", ["-daemon"])
      name = :"snakepit_shm_bench_#{System.unique_integer([:positive])}"
      {:ok, _} = :net_kernel.start([name, :shortnames])
    end

    {:ok, peer, node} =
      :peer.start(%{
        name: :peer.random_name(~c"snakepit_shm_bench_peer"),
        args: [~c"-setcookie", Atom.to_charlist(Node.get_cookie())],
        wait_boot: 120_000
      })

    :ok = :erpc.call(node, :code, :add_paths, [:code.get_path()])

    for {key, value} <- Application.get_all_env(:snakepit_shm),
        do: :erpc.call(node, Application, :put_env, [:snakepit_shm, key, value])

    :erpc.call(node, Application, :put_env, [:logger, :level, :warning])
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:snakepit_shm])
    # The helper is compiled on both sides: the samplers run in both VMs.
    :erpc.call(node, Code, :compile_string, [@helper])
    unless Code.ensure_loaded?(SnakepitShm.Bench.ClusterPeer), do: Code.compile_string(@helper)
    {peer, node}
  end
end
