Code.require_file("../../mix/support/task_helpers.exs", __DIR__)

defmodule Snakepit.SharedMemory.Cluster.Attack6F2Test do
  # Attack run 6 (F2): the cluster layer as a frozen node, a node without :snakepit_shm,
  # a caller dying at the worst instant and malformed directory messages meet it. Peers
  # are OTP's :peer VMs on this machine (test/support/cluster_helpers.ex).
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.ClusterHelpers
  import Snakepit.SharedMemory.TaskHelpers, only: [run_task: 2, mix_cmd: 1]

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.{Cluster, Error}
  alias Snakepit.SharedMemory.Cluster.Directory

  @moduletag timeout: 300_000

  setup_all do
    ensure_distributed!()
    {peer_a, a} = start_peer!("shm6a")
    settle!([node(), a], 2)
    on_exit(fn -> stop_peer(peer_a) end)
    %{a: a}
  end

  # A peer VM that runs no :snakepit_shm: without this project's code (`code: false`), or
  # with it but the application not started.
  defp plain_peer!(prefix, code?) do
    cookie = Node.get_cookie() |> Atom.to_charlist()

    {:ok, peer, node} =
      :peer.start(%{
        name: :peer.random_name(String.to_charlist(prefix)),
        args: [~c"-setcookie", cookie],
        wait_boot: 120_000
      })

    if code?, do: :ok = :erpc.call(node, :code, :add_paths, [:code.get_path()])
    on_exit(fn -> stop_peer(peer) end)
    node
  end

  # Used to: Cluster.list_regions/1 asked every node with one :erpc.multicall (15 s), then
  # each node's OS pid one after the other (15 s each); `mix snakepit.shm.list --cluster`
  # waited 15 s for the whole: a frozen node (SIGSTOP; a VM swapped out, paused, stuck
  # in a long GC) made the task fail with "cannot list the cluster through A:
  # {:error, {:erpc, :timeout}} (does it run :snakepit_shm with cluster support?)",
  # listing none of the healthy nodes.
  test "list --cluster with a frozen node lists the others and names the frozen one", c do
    {peer_f, f} = start_peer!("shm6f")
    on_exit(fn -> stop_peer(peer_f) end)
    settle!([node(), c.a, f], 3)
    a_id = remote(c.a, :filled_region, [100_000])
    vm = os_pid(f)
    {_, 0} = System.cmd("kill", ["-STOP", vm])
    on_exit(fn -> System.cmd("kill", ["-CONT", vm]) end)

    try do
      parent = self()

      lister =
        spawn(fn ->
          started = System.monotonic_time(:millisecond)
          result = Cluster.list_regions()
          send(parent, {:listed, result, System.monotonic_time(:millisecond) - started})

          receive do
            :report -> send(parent, {:left_over, Process.info(self(), :messages)})
          end
        end)

      assert_receive {:listed, {:ok, listing}, elapsed}, 30_000
      assert elapsed < 13_000, "list_regions took #{elapsed} ms"
      assert %{error: message} = Enum.find(listing, &(&1.node == f))
      assert message =~ "did not answer within 10 s"
      assert %{regions: regions, os_pid: pid} = Enum.find(listing, &(&1.node == c.a))
      assert Enum.any?(regions, &(&1.id == a_id))
      assert is_integer(pid)

      cookie = Atom.to_string(Node.get_cookie())
      args = ["--node", "#{c.a}", "--cookie", cookie, "--cluster"]
      {out, err, status} = run_task("snakepit.shm.list", args)
      # 1: a node could not be listed; the others are.
      assert status == 1, "status #{status}: #{err}"
      assert out =~ ~r/^#{c.a}\s+#{a_id}\s+memfd/m
      assert err =~ "#{f}: did not answer within 10 s"
      # A task that connects to the frozen node (a VM of its own, not yet connected):
      # used to say "running but refused the connection: the cookie does not match".
      {out, 1} = mix_cmd(["snakepit.shm.list", "--node", "#{f}", "--cookie", cookie])
      assert out =~ "did not answer the connection within"
      assert out =~ "frozen"
      refute out =~ "cookie does not match"

      # Once the frozen node answers, its late replies are not left in the lister's
      # mailbox (the requests were abandoned).
      System.cmd("kill", ["-CONT", vm])
      ^f = :erpc.call(f, :erlang, :node, [], 30_000)
      Process.sleep(200)
      send(lister, :report)
      assert_receive {:left_over, {:messages, []}}, 5_000
    after
      System.cmd("kill", ["-CONT", vm])
    end

    :ok = shm(c.a, :deallocate_region, [a_id])
    stop_peer(peer_f)
    settle!([node(), c.a], 2)
  end

  # Used to: the node without the code was listed as "error: {:exception, :undef, ...}",
  # and fetch/2 from it failed with :io_error "the sender ... stopped after 0 chunk(s):
  # {:undef, [...]} (is :snakepit_shm of the same version there?)"; from a node with the
  # code but the application not running, :not_found "no region ... is registered
  # (never allocated, or already freed)".
  test "a connected node that runs no :snakepit_shm: clear errors, nothing left behind", c do
    bare = plain_peer!("shm6bare", false)
    stopped = plain_peer!("shm6stopped", true)
    before = ids(node())

    {:ok, listing} = Cluster.list_regions()
    assert %{error: message} = Enum.find(listing, &(&1.node == bare))
    assert message =~ ":snakepit_shm is not loaded there"
    assert %{error: message} = Enum.find(listing, &(&1.node == stopped))
    assert message =~ "application is not running"
    assert Enum.find(listing, &(&1.node == c.a)).regions

    id = "spshm_" <> String.duplicate("b", 20)

    assert {:error, %Error{reason: :unavailable} = error} = SHM.fetch(id, node: bare)
    assert error.message =~ "does not run :snakepit_shm"

    assert {:error, %Error{reason: :unavailable} = error} = SHM.fetch(id, node: stopped)
    assert error.message =~ "does not run :snakepit_shm"
    assert error.message =~ "not started"

    assert ids(node()) == before
    # No sender left running on the node with the code.
    senders =
      :erpc.call(stopped, Process, :list, [])
      |> Enum.filter(fn pid ->
        match?(
          {:current_function, {Snakepit.SharedMemory.Cluster.Fetch, _, _}},
          :erpc.call(stopped, Process, :info, [pid, :current_function])
        )
      end)

    assert senders == []
  end

  # Used to: the receiver sent the result and exited; a caller killed before it read it
  # (a Task shut down at that instant) left the new copy allocated for good when the
  # copy's :region options made it outlive its owner (cleanup_policy :manual), and nobody
  # knew its id.
  test "a caller killed after the transfer but before reading the result: the copy is freed",
       c do
    id = remote(c.a, :filled_region, [4 * 1_048_576])
    before = ids(node())

    opts = [
      node: c.a,
      chunk_size: 65_536,
      window: 1,
      progress: self(),
      region: [cleanup_policy: :manual]
    ]

    caller = fetch_in_background(id, opts, self())
    assert_receive {:snakepit_shm_fetch_progress, ^id, _, _}, 30_000
    # The receiver held still while the caller is suspended, so that the transfer cannot
    # end (and the caller read its result) before.
    receiver = receiver_of(caller)
    :erlang.suspend_process(receiver)
    :erlang.suspend_process(caller)
    :erlang.resume_process(receiver)

    # The transfer ends; the result waits in the suspended caller's mailbox.
    copy =
      eventually(fn ->
        {:messages, messages} = Process.info(caller, :messages)
        Enum.find_value(messages, fn m -> match?({_, :result, {:ok, _}}, m) && elem(m, 2) end)
      end)

    assert {:ok, copy_id} = copy
    assert copy_id in ids(node())
    Process.exit(caller, :kill)

    eventually(fn -> ids(node()) == before end)
    refute_received {:fetch_result, _}
    :ok = shm(c.a, :deallocate_region, [id])
  end

  test "a fetch whose caller lives keeps its :manual copy", c do
    id = remote(c.a, :filled_region, [262_144])

    assert {:ok, copy} =
             SHM.fetch(id, node: c.a, chunk_size: 65_536, region: [cleanup_policy: :manual])

    # Taken over by the caller: still there after the receiver is gone.
    Process.sleep(100)
    assert copy in ids(node())
    assert digest(copy) == remote(c.a, :digest, [id])
    :ok = SHM.deallocate_region(copy)
    :ok = shm(c.a, :deallocate_region, [id])
  end

  # Used to: any of these (a node of another version, or any process of a connected node:
  # the directory is a registered name) crashed the directory (Enum.map/2 of a non-list,
  # MapSet.new/1 of an atom, an improper list), which restarted the :pg scope with it and
  # emptied the shard table until the other nodes re-announced.
  test "malformed directory messages are dropped, the directory keeps running", c do
    {:ok, mine} = SHM.allocate_region(4096)
    a_id = remote(c.a, :filled_region, [4096])
    settle!([node(), c.a], 2)
    pid = Process.whereis(Directory)
    entries = Enum.sort(Directory.shard_entries())

    for message <- [
          {:register, node(), "not a list"},
          {:register, node(), [1 | 2]},
          {:register, node(), [:not_an_id]},
          {:register, "not a node", ["spshm_x"]},
          {:replace, node(), :not_a_list},
          {:replace, c.a, ["spshm_x" | :improper]},
          {:replace, {:not, :a, :node}, []},
          {:unregister, node(), 42},
          {:unregister, "not a node", "spshm_x"},
          {:register}
        ] do
      send(Directory, message)
      # From the other node too: what a node of another version would send.
      :erpc.call(c.a, :erlang, :send, [{Directory, node()}, message])
    end

    assert Directory.sync() == Enum.sort([node(), c.a])
    assert Process.whereis(Directory) == pid
    assert Enum.sort(Directory.shard_entries()) == entries
    assert {:ok, node()} == SHM.locate(mine)
    assert {:ok, c.a} == SHM.locate(a_id)
    assert {:ok, node()} == :erpc.call(c.a, SHM, :locate, [mine])
    :ok = SHM.deallocate_region(mine)
    :ok = shm(c.a, :deallocate_region, [a_id])
  end

  # Used to: the directory forwarded each allocation's entry to the id's shard with a
  # plain send; to a frozen node (SIGSTOP: it stops reading its connection) the
  # distribution buffer filled after some 60 000 allocations, and the send suspended the
  # directory until the connection dropped (net_ticktime, about a minute): its mailbox
  # grew by two messages per allocation (280 000 after 200 000 allocations and frees),
  # sync/0 hung, and this node's own shard entries were not updated meanwhile.
  test "a frozen member never suspends the directory; it catches up once it runs", c do
    {peer_f, f} = start_peer!("shm6z")
    on_exit(fn -> stop_peer(peer_f) end)
    settle!([node(), c.a, f], 3)
    dir = Process.whereis(Directory)
    vm = os_pid(f)
    {_, 0} = System.cmd("kill", ["-STOP", vm])
    on_exit(fn -> System.cmd("kill", ["-CONT", vm]) end)

    {kept, freed} =
      try do
        freed =
          for round <- 1..12, reduce: [] do
            acc ->
              ids =
                for _ <- 1..10_000 do
                  {:ok, id} = SHM.allocate_region(64)
                  :ok = SHM.deallocate_region(id)
                  id
                end

              info = Process.info(dir, [:status, :message_queue_len])
              assert info[:status] != :suspended, "round #{round}: #{inspect(info)}"
              assert info[:message_queue_len] < 20_000, "round #{round}: #{inspect(info)}"
              Enum.take(ids, 50) ++ acc
          end

        kept = for _ <- 1..40, do: elem(SHM.allocate_region(64, cleanup_policy: :manual), 1)
        assert {_, members} = {:sync, Directory.sync()}
        assert f in members
        {kept, freed}
      after
        System.cmd("kill", ["-CONT", vm])
      end

    # Once it runs again, the frozen node's shard is right: every region kept during the
    # freeze is found from there, none of the freed ones.
    eventually(fn ->
      Enum.all?(kept, &(:erpc.call(f, SHM, :locate, [&1]) == {:ok, node()}))
    end)

    assert Enum.all?(freed, &match?({:error, _}, :erpc.call(f, SHM, :locate, [&1])))
    for id <- kept, do: :ok = SHM.deallocate_region(id)
    stop_peer(peer_f)
    settle!([node(), c.a], 2)
  end
end
