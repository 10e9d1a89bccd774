defmodule Snakepit.SharedMemory.Cluster.DirectoryViewsTest do
  # Attack run 3: directories whose member views differ for a moment. A node whose
  # directory still had the old view (busy, here suspended) announced a region to the
  # shard of that view; the receiving node had already moved on and kept the entry, not
  # being its shard. Once the region was freed (withdrawn from its real shard only) and a
  # later membership change made that node the shard again, it answered the freed region
  # for good. Real peer VMs, a real SIGKILL; only the directory process is held still.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.ClusterHelpers

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.Error
  alias Snakepit.SharedMemory.Cluster.Directory

  @moduletag timeout: 300_000

  test "an announcement made under an old view never leaves a freed region behind" do
    ensure_distributed!()
    {peer_a, a} = start_peer!("shmva")
    on_exit(fn -> stop_peer(peer_a) end)
    settle!([node(), a], 2)

    # A's directory held still: what A allocates now is announced later, under [A, me].
    directory_a = :erpc.call(a, Process, :whereis, [Directory])
    Node.spawn(a, Snakepit.SharedMemory.ClusterHelpers, :suspender, [directory_a, self()])
    assert_receive {:suspended, holder}, 30_000
    ids = for _ <- 1..80, do: elem(shm(a, :allocate_region, [64, [cleanup_policy: :manual]]), 1)

    {peer_b, b} = start_peer!("shmvb")
    on_exit(fn -> stop_peer(peer_b) end)
    # This node sees B join (and rebalances) while A's directory still has the old view.
    eventually(fn -> length(Directory.sync()) == 3 end)
    send(holder, :resume)
    settle!([node(), a, b], 3)

    old = Enum.sort([node(), a])
    new = Enum.sort([node(), a, b])
    # Announced to this node under the old view, whose shard is B under the new one.
    moved =
      Enum.filter(ids, &(Directory.shard(&1, old) == node() and Directory.shard(&1, new) == b))

    assert moved != []
    for id <- ids, do: assert({:ok, a} == SHM.locate(id))

    # Freed by processes that end normally (an :erpc process exits with its result,
    # which would make A's manager reconcile the directory and hide the bug).
    for id <- moved, do: Node.spawn(a, SHM, :deallocate_region, [id])

    eventually(fn ->
      not Enum.any?(moved, &:erpc.call(a, Snakepit.SharedMemory.Registry, :member?, [&1]))
    end)

    settle!([node(), a, b], 3)
    for id <- moved, do: assert({:error, %Error{reason: :not_found}} = SHM.locate(id))

    # B dies: this node is the shard of those ids again.
    {_, 0} = System.cmd("kill", ["-9", os_pid(b)])
    settle!([node(), a], 2)

    for id <- moved do
      assert {:error, %Error{reason: :not_found}} = SHM.locate(id),
             "#{id} was freed on #{a}, but the directory still names it"

      refute Enum.any?(Directory.shard_entries(), &(elem(&1, 0) == id))
    end

    for id <- ids -- moved do
      assert {:ok, a} == SHM.locate(id)
      :ok = shm(a, :deallocate_region, [id])
    end
  end
end
