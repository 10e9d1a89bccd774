Code.require_file("../../mix/support/task_helpers.exs", __DIR__)

defmodule Snakepit.SharedMemory.ClusterTest do
  # Several VMs on this machine (OTP's :peer), each running :snakepit_shm with its own
  # manager; this VM is one of the cluster's nodes. Not async: it makes this VM a
  # distributed node and counts calls on the peers.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.ClusterHelpers

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.Cluster.Directory
  alias Snakepit.SharedMemory.Error

  @moduletag timeout: 600_000

  setup_all do
    ensure_distributed!()
    {peer_a, a} = start_peer!("shma")
    {peer_b, b} = start_peer!("shmb")
    settle!([node(), a, b], 3)

    on_exit(fn ->
      stop_peer(peer_a)
      stop_peer(peer_b)
    end)

    %{a: a, b: b}
  end

  describe "locate/1" do
    test "finds regions of every node, local ones without a remote call", c do
      a_ids = for _ <- 1..20, do: remote(c.a, :filled_region, [4096])
      b_ids = for _ <- 1..20, do: remote(c.b, :filled_region, [4096])
      {:ok, mine} = SHM.allocate_region(4096)
      settle!([node(), c.a, c.b], 3)

      counting(fn ->
        assert {:ok, node()} == SHM.locate(mine)
        assert remote_calls() == 0

        for id <- a_ids, do: assert({:ok, c.a} == SHM.locate(id))
        for id <- b_ids, do: assert({:ok, c.b} == SHM.locate(id))
        # At most one remote call per lookup; ids whose shard is this node take none.
        calls = remote_calls()
        assert calls <= 40
        assert calls > 0

        expected =
          Enum.count(a_ids ++ b_ids, &(Directory.shard(&1, Directory.members()) != node()))

        assert calls == expected

        assert {:error, %Error{reason: :not_found}} =
                 SHM.locate("spshm_" <> String.duplicate("a", 20))
      end)

      # From a peer too: the other peer's and this node's regions.
      assert {:ok, node()} == :erpc.call(c.b, SHM, :locate, [mine])
      assert {:ok, c.a} == :erpc.call(c.b, SHM, :locate, [hd(a_ids)])

      # Freed regions leave the directory.
      for id <- a_ids, do: :ok = shm(c.a, :deallocate_region, [id])
      settle!([node(), c.a, c.b], 3)
      for id <- a_ids, do: assert({:error, %Error{reason: :not_found}} = SHM.locate(id))

      for id <- b_ids, do: :ok = shm(c.b, :deallocate_region, [id])
      :ok = SHM.deallocate_region(mine)
    end

    test "a VM that becomes a distributed node after start-up still answers" do
      # A peer without distribution (its control channel is stdio), made a node later.
      {:ok, peer, :nonode@nohost} =
        :peer.start(%{connection: :standard_io, wait_boot: 120_000, args: [~c"-setcookie", ~c"x"]})

      try do
        :ok = :peer.call(peer, :code, :add_paths, [:code.get_path()])
        :ok = :peer.call(peer, Application, :put_env, [:snakepit_shm, :orphan_sweep, false])
        {:ok, _} = :peer.call(peer, Application, :ensure_all_started, [:snakepit_shm])
        {:ok, id} = :peer.call(peer, SHM, :allocate_region, [64, [cleanup_policy: :manual]])
        assert {:ok, :nonode@nohost} = :peer.call(peer, SHM, :locate, [id])
        name = :"shmlate#{System.unique_integer([:positive])}"
        {:ok, _} = :peer.call(peer, :net_kernel, :start, [[name, :shortnames]])
        me = :peer.call(peer, :erlang, :node, [])
        assert {:ok, ^me} = :peer.call(peer, SHM, :locate, [id])
        missing = "spshm_" <> String.duplicate("c", 20)
        assert {:error, %Error{reason: :not_found}} = :peer.call(peer, SHM, :locate, [missing])
        # The directory re-registered its regions under the new name.
        eventually(fn ->
          :peer.call(peer, Directory, :sync, []) == [me] and
            :peer.call(peer, Directory, :shard_entries, []) == [{id, me}]
        end)
      after
        :peer.stop(peer)
      end
    end

    test "bad input" do
      assert {:error, %Error{reason: :invalid_argument}} = SHM.locate(:nope)
    end
  end

  # A region filled on `node`, its directory entry settled (a fetch by id locates it).
  defp settled_region(c, node, args) do
    id = remote(node, :filled_region, args)
    settle!([node(), c.a, c.b], 3)
    id
  end

  # Counts calls of Directory.shard_lookup/1 on every node but this one (each remote
  # lookup is exactly one such call, made by :erpc) and of :erpc.call/5 here.
  defp counting(fun) do
    mfa = {Directory, :shard_lookup, 1}
    nodes = Node.list()
    for n <- nodes, do: :erpc.call(n, :erlang, :trace_pattern, [mfa, true, [:call_count]])

    try do
      Process.put(:count_nodes, nodes)
      fun.()
    after
      for n <- nodes, do: :erpc.call(n, :erlang, :trace_pattern, [mfa, false, [:call_count]])
    end
  end

  defp remote_calls do
    mfa = {Directory, :shard_lookup, 1}

    Process.get(:count_nodes)
    |> Enum.map(fn n ->
      {:call_count, count} = :erpc.call(n, :erlang, :trace_info, [mfa, :call_count])
      count || 0
    end)
    |> Enum.sum()
  end

  describe "fetch/2" do
    test "1 byte and 1 MiB, verified against the source", c do
      for size <- [1, 1_048_576, 3 * 1_048_576 + 17] do
        id = settled_region(c, c.a, [size, [metadata: %{dtype: "uint8", shape: [size]}]])
        source_digest = remote(c.a, :digest, [id])
        assert {:ok, local} = SHM.fetch(id, chunk_size: 1_048_576)
        assert {:ok, node()} == SHM.locate(local)
        assert digest(local) == source_digest
        {:ok, info} = SHM.get_region_info(local)
        assert info.size == size
        assert info.owner == self()
        assert info.node == node()
        assert {:ok, %{node: a}} = shm(c.a, :get_region_info, [id])
        assert a == c.a
        assert info.metadata == %{dtype: "uint8", shape: [size]}
        :ok = SHM.deallocate_region(local)
        :ok = shm(c.a, :deallocate_region, [id])
      end
    end

    test "a ref names its node: no lookup needed", c do
      id = settled_region(c, c.b, [70_000])
      {:ok, ref} = shm(c.b, :export_ref, [id])
      assert ref["node"] == Atom.to_string(c.b)
      assert {:ok, local} = SHM.fetch(ref, checksum: :sha256, chunk_size: 4096, window: 1)
      assert digest(local) == remote(c.b, :digest, [id])
      :ok = SHM.deallocate_region(local)
      :ok = shm(c.b, :deallocate_region, [id])
    end

    test "encrypted regions arrive encrypted, never at a lower level", c do
      id = settled_region(c, c.a, [2_000_000, [security_level: :high]])
      source_digest = remote(c.a, :digest, [id])
      assert {:ok, local} = SHM.fetch(id, chunk_size: 65_536)
      {:ok, info} = SHM.get_region_info(local)
      assert info.security_level == :high and info.encrypted
      assert digest(local) == source_digest
      :ok = SHM.deallocate_region(local)

      assert {:error, %Error{reason: :permission_denied}} =
               SHM.fetch(id, security_level: :standard)

      assert {:ok, local} = SHM.fetch(id, security_level: :maximum)
      assert {:ok, %{security_level: :maximum}} = SHM.get_region_info(local)
      :ok = SHM.deallocate_region(local)
      :ok = shm(c.a, :deallocate_region, [id])

      # :maximum leaves its VM only sealed, and its copy is sealed.
      id = settled_region(c, c.a, [100_000, [security_level: :maximum]])
      assert {:error, %Error{reason: :not_sealed}} = SHM.fetch(id, node: c.a)
      :ok = shm(c.a, :seal, [id])
      assert {:ok, local} = SHM.fetch(id)
      assert {:ok, %{sealed: true, security_level: :maximum}} = SHM.get_region_info(local)
      assert digest(local) == remote(c.a, :digest, [id])
      :ok = SHM.deallocate_region(local)
      :ok = shm(c.a, :deallocate_region, [id])
    end

    test "a standard region with encrypt: true", c do
      id = settled_region(c, c.a, [300_000])
      assert {:ok, local} = SHM.fetch(id, encrypt: true, chunk_size: 65_536)
      assert digest(local) == remote(c.a, :digest, [id])
      :ok = SHM.deallocate_region(local)
      :ok = shm(c.a, :deallocate_region, [id])
    end

    test "a region of this node is copied too", _c do
      id = filled_region(300_000)
      assert {:ok, copy} = SHM.fetch(id, chunk_size: 65_536)
      assert copy != id
      assert digest(copy) == digest(id)
      :ok = SHM.deallocate_region(copy)
      :ok = SHM.deallocate_region(id)
    end

    test "into: an existing local region", c do
      id = settled_region(c, c.a, [100_000])
      {:ok, target} = SHM.allocate_region(100_000)
      assert {:ok, ^target} = SHM.fetch(id, into: target)
      assert digest(target) == remote(c.a, :digest, [id])

      # No downgrade through :into either: an encrypted source needs an encrypted target.
      secret = settled_region(c, c.a, [100_000, [security_level: :high]])
      assert {:error, %Error{reason: :permission_denied}} = SHM.fetch(secret, into: target)
      {:ok, enc_target} = SHM.allocate_region(100_000, security_level: :high)
      assert {:ok, ^enc_target} = SHM.fetch(secret, into: enc_target)
      assert digest(enc_target) == remote(c.a, :digest, [secret])
      :ok = SHM.deallocate_region(enc_target)
      :ok = shm(c.a, :deallocate_region, [secret])

      {:ok, small} = SHM.allocate_region(10)
      assert {:error, %Error{reason: :invalid_size}} = SHM.fetch(id, into: small)
      assert {:ok, _} = SHM.get_region_info(small)
      :ok = SHM.deallocate_region(small)
      :ok = SHM.deallocate_region(target)
      :ok = shm(c.a, :deallocate_region, [id])
    end

    test "errors: unknown region, bad options, allow-lists", c do
      before = ids(node())

      assert {:error, %Error{reason: :not_found}} =
               SHM.fetch("spshm_" <> String.duplicate("b", 20))

      assert {:error, %Error{reason: :not_found}} =
               SHM.fetch("spshm_" <> String.duplicate("b", 20), node: c.a)

      assert {:error, %Error{reason: :nodedown, message: msg}} =
               SHM.fetch("spshm_" <> String.duplicate("b", 20), node: :nowhere@nohost)

      assert msg =~ "not connected"
      assert {:error, %Error{reason: :invalid_option}} = SHM.fetch("x", window: 0)
      assert {:error, %Error{reason: :invalid_option}} = SHM.fetch("x", chunk_size: 1)
      assert {:error, %Error{reason: :invalid_option}} = SHM.fetch("x", bogus: 1)
      assert {:error, %Error{reason: :invalid_argument}} = SHM.fetch(42)

      holder = :erpc.call(c.a, :erlang, :whereis, [Snakepit.SharedMemory.Manager])
      id = settled_region(c, c.a, [4096, [allowed_processes: [holder]]])
      assert {:error, %Error{reason: :permission_denied}} = SHM.fetch(id, node: c.a)
      :ok = shm(c.a, :cleanup_regions, [[ids: [id]]]) |> elem(0)
      assert ids(node()) == before
    end

    test "a :chunk_timeout beyond what receive/after takes is an option error", c do
      # Found by an attack run: 2**40 ms crashed the receiving process (:timeout_value,
      # logged as a crash) and the caller got an :io_error naming the crash.
      id = remote(c.a, :filled_region, [4096])

      assert {:error, %Error{reason: :invalid_option, message: m}} =
               SHM.fetch(id, node: c.a, chunk_timeout: Bitwise.bsl(1, 40))

      assert m =~ ":chunk_timeout"
      assert {:ok, copy} = SHM.fetch(id, node: c.a, chunk_timeout: 4_294_967_295)
      :ok = SHM.deallocate_region(copy)
      :ok = shm(c.a, :deallocate_region, [id])
    end

    test ":region cannot open an existing region (that is what :into is for)", c do
      # Found by an attack run: region: [name: n, open_mode: :open_only] wrote into an
      # existing region of another owner, which a failed fetch would then have freed.
      id = remote(c.a, :filled_region, [4096])
      other = spawn(fn -> Process.sleep(:infinity) end)
      {:ok, named} = SHM.allocate_region(4096, name: "attack_a_fetch", owner: other)

      for mode <- [:open_only, :create_or_open, :remove_and_create] do
        assert {:error, %Error{reason: :invalid_option, message: m}} =
                 SHM.fetch(id, node: c.a, region: [name: "attack_a_fetch", open_mode: mode])

        assert m =~ ":into"
      end

      assert {:ok, %{owner: ^other}} = SHM.get_region_info(named)
      :ok = SHM.deallocate_region(named)
      :ok = shm(c.a, :deallocate_region, [id])
    end
  end

  @mib 1_048_576

  describe "failures mid-transfer" do
    test "the sending node killed: :nodedown, the partial copy freed", c do
      {peer, victim} = start_peer!("shmv")
      on_exit(fn -> stop_peer(peer) end)
      settle!([node(), c.a, c.b, victim], 4)
      id = remote(victim, :filled_region, [16 * @mib])
      vm = os_pid(victim)
      before = ids(node())

      caller =
        fetch_in_background(
          id,
          [node: victim, chunk_size: 65_536, window: 1, progress: self()],
          self()
        )

      assert_receive {:snakepit_shm_fetch_progress, ^id, _, _}, 30_000
      # Hold the receiver still so that the transfer cannot end before the kill.
      receiver = receiver_of(caller)
      :erlang.suspend_process(receiver)
      assert length(ids(node())) == length(before) + 1
      {_, 0} = System.cmd("kill", ["-9", vm])
      eventually(fn -> victim not in Node.list() end)
      :erlang.resume_process(receiver)

      assert_receive {:fetch_result, {:error, %Error{reason: :nodedown} = error}}, 30_000
      assert error.message =~ "went down"
      assert ids(node()) == before
      # The victim's memfd regions died with it: nothing of it in /dev/shm either.
      assert Snakepit.SharedMemory.ShmHelpers.segments_created_by(String.to_integer(vm)) == []
      stop_peer(peer)
      settle!([node(), c.a, c.b], 3)
    end

    test "the receiving node killed: the sender unmaps and stops", c do
      {peer, victim} = start_peer!("shmr")
      on_exit(fn -> stop_peer(peer) end)
      id = remote(c.a, :filled_region, [16 * @mib])
      # After the region exists: the victim's fetch locates it through the directory.
      settle!([node(), c.a, c.b, victim], 4)
      before_a = ids(c.a)

      caller =
        remote(victim, :fetch_in_background, [
          id,
          [chunk_size: 65_536, window: 1, progress: self()],
          self()
        ])

      assert_receive {:snakepit_shm_fetch_progress, ^id, _, _}, 30_000
      receiver = :erpc.call(victim, Snakepit.SharedMemory.ClusterHelpers, :receiver_of, [caller])
      Node.spawn(victim, Snakepit.SharedMemory.ClusterHelpers, :suspender, [receiver, self()])
      assert_receive {:suspended, _holder}, 30_000
      assert {:ok, %{mapped_by: [_sender]}} = shm(c.a, :get_region_info, [id])
      {_, 0} = System.cmd("kill", ["-9", os_pid(victim)])

      eventually(fn -> match?({:ok, %{mapped_by: []}}, shm(c.a, :get_region_info, [id])) end)
      assert ids(c.a) == before_a
      :ok = shm(c.a, :deallocate_region, [id])
      stop_peer(peer)
      settle!([node(), c.a, c.b], 3)
    end

    test "the caller killed: its partial copy is freed, the sender stops", c do
      id = remote(c.a, :filled_region, [16 * @mib])
      settle!([node(), c.a, c.b], 3)
      before = ids(node())

      caller = fetch_in_background(id, [chunk_size: 65_536, window: 1, progress: self()], self())
      assert_receive {:snakepit_shm_fetch_progress, ^id, _, _}, 30_000
      receiver = receiver_of(caller)
      :erlang.suspend_process(receiver)
      assert length(ids(node())) == length(before) + 1
      Process.exit(caller, :kill)
      :erlang.resume_process(receiver)

      eventually(fn -> ids(node()) == before end)
      eventually(fn -> match?({:ok, %{mapped_by: []}}, shm(c.a, :get_region_info, [id])) end)
      refute_received {:fetch_result, _}
      :ok = shm(c.a, :deallocate_region, [id])
    end
  end

  describe "a process of the transfer killed" do
    for victim <- [:sender, :receiver] do
      test "the #{victim}: an error, no partial copy, the source released", c do
        id = remote(c.a, :filled_region, [4 * @mib])
        before = ids(node())
        opts = [node: c.a, chunk_size: 65_536, window: 1, progress: self()]
        caller = fetch_in_background(id, opts, self())
        assert_receive {:snakepit_shm_fetch_progress, ^id, _, _}, 30_000
        receiver = receiver_of(caller)
        # Held still, so that the transfer cannot end before the kill.
        :erlang.suspend_process(receiver)

        case unquote(victim) do
          :receiver ->
            Process.exit(receiver, :kill)

          :sender ->
            {:monitors, monitors} = Process.info(receiver, :monitors)
            [sender] = for {:process, pid} <- monitors, node(pid) == c.a, do: pid
            true = :erpc.call(c.a, Process, :exit, [sender, :kill])
            :erlang.resume_process(receiver)
        end

        assert_receive {:fetch_result, {:error, %Error{reason: :io_error} = error}}, 30_000
        assert error.message =~ "killed"
        assert ids(node()) == before
        eventually(fn -> match?({:ok, %{mapped_by: []}}, shm(c.a, :get_region_info, [id])) end)
        :ok = shm(c.a, :deallocate_region, [id])
      end
    end
  end

  describe "the source mid-transfer" do
    test "freed on its node: the fetch fails, the partial copy is freed", c do
      id = remote(c.a, :filled_region, [4 * @mib])
      before = ids(node())
      opts = [node: c.a, chunk_size: 65_536, window: 1, progress: self()]
      caller = fetch_in_background(id, opts, self())
      assert_receive {:snakepit_shm_fetch_progress, ^id, _, _}, 30_000
      receiver = receiver_of(caller)
      :erlang.suspend_process(receiver)
      :ok = shm(c.a, :deallocate_region, [id])
      :erlang.resume_process(receiver)

      assert_receive {:fetch_result, {:error, %Error{reason: reason}}}, 30_000
      assert reason in [:closed, :deallocated, :not_found]
      assert ids(node()) == before
    end

    test "a silent sender: :timeout after :chunk_timeout, the partial copy is freed", c do
      id = remote(c.a, :filled_region, [4 * @mib])
      before = ids(node())
      opts = [node: c.a, chunk_size: 65_536, window: 1, progress: self(), chunk_timeout: 300]
      caller = fetch_in_background(id, opts, self())
      assert_receive {:snakepit_shm_fetch_progress, ^id, _, _}, 30_000
      receiver = receiver_of(caller)
      :erlang.suspend_process(receiver)
      {:monitors, monitors} = Process.info(receiver, :monitors)
      [sender] = for {:process, pid} <- monitors, node(pid) == c.a, do: pid
      Node.spawn(c.a, Snakepit.SharedMemory.ClusterHelpers, :suspender, [sender, self()])
      assert_receive {:suspended, holder}, 30_000
      # The receiver reads what is queued (at most one chunk), then hears nothing.
      :erlang.resume_process(receiver)

      assert_receive {:fetch_result, {:error, %Error{reason: :timeout} = error}}, 30_000
      assert error.message =~ ":chunk_timeout"
      assert ids(node()) == before
      send(holder, :resume)
      eventually(fn -> match?({:ok, %{mapped_by: []}}, shm(c.a, :get_region_info, [id])) end)
      :ok = shm(c.a, :deallocate_region, [id])
    end
  end

  describe "directory membership" do
    test "a node that joins takes shards, a node that dies is purged", c do
      a_ids = for _ <- 1..30, do: remote(c.a, :filled_region, [4096])
      {peer, newcomer} = start_peer!("shmn")
      # Stopped even when an assertion fails first: a peer left running joins the next
      # suite's cluster (it made PythonClusterTest's setup fail to settle in CI).
      on_exit(fn -> stop_peer(peer) end)
      settle!([node(), c.a, c.b, newcomer], 4)

      # Some shards moved to the newcomer; every region is still found.
      for id <- a_ids, do: assert({:ok, c.a} == SHM.locate(id))
      assert Enum.any?(a_ids, &(Directory.shard(&1, Directory.members()) == newcomer))

      n_ids = for _ <- 1..30, do: remote(newcomer, :filled_region, [4096])
      settle!([node(), c.a, c.b, newcomer], 4)
      for id <- n_ids, do: assert({:ok, newcomer} == SHM.locate(id))
      nodes = [node(), c.a, c.b, newcomer]
      entries = Enum.flat_map(nodes, &:erpc.call(&1, Directory, :shard_entries, []))
      assert Enum.count(entries, &(elem(&1, 1) == newcomer)) == 30

      {_, 0} = System.cmd("kill", ["-9", os_pid(newcomer)])
      settle!([node(), c.a, c.b], 3)

      for n <- [node(), c.a, c.b] do
        entries = :erpc.call(n, Directory, :shard_entries, [])
        refute Enum.any?(entries, &(elem(&1, 1) == newcomer)), "#{n} kept entries of #{newcomer}"
      end

      for id <- n_ids, do: assert({:error, %Error{reason: :not_found}} = SHM.locate(id))
      for id <- a_ids, do: assert({:ok, c.a} == SHM.locate(id))
      for id <- a_ids, do: :ok = shm(c.a, :deallocate_region, [id])
      stop_peer(peer)
    end
  end

  describe "back-pressure" do
    test "256 MiB (1 GiB in soak): verified, and neither VM holds more than a few windows",
         c do
      # Four windows of 4 MiB chunks are the bound; 256 MiB is four times that and is
      # verified end to end in a few seconds; the soak moves the full 1 GiB.
      size =
        if Snakepit.SharedMemory.ReliabilityHelpers.soak?(), do: 1024 * @mib, else: 256 * @mib

      id = remote(c.a, :filled_region, [size])
      source_digest = remote(c.a, :digest, [id])
      settle!([node(), c.a, c.b], 3)

      Node.spawn(c.a, Snakepit.SharedMemory.ClusterHelpers, :sample_binary_memory, [self()])
      assert_receive {:sampling, remote_sampler}, 30_000
      me = self()
      spawn(fn -> Snakepit.SharedMemory.ClusterHelpers.sample_binary_memory(me) end)
      assert_receive {:sampling, local_sampler}, 30_000

      assert {:ok, local} = SHM.fetch(id, progress: self())
      send(remote_sampler, :stop)
      send(local_sampler, :stop)
      assert_receive {:binary_memory, a, a_base, a_peak}, 30_000
      assert_receive {:binary_memory, b, b_base, b_peak}, 30_000
      peaks = %{a => a_peak - a_base, b => b_peak - b_base}
      # Defaults: 4 chunks of 4 MiB in flight. Allow four windows (64 MiB), far below the size.
      assert peaks[c.a] < 64 * @mib, "sender peak #{peaks[c.a]}"
      assert peaks[node()] < 64 * @mib, "receiver peak #{peaks[node()]}"

      IO.puts(
        "\n#{div(size, @mib)} MiB fetch: binary memory peak above baseline: sender #{div(peaks[c.a], @mib)} MiB, receiver #{div(peaks[node()], @mib)} MiB"
      )

      progress = collect_progress(id, [])
      assert length(progress) == div(size, 4 * @mib)
      assert List.last(progress) == size

      assert digest(local) == source_digest
      :ok = SHM.deallocate_region(local)
      :ok = shm(c.a, :deallocate_region, [id])
    end
  end

  defp collect_progress(id, acc) do
    receive do
      {:snakepit_shm_fetch_progress, ^id, done, _total} -> collect_progress(id, [done | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  describe "mix snakepit.shm.list --cluster" do
    test "lists the regions of every connected node, with their node", c do
      import Snakepit.SharedMemory.TaskHelpers, only: [run_task: 2, json!: 1]
      a_id = remote(c.a, :filled_region, [100_000])
      b_id = remote(c.b, :filled_region, [50_000])
      {:ok, mine} = SHM.allocate_region(4096)

      args = [
        "--node",
        Atom.to_string(c.b),
        "--cookie",
        Atom.to_string(Node.get_cookie()),
        "--cluster"
      ]

      {out, _err, 0} = run_task("snakepit.shm.list", args)
      assert out =~ ~r/^NODE\s+ID\s+BACKEND/m
      assert out =~ ~r/^#{c.a}\s+#{a_id}\s+memfd\s+97\.7 KiB/m
      assert out =~ ~r/^#{c.b}\s+#{b_id}\s+memfd\s+48\.8 KiB/m
      assert out =~ ~r/^#{node()}\s+#{mine}\s+memfd\s+4\.0 KiB/m
      assert out =~ "cluster of #{c.b}"

      {out, _err, 0} = run_task("snakepit.shm.list", args ++ ["--format", "json"])
      regions = json!(out)["regions"]
      assert %{"node" => a} = Enum.find(regions, &(&1["id"] == a_id))
      assert a == Atom.to_string(c.a)
      assert %{"node" => b} = Enum.find(regions, &(&1["id"] == b_id))
      assert b == Atom.to_string(c.b)

      {_out, err, 2} = run_task("snakepit.shm.list", ["--cluster"])
      assert err =~ "--cluster needs --node"

      :ok = shm(c.a, :deallocate_region, [a_id])
      :ok = shm(c.b, :deallocate_region, [b_id])
      :ok = SHM.deallocate_region(mine)
    end
  end

  describe "on the wire" do
    test "encrypted regions travel as ciphertext, standard ones as they are", c do
      for {level, opts} <- [{:high, []}, {:standard, [encrypt: true]}, {:standard, []}] do
        id = remote(c.a, :filled_region, [@mib, [security_level: level]])
        # The caller exits after the fetch: the copy must outlive it.
        fetch_opts =
          [node: c.a, chunk_size: 65_536, window: 1, progress: self()] ++
            [region: [cleanup_policy: :manual]] ++ opts

        caller = fetch_in_background(id, fetch_opts, self())
        assert_receive {:snakepit_shm_fetch_progress, ^id, _, _}, 30_000
        receiver = receiver_of(caller)
        :erlang.suspend_process(receiver)
        :erlang.trace(receiver, true, [:receive])
        :erlang.resume_process(receiver)
        assert_receive {:fetch_result, {:ok, local}}, 60_000
        chunks = traced_chunks(receiver, [])
        assert length(chunks) > 4

        for {index, payload} <- chunks do
          plain = remote(c.a, :read, [id, index * 65_536, 65_536])

          if level == :high or opts[:encrypt] do
            assert byte_size(payload) == byte_size(plain) + 16
            assert :binary.match(payload, binary_part(plain, 8, 32)) == :nomatch
          else
            assert payload == plain
          end
        end

        assert digest(local) == remote(c.a, :digest, [id])
        :ok = SHM.deallocate_region(local)
        :ok = shm(c.a, :deallocate_region, [id])
      end
    end
  end

  defp traced_chunks(receiver, acc) do
    receive do
      {:trace, ^receiver, :receive, {_tag, :chunk, index, payload, _crc}} ->
        traced_chunks(receiver, [{index, payload} | acc])

      {:trace, ^receiver, :receive, _other} ->
        traced_chunks(receiver, acc)
    after
      500 -> Enum.reverse(acc)
    end
  end

  describe "telemetry" do
    test "[:snakepit_shm, :fetch, :progress] after each chunk, then :stop", c do
      # The stand-in :telemetry runs on the peer only (it would see this VM's events).
      :ok = remote(c.b, :fake_telemetry, [self()])
      id = filled_region(200_000)

      _caller =
        remote(c.b, :fetch_in_background, [
          id,
          [node: node(), chunk_size: 65_536, region: [cleanup_policy: :manual]],
          self()
        ])

      assert_receive {:fetch_result, {:ok, copy}}, 60_000

      for done <- [65_536, 131_072, 196_608, 200_000] do
        assert_receive {:telemetry, [:snakepit_shm, :fetch, :progress],
                        %{bytes: ^done, total: 200_000},
                        %{region_id: ^id, local_region_id: ^copy} = meta},
                       5_000

        assert meta.node == node()
      end

      assert_receive {:telemetry, [:snakepit_shm, :fetch, :stop], %{duration: d},
                      %{region_id: ^id, result: :ok}},
                     5_000

      assert d > 0
      :ok = remote(c.b, :fake_telemetry, [nil]) |> then(fn :ok -> :ok end)
      :ok = shm(c.b, :deallocate_region, [copy])
      :ok = SHM.deallocate_region(id)
    end
  end

  describe "checks on the way" do
    # Window 1: with the receiver held still, the sender waits for an ack after its next
    # chunk, which sits in the receiver's mailbox with the transfer's tag. A forged chunk
    # with that tag goes in right behind it, with the index the receiver expects next.
    for {level, forged_crc, reason} <- [
          {:standard, :wrong, :corrupt},
          {:high, :right, :tampered}
        ] do
      test "#{level}: a chunk that fails its #{if forged_crc == :wrong, do: "CRC", else: "authentication"} ends the fetch with #{inspect(reason)}",
           c do
        id = remote(c.a, :filled_region, [4 * @mib, [security_level: unquote(level)]])
        before = ids(node())
        opts = [node: c.a, chunk_size: 65_536, window: 1, progress: self()]
        caller = fetch_in_background(id, opts, self())
        assert_receive {:snakepit_shm_fetch_progress, ^id, _, _}, 30_000
        receiver = receiver_of(caller)
        :erlang.suspend_process(receiver)

        {tag, next} =
          eventually(fn ->
            {:messages, messages} = Process.info(receiver, :messages)
            List.last(for {tag, :chunk, i, _, _} <- messages, do: {tag, i + 1})
          end)

        extra = if unquote(level) == :high, do: 16, else: 0
        payload = :crypto.strong_rand_bytes(65_536 + extra)
        crc = :erlang.crc32(payload) + if(unquote(forged_crc) == :wrong, do: 1, else: 0)
        send(receiver, {tag, :chunk, next, payload, crc})
        :erlang.resume_process(receiver)

        assert_receive {:fetch_result, {:error, %Error{reason: unquote(reason)} = error}}, 30_000
        assert error.message =~ "chunk #{next}"
        assert ids(node()) == before
        eventually(fn -> match?({:ok, %{mapped_by: []}}, shm(c.a, :get_region_info, [id])) end)
        :ok = shm(c.a, :deallocate_region, [id])
      end
    end
  end

  describe "concurrency" do
    test "eight fetches at once from two nodes, each verified", c do
      sources =
        for i <- 1..8 do
          n = if rem(i, 2) == 0, do: c.a, else: c.b
          id = remote(n, :filled_region, [@mib + i * 4099])
          {n, id, remote(n, :digest, [id])}
        end

      results =
        sources
        |> Enum.map(fn {n, id, _} ->
          me = self()
          Task.async(fn -> SHM.fetch(id, node: n, chunk_size: 65_536, region: [owner: me]) end)
        end)
        |> Enum.map(&Task.await(&1, 120_000))

      for {{n, id, source_digest}, {:ok, copy}} <- Enum.zip(sources, results) do
        assert {:ok, %{owner: owner}} = SHM.get_region_info(copy)
        assert owner == self()
        assert digest(copy) == source_digest
        :ok = SHM.deallocate_region(copy)
        :ok = shm(n, :deallocate_region, [id])
      end
    end
  end

  describe "adopted worker outputs" do
    test "are found by locate/1 and fetch/2 from other nodes", c do
      # Found by an attack run: adoption registered the region but never told the
      # directory, so other nodes could not locate (nor fetch by id) a worker's output.
      worker =
        Snakepit.SharedMemory.Test.PythonWorker.start("""
        import json, sys, snakepit_shm
        for line in sys.stdin:
            out = snakepit_shm.allocate(4096)
            out.write(0, b"adopted")
            out.close()
            print(json.dumps(out.ref))
        """)

      try do
        ref = Snakepit.SharedMemory.Test.PythonWorker.ask(worker, "go")
        {:ok, id} = SHM.adopt_region(ref)
        sync_all()

        assert {:ok, node()} == :erpc.call(c.a, SHM, :locate, [id])

        assert {:ok, copy} =
                 :erpc.call(c.b, SHM, :fetch, [id, [region: [cleanup_policy: :manual]]])

        assert "adopted" == remote(c.b, :read, [copy, 0, 7])
        :ok = shm(c.b, :deallocate_region, [copy])
        :ok = SHM.deallocate_region(id)
      after
        Snakepit.SharedMemory.Test.PythonWorker.stop(worker)
      end
    end
  end

  describe "an adopted POSIX output whose worker exited" do
    test "is no orphan to another VM on the host while this VM holds it", c do
      # Found by an attack run: the header names the worker as creator, so once it
      # exited the orphan sweep of any other VM on the host (its start, or `mix
      # snakepit.shm.cleanup`) removed the segment under the VM that adopted it.
      alias Snakepit.SharedMemory.Test.PythonWorker

      worker =
        PythonWorker.start("""
        import json, sys, snakepit_shm
        for line in sys.stdin:
            out = snakepit_shm.allocate(4096, backend="posix")
            out.close()
            print(json.dumps(out.ref))
        """)

      ref = PythonWorker.ask(worker, "go")
      {:ok, id} = SHM.adopt_region(ref, cleanup_policy: :manual)
      PythonWorker.stop(worker)

      eventually(fn ->
        {:ok, header} = Snakepit.SharedMemory.Native.inspect_path("/dev/shm/" <> id)
        not header.creator_alive
      end)

      # A dry run: a real sweep on the peer would also take other suites' orphans.
      {:ok, would_free} = shm(c.a, :cleanup_regions, [[dry_run: true]])
      refute id in Enum.map(would_free, & &1.region_id)
      :ok = SHM.deallocate_region(id)
    end
  end

  describe "adopt_region/2 of another node's region (same host)" do
    # Found by an attack run: the ref of a region another VM allocated (a node on the
    # same host) was adopted, and deallocating it here destroyed it under that VM.
    for backend <- [:memfd, :posix] do
      test "#{backend}: refused, and the region stays the other VM's", c do
        {:ok, id} =
          shm(c.a, :allocate_region, [4096, [cleanup_policy: :manual, backend: unquote(backend)]])

        {:ok, ref} = shm(c.a, :export_ref, [id])

        assert {:error, %Error{reason: :invalid_argument, message: message}} =
                 SHM.adopt_region(ref)

        assert message =~ "not a worker's output"
        assert {:error, %Error{reason: :not_found}} = SHM.get_region_info(id)
        assert {:ok, %{adopted: false}} = shm(c.a, :get_region_info, [id])
        # Still alive there (the mapping ends with the :erpc process that made it).
        assert {:ok, _mapping} = shm(c.a, :map_region, [id])
        :ok = shm(c.a, :deallocate_region, [id])
      end
    end
  end
end
