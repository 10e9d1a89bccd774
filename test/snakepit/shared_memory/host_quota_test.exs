defmodule Snakepit.SharedMemory.HostQuotaTest do
  # Host quotas inside this VM: several clients (sessions) of one private quota
  # directory per test, so nothing here meets another process's server.
  # Several OS processes: host_quota_processes_test.exs.
  use ExUnit.Case, async: true

  # The server logs every session it closes for a bad message: expected here.
  @moduletag :capture_log

  import Bitwise

  alias Snakepit.SharedMemory.Error
  alias Snakepit.SharedMemory.HostQuota, as: HQ
  alias Snakepit.SharedMemory.HostQuota.{Client, Protocol}

  setup do
    # The OS pid too: a run killed before its on_exit leaves its directory behind.
    dir =
      Path.join(
        System.tmp_dir!(),
        "spshm_hq_#{System.pid()}_#{System.unique_integer([:positive])}"
      )

    on_exit(fn ->
      # Servers of this directory are children of HostQuota.Supervisor: stop them.
      for {_, pid, _, [mod]} <- DynamicSupervisor.which_children(HQ.Supervisor),
          mod == Snakepit.SharedMemory.HostQuota.Server,
          is_pid(pid),
          do: if(server_dir(pid) == dir, do: Process.exit(pid, :kill))

      File.rm_rf!(dir)
    end)

    %{dir: dir}
  end

  defp server_dir(pid) do
    :sys.get_state(pid, 1_000).dir
  catch
    :exit, _ -> nil
  end

  defp client(dir, label \\ nil) do
    {:ok, pid} = Client.start_link(dir: dir, label: label)
    # Not linked to the test: a test kills clients on purpose.
    Process.unlink(pid)
    on_exit(fn -> Process.exit(pid, :kill) end)
    pid
  end

  defp used(client, name) do
    {:ok, [q]} = HQ.usage(name, client: client)
    q.used
  end

  # Returns as soon as fun holds: the deadline is for a loaded machine (the server
  # handles a death or a hang-up asynchronously).
  defp wait_until(fun, ms \\ 30_000) do
    deadline = System.monotonic_time(:millisecond) + ms

    Stream.repeatedly(fn ->
      fun.() || (Process.sleep(5) && false)
    end)
    |> Enum.find(fn ok -> ok or System.monotonic_time(:millisecond) > deadline end)
  end

  describe "define/3, reserve/3, release/1, usage/2" do
    test "reserve within the limit, refuse beyond it, release gives it back", %{dir: dir} do
      a = client(dir, "node-a")
      b = client(dir, "node-b")
      assert :ok = HQ.define("gpu0", 100, client: a)
      assert {:ok, r1} = HQ.reserve("gpu0", 60, client: a)
      assert r1.amount == 60 and r1.name == "gpu0" and r1.owner == self()

      assert {:error, %Error{reason: :quota_exceeded, message: msg}} =
               HQ.reserve("gpu0", 50, client: b)

      # What is used, by whom, what is left.
      assert msg =~ "cannot reserve 50"
      assert msg =~ "60 of 100 used"
      assert msg =~ "60 by node node-a (os pid #{System.pid()})"
      assert msg =~ "40 left"

      assert {:ok, r2} = HQ.reserve("gpu0", 40, client: b)
      assert {:ok, [usage]} = HQ.usage("gpu0", client: b)
      assert usage.used == 100 and usage.limit == 100

      assert Enum.sort(Enum.map(usage.holders, &{&1.label, &1.amount, &1.count})) ==
               [{"node-a", 60, 1}, {"node-b", 40, 1}]

      assert Enum.all?(usage.holders, &(&1.os_pid == String.to_integer(System.pid())))
      assert Enum.all?(usage.holders, &(&1.kind == :beam))

      assert :ok = HQ.release(r1)
      assert {:error, %Error{reason: :not_found}} = HQ.release(r1)
      assert used(a, "gpu0") == 40
      # r2 is b's and the check asks through a (another session): sync: true, or a
      # could still see the pipelined release in flight.
      assert :ok = HQ.release(r2, sync: true)
      assert used(a, "gpu0") == 0
    end

    test "release/2 is pipelined by default: final at once, ordered before the " <>
           "session's next request from any process of the VM",
         %{dir: dir} do
      a = client(dir, "fast")
      b = client(dir, "other")
      :ok = HQ.define("ff", 10, client: a)
      test = self()

      for i <- 1..200 do
        {:ok, r} = HQ.reserve("ff", 10, client: a)
        opts = Enum.at([[], [sync: false]], rem(i, 2))
        assert :ok = HQ.release(r, opts)
        # Final here: not held, cannot be released twice.
        assert {:error, %Error{reason: :not_found}} = HQ.release(r, opts)
        refute Enum.any?(HQ.held(client: a), &(&1.id == r.id))
        # The same session's next request comes after it, from this process or
        # another one of this VM: the whole quota is free.
        if rem(i, 3) == 0 do
          spawn(fn -> send(test, {:other, HQ.reserve("ff", 10, client: a, owner: test)}) end)
          assert_receive {:other, {:ok, r2}}, 5_000
          assert :ok = HQ.release(r2)
        else
          assert {:ok, r2} = HQ.reserve("ff", 10, client: a)
          assert :ok = HQ.release(r2)
        end
      end

      # Another client sees it once the frame has reached the server.
      {:ok, r} = HQ.reserve("ff", 10, client: a)
      :ok = HQ.release(r)
      assert wait_until(fn -> used(b, "ff") == 0 end)

      # sync: true: seen by every client when it returns.
      for _ <- 1..50 do
        {:ok, r} = HQ.reserve("ff", 10, client: a)
        :ok = HQ.release(r, sync: true)
        assert used(b, "ff") == 0
      end

      assert {:error, %Error{reason: :invalid_option}} = HQ.release(r, sync: :maybe)
      assert {:error, %Error{reason: :invalid_option}} = HQ.release(r, :nope)
    end

    test "usage of every quota and of an unknown one", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("b", 2, client: a)
      :ok = HQ.define("a", 1, client: a)
      assert {:ok, [%{name: "a"}, %{name: "b"}]} = HQ.usage(nil, client: a)
      assert {:ok, []} = HQ.usage("nope", client: a)
    end

    test "an unknown quota, a request larger than the limit, bad arguments", %{dir: dir} do
      a = client(dir)

      assert {:error, %Error{reason: :unknown_quota, message: m}} =
               HQ.reserve("nope", 1, client: a)

      assert m =~ "define it first"
      :ok = HQ.define("q", 10, client: a)

      assert {:error, %Error{reason: :quota_exceeded, message: m}} =
               HQ.reserve("q", 11, client: a, wait: 10_000)

      assert m =~ "more than its whole limit 10"

      for {args, what} <- [
            {["bad name!", 1], "name"},
            {["q", 0], "amount"},
            {["q", -1], "amount"},
            {["q", 1 <<< 64], "amount"},
            {["q", 1.5], "amount"}
          ] do
        assert {:error, %Error{reason: :invalid_option, message: m}} =
                 apply(HQ, :reserve, args ++ [[client: a]])

        assert m =~ what
      end

      assert {:error, %Error{reason: :invalid_option}} = HQ.reserve("q", 1, client: a, wait: -1)
      assert {:error, %Error{reason: :invalid_option}} = HQ.reserve("q", 1, client: a, owner: 1)
      assert {:error, %Error{reason: :invalid_option}} = HQ.define("q", -1, client: a)
      assert {:error, %Error{reason: :invalid_option}} = HQ.define(String.duplicate("x", 65), 1)

      # A misspelt option is named, not ignored (a `wiat: 5_000` would fail at once).
      {:ok, r} = HQ.reserve("q", 1, client: a)

      for {call, name} <- [
            {fn -> HQ.reserve("q", 1, client: a, wiat: 5_000) end, ":wiat"},
            {fn -> HQ.define("q", 10, client: a, limit: 3) end, ":limit"},
            {fn -> HQ.usage("q", client: a, verbose: true) end, ":verbose"},
            {fn -> HQ.release(r, synch: true) end, ":synch"},
            {fn -> HQ.reserve("q", 1, [{:client, a}, :wait]) end, "keyword list"}
          ] do
        assert {:error, %Error{reason: :invalid_option, message: m}} = call.()
        assert m =~ name
      end

      assert :ok = HQ.release(r, sync: false)
      assert used(a, "q") == 0
    end

    test "bad arguments give error tuples, never a raise or an exit", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 10, client: a)

      for bad <- [nil, :res, %{id: 1}, {:ok, 1}] do
        assert {:error, %Error{reason: :invalid_option}} = HQ.release(bad)
      end

      # A Reservation struct built by hand, without a client: the error said the
      # options ([]) were no keyword list.
      forged = %Snakepit.SharedMemory.HostQuota.Reservation{id: 1, name: "q", amount: 1}
      assert {:error, %Error{reason: :invalid_option, message: m}} = HQ.release(forged)
      assert m =~ "release/1 takes a reservation returned by reserve/3"

      assert {:error, %Error{reason: :invalid_option}} = HQ.reserve("q", 1, :bad)
      # (A map of options is accepted, as everywhere in the API: attack4_a_test.exs.)
      assert {:error, %Error{reason: :invalid_option}} = HQ.define("q", 1, "client")
      assert {:error, %Error{reason: :invalid_option}} = HQ.usage("q", :bad)

      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, :process, ^dead, _}, 30_000
      assert {:error, %Error{reason: :unavailable}} = HQ.info(client: dead)
      assert HQ.held(client: dead) == []
      assert {:error, %Error{reason: :unavailable}} = HQ.usage("q", client: dead)
    end

    test "a lower limit revokes nothing; new reservations wait for releases", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 10, client: a)
      {:ok, r} = HQ.reserve("q", 8, client: a)
      :ok = HQ.define("q", 5, client: a)
      assert used(a, "q") == 8
      assert {:error, %Error{reason: :quota_exceeded}} = HQ.reserve("q", 1, client: a)
      :ok = HQ.release(r)
      assert {:ok, _} = HQ.reserve("q", 5, client: a)
    end
  end

  describe "labels" do
    test "control characters in a label are made printable", %{dir: dir} do
      a = client(dir, "evil\nlabel\e[31m")
      :ok = HQ.define("q", 10, client: a)
      {:ok, _} = HQ.reserve("q", 1, client: a)
      {:ok, [q]} = HQ.usage("q", client: a)
      assert [%{label: "evil?label?[31m"}] = q.holders
    end
  end

  describe "Client.start_link/1 options" do
    test "bad options are :invalid_option errors, no client starts", %{dir: dir} do
      # A :define the server refuses closed the session at every connection: the client
      # reconnected forever (thousands of warnings a second) and never answered.
      for opts <- [
            [dir: dir, define: [{"bad name", 1}]],
            [dir: dir, define: [{"q", 1 <<< 64}]],
            [dir: dir, define: [{"q", -1}]],
            [dir: dir, define: [:q]],
            [dir: dir, define: :q],
            [dir: dir, define: [{"q", 1} | :x]],
            [dir: 5],
            [dir: dir, bogus: 1],
            :x,
            [{:dir, dir} | :x]
          ] do
        assert {:error, %Error{reason: :invalid_option}} = Client.start_link(opts),
               inspect(opts)
      end

      refute File.exists?(dir)
      a = client(dir)
      assert {:ok, []} = HQ.usage(nil, client: a)
    end
  end

  describe "death releases" do
    test "the death of the owner process releases its reservations", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 10, client: a)
      test = self()

      owner =
        spawn(fn ->
          {:ok, _} = HQ.reserve("q", 4, client: a)
          {:ok, _} = HQ.reserve("q", 3, client: a)
          send(test, :reserved)
          Process.sleep(:infinity)
        end)

      assert_receive :reserved, 5_000
      {:ok, kept} = HQ.reserve("q", 2, client: a, owner: nil)
      assert used(a, "q") == 9
      Process.exit(owner, :kill)
      assert wait_until(fn -> used(a, "q") == 2 end)
      assert [^kept] = HQ.held(client: a)
    end

    test "the end of a client's session releases all it held", %{dir: dir} do
      a = client(dir)
      b = client(dir)
      :ok = HQ.define("q", 10, client: a)
      {:ok, _} = HQ.reserve("q", 6, client: b, owner: nil)
      assert used(a, "q") == 6
      Process.exit(b, :kill)
      assert wait_until(fn -> used(a, "q") == 0 end)
    end
  end

  describe "a server that does not answer" do
    test "the call fails with :unavailable and a late grant is given back", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 10, client: a)
      {:ok, %{server: server}} = HQ.info(client: a)
      :sys.suspend(server)

      try do
        assert {:error, %Error{reason: :unavailable}} = HQ.reserve("q", 4, client: a)
      after
        :sys.resume(server)
      end

      assert wait_until(fn -> used(a, "q") == 0 end)
      assert HQ.held(client: a) == []
    end
  end

  describe "wait:" do
    test "the longest wait accepted waits in line (no :timeout_value raise)", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 10, client: a)
      {:ok, full} = HQ.reserve("q", 10, client: a)
      # wait + the call's margin passed 2^32 - 1 ms, the largest receive timeout: the
      # caller raised ErlangError :timeout_value.
      task = Task.async(fn -> HQ.reserve("q", 5, client: a, owner: nil, wait: 0xFFFF_FFFE) end)

      assert wait_until(fn ->
               {:ok, [q]} = HQ.usage("q", client: a)
               length(q.waiters) == 1
             end)

      :ok = HQ.release(full)
      assert {:ok, res} = Task.await(task, 5_000)
      :ok = HQ.release(res, sync: true)
      assert used(a, "q") == 0
    end

    test "waiters are granted in arrival order; a big head is not overtaken", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 10, client: a)
      {:ok, full} = HQ.reserve("q", 10, client: a)
      test = self()

      waiters =
        for {{tag, amount}, n} <- Enum.with_index([a5: 5, b8: 8, c2: 2], 1) do
          pid =
            spawn(fn ->
              {:ok, res} = HQ.reserve("q", amount, client: a, wait: 30_000)
              send(test, {:granted, tag, res})
              Process.sleep(:infinity)
            end)

          # Arrival order is the order the server saw them: one at a time.
          assert wait_until(fn ->
                   {:ok, [q]} = HQ.usage("q", client: a)
                   length(q.waiters) == n
                 end)

          {tag, pid}
        end

      {:ok, [q]} = HQ.usage("q", client: a)
      assert Enum.map(q.waiters, & &1.amount) == [5, 8, 2]

      :ok = HQ.release(full)
      assert_receive {:granted, :a5, _}, 5_000
      # 8 does not fit beside 5; 2 would, but it must not overtake 8.
      refute_receive {:granted, _, _}, 200
      Process.exit(waiters[:a5], :kill)
      assert_receive {:granted, :b8, _}, 5_000
      assert_receive {:granted, :c2, _}, 5_000
      assert used(a, "q") == 10
      for {_, pid} <- waiters, do: Process.exit(pid, :kill)
      assert wait_until(fn -> used(a, "q") == 0 end)
    end

    test "a limit lowered below a waiter refuses it at once instead of blocking the line",
         %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 100, client: a)
      {:ok, held} = HQ.reserve("q", 60, client: a)
      test = self()

      spawn(fn -> send(test, {:big, HQ.reserve("q", 50, client: a, wait: :infinity)}) end)
      assert wait_until(fn -> match?({:ok, [%{waiters: [_]}]}, HQ.usage("q", client: a)) end)

      spawn(fn ->
        send(test, {:small, HQ.reserve("q", 10, client: a, wait: :infinity, owner: test)})
      end)

      assert wait_until(fn -> match?({:ok, [%{waiters: [_, _]}]}, HQ.usage("q", client: a)) end)

      # 50 can never fit in 40: it fails now, and 10 is no longer stuck behind it.
      :ok = HQ.define("q", 40, client: a)
      assert_receive {:big, {:error, %Error{reason: :quota_exceeded, message: m}}}, 5_000
      assert m =~ "more than its whole limit 40"
      :ok = HQ.release(held)
      assert_receive {:small, {:ok, _}}, 5_000
      assert used(a, "q") == 10
    end

    test "a session ended by a failed send while the line is reworked is not resurrected",
         %{dir: dir} do
      alias Snakepit.SharedMemory.HostQuota.Server
      # The end of the grace period refuses S's wait-0 request in "a"; that send fails
      # (S's socket is gone), which ends S: its 5 in "b" is released and T's waiter in
      # "b" is granted. T's waiter must not come back into the line of "b" (granted
      # twice, counted twice).
      File.mkdir_p!(dir)
      {:ok, l} = :gen_tcp.listen(0, [:binary, active: false, ifaddr: {:local, "#{dir}/t"}])
      {:ok, t_peer} = :gen_tcp.connect({:local, "#{dir}/t"}, 0, [:binary, active: false])
      {:ok, t} = :gen_tcp.accept(l)
      {:ok, s_port} = :gen_tcp.connect({:local, "#{dir}/t"}, 0, [:binary, active: false])
      :gen_tcp.close(s_port)
      who = %{hello: true, client_id: 1, os_pid: 1, kind: :other, label: "x"}
      waiter = %{req: 7, since: 0, timer: nil}

      state = %{
        recovering: true,
        sessions: %{
          s_port => Map.put(who, :held, %{1 => {"b", 5}}),
          t => Map.put(who, :held, %{2 => {"a", 10}})
        },
        quotas: %{
          "a" => %{
            limit: 10,
            used: 10,
            queue:
              :queue.from_list([
                Map.merge(waiter, %{socket: s_port, res_id: 3, amount: 5, wait: 0})
              ])
          },
          "b" => %{
            limit: 10,
            used: 5,
            queue:
              :queue.from_list([
                Map.merge(waiter, %{socket: t, res_id: 4, amount: 10, wait: :infinity})
              ])
          }
        }
      }

      {:noreply, state} = Server.handle_info(:recovered, state)
      assert state.quotas["b"].used == 10
      assert :queue.to_list(state.quotas["b"].queue) == []
      assert state.sessions[t].held[4] == {"b", 10}
      refute Map.has_key?(state.sessions, s_port)
      :gen_tcp.close(t_peer)
    end

    test "a wait that runs out fails with quota_exceeded; the line moves on", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 10, client: a)
      {:ok, _full} = HQ.reserve("q", 10, client: a)
      t0 = System.monotonic_time(:millisecond)

      assert {:error, %Error{reason: :quota_exceeded, message: m}} =
               HQ.reserve("q", 3, client: a, wait: 100)

      assert System.monotonic_time(:millisecond) - t0 >= 100
      assert m =~ "gave up after waiting 100 ms"
      {:ok, [q]} = HQ.usage("q", client: a)
      assert q.waiters == []
    end

    test "a waiter whose owner dies leaves the line", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 10, client: a)
      {:ok, full} = HQ.reserve("q", 10, client: a)
      waiter = spawn(fn -> HQ.reserve("q", 8, client: a, wait: :infinity) end)

      assert wait_until(fn ->
               {:ok, [q]} = HQ.usage("q", client: a)
               length(q.waiters) == 1
             end)

      Process.exit(waiter, :kill)

      assert wait_until(fn ->
               {:ok, [q]} = HQ.usage("q", client: a)
               q.waiters == []
             end)

      :ok = HQ.release(full)
      assert used(a, "q") == 0
    end
  end

  describe "takeover" do
    test "when the server dies, another client serves and totals stay", %{dir: dir} do
      a = client(dir, "a")
      b = client(dir, "b")
      c = client(dir, "c")
      :ok = HQ.define("q", 10, client: a)
      {:ok, _} = HQ.reserve("q", 3, client: a, owner: nil)
      {:ok, _} = HQ.reserve("q", 4, client: b, owner: nil)
      {:ok, rc} = HQ.reserve("q", 2, client: c, owner: nil)
      {:ok, %{server: server}} = HQ.info(client: a)
      assert is_pid(server)
      Process.exit(server, :kill)

      assert wait_until(
               fn ->
                 match?({:ok, [%{used: 9}]}, HQ.usage("q", client: b)) and
                   match?({:ok, [%{used: 9}]}, HQ.usage("q", client: c))
               end,
               2_000
             )

      {:ok, [q]} = HQ.usage("q", client: c)
      assert q.limit == 10

      assert Enum.sort(Enum.map(q.holders, &{&1.label, &1.amount})) == [
               {"a", 3},
               {"b", 4},
               {"c", 2}
             ]

      assert {:error, %Error{reason: :quota_exceeded}} = HQ.reserve("q", 2, client: b)
      # Seen by another client (b) once it returns: sync: true.
      assert :ok = HQ.release(rc, sync: true)
      assert used(b, "q") == 7
    end
  end

  describe "recovery after a takeover" do
    test "no grant until the live clients had time to re-declare", %{dir: dir} do
      # A stale socket of a dead server: whoever serves next takes over.
      File.mkdir_p!(dir)
      File.chmod!(dir, 0o700)
      stale = Path.join(dir, "quota.sock")
      {:ok, l} = :gen_tcp.listen(0, [:binary, ifaddr: {:local, stale}])
      :gen_tcp.close(l)
      assert File.exists?(stale)

      a = client(dir, "a")
      :ok = HQ.define("q", 10, client: a)
      test = self()
      t0 = System.monotonic_time(:millisecond)

      spawn(fn ->
        send(test, {:a, HQ.reserve("q", 6, client: a), System.monotonic_time(:millisecond)})
      end)

      # A client of the dead server re-declares what it holds, during the grace period.
      {:ok, s} = :gen_tcp.connect({:local, stale}, 0, [:binary, packet: 4, active: false])
      :ok = :gen_tcp.send(s, Protocol.encode_request({:hello, 9, 9, :other, "old"}))
      :ok = :gen_tcp.send(s, Protocol.encode_request({:declare, 1, 1, "q", 5, 10}))
      {:ok, _welcome} = :gen_tcp.recv(s, 0, 30_000)
      {:ok, _ok} = :gen_tcp.recv(s, 0, 30_000)

      assert_receive {:a, {:error, %Error{reason: :quota_exceeded}}, at}, 5_000
      assert at - t0 >= 200
      assert used(a, "q") == 5
      :gen_tcp.close(s)
      assert wait_until(fn -> used(a, "q") == 0 end)
      assert {:ok, _} = HQ.reserve("q", 6, client: a)
    end

    test "a wait: 0 reserve whose caller dies before the answer is given back", %{dir: dir} do
      # No monitor on the caller of a wait: 0 request (answered within a round trip):
      # held back by the grace period here, its grant arrives after the caller died,
      # and the client releases it instead of keeping it for nobody.
      File.mkdir_p!(dir)
      File.chmod!(dir, 0o700)
      stale = Path.join(dir, "quota.sock")
      {:ok, l} = :gen_tcp.listen(0, [:binary, ifaddr: {:local, stale}])
      :gen_tcp.close(l)

      a = client(dir, "a")
      :ok = HQ.define("q", 10, client: a)
      test = self()

      callers =
        for owner <- [:caller, nil] do
          spawn(fn ->
            opts = if owner, do: [client: a], else: [client: a, owner: nil]
            send(test, {:never, HQ.reserve("q", 3, opts)})
          end)
        end

      # Both wait in the line of the recovering server (no grant for 250 ms).
      assert wait_until(fn -> match?({:ok, [%{waiters: [_, _]}]}, HQ.usage("q", client: a)) end)
      Enum.each(callers, &Process.exit(&1, :kill))
      refute_receive {:never, _}, 400
      # Granted at the end of the grace period, then given back by the client.
      assert wait_until(fn -> used(a, "q") == 0 and HQ.held(client: a) == [] end)
      {:ok, [q]} = HQ.usage("q", client: a)
      assert q.holders == [] and q.waiters == []
    end

    test "a live server of the path is never replaced", %{dir: dir} do
      File.mkdir_p!(dir)
      File.chmod!(dir, 0o700)
      # Someone serves quota.sock without our election name (another network namespace).
      {:ok, other} = :gen_tcp.listen(0, [:binary, ifaddr: {:local, Path.join(dir, "quota.sock")}])

      on_exit(fn -> :gen_tcp.close(other) end)
      assert Snakepit.SharedMemory.HostQuota.Server.start(dir) == :ignore
      assert File.exists?(Path.join(dir, "quota.sock"))
    end
  end

  describe "malformed messages" do
    defp raw(dir) do
      {:ok, s} =
        :gen_tcp.connect({:local, Path.join(dir, "quota.sock")}, 0, [:binary, active: false])

      s
    end

    defp hello(s) do
      frame(s, Protocol.encode_request({:hello, 1, 1, :other, "fuzz"}))
      {:ok, <<_len::32, _::binary>>} = :gen_tcp.recv(s, 0, 30_000)
    end

    defp frame(s, payload) do
      payload = IO.iodata_to_binary(payload)
      :ok = :gen_tcp.send(s, <<byte_size(payload)::32, payload::binary>>)
    end

    defp closed?(s), do: match?({:error, :closed}, drain(s))

    defp drain(s) do
      case :gen_tcp.recv(s, 0, 30_000) do
        {:ok, _} -> drain(s)
        other -> other
      end
    end

    test "something that accepts and hangs up at once is not reconnected to in a hot loop",
         %{dir: dir} do
      File.mkdir_p!(dir)
      File.chmod!(dir, 0o700)
      path = Path.join(dir, "quota.sock")
      {:ok, l} = :gen_tcp.listen(0, [:binary, active: false, ifaddr: {:local, path}])
      count = :counters.new(1, [])

      acceptor =
        spawn(fn ->
          Stream.repeatedly(fn ->
            {:ok, s} = :gen_tcp.accept(l)
            :counters.add(count, 1, 1)
            :gen_tcp.close(s)
          end)
          |> Stream.run()
        end)

      a = client(dir)
      Process.sleep(1_000)
      # Before: thousands of connections a second. Backing off to 50 ms: about 20.
      assert :counters.get(count, 1) < 200
      assert {:error, %Error{reason: :unavailable}} = HQ.usage(nil, client: a)
      Process.exit(acceptor, :kill)
    end

    test "bad frames close that session (releasing what it held), never the server",
         %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 10, client: a)

      cases = [
        # unknown version
        <<9, 1, 0::64, 0::32, 1, 0::16>>,
        # unknown type
        <<1, 0x7F, 1, 2, 3>>,
        # truncated fields
        <<1, 0x03, 0::32, 7::64>>,
        # trailing bytes
        IO.iodata_to_binary([Protocol.encode_request({:release, 1, 1}), <<0>>]),
        # invalid name
        <<1, 0x06, 0::32, 3, "a b">>,
        # empty
        <<>>
      ]

      for payload <- cases do
        s = raw(dir)
        hello(s)
        frame(s, Protocol.encode_request({:reserve, 1, 42, "q", 5, 0}))
        {:ok, _granted} = :gen_tcp.recv(s, 0, 30_000)
        assert used(a, "q") == 5
        frame(s, payload)
        assert closed?(s), "session not closed after #{inspect(payload)}"
        assert wait_until(fn -> used(a, "q") == 0 end)
      end

      # A request before HELLO, a second HELLO.
      s = raw(dir)
      frame(s, Protocol.encode_request({:usage, 1, nil}))
      assert closed?(s)
      s = raw(dir)
      hello(s)
      frame(s, Protocol.encode_request({:hello, 1, 1, :other, "again"}))
      assert closed?(s)

      # A connection that never says HELLO is closed after the deadline, and one that
      # said it in time is not.
      key = {Snakepit.SharedMemory.HostQuota.Server, :hello_timeout_ms}
      :persistent_term.put(key, 200)

      try do
        silent = raw(dir)
        greeted = raw(dir)
        hello(greeted)
        Process.sleep(400)
        assert closed?(silent)
        frame(greeted, Protocol.encode_request({:usage, 2, nil}))
        assert {:ok, _usage} = :gen_tcp.recv(greeted, 0, 30_000)
        :gen_tcp.close(greeted)
      after
        :persistent_term.erase(key)
      end

      # A length prefix past the maximum frame; a frame cut short by the client.
      s = raw(dir)
      hello(s)
      :ok = :gen_tcp.send(s, <<100_000_000::32, 1, 2, 3>>)
      assert closed?(s)
      s = raw(dir)
      hello(s)
      :ok = :gen_tcp.send(s, <<50::32, 1, 3, 0, 0>>)
      :gen_tcp.close(s)

      assert {:ok, r} = HQ.reserve("q", 10, client: a)
      :ok = HQ.release(r)
    end

    test "random bytes: the server survives and keeps counting right", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 1_000, client: a)
      {:ok, _} = HQ.reserve("q", 7, client: a)
      :rand.seed(:exsss, {17, 17, 17})

      for i <- 1..300 do
        s = raw(dir)
        if rem(i, 2) == 0, do: hello(s)
        valid = Protocol.encode_request({:reserve, i, i, "q", 1, 0}) |> IO.iodata_to_binary()
        # Mutations of a valid request, or noise.
        payload =
          case rem(i, 3) do
            0 -> :crypto.strong_rand_bytes(:rand.uniform(64))
            1 -> mutate(valid)
            2 -> binary_part(valid, 0, :rand.uniform(byte_size(valid)))
          end

        frame(s, payload)
        _ = :gen_tcp.recv(s, 0, 20)
        :gen_tcp.close(s)
      end

      assert wait_until(fn -> used(a, "q") == 7 end)
      {:ok, [q]} = HQ.usage("q", client: a)
      assert [%{amount: 7}] = q.holders
      {:ok, %{server: server}} = HQ.info(client: a)
      assert Process.alive?(server)
    end

    test "a reservation id reused while it waits is refused, never counted twice",
         %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("qa", 10, client: a)
      :ok = HQ.define("qb", 10, client: a)
      {:ok, fill} = HQ.reserve("qb", 10, client: a)

      s = raw(dir)
      hello(s)
      # id 5 waits in line on qb ...
      frame(s, Protocol.encode_request({:reserve, 1, 5, "qb", 4, 60_000}))
      # ... and is asked for again on qa, and re-declared while it waits.
      frame(s, Protocol.encode_request({:reserve, 2, 5, "qa", 3, 0}))
      assert {:ok, reply} = :gen_tcp.recv(s, 0, 30_000)
      assert {:ok, {:error, 2, :conflict, _}} = Protocol.decode_reply(strip(reply))
      frame(s, Protocol.encode_request({:declare, 3, 5, "qa", 3, 10}))
      assert {:ok, reply} = :gen_tcp.recv(s, 0, 30_000)
      assert {:ok, {:error, 3, :conflict, _}} = Protocol.decode_reply(strip(reply))

      :ok = HQ.release(fill, sync: true)
      assert {:ok, reply} = :gen_tcp.recv(s, 0, 30_000)
      assert {:ok, {:granted, 1, 10}} = Protocol.decode_reply(strip(reply))
      assert used(a, "qa") == 0 and used(a, "qb") == 4

      # Its session ends: everything it held is released, on both quotas.
      :gen_tcp.close(s)
      assert wait_until(fn -> used(a, "qa") == 0 and used(a, "qb") == 0 end)
    end

    defp strip(<<_len::32, payload::binary>>), do: payload

    defp mutate(bin) do
      i = :rand.uniform(byte_size(bin)) - 1
      <<pre::binary-size(i), b, post::binary>> = bin
      <<pre::binary, bxor(b, :rand.uniform(255)), post::binary>>
    end
  end

  describe "directory and socket" do
    test "the directory is 0700 and the socket 0600, both ours", %{dir: dir} do
      a = client(dir)
      :ok = HQ.define("q", 1, client: a)
      {:ok, d} = File.lstat(dir)
      {:ok, s} = File.lstat(Path.join(dir, "quota.sock"))
      assert d.type == :directory and (d.mode &&& 0o777) == 0o700
      assert s.type == :other and (s.mode &&& 0o777) == 0o600
      {:ok, t} = File.lstat(Path.join(dir, "election"))
      assert (t.mode &&& 0o777) == 0o600
    end

    test "a FIFO planted as the election token is refused, not read (which blocks forever)",
         %{dir: dir} do
      File.mkdir_p!(dir)
      File.chmod!(dir, 0o700)
      {_, 0} = System.cmd("mkfifo", [Path.join(dir, "election")])

      assert {:error, %Error{reason: :permission_denied, message: m}} =
               Snakepit.SharedMemory.HostQuota.RuntimeDir.election_name(dir)

      assert m =~ "the election token is not a regular file (other): remove it"
      # The client standing for election stays responsive (it serves nobody).
      a = client(dir)
      assert {:ok, %{connected: false}} = HQ.info(client: a)
    end

    test "a directory with group/other bits, of another owner, or a symlink is refused",
         %{dir: dir} do
      # A refused directory stops the client in init: its start_link exits the caller.
      Process.flag(:trap_exit, true)
      File.mkdir_p!(dir)
      File.chmod!(dir, 0o755)

      assert {:error, %Error{reason: :permission_denied, message: m}} =
               Client.start_link(dir: dir)

      assert m =~ "group/other permissions (mode 0755)"

      File.chmod!(dir, 0o700)

      if Snakepit.SharedMemory.HostQuota.RuntimeDir.uid() == 0 do
        File.chown!(dir, 65_534)
        assert {:error, %Error{message: m}} = Client.start_link(dir: dir)
        assert m =~ "owned by uid 65534"
        File.chown!(dir, 0)
      end

      link = dir <> "_link"
      File.ln_s!(dir, link)
      on_exit(fn -> File.rm(link) end)
      assert {:error, %Error{message: m}} = Client.start_link(dir: link)
      assert m =~ "not a directory"
    end
  end
end
