defmodule SnakepitShm.Bench.Channel do
  @moduledoc """
  Part "channel" (issue 15): the message channel (`Snakepit.SharedMemory.Channel`, shared
  memory rings + eventfd doorbells) against what carries messages to a Python worker
  today, all in the same run with the same Python peer program
  (`bench/python/channel_bench.py`):

    * `:channel` - Elixir owner in active mode, Python worker on the rings;
    * `:channel_socket` - the same channel API forced onto its socket transport;
    * `:port` - an Erlang Port (`{packet, 4}`) to the worker's stdin/stdout;
    * `:socket` - a plain Unix socket (`gen_tcp`, `{packet, 4}`) with the same framing;
    * `:grpc` - a gRPC unary round trip between two Python processes (Debian's
      python3-grpcio, generic handler, identity serializers, Unix socket): the reference
      for what Snakepit pays today. Round trips only.

  Measures round-trip latency (p50, p99) for 64 B, 4 KiB, 64 KiB and 1 MiB, one-way
  throughput (messages/s) for 256 B and 4 KiB, and the end-to-end handoff (message +
  the worker reads every byte + 8-byte reply) of the channel (region messages above the
  inline threshold) against the Port from 4 KiB up to the profile's largest size.
  """

  alias Snakepit.SharedMemory.{Channel, JSON}
  alias SnakepitShm.Bench.{Programs, Stats}

  @rtt_sizes [64, 4096, 65_536, 1_048_576]
  @oneway_sizes [256, 4096]

  def run(profile, payload) do
    quick = profile.name == :quick
    rtt_n = if quick, do: 2_000, else: 20_000
    oneway_n = if quick, do: 50_000, else: 300_000

    handoff_sizes =
      if(quick,
        do: [4096, 65_536, 1_048_576, 16_777_216, 67_108_864],
        else: [4096, 65_536, 1_048_576, 16_777_216, 268_435_456, 1_073_741_824]
      )
      |> Enum.filter(&(&1 <= byte_size(payload)))

    rtt = %{
      channel: with_channel(:shm, "echo", &rtt_channel(&1, rtt_n)),
      channel_socket: with_channel(:socket, "echo", &rtt_channel(&1, rtt_n)),
      port: with_port("echo", &rtt_port(&1, rtt_n)),
      socket: with_socket("echo", &rtt_socket(&1, rtt_n)),
      grpc: rtt_grpc(rtt_n)
    }

    oneway = %{
      channel: with_channel(:shm, "sink", &oneway_channel(&1, oneway_n)),
      channel_socket: with_channel(:socket, "sink", &oneway_channel(&1, oneway_n)),
      port: with_port("sink", &oneway_port(&1, oneway_n)),
      socket: with_socket("sink", &oneway_socket(&1, oneway_n))
    }

    handoff = %{
      channel: with_channel(:shm, "handoff", &handoff_channel(&1, payload, handoff_sizes, quick)),
      port: with_port("handoff", &handoff_port(&1, payload, handoff_sizes, quick))
    }

    %{rtt: rtt, oneway: oneway, handoff: handoff, rtt_n: rtt_n, oneway_n: oneway_n}
  end

  # ---- transports ----

  defp with_channel(transport, mode, fun) do
    {:ok, ch} = Channel.open(transport: transport, active: true, ring_size: 4 * 1024 * 1024)
    {:ok, json} = JSON.encode(Channel.export_ref(ch))
    port = python(["channel_#{mode}"], [{~c"SPSHM_CHANNEL_REF", String.to_charlist(json)}])

    try do
      fun.(ch)
    after
      Channel.close(ch)
      await_exit(port)
    end
  end

  defp with_port(mode, fun) do
    port = python(["port_#{mode}"], [], packet: true)

    try do
      fun.(port)
    after
      Port.close(port)
    end
  end

  defp with_socket(mode, fun) do
    path = Path.join(System.tmp_dir!(), "spshm_chbench_#{System.pid()}.sock")
    File.rm(path)

    {:ok, listener} =
      :gen_tcp.listen(0, [
        :binary,
        {:ifaddr, {:local, String.to_charlist(path)}},
        packet: 4,
        active: false,
        sndbuf: 4 * 1024 * 1024,
        recbuf: 4 * 1024 * 1024
      ])

    port = python(["socket_#{mode}", path], [])
    {:ok, socket} = :gen_tcp.accept(listener, 30_000)

    try do
      fun.(socket)
    after
      :gen_tcp.close(socket)
      :gen_tcp.close(listener)
      File.rm(path)
      await_exit(port)
    end
  end

  defp python(args, env, opts \\ []) do
    script = Path.join([File.cwd!(), "bench", "python", "channel_bench.py"])

    env = [
      {~c"PYTHONPATH", String.to_charlist(Programs.python_client_dir())},
      {~c"SNAKEPIT_SHM_LIB",
       String.to_charlist(Path.join(:code.priv_dir(:snakepit_shm), "libsnakepit_shm.so"))}
      | env
    ]

    packet = if opts[:packet], do: [{:packet, 4}], else: []

    Port.open(
      {:spawn_executable, "/usr/bin/python3"},
      [:binary, :exit_status, env: env, args: [script | args]] ++ packet
    )
  end

  defp await_exit(port) do
    receive do
      {^port, {:exit_status, _}} -> :ok
    after
      10_000 -> :ok
    end
  end

  # ---- round trips ----

  defp iterations(n, size), do: if(size >= 1_048_576, do: max(div(n, 10), 50), else: n)

  defp rtt_channel(ch, n) do
    for size <- @rtt_sizes, into: %{} do
      msg = :crypto.strong_rand_bytes(size)

      samples =
        timed(iterations(n, size), fn ->
          :ok = Channel.send(ch, msg)

          receive do
            {:snakepit_shm_channel, ^ch, _} -> :ok
          end
        end)

      {size, summarize(samples)}
    end
  end

  defp rtt_port(port, n) do
    for size <- @rtt_sizes, into: %{} do
      msg = :crypto.strong_rand_bytes(size)

      samples =
        timed(iterations(n, size), fn ->
          Port.command(port, msg)

          receive do
            {^port, {:data, _}} -> :ok
          end
        end)

      {size, summarize(samples)}
    end
  end

  defp rtt_socket(socket, n) do
    for size <- @rtt_sizes, into: %{} do
      msg = :crypto.strong_rand_bytes(size)

      samples =
        timed(iterations(n, size), fn ->
          :ok = :gen_tcp.send(socket, msg)
          {:ok, _} = :gen_tcp.recv(socket, 0)
        end)

      {size, summarize(samples)}
    end
  end

  defp rtt_grpc(n) do
    script = Path.join([File.cwd!(), "bench", "python", "grpc_bench.py"])
    sizes = Enum.map_join(@rtt_sizes, ",", &Integer.to_string/1)

    case System.cmd("/usr/bin/python3", [script, "client", sizes, Integer.to_string(div(n, 2))],
           stderr_to_stdout: true
         ) do
      {out, 0} ->
        {:ok, map} = JSON.decode(out |> String.split("\n", trim: true) |> List.last())
        for {size, samples} <- map, into: %{}, do: {String.to_integer(size), summarize(samples)}

      {out, _} ->
        %{error: String.slice(out, 0, 300)}
    end
  end

  defp timed(n, fun) do
    for _ <- 1..min(200, n), do: fun.()

    for _ <- 1..n do
      t0 = System.monotonic_time(:nanosecond)
      fun.()
      System.monotonic_time(:nanosecond) - t0
    end
  end

  defp summarize(samples) do
    %{
      p50: Stats.percentile(samples, 50),
      p99: Stats.percentile(samples, 99),
      n: length(samples)
    }
  end

  # ---- one way ----

  defp oneway_channel(ch, n) do
    for size <- @oneway_sizes, into: %{} do
      msg = :crypto.strong_rand_bytes(size)

      rate =
        rate(n, fn ->
          for _ <- 1..n, do: :ok = Channel.send(ch, msg)
          :ok = Channel.send(ch, "!END")

          receive do
            {:snakepit_shm_channel, ^ch, count} -> ^n = String.to_integer(count)
          end
        end)

      {size, rate}
    end
  end

  defp oneway_port(port, n) do
    for size <- @oneway_sizes, into: %{} do
      msg = :crypto.strong_rand_bytes(size)

      rate =
        rate(n, fn ->
          for _ <- 1..n, do: Port.command(port, msg)
          Port.command(port, "!END")

          receive do
            {^port, {:data, count}} -> ^n = String.to_integer(count)
          end
        end)

      {size, rate}
    end
  end

  defp oneway_socket(socket, n) do
    for size <- @oneway_sizes, into: %{} do
      msg = :crypto.strong_rand_bytes(size)

      rate =
        rate(n, fn ->
          for _ <- 1..n, do: :ok = :gen_tcp.send(socket, msg)
          :ok = :gen_tcp.send(socket, "!END")
          {:ok, count} = :gen_tcp.recv(socket, 0)
          ^n = String.to_integer(count)
        end)

      {size, rate}
    end
  end

  # Messages per second, best of 3 runs.
  defp rate(n, fun) do
    for _ <- 1..3 do
      t0 = System.monotonic_time(:nanosecond)
      fun.()
      n * 1.0e9 / (System.monotonic_time(:nanosecond) - t0)
    end
    |> Enum.max()
  end

  # ---- handoff ----

  defp handoff_channel(ch, payload, sizes, quick) do
    for size <- sizes, into: %{} do
      data = binary_part(payload, 0, size)

      samples =
        timed(handoff_n(size, quick), fn ->
          :ok = Channel.send(ch, data)

          receive do
            {:snakepit_shm_channel, ^ch, <<_::64>>} -> :ok
          end
        end)

      {size, summarize(samples)}
    end
  end

  defp handoff_port(port, payload, sizes, quick) do
    for size <- sizes, into: %{} do
      data = binary_part(payload, 0, size)

      samples =
        timed(handoff_n(size, quick), fn ->
          Port.command(port, data)

          receive do
            {^port, {:data, <<_::64>>}} -> :ok
          end
        end)

      {size, summarize(samples)}
    end
  end

  defp handoff_n(size, quick) do
    base = if quick, do: 5, else: 20

    cond do
      size <= 65_536 -> base * 100
      size <= 16_777_216 -> base * 4
      true -> base
    end
  end

  # ---- report ----

  @doc "The markdown section of RESULTS.md."
  def markdown(%{rtt: rtt, oneway: oneway, handoff: handoff} = r) do
    paths = [:channel, :channel_socket, :port, :socket, :grpc]

    rtt_rows =
      for size <- @rtt_sizes do
        cells =
          for p <- paths do
            case rtt[p] do
              %{^size => %{p50: p50, p99: p99}} -> "#{us(p50)} / #{us(p99)}"
              _ -> "—"
            end
          end

        "| #{bytes(size)} | " <>
          Enum.join(cells, " | ") <>
          " | #{ratio(rtt, size, :port)} | #{ratio(rtt, size, :socket)} |"
      end

    oneway_rows =
      for size <- @oneway_sizes do
        c = oneway.channel[size]
        p = oneway.port[size]
        s = oneway.socket[size]

        "| #{bytes(size)} | #{round(c)} | #{round(oneway.channel_socket[size])} | #{round(p)} | #{round(s)} | #{Float.round(c / p, 1)}× | #{Float.round(c / s, 1)}× |"
      end

    handoff_rows =
      for {size, c} <- Enum.sort(handoff.channel) do
        p = handoff.port[size]
        "| #{bytes(size)} | #{us(c.p50)} | #{us(p.p50)} | #{Float.round(p.p50 / c.p50, 1)}× |"
      end

    """
    ## Part: channel (issue 15)

    Round trips: #{r.rtt_n} per size (a tenth for 1 MiB); one way: #{r.oneway_n} messages, best of 3.
    Channel rings 4 MiB (inline threshold 1 MiB). Latency in µs, p50 / p99.

    | size | channel (shm) | channel (socket) | Port {packet,4} | Unix socket | gRPC (Python↔Python) | Port / channel p50 | socket / channel p50 |
    |---|---|---|---|---|---|---|---|
    #{Enum.join(rtt_rows, "\n")}

    One-way messages per second:

    | size | channel (shm) | channel (socket) | Port | Unix socket | channel / Port | channel / socket |
    |---|---|---|---|---|---|---|
    #{Enum.join(oneway_rows, "\n")}

    Handoff (message + the worker reads every byte + 8-byte reply), p50 µs:

    | size | channel (+ region) | Port | Port / channel |
    |---|---|---|---|
    #{Enum.join(handoff_rows, "\n")}
    """
  end

  defp ratio(rtt, size, other) do
    with %{^size => %{p50: c}} <- rtt.channel, %{^size => %{p50: o}} <- rtt[other] do
      "#{Float.round(o / c, 1)}×"
    else
      _ -> "—"
    end
  end

  defp us(ns), do: :erlang.float_to_binary(ns / 1000, decimals: 1)

  defp bytes(n) when n >= 1_048_576, do: "#{div(n, 1_048_576)} MiB"
  defp bytes(n) when n >= 1024, do: "#{div(n, 1024)} KiB"
  defp bytes(n), do: "#{n} B"
end
