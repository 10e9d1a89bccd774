defmodule Snakepit.SharedMemory.Reliability.PeersTest do
  # The presence of VMs to one another (Snakepit.SharedMemory.Peers): a VM killed with
  # SIGKILL while another keeps running has its POSIX segments swept by the survivor,
  # with no VM started. Real VMs (OTP's :peer), each with a private shm_path so that no
  # sweep here touches other suites' segments; real SIGKILLs.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{ClusterHelpers, JSON, Native, PeerVms, Peers, ReliabilityHelpers}
  alias Snakepit.SharedMemory.{ShmHelpers, Test.PythonWorker}

  @moduletag :reliability
  @moduletag timeout: 300_000

  setup do
    dir = "/dev/shm/peers_test_#{System.unique_integer([:positive])}"
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    {:ok, dir: dir}
  end

  defp posix_regions(node, count) do
    for _ <- 1..count,
        do: :erpc.call(node, ClusterHelpers, :filled_region, [65_536, [backend: :posix]], 60_000)
  end

  defp kill9(node) do
    {_, 0} = System.cmd("kill", ["-9", :erpc.call(node, System, :pid, [])])
    assert ShmHelpers.wait_until(fn -> node not in Node.list() end, 30_000)
  end

  defp gone?(dir, ids), do: Enum.all?(ids, &(not File.exists?(Path.join(dir, &1))))

  defp uid, do: File.stat!("/proc/self").uid

  defp vms(dir), do: Peers.directory(dir, uid())

  # A presence hello (docs/FORMAT.md "Presence sockets") naming `identity`.
  defp hello(identity) do
    {:ok, json} =
      JSON.encode(%{
        "snakepit_shm_peer" => 1,
        "os_pid" => identity.os_pid,
        "start_time" => identity.start_time,
        "boot_id" => identity.boot_id
      })

    json
  end

  # An identity no process has.
  @nobody %{os_pid: 999_999, start_time: 1, boot_id: String.duplicate("0", 32)}

  # The presence directory made beforehand, as a VM makes it (both levels 0700).
  defp private_vms(dir) do
    vms = vms(dir)
    File.mkdir_p!(vms)
    File.chmod!(Path.dirname(vms), 0o700)
    File.chmod!(vms, 0o700)
    vms
  end

  defp sockets(dir) do
    {:ok, names} = File.ls(vms(dir))
    Enum.filter(names, &String.starts_with?(&1, "vm-"))
  end

  # The path of the only VM socket in `dir`'s presence directory.
  defp socket_path(dir) do
    [name] = sockets(dir)
    Path.join(vms(dir), name)
  end

  test "a VM SIGKILLed while another runs: the survivor sweeps its POSIX segments at once",
       %{dir: dir} do
    # Before: the segments stayed in the shm directory until some VM *started* (its
    # start-up sweep) or an operator ran `mix snakepit.shm.cleanup`.
    survivor = PeerVms.shm_peer("psurv", dir, true)
    own = posix_regions(survivor, 1)
    doomed = PeerVms.shm_peer("pdead", dir, false)
    ids = posix_regions(doomed, 3)

    assert ShmHelpers.wait_until(fn -> length(:erpc.call(survivor, Peers, :list, [])) == 1 end)
    assert [%{os_pid: os_pid}] = :erpc.call(survivor, Peers, :list, [])
    assert Integer.to_string(os_pid) == :erpc.call(doomed, System, :pid, [])
    assert Enum.all?(ids, &File.exists?(Path.join(dir, &1)))

    kill9(doomed)

    assert ShmHelpers.wait_until(fn -> gone?(dir, ids) end, 10_000),
           "the dead VM's segments outlived it: #{inspect(Enum.filter(ids, &File.exists?(Path.join(dir, &1))))}"

    # The survivor's own region is untouched, and the dead VM's socket was removed by
    # nobody yet (it is refused, and removed by the next VM that finds it).
    assert Enum.all?(own, &File.exists?(Path.join(dir, &1)))
    assert :erpc.call(survivor, Peers, :list, []) == []
  end

  test "the dead VM's segment a worker still holds goes when the worker lets go", %{dir: dir} do
    survivor = PeerVms.shm_peer("psurv", dir, true)
    doomed = PeerVms.shm_peer("pdead", dir, false)
    [held, free] = posix_regions(doomed, 2)
    {:ok, ref} = :erpc.call(doomed, Snakepit.SharedMemory, :export_ref, [held], 60_000)

    expected =
      doomed |> :erpc.call(ClusterHelpers, :read, [held, 0, 16]) |> Base.encode16(case: :lower)

    worker = PeerVms.holding_worker(dir, ref, expected)
    assert ShmHelpers.wait_until(fn -> length(:erpc.call(survivor, Peers, :list, [])) == 1 end)
    kill9(doomed)

    assert ShmHelpers.wait_until(fn -> gone?(dir, [free]) end, 10_000)
    assert File.exists?(Path.join(dir, held)), "a held segment was removed"
    assert {:ok, %{in_use: true}} = Native.inspect_path(Path.join(dir, held))

    send(worker, :release)
    assert_receive {:released, ^worker}, 30_000

    assert ShmHelpers.wait_until(fn -> gone?(dir, [held]) end, 15_000),
           "#{held} outlived its last holder"

    _ = survivor
  end

  # A worker that makes POSIX outputs in `dir` (its argv[1]): "alloc" makes one and
  # closes its Region (the output stays pending, unadopted), "fork" forks a child that
  # sleeps; each replies with JSON.
  @posix_worker """
  import json, os, sys, time
  os.environ["SNAKEPIT_SHM_PATH"] = sys.argv[1]
  import snakepit_shm
  from snakepit_shm import _presence
  for line in sys.stdin:
      if line.strip() == "alloc":
          with snakepit_shm.allocate(4096, backend="posix") as out:
              out.write(0, b"pending output")
          print(json.dumps({"id": out.ref["region_id"], "connected": _presence.connected()}), flush=True)
      else:
          child = os.fork()
          if child == 0:
              time.sleep(3600)
              os._exit(0)
          print(json.dumps({"child": child}), flush=True)
  """

  test "a Python worker SIGKILLed with an unadopted POSIX output: the VM sweeps it at once",
       %{dir: dir} do
    # Before: the output stayed in the shm directory until a VM started (or cleanup).
    vm = PeerVms.shm_peer("pwork", dir, true)
    worker = PythonWorker.start(@posix_worker, [dir])
    %{"id" => id, "connected" => 1} = PythonWorker.ask(worker, "alloc")
    assert File.exists?(Path.join(dir, id))
    assert ShmHelpers.wait_until(fn -> length(:erpc.call(vm, Peers, :list, [])) == 1 end)
    assert [%{os_pid: os_pid}] = :erpc.call(vm, Peers, :list, [])
    assert os_pid == worker.os_pid

    PythonWorker.kill9(worker)
    assert ShmHelpers.wait_until(fn -> gone?(dir, [id]) end, 10_000), "#{id} outlived its worker"
  end

  test "a worker joins again a VM whose presence restarted: its death is still seen",
       %{dir: dir} do
    # Found by attack run 4 (D): a worker joined once per process, so after the Peers
    # process of its VM restarted (or the application was stopped and started again: a
    # new socket name), the worker was connected to no VM for good, and its unadopted
    # POSIX outputs outlived a SIGKILL until the next VM start.
    vm = PeerVms.shm_peer("prejoin", dir, true)
    worker = PythonWorker.start(@posix_worker, [dir])
    %{"id" => first, "connected" => 1} = PythonWorker.ask(worker, "alloc")
    assert ShmHelpers.wait_until(fn -> length(:erpc.call(vm, Peers, :list, [])) == 1 end)

    [old] = sockets(dir)
    peers = :erpc.call(vm, Process, :whereis, [Peers])
    :erpc.call(vm, Process, :exit, [peers, :kill])

    assert ShmHelpers.wait_until(fn ->
             pid = :erpc.call(vm, Process, :whereis, [Peers])
             is_pid(pid) and pid != peers and sockets(dir) -- [old] != []
           end)

    assert :erpc.call(vm, Peers, :list, []) == []
    %{"id" => second, "connected" => 1} = PythonWorker.ask(worker, "alloc")
    assert ShmHelpers.wait_until(fn -> length(:erpc.call(vm, Peers, :list, [])) == 1 end)

    PythonWorker.kill9(worker)

    assert ShmHelpers.wait_until(fn -> gone?(dir, [first, second]) end, 10_000),
           "the outputs outlived their worker"
  end

  test "a forked child does not keep its parent's presence connections", %{dir: dir} do
    vm = PeerVms.shm_peer("pfork", dir, true)
    worker = PythonWorker.start(@posix_worker, [dir])
    %{"connected" => 1} = PythonWorker.ask(worker, "alloc")
    %{"child" => child} = PythonWorker.ask(worker, "fork")

    try do
      assert ShmHelpers.wait_until(fn -> length(:erpc.call(vm, Peers, :list, [])) == 1 end)
      # (Not PythonWorker.kill9/1: the child keeps the port's pipes open.)
      ReliabilityHelpers.kill9(worker.os_pid)
      # The parent's death is seen although its child (which inherited the sockets) lives.
      assert ShmHelpers.wait_until(fn -> :erpc.call(vm, Peers, :list, []) == [] end, 10_000)
      assert ReliabilityHelpers.os_alive?(child)
    after
      ReliabilityHelpers.kill9(child)
    end
  end

  test "fake deaths of a live VM (forged hellos, its Peers killed) never remove its segments",
       %{dir: dir} do
    # Attack run 4 (D): what a survivor is told about a VM decides at most which held
    # segments it looks at again; the liveness locks alone decide what goes.
    survivor = PeerVms.shm_peer("psurv", dir, true)
    live = PeerVms.shm_peer("plive", dir, true)
    ids = posix_regions(live, 3)
    before = for id <- ids, do: :erpc.call(live, ClusterHelpers, :read, [id, 0, 64])

    assert ShmHelpers.wait_until(fn -> length(:erpc.call(survivor, Peers, :list, [])) == 1 end)
    [identity] = :erpc.call(survivor, Peers, :list, [])

    hello = hello(identity)

    path = fn node ->
      [name] = sockets(dir) -- [Path.basename(:erpc.call(node, :sys, :get_state, [Peers]).path)]
      Path.join(vms(dir), name)
    end

    # Forged: the live VM's identity, then the end of the connection.
    for _ <- 1..50 do
      {:ok, s} = :gen_tcp.connect({:local, path.(live)}, 0, [:binary, packet: 4, active: false])
      :ok = :gen_tcp.send(s, hello)
      {:ok, _} = :gen_tcp.recv(s, 0, 5_000)
      :gen_tcp.close(s)
    end

    # Its Peers killed over and over.
    for _ <- 1..10 do
      pid = :erpc.call(live, Process, :whereis, [Peers])
      :erpc.call(live, Process, :exit, [pid, :kill])

      assert ShmHelpers.wait_until(fn ->
               new = :erpc.call(live, Process, :whereis, [Peers])
               is_pid(new) and new != pid
             end)
    end

    assert ShmHelpers.wait_until(fn -> length(:erpc.call(survivor, Peers, :list, [])) == 1 end)
    # The survivor's held sweeps (1 s, then backing off) ran on them.
    Process.sleep(2_500)
    :ok = :erpc.call(survivor, Snakepit.SharedMemory.Manager, :sync, [])

    for id <- ids, do: assert(File.exists?(Path.join(dir, id)), "#{id} of a live VM was removed")
    assert before == for(id <- ids, do: :erpc.call(live, ClusterHelpers, :read, [id, 0, 64]))
  end

  test "deaths in a stream do not keep the survivor's manager sweeping back to back",
       %{dir: dir} do
    # Found by attack run 4 (D): every peer that ends (a Python worker's normal exit
    # included) asked each VM for a sweep of the whole shm directory, run as soon as the
    # previous one ended: with 1500 segments of a live VM there and a stream of
    # connections that introduce themselves and leave, the manager swept without a pause
    # (and every call to it waited). Now a sweep waits 4 times its predecessor's duration.
    survivor = PeerVms.shm_peer("psurv", dir, true)
    live = PeerVms.shm_peer("plive", dir, false)

    for _ <- 1..1500 do
      {:ok, _} =
        :erpc.call(live, Snakepit.SharedMemory, :allocate_region, [
          4096,
          [backend: :posix, cleanup_policy: :manual]
        ])
    end

    cost_ms =
      Enum.min(
        for _ <- 1..3 do
          {us, _} =
            :erpc.call(survivor, :timer, :tc, [
              Snakepit.SharedMemory.Sweep,
              :sweep_orphans_of,
              [[]]
            ])

          div(us, 1000)
        end
      )

    path = :erpc.call(survivor, :sys, :get_state, [Peers]).path

    hello = hello(@nobody)

    deadline = System.monotonic_time(:millisecond) + 4_000

    flood =
      Task.async(fn ->
        Stream.repeatedly(fn ->
          {:ok, s} = :gen_tcp.connect({:local, path}, 0, [:binary, packet: 4, active: false])
          :ok = :gen_tcp.send(s, hello)
          {:ok, _} = :gen_tcp.recv(s, 0, 5_000)
          :gen_tcp.close(s)
        end)
        |> Stream.take_while(fn _ -> System.monotonic_time(:millisecond) < deadline end)
        |> Stream.run()
      end)

    Process.sleep(500)

    # How long the manager takes to answer while deaths keep coming: back to back, a
    # call waits for the sweep in progress (half a sweep on average).
    latencies =
      for _ <- 1..15 do
        Process.sleep(:rand.uniform(150))

        {us, :ok} =
          :timer.tc(fn -> :erpc.call(survivor, Snakepit.SharedMemory.Manager, :sync, []) end)

        div(us, 1000)
      end

    Task.await(flood, 30_000)
    median = latencies |> Enum.sort() |> Enum.at(7)

    assert median < max(div(cost_ms, 4), 5),
           "median #{median} ms to answer (#{inspect(latencies)}), a sweep takes #{cost_ms} ms"
  end

  test "a VM that starts later is connected too, in both directions", %{dir: dir} do
    first = PeerVms.shm_peer("pfirst", dir, false)
    second = PeerVms.shm_peer("psecond", dir, true)
    ids = posix_regions(first, 2)

    assert ShmHelpers.wait_until(fn -> length(:erpc.call(first, Peers, :list, [])) == 1 end)
    assert length(:erpc.call(second, Peers, :list, [])) == 1
    assert length(sockets(dir)) == 2

    # The first VM dies: the second (which connected to it) sweeps.
    kill9(first)
    assert ShmHelpers.wait_until(fn -> gone?(dir, ids) end, 10_000)
  end

  test "a dead VM's socket is removed by the next VM; a stopped VM removes its own",
       %{dir: dir} do
    vm = PeerVms.shm_peer("pone", dir, false)
    [socket] = sockets(dir)
    kill9(vm)
    assert sockets(dir) == [socket]

    next = PeerVms.shm_peer("ptwo", dir, false)
    assert [other] = sockets(dir)
    assert other != socket
    assert :erpc.call(next, Peers, :list, []) == []

    :ok = :erpc.call(next, Application, :stop, [:snakepit_shm])
    assert sockets(dir) == []
  end

  test "a VM killed between its listen and its rename: its temporary socket goes later",
       %{dir: dir} do
    # Found by attack run 4 (D): a `.tmp-*` name (a VM killed between binding its socket
    # and renaming it) was never removed by anyone: one dead socket file per such kill.
    vms = private_vms(dir)

    for name <- [".tmp-old", ".tmp-young"] do
      path = Path.join(vms, name)
      {:ok, listener} = :gen_tcp.listen(0, ifaddr: {:local, path})
      :ok = :gen_tcp.close(listener)
      assert {:ok, %File.Stat{type: :other}} = File.lstat(path)
    end

    File.touch!(Path.join(vms, ".tmp-old"), {{2020, 1, 1}, {0, 0, 0}})
    _vm = PeerVms.shm_peer("ptmp", dir, false)

    {:ok, names} = File.ls(vms)
    # The old one refuses connections: its VM is dead. A young one may be a VM starting.
    refute ".tmp-old" in names
    assert ".tmp-young" in names
  end

  test "a name too long for a Unix socket in the presence directory does not stop a start",
       %{dir: dir} do
    # Found by attack run 4 (D): :gen_tcp.connect/4 exits with :badarg on a path longer
    # than sun_path, so one such `vm-*.sock` (or old `.tmp-*`) name, planted by any
    # process of the user, crashed Peers at every start: the application failed to start.
    vms = private_vms(dir)
    long = String.duplicate("a", 200)
    File.write!(Path.join(vms, "vm-#{long}.sock"), "")
    File.write!(Path.join(vms, ".tmp-#{long}"), "")
    File.touch!(Path.join(vms, ".tmp-#{long}"), {{2020, 1, 1}, {0, 0, 0}})

    vm = PeerVms.shm_peer("plong", dir, true)
    assert is_pid(:erpc.call(vm, Process, :whereis, [Peers]))
    assert [_] = sockets(dir) -- ["vm-#{long}.sock"]
  end

  test "a connection that does not introduce itself is dropped and its end sweeps nothing",
       %{dir: dir} do
    vm = PeerVms.shm_peer("pvm", dir, true)
    path = socket_path(dir)
    orphan = "spshm_" <> String.duplicate("a", 20)

    for hello <- ["not a term", :erlang.term_to_binary({:snakepit_shm_peer, 2, %{}})] do
      {:ok, s} = :gen_tcp.connect({:local, path}, 0, [:binary, packet: 4, active: false])
      :ok = :gen_tcp.send(s, hello)
      # The VM's own hello, then the end of the connection it dropped.
      assert {:ok, _} = :gen_tcp.recv(s, 0, 5_000)
      assert {:error, :closed} = :gen_tcp.recv(s, 0, 5_000)
    end

    assert :erpc.call(vm, Peers, :list, []) == []
    # A header-less segment of ours, old enough for any sweep to remove it.
    File.write!(Path.join(dir, orphan), "")
    File.touch!(Path.join(dir, orphan), {{2020, 1, 1}, {0, 0, 0}})
    {:ok, s} = :gen_tcp.connect({:local, path}, 0, [:binary, packet: 4, active: false])
    :ok = :gen_tcp.close(s)
    # Nothing triggered a sweep: it stays...
    Process.sleep(500)
    assert File.exists?(Path.join(dir, orphan))

    # ...until a VM that introduced itself dies.
    other = PeerVms.shm_peer("pother", dir, false)
    assert ShmHelpers.wait_until(fn -> length(:erpc.call(vm, Peers, :list, [])) == 1 end)
    kill9(other)
    assert ShmHelpers.wait_until(fn -> gone?(dir, [orphan]) end, 10_000)
  end

  test "connections that never introduce themselves are closed; at most 1024 are kept",
       %{dir: dir} do
    # (ulimit -n 8192: at most a quarter of the descriptor limit is kept, 1024 here.)
    vm = PeerVms.shm_peer("pflood", dir, false, nofile: 8192)
    path = socket_path(dir)
    fds = fn -> length(:erpc.call(vm, File, :ls!, ["/proc/self/fd"])) end
    before = fds.()
    connect = fn -> :gen_tcp.connect({:local, path}, 0, [:binary, packet: 4, active: false]) end

    # 1100 connections that say nothing, one at a time (the client side of a Unix socket
    # connected past a full backlog is not really connected): the VM keeps 1024, each
    # greeted with its hello, and closes the rest before its hello.
    # (Silent connections are closed after 10 s: longer here, so that all are counted.)
    :ok = :erpc.call(vm, :persistent_term, :put, [{Peers, :hello_timeout_ms}, 120_000])

    {sockets, outcomes} =
      Enum.unzip(
        for _ <- 1..1100 do
          {:ok, s} = connect.()

          case :gen_tcp.recv(s, 0, 10_000) do
            {:ok, _hello} -> {s, :kept}
            {:error, reason} -> {s, reason}
          end
        end
      )

    assert Enum.frequencies(outcomes) == %{kept: 1024, closed: 1100 - 1024}
    # (Give or take a few descriptors the VM opens or closes meanwhile: 1023 was seen.)
    assert (fds.() - before) in 1018..1030

    Enum.each(sockets, &:gen_tcp.close/1)
    assert ShmHelpers.wait_until(fn -> fds.() - before < 10 end, 10_000)

    # A silent connection is closed after the hello timeout (10 s; 200 ms here).
    :ok = :erpc.call(vm, :persistent_term, :put, [{Peers, :hello_timeout_ms}, 200])
    {:ok, s} = connect.()
    assert {:ok, _hello} = :gen_tcp.recv(s, 0, 5_000)
    assert {:error, :closed} = :gen_tcp.recv(s, 0, 5_000)
  end

  test "presence connections never take the descriptors the VM needs (ulimit -n 512)",
       %{dir: dir} do
    # Found by attack run 4 (D): up to 1024 connections were kept whatever the VM's
    # descriptor limit; under `ulimit -n 1024` (systemd's default soft limit) 1024
    # workers, or a process of the user introducing itself in a loop, took every
    # descriptor of the VM, and its allocations failed.
    vm = PeerVms.shm_peer("pnofile", dir, false, nofile: 512)
    path = socket_path(dir)

    hello = hello(@nobody)

    kept =
      Enum.reduce_while(1..600, [], fn _, kept ->
        {:ok, s} = :gen_tcp.connect({:local, path}, 0, [:binary, packet: 4, active: false])
        :ok = :gen_tcp.send(s, hello)

        case :gen_tcp.recv(s, 0, 2_000) do
          {:ok, _hello} ->
            {:cont, [s | kept]}

          {:error, _} ->
            :gen_tcp.close(s)
            {:halt, kept}
        end
      end)

    try do
      assert ShmHelpers.wait_until(fn ->
               length(:erpc.call(vm, Peers, :list, [])) == length(kept)
             end)

      # (Each freed when the :erpc process that owns it exits.)
      for backend <- [:posix, :memfd, :posix, :memfd], _ <- 1..20 do
        assert {:ok, _region} =
                 :erpc.call(vm, Snakepit.SharedMemory, :allocate_region, [
                   65_536,
                   [backend: backend]
                 ])
      end

      # At most a quarter of the VM's descriptors.
      assert length(kept) <= div(512, 4)
    after
      Enum.each(kept, &:gen_tcp.close/1)
    end
  end

  test "a presence directory with group permissions turns presence off, the app runs",
       %{dir: dir} do
    vms = vms(dir)
    File.mkdir_p!(vms)
    File.chmod!(vms, 0o755)
    vm = PeerVms.shm_peer("pperm", dir, true)
    assert :erpc.call(vm, Process, :whereis, [Peers]) == nil
    assert {:ok, _} = :erpc.call(vm, Snakepit.SharedMemory, :allocate_region, [4096])
    assert {:ok, []} = File.ls(vms)
    assert File.stat!(vms).mode |> Bitwise.band(0o777) == 0o755
  end
end
