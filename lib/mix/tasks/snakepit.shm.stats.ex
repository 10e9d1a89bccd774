defmodule Mix.Tasks.Snakepit.Shm.Stats do
  @shortdoc "Shows the shared memory manager's counters of a running node"

  @help """
  Shows the counters of the snakepit_shm manager of a running node
  (`Snakepit.SharedMemory.stats/0`): allocations, deallocations, live regions and
  bytes, limits, errors by reason, per-operation latencies (count, p50, p90, p99, max)
  and events (expiries, owner deaths, orphans swept, dead workers' holds released...),
  and the warm pool of large regions (hits, misses, bytes held).

      mix snakepit.shm.stats --node NAME [--cookie COOKIE] [--format table|json]

  The counters live in the VM that uses snakepit_shm, so `--node` is required: start
  that VM with a name (`--sname app` or `--name app@host`) and give its cookie. For a
  view of the host without a running node, use `mix snakepit.shm.list`.

  Latencies come from log2 histograms: exact to within a factor of two.

  ## Options

    * `--node NAME` - the node to ask (`app@host`). Required.
    * `--cookie COOKIE` - its cookie. Defaults to `~/.erlang.cookie`.
    * `--format table|json` - output format. Defaults to `table`.

  ## Exit status

  0 on success, 1 when the node cannot be reached or has no snakepit_shm running,
  2 on bad usage (for example without `--node`).
  """
  @moduledoc @help

  use Mix.Task

  alias Snakepit.SharedMemory.CLI.{Command, Human, Remote, Table}

  @task "snakepit.shm.stats"

  @impl true
  def run(argv) do
    %{opts: opts, format: format} = Command.parse!(@task, @help, argv, [])

    if opts[:node] == nil do
      Command.usage_error!(
        @task,
        "--node NAME is required: the counters live in the running VM " <>
          "(`mix snakepit.shm.list` reads the host without one)"
      )
    end

    Command.load_code()

    stats =
      case Remote.call!(opts, :stats, []) do
        {:ok, stats} -> stats
        other -> Command.fail!("unexpected answer from #{opts[:node]}: #{inspect(other)}")
      end

    channels = remote_channels(opts)

    case format do
      :json ->
        Command.print_json(stats |> Map.put(:node, opts[:node]) |> Map.put(:channels, channels))

      :table ->
        Mix.shell().info(render(opts[:node], stats))
        Mix.shell().info("\n" <> channel_lines(channels))
    end
  end

  # The node's open message channels (Snakepit.SharedMemory.Channel.list/0), as plain maps.
  defp remote_channels(opts) do
    node = Remote.connect!(opts)

    case :erpc.call(node, Snakepit.SharedMemory.Channel, :list, [], 15_000) do
      list when is_list(list) ->
        for {ch, s} <- list, do: Map.put(Map.drop(s, [:owner]), :id, ch.id)

      _ ->
        []
    end
  catch
    _, _ -> []
  end

  defp channel_lines([]), do: "Channels: none"

  defp channel_lines(channels) do
    rows =
      for c <- channels do
        "  #{c.id}  #{c.transport} #{c.state}  sent #{c.messages_sent} (#{Human.bytes(c.bytes_sent)})" <>
          "  received #{c.messages_received} (#{Human.bytes(c.bytes_received)})" <>
          "  doorbells #{c.doorbells_rung}  fallbacks #{c.fallbacks}  peer #{c.peer_pid}"
      end

    Enum.join(["Channels: #{length(channels)}" | rows], "\n")
  end

  defp render(node, stats) do
    summary =
      Table.pairs([
        {"Node", node},
        {"Live regions", stats.active_regions},
        {"Live bytes", "#{Human.bytes(stats.active_bytes)} (#{stats.active_bytes})"},
        {"Allocations", stats.allocations},
        {"Deallocations", stats.deallocations},
        {"Limits", limits(stats.limits)},
        {"Errors", counts(stats.errors)},
        {"Warm pool", pool_line(Map.get(stats, :pool))}
      ])

    Enum.join([summary, operations(stats.operations), "Events: " <> counts(stats.events)], "\n\n")
  end

  defp pool_line(nil), do: "-"

  defp pool_line(p) do
    "#{p.hits} hits, #{p.misses} misses, #{Human.bytes(p.bytes_held)} held in #{p.entries} " <>
      "(budget #{Human.bytes(p.budget)}), #{p.refused} refused"
  end

  defp operations(ops) do
    rows =
      for {op, h} <- Enum.sort(ops) do
        [op, h.count, us(h.p50_us), us(h.p90_us), us(h.p99_us), us(h.max_us)]
      end

    Table.render(["OPERATION", "COUNT", "P50", "P90", "P99", "MAX"], rows, right: [1, 2, 3, 4, 5])
  end

  defp us(nil), do: "-"
  defp us(value), do: Human.micros(value)

  defp limits(limits) do
    limits
    |> Enum.sort()
    |> Enum.map_join(", ", fn
      {key, :infinity} ->
        "#{key} infinity"

      {key, value} when key in [:max_region_size, :max_total_memory] ->
        "#{key} #{Human.bytes(value)}"

      {key, value} ->
        "#{key} #{value}"
    end)
  end

  defp counts(map) when map_size(map) == 0, do: "none"

  defp counts(map) do
    case for({key, n} <- Enum.sort(map), n > 0, do: "#{key} #{n}") do
      [] -> "none"
      parts -> Enum.join(parts, ", ")
    end
  end
end
