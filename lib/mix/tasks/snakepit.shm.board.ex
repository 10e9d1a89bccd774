defmodule Mix.Tasks.Snakepit.Shm.Board do
  @shortdoc "Shows a status board: one row per worker (state, queue, memory, age)"

  @help """
  Shows a status board (`Snakepit.SharedMemory.StatusBoard`): one row per live slot
  with the worker id, state, queue length, requests in flight, memory, requests
  processed, errors, time since its last update, and its OS pid. Entries older than the
  board's `stale_after` are marked `stale`; a slot that could not be read consistently
  (a writer stuck mid-update, or damaged memory) is shown as `unreadable`.

      mix snakepit.shm.board NAME [--watch [--interval MS] [--count N]]
                                  [--format table|json] [--node NAME [--cookie COOKIE]]

  NAME is the board's name (or its region id `spshm_n_NAME`). Without `--node` the task
  reads the board's segment `/dev/shm/spshm_n_NAME` itself, read-only: no running
  manager is needed and nothing is changed.

  ## Options

    * `--watch` - redraw the table in place every `--interval` ms until interrupted
      (Ctrl-C), or `--count` times.
    * `--interval MS` - refresh period of `--watch`. Defaults to 1000.
    * `--count N` - number of refreshes of `--watch`. Defaults to unlimited.
    * `--format table|json` - output format. Defaults to `table`. With `--watch`, JSON
      prints one document per line per refresh.
    * `--node NAME`, `--cookie COOKIE` - read the board through a running node.

  ## Exit status

  0 when the board was read, 1 when it does not exist or is not a valid board, 2 on
  bad usage.
  """
  @moduledoc @help

  use Mix.Task

  alias Snakepit.SharedMemory.CLI.{Command, Human, Remote, Table}
  alias Snakepit.SharedMemory.StatusBoard

  @task "snakepit.shm.board"

  @impl true
  def run(argv) do
    %{opts: opts, args: args, format: format} =
      Command.parse!(@task, @help, argv, [watch: :boolean, interval: :integer, count: :integer],
        max_args: 1
      )

    name =
      case args do
        [name] -> valid_name!(name)
        [] -> Command.usage_error!(@task, "give the board's name")
      end

    interval = Keyword.get(opts, :interval, 1_000)
    count = Keyword.get(opts, :count)

    cond do
      # Process.sleep/1 sleeps at most 2^32 - 1 ms (about 49 days).
      interval not in 1..0xFFFF_FFFF ->
        Command.usage_error!(@task, "--interval must be from 1 to 4294967295 ms")

      count != nil and count < 1 ->
        Command.usage_error!(@task, "--count must be positive")

      true ->
        :ok
    end

    Command.load_code()

    if opts[:watch] do
      watch(name, opts, format, interval, count || :infinity)
    else
      show(fetch!(name, opts), format, false)
    end
  end

  # A malformed name is a usage error (status 2), not a missing board (status 1).
  defp valid_name!(name) do
    if Regex.match?(~r/\A(spshm_n_[a-z0-9_-]{1,21}|(?!spshm_n_)[a-z0-9_-]{1,21})\z/, name),
      do: name,
      else:
        Command.usage_error!(
          @task,
          "#{inspect(name)} is not a board name: 1 to 21 characters of [a-z0-9_-] " <>
            "(or its region id spshm_n_NAME; see `mix snakepit.shm.list`)"
        )
  end

  defp watch(_name, _opts, _format, _interval, 0), do: :ok

  defp watch(name, opts, format, interval, left) do
    show(fetch!(name, opts), format, true)
    if left == 1, do: :ok, else: Process.sleep(interval)
    watch(name, opts, format, interval, if(left == :infinity, do: left, else: left - 1))
  end

  defp fetch!(name, opts) do
    result =
      case opts[:node] do
        nil -> StatusBoard.snapshot(name)
        _node -> Remote.call!(opts, :snapshot, [name], StatusBoard)
      end

    case result do
      {:ok, snapshot} ->
        snapshot

      {:error, %{reason: :not_found}} ->
        where = if opts[:node], do: "on node #{opts[:node]}", else: "on this host"

        Command.fail!(
          "no status board #{inspect(name)} #{where}: it was deleted, its owner exited, or " <>
            "the name is wrong. `mix snakepit.shm.list` shows the regions that exist."
        )

      {:error, error} ->
        Command.fail!("cannot read status board #{inspect(name)}: #{error.message}")
    end
  end

  defp show(snapshot, :json, _watch), do: Command.print_json(snapshot)

  defp show(snapshot, :table, watch) do
    if watch, do: IO.write(IO.ANSI.home() <> IO.ANSI.clear())
    IO.puts(render(snapshot))
  end

  @doc false
  @spec render(map()) :: String.t()
  def render(snapshot) do
    live = Enum.count(snapshot.entries, &(&1.state != :unreadable))

    title =
      "board #{snapshot.name} (#{snapshot.region_id}): #{live}/#{snapshot.capacity} slots " <>
        "in use, stale after #{Human.duration_ms(snapshot.stale_after)}"

    rows =
      for e <- snapshot.entries do
        if e.state == :unreadable do
          [e.slot, "-", "unreadable", "-", "-", "-", "-", "-", "-", "-"]
        else
          state = if e.stale, do: "#{e.state} (stale)", else: Atom.to_string(e.state)

          [
            e.slot,
            e.worker_id,
            state,
            e.queue,
            e.in_flight,
            Human.bytes(e.memory),
            e.processed,
            e.errors,
            Human.duration_ms(e.age_ms),
            e.os_pid
          ]
        end
      end

    table =
      Table.render(
        [
          "SLOT",
          "ID",
          "STATE",
          "QUEUE",
          "IN-FLIGHT",
          "MEMORY",
          "PROCESSED",
          "ERRORS",
          "AGE",
          "PID"
        ],
        rows,
        right: [0, 3, 4, 5, 6, 7, 8, 9]
      )

    if rows == [], do: title <> "\n(no worker has joined)", else: title <> "\n" <> table
  end
end
