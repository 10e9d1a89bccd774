defmodule Snakepit.SharedMemory.HostQuotaProcessesTest do
  # Host quotas across OS processes: extra BEAM VMs (test/support/host_quota_peer.exs)
  # and Python clients (test/support/host_quota_peer.py) started here, each test in its
  # own private quota directory. Deaths are real: kill -9.
  use ExUnit.Case, async: false

  @moduletag :capture_log
  @moduletag timeout: 180_000

  alias Snakepit.SharedMemory.HostQuota, as: HQ
  alias Snakepit.SharedMemory.HostQuota.Client

  @peer_exs Path.expand("../../support/host_quota_peer.exs", __DIR__)
  @peer_py Path.expand("../../support/host_quota_peer.py", __DIR__)
  @python_path Path.expand("../../../priv/python", __DIR__)

  setup do
    dir =
      Path.join(
        System.tmp_dir!(),
        "spshm_hqp_#{System.pid()}_#{System.unique_integer([:positive])}"
      )

    on_exit(fn ->
      for {_, pid, _, _} <- DynamicSupervisor.which_children(HQ.Supervisor),
          is_pid(pid),
          server_dir(pid) == dir,
          do: Process.exit(pid, :kill)

      File.rm_rf!(dir)
    end)

    %{dir: dir}
  end

  defp server_dir(pid) do
    case :sys.get_state(pid, 1_000) do
      %{dir: dir} -> dir
      _ -> nil
    end
  catch
    :exit, _ -> nil
  end

  # ---- peers ----

  defp start_beam(dir, config \\ nil) do
    ebin = Path.join(Mix.Project.app_path(), "ebin")
    env = [{~c"SNAKEPIT_SHM_QUOTA_DIR", ~c"#{dir}"}]
    env = if config, do: [{~c"HQ_CONFIG", ~c"#{config}"} | env], else: env
    elixir = System.find_executable("elixir")
    start(elixir, ["-pa", ebin, @peer_exs], env)
  end

  defp start_python(dir) do
    env = [{~c"SNAKEPIT_SHM_QUOTA_DIR", ~c"#{dir}"}, {~c"PYTHONPATH", ~c"#{@python_path}"}]
    start("/usr/bin/python3", ["-u", @peer_py], env)
  end

  defp start(exe, args, env) do
    port =
      Port.open({:spawn_executable, exe}, [
        :binary,
        :exit_status,
        {:line, 65_536},
        args: args,
        env: env
      ])

    pid = await(port, ~r/^READY (\d+)/, 60_000) |> then(fn [_, pid] -> pid end)

    on_exit(fn -> System.cmd("kill", ["-9", pid], stderr_to_stdout: true) end)
    %{port: port, pid: pid}
  end

  defp await(port, regex, timeout) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        case Regex.run(regex, line) do
          nil -> await(port, regex, timeout)
          match -> match
        end

      {^port, {:exit_status, status}} ->
        flunk("peer exited with status #{status}")
    after
      timeout -> flunk("peer did not answer #{inspect(regex)} within #{timeout} ms")
    end
  end

  defp cmd(peer, line, timeout \\ 30_000) do
    send_line(peer, line)
    reply(peer, timeout)
  end

  # Port data goes to the port's owner, this test process: commands that take long are
  # sent first and their replies awaited later, here.
  defp send_line(%{port: port}, line), do: Port.command(port, line <> "\n")

  defp reply(%{port: port}, timeout) do
    [reply | _] = await(port, ~r/^(ok|error|used|done|serving).*$/, timeout)
    reply
  end

  defp kill9(%{pid: pid}), do: {_, 0} = System.cmd("kill", ["-9", pid])

  defp client(dir) do
    {:ok, pid} = Client.start_link(dir: dir, label: "test")
    Process.unlink(pid)
    on_exit(fn -> Process.exit(pid, :kill) end)
    pid
  end

  defp usage(c, name) do
    {:ok, [q]} = HQ.usage(name, client: c)
    q
  end

  # Milliseconds until fun.() is true (polling the server, which is the test's view).
  defp ms_until(fun, max, t0 \\ System.monotonic_time(:millisecond)) do
    Enum.find_value(Stream.repeatedly(fn -> nil end), fn _ ->
      ok = safe(fun)
      elapsed = System.monotonic_time(:millisecond) - t0

      cond do
        elapsed > max -> flunk("not within #{max} ms (#{elapsed} ms)")
        ok -> elapsed
        true -> Process.sleep(2) && nil
      end
    end)
  end

  defp safe(fun) do
    fun.()
  rescue
    _ -> false
  catch
    _, _ -> false
  end

  # ---- tests ----

  test "two VMs and two Python clients reserving at once never exceed the limit",
       %{dir: dir} do
    c = client(dir)
    :ok = HQ.define("q", 10, client: c)
    peers = [start_beam(dir), start_beam(dir), start_python(dir), start_python(dir)]
    test = self()

    # Watches every state the server passes through while the peers run.
    watcher =
      spawn_link(fn ->
        watch = fn watch, max ->
          q = usage(c, "q")
          assert q.used == Enum.sum(Enum.map(q.holders, & &1.amount))
          max = max(max, q.used)

          receive do
            :stop -> send(test, {:max_used, max})
          after
            0 -> watch.(watch, max)
          end
        end

        watch.(watch, 0)
      end)

    for p <- peers, do: send_line(p, "stress q 10 300")
    assert Enum.map(peers, &reply(&1, 150_000)) == ["done", "done", "done", "done"]
    send(watcher, :stop)
    assert_receive {:max_used, max}, 5_000
    assert max <= 10 and max > 0
    # The peers' last releases are pipelined: seen by this client once they arrive.
    ms_until(fn -> usage(c, "q").used == 0 end, 5_000)
    q = usage(c, "q")
    assert q.used == 0 and q.waiters == [] and q.holders == []
  end

  test "SIGKILL of a Python client or a VM client releases its share at once", %{dir: dir} do
    c = client(dir)
    :ok = HQ.define("q", 10, client: c)
    py = start_python(dir)
    vm = start_beam(dir)
    assert "ok " <> _ = cmd(py, "reserve q 4 0")
    assert "ok " <> _ = cmd(vm, "reserve q 5 0")
    q = usage(c, "q")
    assert q.used == 9

    assert Enum.sort(Enum.map(q.holders, &{&1.kind, &1.os_pid})) ==
             Enum.sort([
               {:python, String.to_integer(py.pid)},
               {:beam, String.to_integer(vm.pid)}
             ])

    assert [%{label: "quota_peer.py"}] = Enum.filter(q.holders, &(&1.kind == :python))

    # Timed from before the kill command (its own start-up cost included).
    t0 = System.monotonic_time(:millisecond)
    kill9(py)
    ms = ms_until(fn -> usage(c, "q").used == 5 end, 1_000, t0)
    IO.puts(:stderr, "\n[host quota] Python client SIGKILL -> released in #{ms} ms")
    t0 = System.monotonic_time(:millisecond)
    kill9(vm)
    ms = ms_until(fn -> usage(c, "q").used == 0 end, 1_000, t0)
    IO.puts(:stderr, "[host quota] VM client SIGKILL -> released in #{ms} ms")
  end

  test "SIGKILL of the serving VM: another VM takes over, totals intact", %{dir: dir} do
    server = start_beam(dir)
    assert cmd(server, "serving") == "serving true"
    assert cmd(server, "define q 10") == "ok"
    other = start_beam(dir)
    assert cmd(other, "serving") == "serving false"
    py = start_python(dir)
    c = client(dir)
    assert "ok " <> _ = cmd(server, "reserve q 2 0")
    assert "ok " <> _ = cmd(other, "reserve q 3 0")
    assert "ok " <> _ = cmd(py, "reserve q 4 0")
    {:ok, r} = HQ.reserve("q", 1, client: c)
    assert usage(c, "q").used == 10

    t0 = System.monotonic_time(:millisecond)
    kill9(server)

    ms =
      ms_until(
        fn ->
          q = usage(c, "q")
          q.used == 8 and length(q.holders) == 3
        end,
        1_000,
        t0
      )

    IO.puts(:stderr, "\n[host quota] serving VM SIGKILL -> new server with totals in #{ms} ms")

    q = usage(c, "q")
    assert q.limit == 10

    assert Enum.sort(Enum.map(q.holders, &{&1.kind, &1.amount})) ==
             [{:beam, 1}, {:beam, 3}, {:python, 4}]

    # Nothing counted twice: exactly 2 are left.
    assert "error quota_exceeded" = cmd(other, "reserve q 3 0")
    assert "ok " <> _ = cmd(py, "reserve q 2 0")
    assert "error quota_exceeded" = cmd(other, "reserve q 1 0")
    :ok = HQ.release(r, sync: true)
    assert "ok " <> _ = cmd(other, "reserve q 1 0")
    assert usage(c, "q").used == 10
  end

  test "waiting reservations across processes are granted in arrival order", %{dir: dir} do
    c = client(dir)
    :ok = HQ.define("q", 10, client: c)
    {:ok, full} = HQ.reserve("q", 10, client: c)
    py = start_python(dir)
    vm = start_beam(dir)

    # The Python client queues first (6), then the VM (6): only one fits at a time.
    send_line(py, "reserve q 6 20000")
    ms_until(fn -> length(usage(c, "q").waiters) == 1 end, 10_000)
    send_line(vm, "reserve q 6 20000")
    ms_until(fn -> length(usage(c, "q").waiters) == 2 end, 10_000)
    assert [%{kind: :python}, %{kind: :beam}] = usage(c, "q").waiters

    :ok = HQ.release(full)
    assert "ok " <> id = reply(py, 10_000)
    # The VM still waits: 6 + 6 > 10.
    assert [%{kind: :beam}] = usage(c, "q").waiters
    assert cmd(py, "release #{id}") == "ok"
    assert "ok " <> _ = reply(vm, 10_000)
  end

  test "SIGKILL of a Python client waiting in line: its waiter leaves, what it held is " <>
         "released, the next waiter is granted",
       %{dir: dir} do
    c = client(dir)
    :ok = HQ.define("q", 10, client: c)
    {:ok, _} = HQ.reserve("q", 6, client: c)
    py = start_python(dir)
    vm = start_beam(dir)
    assert "ok " <> _ = cmd(py, "reserve q 4 0")
    # The Python client waits for 5 (6 + 4 + 5 > 10); the VM queues 4 behind it.
    send_line(py, "reserve q 5 60000")
    ms_until(fn -> length(usage(c, "q").waiters) == 1 end, 10_000)
    send_line(vm, "reserve q 4 60000")
    ms_until(fn -> length(usage(c, "q").waiters) == 2 end, 10_000)
    assert [%{kind: :python, amount: 5}, %{kind: :beam, amount: 4}] = usage(c, "q").waiters

    kill9(py)
    # Its 4 are released and its waiter is gone: the VM's 4 fits (6 + 4) and, no longer
    # behind the dead client's 5, is granted.
    assert "ok " <> _ = reply(vm, 5_000)
    q = usage(c, "q")
    assert q.used == 10 and q.waiters == []
    assert Enum.sort(Enum.map(q.holders, &{&1.kind, &1.amount})) == [{:beam, 4}, {:beam, 6}]
  end

  test "SIGKILL of the serving VM while a Python client is idle: it re-declares what it " <>
         "holds within the grace period",
       %{dir: dir} do
    server = start_beam(dir)
    assert cmd(server, "serving") == "serving true"
    assert cmd(server, "define q 10") == "ok"
    py = start_python(dir)
    assert "ok " <> _ = cmd(py, "reserve q 6 0")
    c = client(dir)
    {:ok, _} = HQ.reserve("q", 1, client: c)
    assert usage(c, "q").used == 7

    # The Python client makes no call from here on: only its watcher sees the hang-up.
    kill9(server)
    # This VM serves now (its client won the election): the request below goes to the
    # new server, which answers it when its grace period ends. Had the idle client
    # not re-declared its 6 by then, 5 would fit (1 + 5) and the total would reach 12
    # once it did.
    ms_until(
      fn -> match?({:ok, %{serving: true, connected: true}}, HQ.info(client: c)) end,
      2_000
    )

    assert {:error, %{reason: :quota_exceeded}} = HQ.reserve("q", 5, client: c)
    q = usage(c, "q")
    assert q.used == 7
    assert Enum.sort(Enum.map(q.holders, &{&1.kind, &1.amount})) == [{:beam, 1}, {:python, 6}]
    # The idle client works on the new server, with what it held.
    assert "error quota_exceeded" = cmd(py, "reserve q 4 0")
    assert "ok " <> _ = cmd(py, "reserve q 3 0")
  end

  test "a released amount is free for the same client's next reserve (pipelined releases " <>
         "from two Python threads), while a VM hammers another quota",
       %{dir: dir} do
    c = client(dir)
    :ok = HQ.define("q", 5, client: c)
    :ok = HQ.define("r", 10, client: c)
    py = start_python(dir)
    vm = start_beam(dir)
    send_line(vm, "stress r 10 300")
    assert cmd(py, "cycle q 5 400", 120_000) == "done"
    assert reply(vm, 120_000) == "done"
    # The last release is pipelined: seen by this (other) client once it arrives.
    ms_until(fn -> usage(c, "q").used == 0 and usage(c, "r").used == 0 end, 5_000)
  end

  test "two VMs with host_quota: \"shm_total\" cannot exceed the budget together",
       %{dir: dir} do
    config = ~s([host_quota: "shm_total", host_quota_limit: 1_048_576])
    vm1 = start_beam(dir, config)
    vm2 = start_beam(dir, config)
    assert "ok " <> id1 = cmd(vm1, "allocate 600000")
    assert cmd(vm2, "allocate 600000") == "error quota_exceeded"
    assert "ok " <> _ = cmd(vm2, "allocate 400000")
    assert cmd(vm1, "allocate 100000") == "error quota_exceeded"
    assert cmd(vm1, "deallocate #{id1}") == "ok"
    assert "ok " <> _ = cmd(vm1, "allocate 500000")

    c = client(dir)
    q = usage(c, "shm_total")
    assert q.used == 900_000 and q.limit == 1_048_576

    # A VM that dies takes its regions' reservations with it.
    kill9(vm2)
    ms_until(fn -> usage(c, "shm_total").used == 500_000 end, 1_000)
    assert "ok " <> _ = cmd(vm1, "allocate 500000")
  end

  # The serving process is killed again and again while VMs and Python clients hammer
  # one quota; the limit holds throughout and everything comes back to zero. Three
  # takeovers here, twenty in a soak run (SNAKEPIT_SHM_SOAK=1).
  @rounds if System.get_env("SNAKEPIT_SHM_SOAK") in ["1", "true"], do: 20, else: 3
  @tag timeout: 600_000
  test "repeated takeovers under load", %{dir: dir} do
    first = start_beam(dir)
    assert cmd(first, "serving") == "serving true"
    assert cmd(first, "define q 10") == "ok"
    beams = [first, start_beam(dir), start_beam(dir)]
    pys = [start_python(dir), start_python(dir)]
    c = client(dir)
    test = self()

    watcher =
      spawn_link(fn ->
        watch = fn watch, max ->
          max =
            case HQ.usage("q", client: c) do
              {:ok, [q]} ->
                assert q.used <= q.limit, "over the limit: #{inspect(q)}"
                assert q.used == Enum.sum(Enum.map(q.holders, & &1.amount))
                max(max, q.used)

              _ ->
                max
            end

          receive do
            :stop -> send(test, {:max_used, max})
          after
            1 -> watch.(watch, max)
          end
        end

        watch.(watch, 0)
      end)

    n = 4_000 * @rounds
    for p <- pys, do: send_line(p, "stress q 10 #{n}")
    for p <- tl(beams), do: send_line(p, "stress q 10 #{n}")

    {alive, kills} =
      Enum.reduce(1..@rounds, {beams, 0}, fn _round, {alive, kills} ->
        Process.sleep(400)
        # Who serves (the peers are busy: ask the server itself).
        {:ok, %{server_os_pid: pid}} = Snakepit.SharedMemory.HostQuota.Probe.usage(dir, "q")
        {:ok, %{server: local}} = HQ.info(client: c)

        case Enum.find(alive, &(&1.pid == Integer.to_string(pid))) do
          nil ->
            # This VM serves: kill the server process (its sessions end as on a VM death).
            assert local, "the server (os pid #{pid}) is neither a peer nor this VM"
            Process.exit(local, :kill)
            {alive, kills + 1}

          peer ->
            kill9(peer)
            {List.delete(alive, peer), kills + 1}
        end
      end)

    assert kills == @rounds
    # Still stressing when the last takeover happened (else the test proves little).
    survivors = Enum.filter(alive, &(&1 != first))
    assert Enum.map(survivors ++ pys, &reply(&1, 300_000)) |> Enum.uniq() == ["done"]
    send(watcher, :stop)
    assert_receive {:max_used, max}, 10_000
    assert max <= 10

    Enum.find(1..500, fn _ -> usage(c, "q").used == 0 || (Process.sleep(10) && false) end) ||
      flunk(
        "still held after all clients finished: #{inspect(usage(c, "q"))}, " <>
          "peers alive: #{inspect(Enum.map(survivors ++ pys, & &1.pid))}"
      )
  end
end
