defmodule Snakepit.SharedMemory.Cluster.DirectoryKillTest do
  # Attack run 3: a caller killed (Process.exit(pid, :kill)) between registering a region
  # and announcing it to the cluster directory, or between taking a freed region's
  # record and withdrawing it, left the directory wrong for good: another node's
  # locate/1 answered :not_found for a live region, or this node for a freed one, until
  # some node joined or left. Parked at the allocator's checkpoints (its test hook), as in
  # kill_instants_test.exs; a real peer VM does the lookups.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.ClusterHelpers

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.{Allocator, Error}
  alias Snakepit.SharedMemory.Cluster.Directory

  @moduletag timeout: 300_000

  setup_all do
    ensure_distributed!()
    {peer, p} = start_peer!("shmdk")
    settle!([node(), p], 2)
    on_exit(fn -> stop_peer(peer) end)
    %{p: p}
  end

  defp parked_caller(point, fun) do
    parent = self()

    caller =
      spawn(fn ->
        Process.put(Allocator.checkpoint_key(), fn
          ^point ->
            send(parent, {:parked, self(), point})
            Process.sleep(:infinity)

          _ ->
            :ok
        end)

        fun.()
      end)

    assert_receive {:parked, ^caller, ^point}, 10_000
    caller
  end

  defp entries_of(id, nodes) do
    nodes
    |> Enum.flat_map(&:erpc.call(&1, Directory, :shard_entries, []))
    |> Enum.filter(&(elem(&1, 0) == id))
  end

  for point <- [:registered, :kept] do
    test "an allocating caller killed at #{point}: the region is still found from another node",
         c do
      parent = self()

      caller =
        parked_caller(unquote(point), fn ->
          {:ok, id} = SHM.allocate_region(4096, cleanup_policy: :manual)
          send(parent, {:id, id})
        end)

      Process.exit(caller, :kill)
      [id] = SHM.list_regions() |> elem(1) |> Enum.map(& &1.id) |> Enum.filter(&owned_by_none?/1)

      try do
        eventually(fn -> :erpc.call(c.p, SHM, :locate, [id]) == {:ok, node()} end)
        assert entries_of(id, [node(), c.p]) == [{id, node()}]
      after
        :ok = SHM.deallocate_region(id)
      end
    end
  end

  for point <- [:taken, :destroyed] do
    test "a freeing caller killed at #{point}: no node points to the freed region any more",
         c do
      {:ok, id} = SHM.allocate_region(4096, cleanup_policy: :manual)
      sync_all()
      assert {:ok, node()} == :erpc.call(c.p, SHM, :locate, [id])

      caller = parked_caller(unquote(point), fn -> SHM.deallocate_region(id) end)
      Process.exit(caller, :kill)
      assert {:error, %Error{reason: :not_found}} = SHM.get_region_info(id)

      eventually(fn ->
        match?({:error, %Error{reason: :not_found}}, :erpc.call(c.p, SHM, :locate, [id]))
      end)

      assert entries_of(id, [node(), c.p]) == []
    end
  end

  test "after reconcile/0 every live region is entered once, at its shard", c do
    mine = for _ <- 1..20, do: elem(SHM.allocate_region(4096, cleanup_policy: :manual), 1)
    theirs = for _ <- 1..20, do: remote(c.p, :filled_region, [4096])
    Directory.reconcile()
    :ok = :erpc.call(c.p, Directory, :reconcile, [])
    settle!([node(), c.p], 2)
    nodes = Enum.sort([node(), c.p])

    expected = for n <- nodes, id <- ids(n), do: {Directory.shard(id, nodes), {id, n}}

    for shard <- nodes do
      want = for {^shard, entry} <- expected, do: entry
      assert Enum.sort(:erpc.call(shard, Directory, :shard_entries, [])) == Enum.sort(want)
    end

    for id <- mine, do: assert({:ok, node()} == :erpc.call(c.p, SHM, :locate, [id]))
    for id <- theirs, do: assert({:ok, c.p} == SHM.locate(id))
    for id <- mine, do: :ok = SHM.deallocate_region(id)
    for id <- theirs, do: :ok = shm(c.p, :deallocate_region, [id])
  end

  test "lookups racing reconciliations never miss a live region", c do
    ids = for _ <- 1..300, do: elem(SHM.allocate_region(64, cleanup_policy: :manual), 1)
    settle!([node(), c.p], 2)
    nodes = Enum.sort([node(), c.p])
    # Those whose shard is this node: the peer's lookups read the table replaced here.
    here = Enum.filter(ids, &(Directory.shard(&1, nodes) == node()))
    me = self()

    :erpc.call(c.p, :erlang, :spawn, [
      Snakepit.SharedMemory.ClusterHelpers,
      :locate_loop,
      [me, here, 3_000]
    ])

    deadline = System.monotonic_time(:millisecond) + 3_000

    Stream.repeatedly(fn ->
      Directory.reconcile()
      Directory.sync()
    end)
    |> Enum.find(fn _ -> System.monotonic_time(:millisecond) > deadline end)

    assert_receive {:locate_loop, lookups, misses}, 30_000
    assert lookups > 0
    assert misses == [], "#{length(misses)} of #{lookups} lookups missed a live region"
    for id <- ids, do: :ok = SHM.deallocate_region(id)
  end

  # The region the killed caller registered: :manual, its owner (the caller) dead.
  defp owned_by_none?(id) do
    case SHM.get_region_info(id) do
      {:ok, %{owner: owner}} when is_pid(owner) -> not Process.alive?(owner)
      _ -> false
    end
  end
end
