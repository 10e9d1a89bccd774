defmodule Snakepit.SharedMemory.PeerVms do
  @moduledoc false
  # Other VMs running :snakepit_shm on this host with a private shm_path, and Python
  # workers holding their regions: for the tests of orphan sweeps across VMs.

  import ExUnit.Assertions
  import ExUnit.Callbacks, only: [on_exit: 1]

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.{ClusterHelpers, JSON}

  @doc """
  A peer VM running :snakepit_shm with its POSIX segments in `dir` (stopped on exit).
  `nofile: n` starts it under `ulimit -n n`.
  """
  def shm_peer(prefix, dir, sweep?, opts \\ []) do
    ClusterHelpers.ensure_distributed!()

    exec =
      case Keyword.fetch(opts, :nofile) do
        {:ok, n} ->
          %{exec: {~c"/bin/sh", [~c"-c", ~c"ulimit -n #{n} && exec erl \"$@\"", ~c"sh"]}}

        :error ->
          %{}
      end

    {:ok, peer, node} =
      :peer.start(
        Map.merge(exec, %{
          name: :peer.random_name(String.to_charlist(prefix)),
          args: [~c"-setcookie", Atom.to_charlist(Node.get_cookie())],
          wait_boot: 120_000
        })
      )

    :ok = :erpc.call(node, :code, :add_paths, [:code.get_path()])

    for {key, value} <- Application.get_all_env(:snakepit_shm),
        do: :ok = :erpc.call(node, Application, :put_env, [:snakepit_shm, key, value])

    env = [shm_path: dir, orphan_sweep: sweep?, cleanup_interval: 100]

    for {key, value} <- env,
        do: :ok = :erpc.call(node, Application, :put_env, [:snakepit_shm, key, value])

    :ok = :erpc.call(node, Application, :put_env, [:logger, :level, :warning])
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:snakepit_shm])
    on_exit(fn -> ClusterHelpers.stop_peer(peer) end)
    node
  end

  @doc """
  A Python worker (SNAKEPIT_SHM_PATH=dir) attached to `ref` (its first 16 bytes in hex are
  `expected`) until sent `:release`; then it sends `{:released, worker}` to the caller.
  """
  def holding_worker(dir, ref, expected) do
    parent = self()

    spawn_link(fn ->
      {:ok, env} = SHM.python_env()
      env = Map.put(env, "SNAKEPIT_SHM_PATH", dir)
      env = for {k, v} <- env, do: {String.to_charlist(k), String.to_charlist(v)}

      script = """
      import json, sys, snakepit_shm
      region = snakepit_shm.attach(json.loads(sys.stdin.readline()))
      print(bytes(region.read(0, 16)).hex(), flush=True)
      sys.stdin.readline()
      region.close()
      print("released", flush=True)
      """

      port =
        Port.open({:spawn_executable, "/usr/bin/python3"}, [
          :binary,
          :exit_status,
          {:line, 100_000},
          args: ["-u", "-c", script],
          env: env
        ])

      {:ok, json} = JSON.encode(ref)
      Port.command(port, json <> "\n")

      receive do
        {^port, {:data, {:eol, ^expected}}} -> send(parent, {:holding, self()})
      after
        30_000 -> raise "the worker did not attach"
      end

      receive do
        :release -> Port.command(port, "go\n")
      end

      receive do
        {^port, {:data, {:eol, "released"}}} -> :ok
      after
        30_000 -> raise "the worker did not release"
      end

      receive do
        {^port, {:exit_status, _}} -> send(parent, {:released, self()})
      after
        30_000 -> raise "the worker did not exit"
      end
    end)
    |> tap(fn worker -> assert_receive {:holding, ^worker}, 30_000 end)
  end
end
