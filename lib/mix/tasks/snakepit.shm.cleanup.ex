defmodule Mix.Tasks.Snakepit.Shm.Cleanup do
  @shortdoc "Removes orphaned shared memory segments and releases dead holds"

  @help """
  Removes the segments left by VMs that died (SIGKILL, OOM killer, power loss of a
  container...) and releases the holds of dead processes.

      mix snakepit.shm.cleanup [--dry-run] [--owner OS_PID] [--older-than DURATION]
                               [--id REGION_ID ...] [--format table|json]
                               [--node NAME [--cookie COOKIE]]

  Offline (without `--node`), it reads every segment's header and:

    * never touches a region some process uses: every user (the creating VM, other VMs
      that opened it, Python workers, a creator still sizing it) holds a shared lock
      on the segment, and the kernel says whether anyone does. PIDs in the header are
      shown, never trusted (PID namespaces, reuse);
    * removes a POSIX segment nobody uses;
    * for a memfd region whose owner VM is gone, releases the holds of dead processes
      and names the processes that keep it alive (the kernel frees it when they close
      it; there is no name to remove);
    * removes a segment that never got a header and that nobody uses (its creator
      died while creating it);
    * refuses, and only reports, a segment with a damaged header, a symlink, an object
      of another user or a misnamed file: check it and delete it by hand;
    * without `--dry-run`, `--owner`, `--older-than` or `--id`: removes the socket
      directories (`spshm-ch-*` in `$XDG_RUNTIME_DIR`, `$TMPDIR` and `/tmp`) that
      channels of dead VMs left, those no live channel holds the lock of and 10 s old
      or more, as every VM's orphan sweep does (docs/CHANNEL.md). Directories under a
      custom `:socket_dir` are never swept.

  With `--node`, it asks that node's manager to run its cleanup now
  (`Snakepit.SharedMemory.cleanup_regions/1`): regions whose idle timeout passed or
  whose owner process died, orphans of dead VMs in /dev/shm, and, when given, every
  region older than `--older-than` or named by `--id`, live or not (that is how a
  leak in a running VM is cut short).

  ## Options

    * `--dry-run` - print what would be done, change nothing.
    * `--owner OS_PID` - only regions created by the (dead) VM with that OS pid (offline).
    * `--older-than DURATION` - offline: only regions created longer ago (`30s`, `5m`,
      `2h`, `1d`); with `--node`: also free the node's regions older than that.
    * `--id REGION_ID` - offline: only this region (repeatable); with `--node`: also
      free this region of the node.
    * `--format table|json` - output format. Defaults to `table`.
    * `--node NAME`, `--cookie COOKIE` - run the cleanup of a running node.

  `--owner` and `--older-than` leave out segments whose header cannot be read.

  ## Exit status

  0 when everything to do was done (or nothing was to do), 1 when a segment was refused
  or an action failed, 2 on bad usage.
  """
  @moduledoc @help

  use Mix.Task

  alias Snakepit.SharedMemory.CLI.{
    Command,
    HostCleanup,
    HostScan,
    Human,
    RegionView,
    Remote,
    Table
  }

  alias Snakepit.SharedMemory.Sweep

  @task "snakepit.shm.cleanup"
  @switches [dry_run: :boolean, owner: :integer, older_than: :string, id: :keep]

  @impl true
  def run(argv) do
    %{opts: opts, format: format} = Command.parse!(@task, @help, argv, @switches)
    Command.load_code()

    if opts[:node],
      do: remote(opts, format),
      else: offline(opts, format)
  end

  # ---- offline ----

  defp offline(opts, format) do
    filters = filters!(opts)
    dry_run = Keyword.get(opts, :dry_run, false)
    planned = HostScan.scan() |> Enum.filter(&selected?(&1, filters)) |> HostCleanup.plan()
    actions = if dry_run, do: planned, else: HostCleanup.apply_plan(planned)
    # Channel socket directories are no segment: only a cleanup of everything sweeps them.
    dirs = if dry_run or filtered?(filters), do: 0, else: Sweep.remove_stale_channel_dirs()

    case format do
      :json ->
        Command.print_json(%{
          dry_run: dry_run,
          actions: Enum.map(actions, &Map.delete(&1, :entry)),
          channel_dirs_removed: dirs
        })

      :table ->
        Mix.shell().info(render(actions, dry_run) <> channel_dirs(dirs))
    end

    Command.finish(if Enum.any?(actions, &HostCleanup.problem?/1), do: 1, else: 0)
  end

  defp filters!(opts) do
    older =
      case opts[:older_than] && Human.parse_duration(opts[:older_than]) do
        nil ->
          nil

        {:ok, ms} ->
          ms

        :error ->
          Command.usage_error!(
            @task,
            "--older-than needs a duration like 30s, 5m, 2h or 1d, got: #{inspect(opts[:older_than])}"
          )
      end

    %{owner: opts[:owner], older_than: older, ids: Keyword.get_values(opts, :id)}
  end

  defp filtered?(%{owner: owner, older_than: older, ids: ids}),
    do: owner != nil or older != nil or ids != []

  defp channel_dirs(0), do: ""

  defp channel_dirs(1),
    do: "\nRemoved 1 stale channel socket directory (left by a channel of a VM that died)."

  defp channel_dirs(n),
    do: "\nRemoved #{n} stale channel socket directories (left by channels of VMs that died)."

  defp selected?(entry, %{owner: owner, older_than: older, ids: ids}) do
    (ids == [] or entry.id in ids) and
      (owner == nil or (entry.status == :ok and entry.owner.os_pid == owner)) and
      (older == nil or (entry.status == :ok and entry.age_ms > older))
  end

  defp render([], _dry_run),
    do: "Nothing to clean up: no orphaned or damaged segment of ours on this host."

  defp render(actions, dry_run) do
    rows =
      Enum.map(actions, fn a ->
        [a.id, verb(a, dry_run), Human.bytes(a.size), a.detail]
      end)

    freed =
      actions
      |> Enum.filter(
        &(&1.action in [:remove, :remove_incomplete] and &1.result in [:done, :planned])
      )

    refused = Enum.count(actions, &HostCleanup.problem?/1)

    summary =
      "#{if dry_run, do: "Would remove", else: "Removed"} " <>
        "#{RegionView.plural(length(freed), "segment")} (#{Human.bytes(Enum.sum(Enum.map(freed, &(&1.size || 0))))})" <>
        if(refused > 0, do: "; #{refused} refused or failed: see above", else: "") <>
        if(dry_run, do: ". Nothing was changed (--dry-run).", else: ".")

    problems = for %{problem: problem} = a <- actions, problem != nil, do: "  #{a.id}: #{problem}"

    details =
      if problems == [],
        do: "",
        else:
          "\n\nWhy:\n" <>
            Enum.join(problems, "\n") <> general_advice(problems)

    Table.render(["ID", "ACTION", "SIZE", "WHY"], rows, right: [2]) <>
      details <> "\n\n" <> summary
  end

  @doc false
  # Said once: the core's own messages often carry this advice already.
  def general_advice(problems) do
    if Enum.all?(problems, &String.contains?(&1, "by hand")),
      do: "",
      else:
        "\nCheck such files yourself (ls -l, od -c | head) and delete them by hand if they are garbage."
  end

  defp verb(%{action: :refuse}, _), do: "REFUSED"
  defp verb(%{result: :failed}, _), do: "FAILED"
  defp verb(%{result: :skipped}, _), do: "kept"
  defp verb(%{action: kind}, true), do: "would " <> verb_text(kind)
  defp verb(%{action: kind}, false), do: past(kind)

  defp verb_text(:remove), do: "remove"
  defp verb_text(:remove_incomplete), do: "remove"
  defp verb_text(:release_holds), do: "release holds"
  defp verb_text(:keep), do: "keep"

  defp past(:remove), do: "removed"
  defp past(:remove_incomplete), do: "removed"
  defp past(:release_holds), do: "released holds"
  defp past(:keep), do: "kept"

  # ---- remote ----

  defp remote(opts, format) do
    if opts[:owner] do
      Command.usage_error!(
        @task,
        "--owner OS_PID is an offline filter: drop --node, or drop --owner"
      )
    end

    selectors =
      %{dry_run: Keyword.get(opts, :dry_run, false)}
      |> put_if(:older_than, filters!(opts).older_than)
      |> put_if(:ids, nonempty(Keyword.get_values(opts, :id)))

    result = Remote.cleanup!(opts, selectors)

    case format do
      :json -> Command.print_json(result)
      :table -> Mix.shell().info(Remote.render_cleanup(result))
    end

    Command.finish(0)
  end

  defp put_if(map, _key, nil), do: map
  defp put_if(map, key, value), do: Map.put(map, key, value)

  defp nonempty([]), do: nil
  defp nonempty(list), do: list
end
