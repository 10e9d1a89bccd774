defmodule Mix.Tasks.Snakepit.Shm.List do
  @shortdoc "Lists the shared memory regions of snakepit_shm on this host"

  @help """
  Lists every snakepit_shm region on this host: id, backend, size, owner VM (OS pid and
  what the kernel says of it), holders, age, idle time, expiry and flags, then totals.

  OWNER is `N alive` when the kernel shows the process of that pid and start time (in
  this PID namespace or one nested in it), `N dead (old boot)` for a header written
  during another boot, else `N not seen (in use)` (some process holds the region's
  liveness lock) or `N not seen (unused)` (nobody does). A pid alone never says dead: a
  VM in another PID namespace (a container sharing /dev/shm) has a pid that means
  nothing here. JSON: `owner.liveness` (alive, other_boot, in_use, unused) and
  `owner.alive` (true, false, or null when not seen).

      mix snakepit.shm.list [--orphaned] [--owner OS_PID] [--older-than DURATION]
                            [--format table|json] [--node NAME [--cookie COOKIE]]
                            [--cluster --node NAME [--cookie COOKIE]]

  Without `--node` it works offline, with no running manager: it reads the header of
  every POSIX segment in /dev/shm/spshm_* (or in the directory of config :snakepit_shm,
  shm_path) and of every memfd region found in the open fds of processes of your uid
  (/proc/*/fd). Run it as the user that runs the VM.

  ## Options

    * `--orphaned` - only regions nobody uses: no process holds their liveness lock
      (what `mix snakepit.shm.cleanup` removes).
    * `--owner OS_PID` - only regions created by the VM with that OS pid.
    * `--older-than DURATION` - only regions created longer ago than DURATION
      (`250ms`, `30s`, `5m`, `2h`, `1d`).
    * `--format table|json` - output format. Defaults to `table`. In scripts, set
      `MIX_QUIET=1` to keep mix's own messages out of the JSON.
    * `--node NAME`, `--cookie COOKIE` - ask a running node (distributed Erlang) for the
      regions its manager knows instead of reading the segments.

    * `--cluster` (with `--node`) - the regions of every node connected to NAME (NAME
      included), as their managers know them, with a NODE column (a `node` field in
      JSON). A connected node that does not answer or does not run `:snakepit_shm` is
      reported on stderr and makes the exit status 1.

  With a filter, segments whose header cannot be read are not shown (they have no
  owner or age); without one they are listed with the flag CORRUPT, NOT-OURS or
  UNREADABLE.

  Before the totals come the message channels (`Snakepit.SharedMemory.Channel`) mapped by
  processes of your uid: one line per channel with the OS pids mapping it (owner VM and
  worker); `--format json` lists them under `channels`.

  Flags: `orphaned` (nobody holds its liveness lock), `expired` (idle longer than its
  timeout), `sealed`, `encrypted`, `dead-holder` (a hold in its header whose process no
  longer has it: nobody holds the liveness lock, or a header of another boot).

  ## Exit status

  0 when the regions could be listed, 1 when a listed segment is corrupt, not ours or
  unreadable (or the node cannot be reached), 2 on bad usage.
  """
  @moduledoc @help

  use Mix.Task

  alias Snakepit.SharedMemory.CLI.{Command, HostScan, Human, RegionView, Remote}

  @switches [orphaned: :boolean, owner: :integer, older_than: :string, cluster: :boolean]

  @impl true
  def run(argv) do
    %{opts: opts, format: format} = Command.parse!("snakepit.shm.list", @help, argv, @switches)
    filters = filters!(opts)
    Command.load_code()
    {source, entries, failed} = fetch(opts)
    shown = apply_filters(entries, filters)
    totals = RegionView.totals(shown)
    for {node, message} <- failed, do: Mix.shell().error("#{node}: #{message}")

    case format do
      :json ->
        Command.print_json(%{
          source: source,
          filters: Map.new(filters),
          regions: shown,
          totals: totals,
          channels: Snakepit.SharedMemory.CLI.ChannelScan.scan()
        })

      :table ->
        table =
          if opts[:cluster], do: RegionView.cluster_table(shown), else: RegionView.table(shown)

        Mix.shell().info(table)
        Mix.shell().info("\n" <> RegionView.totals_line(totals) <> " (#{source})")
        # message channels (Snakepit.SharedMemory.Channel) mapped on this host
        Mix.shell().info(
          Snakepit.SharedMemory.CLI.ChannelScan.lines(
            Snakepit.SharedMemory.CLI.ChannelScan.scan()
          )
        )
    end

    Command.finish(if failed != [] or Enum.any?(shown, &(&1.status != :ok)), do: 1, else: 0)
  end

  defp filters!(opts) do
    Enum.flat_map(opts, fn
      {:orphaned, true} ->
        [orphaned: true]

      {:owner, pid} when pid > 0 ->
        [owner: pid]

      {:owner, pid} ->
        Command.usage_error!(
          "snakepit.shm.list",
          "--owner must be a positive OS pid, got: #{pid}"
        )

      {:older_than, text} ->
        case Human.parse_duration(text) do
          {:ok, ms} -> [older_than_ms: ms]
          :error -> Command.usage_error!("snakepit.shm.list", duration_error(text))
        end

      _ ->
        []
    end)
  end

  defp duration_error(text),
    do: "--older-than needs a duration like 250ms, 30s, 5m, 2h or 1d, got: #{inspect(text)}"

  defp fetch(opts) do
    case {opts[:node], opts[:cluster]} do
      {nil, true} ->
        Command.usage_error!(
          "snakepit.shm.list",
          "--cluster needs --node NAME: a node of the cluster to ask (with --cookie if needed)"
        )

      {nil, _} ->
        {"offline scan of this host", HostScan.scan(), []}

      {node, true} ->
        {entries, failed} = Remote.cluster_entries!(opts)
        nodes = entries |> Enum.map(& &1.node) |> Enum.uniq() |> length()
        {"cluster of #{node}: #{nodes} node(s) with regions", entries, failed}

      {node, _} ->
        {"node #{node}", Remote.entries!(opts), []}
    end
  end

  defp apply_filters(entries, []), do: entries

  defp apply_filters(entries, filters) do
    Enum.filter(entries, fn entry ->
      entry.status == :ok and Enum.all?(filters, &match_filter?(&1, entry))
    end)
  end

  defp match_filter?({:orphaned, true}, e), do: e.orphaned
  defp match_filter?({:owner, pid}, e), do: e.owner != nil and e.owner.os_pid == pid
  defp match_filter?({:older_than_ms, ms}, e), do: e.age_ms > ms
end
