defmodule Mix.Tasks.Snakepit.Shm.Quota do
  @shortdoc "Lists the host-wide quotas, their holders and waiters"

  @help """
  Lists the host-wide quotas of snakepit_shm (`Snakepit.SharedMemory.HostQuota`): for
  each quota its limit, what is used and left, every holder (OS pid, node name or
  program, amount, number of reservations) and every waiter in line order.

      mix snakepit.shm.quota [QUOTA] [--dir DIR] [--format table|json]
                             [--node NAME [--cookie COOKIE]]

  Without `--node` it asks the host's quota server directly over its Unix socket (in
  the private directory `$XDG_RUNTIME_DIR/snakepit_shm`, `/run/user/<uid>/snakepit_shm`
  or `/tmp/snakepit_shm-<uid>`; `SNAKEPIT_SHM_QUOTA_DIR` or `--dir` overrides). It
  only looks: it never becomes the server. Run it as the user that runs the VMs.

  ## Options

    * `QUOTA` - show only this quota.
    * `--dir DIR` - the quota directory. Defaults to the one the VMs use (above).
    * `--format table|json` - output format. Defaults to `table`. In scripts, set
      `MIX_QUIET=1` to keep mix's own messages out of the JSON.
    * `--node NAME`, `--cookie COOKIE` - ask a running node (distributed Erlang) to
      query the server of its quota directory instead (for a VM whose directory or
      user environment differs from this shell's).

  ## Exit status

  0 when the quotas could be listed, 1 when no server answers (no VM configured for
  host quotas runs, or the node cannot be reached) or the directory is refused, 2 on
  bad usage.
  """
  @moduledoc @help

  use Mix.Task

  alias Snakepit.SharedMemory.CLI.{Command, Remote, Table}
  alias Snakepit.SharedMemory.HostQuota

  @task "snakepit.shm.quota"

  @impl true
  def run(argv) do
    %{opts: opts, args: args, format: format} =
      Command.parse!(@task, @help, argv, [dir: :string], max_args: 1)

    name = List.first(args)

    if name != nil and not HostQuota.Protocol.valid_name?(name),
      do:
        Command.usage_error!(
          @task,
          "#{inspect(name)} is not a quota name ([A-Za-z0-9_.:-]{1,64})"
        )

    if opts[:node] && opts[:dir],
      do: Command.usage_error!(@task, "--dir and --node exclude each other")

    Command.load_code()
    result = if opts[:node], do: remote(opts, name), else: local(opts, name)

    case format do
      :json -> Command.print_json(result)
      :table -> Mix.shell().info(render(result))
    end

    Command.finish(0)
  end

  defp local(opts, name) do
    case HostQuota.Probe.usage(opts[:dir], name) do
      {:ok, result} -> Map.put(result, :source, "server at #{result.dir}")
      {:error, error} -> Command.fail!("mix #{@task}: #{error.message}")
    end
  end

  defp remote(opts, name) do
    node = Remote.connect!(opts)

    # The node probes its own quota directory: like the local probe, it only looks (a
    # node that never used host quotas does not become a client or a server).
    try do
      :erpc.call(node, HostQuota.Probe, :usage, [nil, name], 15_000)
    catch
      kind, reason ->
        Command.fail!("probing the host quotas on #{node} failed: #{inspect({kind, reason})}")
    else
      {:ok, result} ->
        Map.put(result, :source, "node #{node}, server at #{result.dir}")

      {:error, error} ->
        Command.fail!("on #{node}: #{error.message}")
    end
  end

  defp render(%{quotas: []} = result), do: "no host quotas defined (#{result.source})"

  defp render(result) do
    quotas =
      Table.render(
        ["quota", "limit", "used", "left", "holders", "waiters"],
        for q <- result.quotas do
          [
            q.name,
            q.limit,
            q.used,
            max(q.limit - q.used, 0),
            length(q.holders),
            length(q.waiters)
          ]
        end,
        right: [1, 2, 3, 4, 5]
      )

    details =
      for q <- result.quotas, q.holders != [] or q.waiters != [] do
        rows =
          Enum.map(q.holders, &["holder", who(&1), &1.amount, "#{&1.count} reservation(s)"]) ++
            Enum.map(q.waiters, &["waiter", who(&1), &1.amount, "waiting #{&1.waited_ms} ms"])

        "\n#{q.name}:\n" <>
          Table.render(["", "client", "amount", ""], rows, right: [2], indent: 2)
      end

    server =
      case result do
        %{server: label, server_os_pid: pid} -> "\nserved by #{label} (os pid #{pid}), "
        _ -> "\n"
      end

    Enum.join([quotas | details], "\n") <> "\n" <> server <> result.source
  end

  defp who(%{kind: :beam} = c), do: "node #{c.label} (os pid #{c.os_pid})"
  defp who(%{kind: :python} = c), do: "python #{c.label} (os pid #{c.os_pid})"
  defp who(c), do: "#{c.label} (os pid #{c.os_pid})"
end
