Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.EventsTest do
  # Issue 12, Seen 10: the manager polled (one NIF call per region every
  # holder_scan_interval ms to find new OS holders). Now OS holders announce themselves
  # on the VM's event socket, and periodic work is O(what changed). The counts below
  # are NIF calls *made by the manager process*, traced with :erlang.trace/3.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Events, Holders, Manager, Native, Registry}
  alias Snakepit.SharedMemory.{ShmHelpers, TestSupport}

  @many 1_000

  setup do: TestSupport.no_leaks()

  defp manager, do: Process.whereis(Manager)

  # Runs `fun` while counting the manager's calls of each of `functions` (Native NIFs).
  defp count_manager_calls(functions, fun) do
    mgr = manager()
    for f <- functions, do: :erlang.trace_pattern({Native, f, 1}, true, [:local])
    :erlang.trace(mgr, true, [:call, {:tracer, self()}])

    try do
      fun.()
    after
      :erlang.trace(mgr, false, [:call])
      for f <- functions, do: :erlang.trace_pattern({Native, f, 1}, false, [:local])
    end

    drain(Map.new(functions, &{&1, 0}))
  end

  defp drain(counts) do
    receive do
      {:trace, _pid, :call, {Native, f, _args}} -> drain(Map.update(counts, f, 1, &(&1 + 1)))
    after
      200 -> counts
    end
  end

  defp allocate_many(n) do
    for _ <- 1..n do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      id
    end
  end

  defp watched?(os_pid),
    do: Enum.any?(Map.keys(:sys.get_state(manager()).holders.watches), &(elem(&1, 0) == os_pid))

  defp events, do: :sys.get_state(manager()).events

  describe "no polling" do
    test "an idle manager with #{@many} regions makes no per-region NIF calls" do
      allocate_many(@many)
      # Let the manager settle (it is told of nothing: no holder announces).
      Manager.sync()

      # 1.5 s is 30 holder_scan_intervals and 15 cleanup_intervals of config/test.exs:
      # a poll of every region would make tens of thousands of calls.
      counts =
        count_manager_calls([:hold_counts, :header, :last_access], fn -> Process.sleep(1_500) end)

      assert counts.hold_counts + counts.header + counts.last_access < @many,
             "the manager polled its regions: #{inspect(counts)}"
    end

    test "a new OS holder is learned from its announcement: one region read, not all" do
      ids = allocate_many(@many)
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :reference_counted)
      {:ok, ref} = SM.export_ref(id)
      Manager.sync()

      counts =
        count_manager_calls([:hold_counts, :header], fn ->
          {port, os_pid} = TestSupport.python_holder(ref)
          assert ShmHelpers.wait_until(fn -> watched?(os_pid) end, 5_000)
          send(self(), {:holder, port, os_pid})
        end)

      assert_received {:holder, port, os_pid}
      assert counts.hold_counts < 50, inspect(counts)
      assert counts.header < 50, inspect(counts)

      # Its death is an event too, and its slots are reaped only where it held one.
      reaps =
        count_manager_calls([:reap_holders], fn ->
          TestSupport.kill9(os_pid)
          assert_receive {^port, {:exit_status, _}}, 5_000
          assert ShmHelpers.wait_until(fn -> Registry.lookup(id) == nil end, 5_000)
        end)

      assert reaps.reap_holders < 50, "reaped in every region: #{inspect(reaps)}"
      assert length(ids) == @many
    end

    test "a worker's close frees a :reference_counted region at once (announced release)" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :reference_counted)
      {:ok, ref} = SM.export_ref(id)
      {port, _os_pid} = python_closer(ref)
      assert_receive {^port, {:data, {:eol, "CLOSED"}}}, 10_000
      assert ShmHelpers.wait_until(fn -> Registry.lookup(id) == nil end, 5_000)
      Port.close(port)
    end
  end

  describe "Holders.rung/2" do
    test "keeps its maps bounded by the live regions (pruned once they doubled)" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      gone = for i <- 1..10, into: %{}, do: {"spshm_freed_long_ago_#{i}", 1}
      holder = {999_999_999, 1}

      state = %{
        Holders.new()
        | generations: gone,
          held: %{holder => MapSet.new(Map.keys(gone))},
          prune_at: 8
      }

      state = Holders.rung(state, id)
      assert Map.keys(state.generations) -- [{:board, id}] == [id]
      assert state.held == %{}
      assert state.prune_at >= 8
    end
  end

  describe "the event socket" do
    test "is owner-only, in a private directory, and named in the VM's environment" do
      %{path: path} = events()
      assert System.get_env(Events.env_var()) == path
      {:ok, %File.Stat{mode: mode, type: :other}} = File.lstat(path)
      assert Bitwise.band(mode, 0o077) == 0
      {:ok, %File.Stat{mode: dir_mode, type: :directory}} = File.lstat(Path.dirname(path))
      assert Bitwise.band(dir_mode, 0o077) == 0
      me = Native.self_info()
      assert Path.basename(path) == "ev-#{me.os_pid}-#{me.start_time}.sock"
    end

    test "parse/1 accepts only A/R plus a region id" do
      assert Events.parse("Aspshm_abc") == {:attach, "spshm_abc"}
      assert Events.parse("Rspshm_n_x-1") == {:release, "spshm_n_x-1"}

      for bad <- [
            "",
            "A",
            "X" <> "spshm_abc",
            "Aspshm/../x",
            "Aspshm\0",
            "A" <> String.duplicate("a", 256),
            <<?A, 255, 254>>,
            42
          ] do
        assert Events.parse(bad) == :error, inspect(bad)
      end
    end

    test "hostile datagrams: garbage and unknown ids cost no NIF call" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      %{path: path} = events()
      {:ok, sock} = :gen_udp.open(0, [:local, :binary, {:active, false}])

      counts =
        count_manager_calls([:hold_counts, :header], fn ->
          for i <- 1..2_000 do
            garbage = :crypto.strong_rand_bytes(rem(i, 300))
            _ = :gen_udp.send(sock, {:local, path}, 0, garbage)
            _ = :gen_udp.send(sock, {:local, path}, 0, "Aspshm_no_such_region_#{i}")
          end

          # Still serving, and every queued datagram handled (a ping answers after them).
          _ = :sys.get_state(manager())
        end)

      :gen_udp.close(sock)
      assert Process.alive?(manager())
      assert counts == %{hold_counts: 0, header: 0}
      assert {:ok, _} = SM.get_region_info(id)
    end

    test "a flood of one region's id is coalesced into one read" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      %{path: path} = events()
      {:ok, sock} = :gen_udp.open(0, [:local, :binary, {:active, false}])

      counts =
        count_manager_calls([:hold_counts, :header], fn ->
          # Queued while the manager is busy: handled as one.
          TestSupport.with_manager_suspended(fn ->
            for _ <- 1..2_000, do: :gen_udp.send(sock, {:local, path}, 0, "A" <> id)
            # The kernel queue then holds what the {:active, n} round did not take.
          end)

          Process.sleep(200)
          _ = :sys.get_state(manager())
        end)

      :gen_udp.close(sock)
      # {:active, 64} rounds: at most one read per round, not one per datagram.
      assert counts.hold_counts <= div(2_000, 64) + 2, inspect(counts)
    end

    test "a hold taken without an announcement (killed mid-announce) is still released" do
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :reference_counted)
      {:ok, ref} = SM.export_ref(id)
      # A worker that holds but never announces (as if killed between its hold and its
      # sendto), then dies: the kernel dropped its slot lock, so the periodic cleanup's
      # count sees zero holds and frees the region.
      {port, os_pid} = python_holder_silent(ref)
      TestSupport.kill9(os_pid)
      assert_receive {^port, {:exit_status, _}}, 5_000
      assert ShmHelpers.wait_until(fn -> Registry.lookup(id) == nil end, 5_000)
    end

    test "a removed socket file is bound again by the next cleanup, and works" do
      %{path: path, socket: socket} = events()
      File.rm!(path)

      # (tmpfs may give the new file the old inode number: the port tells them apart.)
      assert ShmHelpers.wait_until(
               fn -> match?(%{path: ^path, socket: s} when s != socket, events()) end,
               5_000
             )

      assert File.exists?(path)
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :reference_counted)
      {:ok, ref} = SM.export_ref(id)
      {port, os_pid} = TestSupport.python_holder(ref)
      assert ShmHelpers.wait_until(fn -> watched?(os_pid) end, 5_000)
      Port.close(port)
      TestSupport.kill9(os_pid)
    end

    test "stale sockets of dead VMs are removed, live ones and fresh ones are kept" do
      dir = Path.join(System.tmp_dir!(), "spshm_ev_#{System.unique_integer([:positive])}")
      File.mkdir_p!(dir)

      try do
        stale = Path.join(dir, "ev-1-1.sock")
        fresh = Path.join(dir, "ev-2-2.sock")
        live = Path.join(dir, "ev-3-3.sock")

        for path <- [stale, fresh] do
          {:ok, s} = :gen_udp.open(0, [:local, {:ifaddr, {:local, path}}])
          :gen_udp.close(s)
        end

        {:ok, live_sock} = :gen_udp.open(0, [:local, {:ifaddr, {:local, live}}])
        # Just made: too young to be judged, whatever answers.
        assert Events.sweep_stale(dir, nil) == []
        # As seen two minutes later: the unbound ones are gone, the bound one stays.
        removed = Events.sweep_stale(dir, nil, System.os_time(:second) + 120)
        assert Enum.sort(removed) == Enum.sort([stale, fresh])
        refute File.exists?(stale)
        assert File.exists?(live)
        :gen_udp.close(live_sock)
      after
        File.rm_rf!(dir)
      end
    end
  end

  defp python_closer(ref) do
    python(ref, """
    region = snakepit_shm.attach(json.loads(sys.argv[1]), mode="r")
    region.close()
    print("CLOSED", flush=True)
    time.sleep(120)
    """)
  end

  defp python_holder_silent(ref) do
    {port, os_pid} =
      python(ref, """
      from snakepit_shm import _announce
      _announce.announce = lambda *args: None
      region = snakepit_shm.attach(json.loads(sys.argv[1]), mode="r")
      print("ATTACHED", flush=True)
      time.sleep(120)
      """)

    receive do
      {^port, {:data, {:eol, "ATTACHED"}}} -> {port, os_pid}
    after
      10_000 -> flunk("python holder did not attach")
    end
  end

  defp python(ref, body) do
    {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)

    script =
      "import sys, time, json, warnings\nwarnings.simplefilter('ignore')\nimport snakepit_shm\n" <>
        body

    TestSupport.python_port(script, [json])
  end
end
