defmodule Mix.Tasks.Snakepit.Shm.Doctor do
  @shortdoc "Checks that this host can run snakepit_shm, and says what to fix"

  @help """
  Checks this host for what snakepit_shm needs, and says what to do about each problem:

    * the NIF loads;
    * the application starts with this project's configuration (an invalid setting is
      named, with the start's own message; the checks that need the application then
      say so instead of running);
    * /dev/shm: mounted, its size (warns at Docker's 64 MB default) and free space;
    * leftover segments: orphans of dead VMs, damaged or foreign spshm_* files;
    * peer VMs: whether a VM here can open its presence socket (so that the other VMs
      of this user sweep its POSIX segments the moment it dies), and how many VMs share
      the shm directory now;
    * the kernel: memfd F_SEAL_FUTURE_WRITE (Linux 5.1) and pidfd (5.3);
    * RLIMIT_MEMLOCK (security_level :maximum locks pages) and RLIMIT_NOFILE (each
      memfd region holds 2 fds), from /proc/self/limits;
    * systemd-logind's RemoveIPC (logind.conf and logind.conf.d), which deletes a
      user's segments at logout;
    * by behaviour: allocates a memfd region through the API, seals it, and checks that
      read-write mappings are then refused;
    * the Python client imports under the workers' interpreter (with
      PYTHONPATH=priv/python and SNAKEPIT_SHM_LIB=priv/libsnakepit_shm.so), finds its
      C library, numpy is present, and pidfd_open works;
    * the health checks of a running application (`health: NAME` rows, the very checks
      of `Snakepit.SharedMemory.health/0`): regions, bytes and regions per process
      against their limits, the shm tmpfs, the memory cgroup, host memory, file
      descriptors, locked memory, dead processes cleaned up, expired regions still held.
      A degraded check warns, a critical one fails.

      mix snakepit.shm.doctor [--python PATH] [--strict] [--format table|json]
      mix snakepit.shm.doctor --node NAME [--cookie COOKIE] [--strict] [--format table|json]

  With `--node` it asks the running VM NAME for its health report
  (`Snakepit.SharedMemory.health/0`) and shows only those checks.

  It starts the :snakepit_shm application in its own VM (with the start-up orphan
  sweep turned off: the doctor only reports) and frees the region it made.

  ## Options

    * `--python PATH` - the workers' interpreter: a path, or a name looked up on PATH
      (`--python python3`). Defaults to `/usr/bin/python3`.
    * `--node NAME` - ask this running node (started with `--sname`/`--name`) for
      its health checks instead. Defaults to none: check this host.
    * `--cookie COOKIE` - the node's cookie. Defaults to `~/.erlang.cookie`.
    * `--strict` - treat warnings as failures (exit 1).
    * `--format table|json` - output format. Defaults to `table`.

  ## Exit status

  0 when nothing failed (warnings allowed, unless `--strict`), 1 when a check failed,
  2 on bad usage.
  """
  @moduledoc @help

  use Mix.Task

  alias Snakepit.SharedMemory.CLI.{Command, Doctor, Remote, Table}

  @switches [python: :string, strict: :boolean]

  @impl true
  def run(argv) do
    %{opts: opts, format: format} = Command.parse!("snakepit.shm.doctor", @help, argv, @switches)

    Command.load_code()
    python = Command.executable(Keyword.get(opts, :python, "/usr/bin/python3"))

    {findings, health} =
      if opts[:node] do
        health = Remote.call!(opts, :health, [])
        {Doctor.health_findings(health), health}
      else
        without_orphan_sweep(fn ->
          Command.quietly(fn ->
            findings = Doctor.run(python, priv_dir())
            {findings, Snakepit.SharedMemory.HealthMonitor.last()}
          end)
        end)
      end

    failed = Enum.any?(findings, &(&1.status == :fail or (opts[:strict] && &1.status == :warn)))

    case format do
      :json -> Command.print_json(%{ok: not failed, findings: findings, health: health})
      :table -> Mix.shell().info(render(findings))
    end

    Command.finish(if failed, do: 1, else: 0)
  end

  # The doctor reports leftovers: a manager it starts must not sweep them away first.
  # (When the application already runs, as in a test VM, its setting is left alone.)
  defp without_orphan_sweep(fun) do
    running = List.keymember?(Application.started_applications(), :snakepit_shm, 0)
    previous = Application.fetch_env(:snakepit_shm, :orphan_sweep)
    unless running, do: Application.put_env(:snakepit_shm, :orphan_sweep, false)

    try do
      fun.()
    after
      case {running, previous} do
        {true, _} -> :ok
        {false, {:ok, value}} -> Application.put_env(:snakepit_shm, :orphan_sweep, value)
        {false, :error} -> Application.delete_env(:snakepit_shm, :orphan_sweep)
      end
    end
  end

  defp render(findings) do
    rows = Enum.map(findings, &[&1.check, status(&1.status), &1.detail])

    todo =
      for %{fix: fix} = f <- findings, f.status != :ok, fix != nil, do: "  * #{f.check}: #{fix}"

    counts =
      Enum.map_join([:ok, :warn, :fail], ", ", fn s ->
        "#{Enum.count(findings, &(&1.status == s))} #{status(s)}"
      end)

    table = Table.render(["CHECK", "STATUS", "DETAIL"], rows)

    if todo == [],
      do: table <> "\n\n#{counts}: this host is ready.",
      else: table <> "\n\nWhat to do:\n" <> Enum.join(todo, "\n") <> "\n\n#{counts}."
  end

  defp status(:ok), do: "ok"
  defp status(:warn), do: "WARN"
  defp status(:fail), do: "FAIL"

  defp priv_dir do
    case :code.priv_dir(:snakepit_shm) do
      {:error, _} -> Path.expand("priv")
      dir -> List.to_string(dir)
    end
  end
end
