defmodule SnakepitShm.Bench.PerRequest do
  @moduledoc """
  Issue 14: the per-request handoff, what a Snakepit tool does for every call: a fresh
  1 MiB region per request (allocate, map, write, unmap, deallocate, all timed) that the
  worker attaches, reduces (xor over a numpy uint64 view) and closes, against the same
  payload through the worker's Erlang Port (stdio, `{packet, 4}`, the pipe as the OS
  makes it). Paths:

    * `:bare_id` - the worker gets the bare region id and finds the region itself (the
      runtime index; a /proc/*/fd scan where it is missing);
    * `:ref` - the worker gets the JSON ref of `export_ref/2`;
    * `:port` - the payload through the Port.

  Columns: 1, 2 and 8 concurrent Elixir/worker pairs (each pair: one Elixir process
  and its own worker process), every pair running the same number of requests at once;
  a path's figure is the wall time of the round divided by all requests of all pairs.
  Paths run in the same rounds, their order rotated from round to round; ratios come
  from paired rounds. Target (issue 14): at least 5x the Port in every column.

  Also the worker-side micro figures (`bench/python/attach_micro.py`): Python attach +
  `ndarray()` + close of a 4 KiB region by ref against `multiprocessing.shared_memory`'s
  attach + close, and by bare id with many live memfd regions (10 000 where the
  descriptor limit allows: each memfd region holds two), with the /proc scan fallback
  measured on the same regions; and by bare id of a default 4 KiB region, carved from
  an arena, with 10 000 such regions live (its `arena` index entry, written by the
  VM's background writer; the fallback is the scan plus a walk of every arena).
  """

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.JSON
  alias SnakepitShm.Bench.{Format, Programs, Stats}

  @size 1024 * 1024
  @paths [:bare_id, :ref, :port]
  @pairs [1, 2, 8]
  @micro_regions 10_000

  def paths, do: @paths
  def pair_counts, do: @pairs
  def size, do: @size

  @doc "Runs the part; `payload` must hold at least 1 MiB."
  def run(profile, payload, _programs) do
    data = binary_part(payload, 0, @size)
    {rounds, requests} = counts(profile)

    columns =
      for pairs <- @pairs do
        measure_column(pairs, data, rounds, requests)
      end

    %{size: @size, rounds: rounds, requests: requests, columns: columns, micro: micro(profile)}
  end

  defp counts(%{name: :quick}), do: {3, 10}
  defp counts(_), do: {7, 40}

  # ---- the handoff ----

  defp measure_column(pairs, data, rounds, requests) do
    parent = self()
    workers = for _ <- 1..pairs, do: spawn_link(fn -> pair_loop(parent, data) end)
    ready = for w <- workers, do: receive(do: ({:ready, ^w, xor} -> xor))
    [expected | _] = ready

    try do
      samples =
        for round <- 1..rounds, reduce: Map.new(@paths, &{&1, []}) do
          acc ->
            order = rotate(@paths, round)

            Enum.reduce(order, acc, fn path, acc ->
              ns = run_round(workers, path, requests, expected)
              Map.update!(acc, path, &[ns / (pairs * requests) | &1])
            end)
        end

      samples = Map.new(samples, fn {path, list} -> {path, Enum.reverse(list)} end)
      [first | _] = workers
      send(first, {:breakdown, self(), requests * rounds})
      breakdown = receive(do: ({:breakdown, ^first, b} -> b))
      %{pairs: pairs, samples: samples, breakdown: breakdown}
    after
      for w <- workers, do: send(w, :stop)
      for w <- workers, do: receive(do: ({:stopped, ^w} -> :ok))
    end
  end

  defp run_round(workers, path, requests, expected) do
    started = System.monotonic_time(:nanosecond)
    for w <- workers, do: send(w, {:go, path, requests})

    for w <- workers do
      receive do
        {:done, ^w, ^expected} -> :ok
        {:done, ^w, other} -> raise "#{path}: the worker computed #{other}, expected #{expected}"
      end
    end

    System.monotonic_time(:nanosecond) - started
  end

  # One Elixir process per pair, owner of its worker's Port (a Port answers its owner).
  defp pair_loop(parent, data) do
    port = Programs.open_python("worker.py", [Programs.python_client_dir(), "--default-pipe"])

    # Every path once, untimed (the worker loads numpy, the library, the index).
    xor = request(port, :port, data)
    ^xor = request(port, :bare_id, data)
    ^xor = request(port, :ref, data)
    send(parent, {:ready, self(), xor})
    serve(parent, port, data)
  end

  defp serve(parent, port, data) do
    receive do
      {:go, path, count} ->
        xor = Enum.reduce(1..count, 0, fn _, _ -> request(port, path, data) end)
        send(parent, {:done, self(), xor})
        serve(parent, port, data)

      {:breakdown, from, count} ->
        send(from, {:breakdown, self(), breakdown(port, data, count)})
        serve(parent, port, data)

      :stop ->
        Programs.close_python(port)
        send(parent, {:stopped, self()})
    end
  end

  defp request(port, :port, data), do: xor_of(Programs.request(port, ["P", data]))

  defp request(port, path, data) do
    {:ok, id} = ok!(SM.allocate_region(byte_size(data)), :allocate)
    {:ok, mapping} = ok!(SM.map_region(id), :map)
    :ok = ok!(SM.write(mapping, 0, data), :write)

    body =
      case path do
        :bare_id ->
          ["B", id]

        :ref ->
          {:ok, ref} = ok!(SM.export_ref(id), :export_ref)
          {:ok, json} = JSON.encode(ref)
          ["S", json]
      end

    xor = xor_of(Programs.request(port, body))
    :ok = ok!(SM.unmap_region(mapping), :unmap)
    :ok = ok!(SM.deallocate_region(id), :deallocate)
    xor
  end

  # Untimed by the rounds: where a bare-id request's time goes (medians, ns).
  defp breakdown(port, data, count) do
    steps =
      for _ <- 1..count do
        t0 = now()
        {:ok, id} = ok!(SM.allocate_region(byte_size(data)), :allocate)
        t1 = now()
        {:ok, mapping} = ok!(SM.map_region(id), :map)
        :ok = ok!(SM.write(mapping, 0, data), :write)
        t2 = now()
        reply = Programs.request(port, ["B", id])
        t3 = now()
        :ok = ok!(SM.unmap_region(mapping), :unmap)
        :ok = ok!(SM.deallocate_region(id), :deallocate)
        t4 = now()
        <<?R, _::little-64, attach::little-64, reduce::little-64, close::little-64>> = reply
        t5 = now()
        _ = Programs.request(port, ["P", data])
        port_ns = now() - t5

        [
          {"allocate", t1 - t0},
          {"map + write 1 MiB", t2 - t1},
          {"worker: attach by bare id", attach},
          {"worker: reduce", reduce},
          {"worker: close", close},
          {"messaging (round trip less worker time)", t3 - t2 - attach - reduce - close},
          {"unmap + deallocate", t4 - t3},
          {"total", t4 - t0},
          {"the Port (same payload)", port_ns}
        ]
      end

    steps
    |> Enum.zip()
    |> Enum.map(fn column ->
      pairs = Tuple.to_list(column)
      {elem(hd(pairs), 0), Stats.summary(Enum.map(pairs, &elem(&1, 1))).median}
    end)
  end

  defp now, do: System.monotonic_time(:nanosecond)

  defp xor_of(<<?R, xor::little-64, _::binary>>), do: xor
  defp xor_of(other), do: raise("unexpected worker answer #{inspect(other, limit: 20)}")

  defp ok!(:ok, _), do: :ok
  defp ok!({:ok, _} = ok, _), do: ok
  defp ok!(error, what), do: raise("#{what} failed: #{inspect(error)}")

  defp rotate(list, round) do
    n = rem(round - 1, length(list))
    Enum.drop(list, n) ++ Enum.take(list, n)
  end

  # ---- the worker-side micro figures ----

  defp micro(profile) do
    count = micro_region_count()

    ids =
      for _ <- 1..count, do: elem(ok!(SM.allocate_region(4096, backend: :memfd), :allocate), 1)

    # Default options: carved from arenas (a few descriptors for all of them).
    arena_ids = for _ <- 1..@micro_regions, do: elem(ok!(SM.allocate_region(4096), :allocate), 1)
    # Their index entries are written by the VM's background writer: wait for it.
    :ok = SM.Native.runtime_index_flush(60_000)

    try do
      {:ok, small} = ok!(SM.allocate_region(4096, backend: :memfd), :allocate)

      try do
        {:ok, ref} = ok!(SM.export_ref(small), :export_ref)
        arena_id = Enum.at(arena_ids, div(@micro_regions, 2))
        {:ok, arena_ref} = ok!(SM.export_ref(arena_id), :export_ref)

        {rounds, per_round, scans} =
          if profile.name == :quick, do: {5, 300, 3}, else: {11, 1000, 5}

        request = %{
          ref: ref,
          bare_id: Enum.at(ids, div(count, 2)),
          arena_id: arena_id,
          arena_ref: arena_ref,
          rounds: rounds,
          per_round: per_round,
          scan_iterations: scans
        }

        {:ok, json} = JSON.encode(request)
        script = Path.join([Programs.bench_dir(), "python", "attach_micro.py"])

        {out, 0} =
          System.cmd("/usr/bin/python3", [script, Programs.python_client_dir(), json],
            stderr_to_stdout: false
          )

        {:ok, figures} = JSON.decode(out |> String.split("\n", trim: true) |> List.last())

        figures
        |> Map.put("live_regions", count + 1)
        |> Map.put("live_arena_regions", @micro_regions)
      after
        SM.deallocate_region(small)
      end
    after
      Enum.each(ids, &SM.deallocate_region/1)
      Enum.each(arena_ids, &SM.deallocate_region/1)
    end
  end

  # Each memfd region holds two descriptors in this VM: as many as the limit allows.
  defp micro_region_count do
    limit =
      case File.read("/proc/self/limits") do
        {:ok, text} ->
          case Regex.run(~r/Max open files\s+(\d+)/, text) do
            [_, n] -> String.to_integer(n)
            _ -> 4096
          end

        _ ->
          4096
      end

    open = length(File.ls!("/proc/self/fd"))
    max(1, min(@micro_regions, div(limit - open - 2000, 2)))
  end

  # ---- report and targets ----

  @doc "The paired ratio (Port time / path time) of each column: `%{pairs => %{path => summary}}`."
  def ratios(%{columns: columns}) do
    Map.new(columns, fn %{pairs: n, samples: s} ->
      {n,
       %{
         bare_id: Stats.paired_ratio(s.port, s.bare_id),
         ref: Stats.paired_ratio(s.port, s.ref)
       }}
    end)
  end

  @doc "The part's section of RESULTS.md."
  def section(r) do
    ratios = ratios(r)

    rows =
      for %{pairs: n, samples: s} <- r.columns do
        [
          "#{n}",
          Format.time_summary(s.bare_id),
          Format.time_summary(s.ref),
          Format.time_summary(s.port),
          Format.ratio(ratios[n].bare_id),
          Format.ratio(ratios[n].ref)
        ]
      end

    m = r.micro
    [%{breakdown: breakdown} | _] = r.columns
    breakdown_rows = for {step, ns} <- breakdown, do: [step, Format.time(ns)]

    micro_rows = [
      ["attach + ndarray + close by ref (4 KiB)", us(m["ref"])],
      ["multiprocessing.shared_memory attach + numpy view + close (4 KiB)", us(m["mp"])],
      ["attach + ndarray + close by ref, default (arena) 4 KiB region", us(m["arena_ref"])],
      [
        "attach + ndarray + close by bare id (#{m["live_regions"]} live memfd regions)",
        us(m["bare_id"])
      ],
      [
        "bare-id lookup alone, runtime index#{if m["index"], do: "", else: " (absent!)"}",
        us(m["find"])
      ],
      ["bare-id lookup alone, /proc/*/fd scan (the fallback)", us(m["scan"])],
      [
        "attach + ndarray + close by bare id, arena region " <>
          "(#{m["live_arena_regions"]} live arena regions)",
        us(m["arena_bare_id"])
      ],
      [
        "arena bare-id lookup alone, runtime index" <>
          if(m["arena_index"], do: "", else: " (absent!)"),
        us(m["arena_find"])
      ],
      ["arena bare-id lookup alone, scan + arena walk (the fallback)", us(m["arena_scan"])]
    ]

    """
    ## Per-request handoff (issue 14)

    #{Format.bytes(r.size)} per request, a fresh region each time (allocate, map, write,
    unmap, deallocate: timed); the worker attaches it by bare id or by ref, reduces it and
    closes it, against the same payload through the worker's Erlang Port (default pipe).
    Time per request = wall time of a round / all requests of all pairs (#{r.requests}
    per pair per round, #{r.rounds} rounds). Target: at least 5× the Port in every column.

    #{Format.table(["pairs", "by bare id", "by ref", "Port", "bare id vs Port", "ref vs Port"], rows)}
    Breakdown of one bare-id request (1 pair, medians, measured apart from the rounds):

    #{Format.table(["step", "median"], breakdown_rows)}
    Worker-side attach (bench/python/attach_micro.py; medians of rounds, µs):

    #{Format.table(["what", "median (min–max) over rounds"], micro_rows)}
    """
  end

  defp us([_ | _] = list) do
    %{median: m, min: lo, max: hi} = Stats.summary(list)
    "#{Format.num(m)} µs (#{Format.num(lo)}–#{Format.num(hi)})"
  end

  defp us(_), do: "–"

  @doc "Issue 14's targets for this part."
  def targets(%{per_request: r}) do
    ratios = ratios(r)

    columns =
      for %{pairs: n} <- r.columns, path <- [:bare_id, :ref] do
        ratio = ratios[n][path]

        %{
          part: "14",
          what: "per-request 1 MiB handoff by #{path}, #{n} pair(s), vs the Port",
          target: ">= 5×",
          measured: Format.ratio(ratio),
          met: ratio.median >= 5.0,
          reason: if(ratio.median >= 5.0, do: "", else: "see the per-request table")
        }
      end

    m = r.micro
    ref = Stats.summary(m["ref"]).median
    mp = Stats.summary(m["mp"]).median
    bare = Stats.summary(m["bare_id"]).median
    attach_ratio = Stats.paired_ratio(m["mp"], m["ref"])

    columns ++
      [
        %{
          part: "14",
          what: "Python attach + close by ref (4 KiB) vs multiprocessing.shared_memory",
          target: "no slower (ratio >= 1)",
          measured:
            "#{Format.num(ref)} µs vs #{Format.num(mp)} µs (#{Format.ratio(attach_ratio)})",
          met: attach_ratio.median >= 1.0,
          reason: if(attach_ratio.median >= 1.0, do: "", else: "see FINDINGS.md (attach)")
        },
        %{
          part: "14",
          what: "Python attach + close by bare id, #{m["live_regions"]} live regions",
          target: "< 100 µs",
          measured: "#{Format.num(bare)} µs",
          met: bare < 100.0,
          reason: if(bare < 100.0, do: "", else: "see the per-request table")
        }
      ] ++ arena_target(m)
  end

  def targets(_), do: []

  defp arena_target(%{"arena_bare_id" => [_ | _] = samples} = m) do
    bare = Stats.summary(samples).median

    arena_ref_target(m) ++
      [
        %{
          part: "14",
          what:
            "Python attach + close by bare id of an arena region, " <>
              "#{m["live_arena_regions"]} live arena regions",
          target: "< 100 µs",
          measured: "#{Format.num(bare)} µs",
          met: bare < 100.0,
          reason: if(bare < 100.0, do: "", else: "see the per-request table")
        }
      ]
  end

  defp arena_target(_), do: []

  # The default 4 KiB region (an arena chunk) by ref, against the same baseline.
  defp arena_ref_target(%{"arena_ref" => [_ | _] = samples, "mp" => mp}) do
    ratio = Stats.paired_ratio(mp, samples)

    [
      %{
        part: "14",
        what:
          "Python attach + close by ref of a default (arena) 4 KiB region vs " <>
            "multiprocessing.shared_memory",
        target: "no slower (ratio >= 1)",
        measured:
          "#{Format.num(Stats.summary(samples).median)} µs vs " <>
            "#{Format.num(Stats.summary(mp).median)} µs (#{Format.ratio(ratio)})",
        met: ratio.median >= 1.0,
        reason: if(ratio.median >= 1.0, do: "", else: "see FINDINGS.md (attach)")
      }
    ]
  end

  defp arena_ref_target(_), do: []
end
