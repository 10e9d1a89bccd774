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
  alias SnakepitShm.Bench.{Format, Programs, Stats}

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

    rounds = if quick, do: 3, else: 7

    # The four peers run at once and, per size, their rounds alternate (order rotated):
    # a change in the machine's load hits every path alike, and the ratios are taken
    # inside a round.
    {rtt, rtt_ratios} = with_peers("echo", &rtt_paired(&1, rtt_n, rounds))
    {oneway, oneway_ratios} = with_peers("sink", &oneway_paired(&1, oneway_n))

    rtt = Map.put(rtt, :grpc, rtt_grpc(rtt_n))

    # Both peers run at once and their rounds alternate, so that a change in the
    # machine's load (other work on a shared host) hits both paths alike.
    handoff =
      with_channel(:shm, "handoff", fn ch ->
        with_port("handoff", &handoff_paired(ch, &1, payload, handoff_sizes, quick))
      end)

    %{
      rtt: rtt,
      rtt_ratios: rtt_ratios,
      rtt_rounds: rounds,
      oneway: oneway,
      oneway_ratios: oneway_ratios,
      handoff: handoff,
      rtt_n: rtt_n,
      oneway_n: oneway_n
    }
  end

  # ---- transports ----

  @paths [:channel, :channel_socket, :port, :socket]

  # The four peers of one mode at once: `%{path => {send_fun, await_fun}}`.
  defp with_peers(mode, fun) do
    with_channel(:shm, mode, fn ch ->
      with_channel(:socket, mode, fn chs ->
        with_port(mode, fn port ->
          with_socket(mode, fn socket ->
            fun.(%{
              channel: channel_io(ch),
              channel_socket: channel_io(chs),
              port: port_io(port),
              socket: socket_io(socket)
            })
          end)
        end)
      end)
    end)
  end

  defp channel_io(ch) do
    {fn msg -> :ok = Channel.send(ch, msg) end,
     fn ->
       receive do
         {:snakepit_shm_channel, ^ch, reply} -> reply
       end
     end}
  end

  defp port_io(port) do
    {fn msg -> Port.command(port, msg) end,
     fn ->
       receive do
         {^port, {:data, reply}} -> reply
       end
     end}
  end

  defp socket_io(socket) do
    {fn msg -> :ok = :gen_tcp.send(socket, msg) end,
     fn ->
       {:ok, reply} = :gen_tcp.recv(socket, 0)
       reply
     end}
  end

  # Round `r`'s order of the paths: rotated by one each round.
  defp rotation(paths, r) do
    k = rem(r, length(paths))
    Enum.drop(paths, k) ++ Enum.take(paths, k)
  end

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

  # Per size: `rounds` rounds; in each, every path times its share of the round trips
  # (order rotated). Returns the pooled p50/p99 per path and size, and per size the
  # paired ratios (other path's p50 / channel's p50, round by round).
  defp rtt_paired(peers, n, rounds) do
    per_size =
      for size <- @rtt_sizes do
        msg = :crypto.strong_rand_bytes(size)
        per_round = max(div(iterations(n, size), rounds), 20)

        samples =
          for r <- 1..rounds do
            Map.new(rotation(@paths, r), fn path ->
              {send, await} = peers[path]
              {path, timed(per_round, fn -> send.(msg) && await.() end)}
            end)
          end

        {size, samples}
      end

    pooled =
      Map.new(@paths, fn path ->
        {path,
         Map.new(per_size, fn {size, rs} -> {size, summarize(Enum.flat_map(rs, & &1[path]))} end)}
      end)

    ratios =
      Map.new(per_size, fn {size, rs} ->
        p50s = fn path -> Enum.map(rs, &Stats.percentile(&1[path], 50)) end
        channel = p50s.(:channel)

        {size,
         Map.new([:channel_socket, :port, :socket], fn path ->
           {path, Stats.paired_ratio(p50s.(path), channel)}
         end)}
      end)

    {pooled, ratios}
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
    for _ <- 1..min(50, n), do: fun.()

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

  # Per size: 3 rounds, each timing `n` messages and the sink's count reply on every path
  # (order rotated). Returns the best rate per path and size (messages/s), and per size
  # the paired ratios (channel's rate / other path's rate, round by round).
  defp oneway_paired(peers, n) do
    per_size =
      for size <- @oneway_sizes do
        msg = :crypto.strong_rand_bytes(size)

        rates =
          for r <- 1..3 do
            Map.new(rotation(@paths, r), fn path ->
              {send, await} = peers[path]
              t0 = System.monotonic_time(:nanosecond)
              for _ <- 1..n, do: send.(msg)
              send.("!END")
              ^n = String.to_integer(await.())
              {path, n * 1.0e9 / (System.monotonic_time(:nanosecond) - t0)}
            end)
          end

        {size, rates}
      end

    best =
      Map.new(@paths, fn path ->
        {path, Map.new(per_size, fn {size, rs} -> {size, Enum.max(Enum.map(rs, & &1[path]))} end)}
      end)

    ratios =
      Map.new(per_size, fn {size, rs} ->
        channel = Enum.map(rs, & &1.channel)

        {size,
         Map.new([:channel_socket, :port, :socket], fn path ->
           {path, Stats.paired_ratio(channel, Enum.map(rs, & &1[path]))}
         end)}
      end)

    {best, ratios}
  end

  # ---- handoff ----

  @handoff_rounds 5

  # Per size: #{@handoff_rounds} rounds, each timing a batch of channel handoffs and a
  # batch of Port handoffs, the order swapped every round; samples pooled per path.
  defp handoff_paired(ch, port, payload, sizes, quick) do
    per_size =
      for size <- sizes do
        data = binary_part(payload, 0, size)
        n = max(div(handoff_n(size, quick), @handoff_rounds), 1)

        paths = [
          channel: fn -> handoff_channel(ch, data) end,
          port: fn -> handoff_port(port, data) end
        ]

        rounds =
          for round <- 1..@handoff_rounds do
            order = if rem(round, 2) == 0, do: Enum.reverse(paths), else: paths
            Map.new(order, fn {name, fun} -> {name, timed(n, fun)} end)
          end

        {size,
         Map.new([:channel, :port], fn p -> {p, summarize(Enum.flat_map(rounds, & &1[p]))} end)}
      end

    %{
      channel: Map.new(per_size, fn {size, m} -> {size, m.channel} end),
      port: Map.new(per_size, fn {size, m} -> {size, m.port} end)
    }
  end

  defp handoff_channel(ch, data) do
    :ok = Channel.send(ch, data)

    receive do
      {:snakepit_shm_channel, ^ch, <<_::64>>} -> :ok
    end
  end

  defp handoff_port(port, data) do
    Port.command(port, data)

    receive do
      {^port, {:data, <<_::64>>}} -> :ok
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

        ratios = Map.get(r, :rtt_ratios, %{})[size] || %{}

        "| #{bytes(size)} | " <>
          Enum.join(cells, " | ") <>
          " | #{Format.ratio(ratios[:port])} | #{Format.ratio(ratios[:socket])} |"
      end

    oneway_rows =
      for size <- @oneway_sizes do
        cells = Enum.map(@paths, &Integer.to_string(round(oneway[&1][size])))
        ratios = Map.get(r, :oneway_ratios, %{})[size] || %{}

        "| #{bytes(size)} | " <>
          Enum.join(cells, " | ") <>
          " | #{Format.ratio(ratios[:port])} | #{Format.ratio(ratios[:socket])} |"
      end

    handoff_rows =
      for {size, c} <- Enum.sort(handoff.channel) do
        p = handoff.port[size]
        "| #{bytes(size)} | #{us(c.p50)} | #{us(p.p50)} | #{Float.round(p.p50 / c.p50, 1)}× |"
      end

    """
    ## Part: channel (issue 15)

    Round trips: #{r.rtt_n} per size (a tenth for 1 MiB) and path, in #{r[:rtt_rounds]} rounds; in each
    round every path times its share, the order rotated each round, all four peers running.
    Latency in µs, p50 / p99 of the pooled samples; the ratios are those of the p50s of each
    round, median (min–max) over the rounds. gRPC (two Python processes) runs apart.
    Channel rings 4 MiB (inline threshold 1 MiB).

    | size | channel (shm) | channel (socket) | Port {packet,4} | Unix socket | gRPC (Python↔Python) | Port / channel p50 | socket / channel p50 |
    |---|---|---|---|---|---|---|---|
    #{Enum.join(rtt_rows, "\n")}

    One-way messages per second (#{r.oneway_n} messages and the sink's count reply, 3 rounds
    in rotated order; the best round per path; ratios paired by round):

    | size | channel (shm) | channel (socket) | Port | Unix socket | channel / Port | channel / socket |
    |---|---|---|---|---|---|---|
    #{Enum.join(oneway_rows, "\n")}

    Handoff (message + the worker reads every byte + 8-byte reply), p50 µs:

    | size | channel (+ region) | Port | Port / channel |
    |---|---|---|---|
    #{Enum.join(handoff_rows, "\n")}
    """
  end

  @doc """
  Issue 15's goals for the part: a 64 B round trip at least 3× faster than the Port's
  (p50), 256 B one way at least 3× the Port's rate and 2× the Unix socket's.
  """
  def targets(%{channel: %{rtt_ratios: rtt, oneway_ratios: oneway}}) do
    [
      target("64 B round trip p50 vs Erlang Port", ">= 3×", rtt[64].port, 3),
      target("256 B one way, messages/s vs Erlang Port", ">= 3×", oneway[256].port, 3),
      target("256 B one way, messages/s vs Unix socket", ">= 2×", oneway[256].socket, 2)
    ]
  end

  def targets(_), do: []

  defp target(what, target, ratio, min) do
    met = ratio.median >= min

    %{
      part: "channel",
      what: what,
      target: target,
      measured: Format.ratio(ratio),
      met: met,
      reason: if(met, do: "", else: "see the part \"channel\" and bench/FINDINGS.md section 8")
    }
  end

  defp us(ns), do: :erlang.float_to_binary(ns / 1000, decimals: 1)

  defp bytes(n) when n >= 1_048_576, do: "#{div(n, 1_048_576)} MiB"
  defp bytes(n) when n >= 1024, do: "#{div(n, 1024)} KiB"
  defp bytes(n), do: "#{n} B"
end
