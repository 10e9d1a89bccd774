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

    test "bad input" do
      assert {:error, %Error{reason: :invalid_argument}} = SHM.locate(:nope)
    end
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
        id = remote(c.a, :filled_region, [size, [metadata: %{dtype: "uint8", shape: [size]}]])
        source_digest = remote(c.a, :digest, [id])
        assert {:ok, local} = SHM.fetch(id, chunk_size: 1_048_576)
        assert {:ok, node()} == SHM.locate(local)
        assert digest(local) == source_digest
        {:ok, info} = SHM.get_region_info(local)
        assert info.size == size
        assert info.owner == self()
        assert info.metadata == %{dtype: "uint8", shape: [size]}
        :ok = SHM.deallocate_region(local)
        :ok = shm(c.a, :deallocate_region, [id])
      end
    end

    test "a ref names its node: no lookup needed", c do
      id = remote(c.b, :filled_region, [70_000])
      {:ok, ref} = shm(c.b, :export_ref, [id])
      assert ref["node"] == Atom.to_string(c.b)
      assert {:ok, local} = SHM.fetch(ref, checksum: :sha256, chunk_size: 4096, window: 1)
      assert digest(local) == remote(c.b, :digest, [id])
      :ok = SHM.deallocate_region(local)
      :ok = shm(c.b, :deallocate_region, [id])
    end

    test "encrypted regions arrive encrypted, never at a lower level", c do
      id = remote(c.a, :filled_region, [2_000_000, [security_level: :high]])
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
      id = remote(c.a, :filled_region, [100_000, [security_level: :maximum]])
      assert {:error, %Error{reason: :not_sealed}} = SHM.fetch(id)
      :ok = shm(c.a, :seal, [id])
      assert {:ok, local} = SHM.fetch(id)
      assert {:ok, %{sealed: true, security_level: :maximum}} = SHM.get_region_info(local)
      assert digest(local) == remote(c.a, :digest, [id])
      :ok = SHM.deallocate_region(local)
      :ok = shm(c.a, :deallocate_region, [id])
    end

    test "a standard region with encrypt: true", c do
      id = remote(c.a, :filled_region, [300_000])
      assert {:ok, local} = SHM.fetch(id, encrypt: true, chunk_size: 65_536)
      assert digest(local) == remote(c.a, :digest, [id])
      :ok = SHM.deallocate_region(local)
      :ok = shm(c.a, :deallocate_region, [id])
    end

    test "into: an existing local region", c do
      id = remote(c.a, :filled_region, [100_000])
      {:ok, target} = SHM.allocate_region(100_000)
      assert {:ok, ^target} = SHM.fetch(id, into: target)
      assert digest(target) == remote(c.a, :digest, [id])

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

      assert {:error, %Error{reason: :invalid_option}} = SHM.fetch("x", window: 0)
      assert {:error, %Error{reason: :invalid_option}} = SHM.fetch("x", chunk_size: 1)
      assert {:error, %Error{reason: :invalid_option}} = SHM.fetch("x", bogus: 1)
      assert {:error, %Error{reason: :invalid_argument}} = SHM.fetch(42)

      holder = :erpc.call(c.a, :erlang, :whereis, [Snakepit.SharedMemory.Manager])
      id = remote(c.a, :filled_region, [4096, [allowed_processes: [holder]]])
      assert {:error, %Error{reason: :permission_denied}} = SHM.fetch(id)
      :ok = shm(c.a, :cleanup_regions, [[ids: [id]]]) |> elem(0)
      assert ids(node()) == before
    end
  end
end
