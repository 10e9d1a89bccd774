defmodule SnakepitShm.Bench.HostQuota do
  @moduledoc """
  Part `host_quota` (issue 17): the host quota server against the seed's approach, in
  the same run.

    * reserve + release round trip: from Elixir (this VM's client; this VM serves, over
      the Unix socket like every client), from Python (`bench/python/quota_client.py`),
      each with the defaults (a pipelined release: one round trip per pair; the Python
      caller spins for its answer while a CPU is to spare) and with `sync: true`
      releases (answered: two round trips per pair, the default before), Python also
      with `spin=0`, in alternating order within each round; and the seed's
      robust-mutex table in shared memory (C++ `robust_quota rt`, one process, no IPC
      at all: its floor);
    * release latency after a client's SIGKILL: a Python client holding 60 of 100 kills
      itself while an Elixir reservation of 60 waits in line; the time from its clock
      reading before the signal to the grant. The seed's table (`robust_quota kill`):
      the dying child holding the mutex (EOWNERDEAD path), dying outside it (the seed
      never reclaims: timeouts), and a variant that scans dead PIDs on every failure.
  """

  alias Snakepit.SharedMemory.HostQuota, as: HQ
  alias Snakepit.SharedMemory.HostQuota.Client
  alias Snakepit.SharedMemory.JSON
  alias SnakepitShm.Bench.Programs

  @python "/usr/bin/python3"

  def run(profile, programs) do
    dir = Path.join(System.tmp_dir!(), "spshm_bench_hq_#{System.unique_integer([:positive])}")
    {:ok, client} = Client.start_link(dir: dir, label: "bench")
    Process.unlink(client)
    :ok = HQ.define("bench", 100, client: client)
    reps = profile.host_quota_reps
    pairs = profile.host_quota_pairs

    try do
      rounds =
        for _ <- 1..reps do
          %{
            elixir: elixir_rt(client, pairs),
            elixir_sync: elixir_rt(client, pairs, sync: true),
            python: python_rt(dir, pairs),
            python_sync: python_rt(dir, pairs, "rt-sync"),
            python_nospin: python_rt(dir, pairs, "rt-nospin"),
            seed: seed_rt(programs, pairs * 20)
          }
        end

      %{
        pairs: pairs,
        elixir_rt_ns: Enum.map(rounds, & &1.elixir),
        elixir_sync_rt_ns: Enum.map(rounds, & &1.elixir_sync),
        python_rt_ns: Enum.map(rounds, &elem(&1.python, 0)),
        python_spin: Enum.map(rounds, &elem(&1.python, 1)),
        python_sync_rt_ns: Enum.map(rounds, &elem(&1.python_sync, 0)),
        python_nospin_rt_ns: Enum.map(rounds, &elem(&1.python_nospin, 0)),
        seed_rt_ns: Enum.map(rounds, & &1.seed),
        kill_ours_ns: for(_ <- 1..profile.host_quota_kills, do: ours_kill(dir, client)),
        kill_seed:
          Map.new(~w(holding idle scan), fn mode ->
            kills = if mode == "idle", do: 2, else: profile.host_quota_kills
            {String.to_atom(mode), seed_kill(programs, mode, kills)}
          end)
      }
    after
      {:ok, %{server: server}} = HQ.info(client: client)
      Process.exit(client, :kill)
      if server, do: Process.exit(server, :kill)
      File.rm_rf(dir)
    end
  end

  defp elixir_rt(client, pairs, release_opts \\ []) do
    for _ <- 1..500, do: pair(client, release_opts)
    {us, _} = :timer.tc(fn -> for _ <- 1..pairs, do: pair(client, release_opts) end)
    us * 1000 / pairs
  end

  defp pair(client, release_opts) do
    {:ok, res} = HQ.reserve("bench", 1, client: client)
    :ok = HQ.release(res, release_opts)
  end

  defp python_rt(dir, pairs, mode \\ "rt") do
    script = Path.join([Programs.bench_dir(), "python", "quota_client.py"])
    {out, 0} = System.cmd(@python, [script, mode, dir, "bench", "#{pairs}"])
    {:ok, %{"ns_per_pair" => ns} = r} = JSON.decode(String.trim(out))
    {ns, {r["spin_hits"], r["spin_misses"]}}
  end

  defp seed_rt(programs, pairs) do
    out = Programs.run(programs.robust_quota, ["rt", "#{pairs}"])
    {:ok, %{"ns_per_pair" => ns}} = JSON.decode(String.trim(out))
    ns
  end

  defp ours_kill(dir, client) do
    script = Path.join([Programs.bench_dir(), "python", "quota_client.py"])

    port =
      Port.open({:spawn_executable, @python}, [
        :binary,
        {:line, 256},
        :exit_status,
        args: [script, "hold", dir, "bench", "60"]
      ])

    receive do
      {^port, {:data, {:eol, "READY"}}} -> :ok
    after
      30_000 -> raise "the Python holder did not get ready"
    end

    me = self()

    waiter =
      spawn_link(fn ->
        {:ok, res} = HQ.reserve("bench", 60, client: client, wait: 10_000)
        send(me, {:granted, System.os_time(:nanosecond)})
        HQ.release(res)
      end)

    wait_queued(client)
    Port.command(port, "die\n")

    kill_ns =
      receive do
        {^port, {:data, {:eol, "KILL " <> ns}}} -> String.to_integer(ns)
      after
        30_000 -> raise "the Python holder did not die"
      end

    receive do
      {:granted, at} ->
        receive do
          {^port, {:exit_status, _}} -> :ok
        after
          5_000 -> :ok
        end

        _ = waiter
        at - kill_ns
    after
      15_000 -> raise "the waiting reservation was never granted"
    end
  end

  defp wait_queued(client) do
    case HQ.usage("bench", client: client) do
      {:ok, [%{waiters: [_]}]} -> :ok
      _ -> Process.sleep(1) && wait_queued(client)
    end
  end

  defp seed_kill(programs, mode, reps) do
    out = Programs.run(programs.robust_quota, ["kill", mode, "#{reps}"])
    {:ok, %{"ns" => ns, "timeouts" => t}} = JSON.decode(String.trim(out))
    %{ns: ns, timeouts: t, reps: reps}
  end
end
