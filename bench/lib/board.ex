defmodule SnakepitShm.Bench.Board do
  @moduledoc """
  Issue 16, part "board": routing a request with the status board against a GenServer
  that holds the same state, in the same rounds (order alternated from round to round):

    * `least_loaded/2` over 8, 64 and 1 024 workers (random idle/busy states and queue
      lengths, some stale) versus `GenServer.call` to a server that holds the same
      entries in a map and answers with the same algorithm (stale dropped, idle first,
      lowest queue + in flight, round-robin ties);
    * `least_loaded/2` without and with `verify: true` over 64 slots owned by another OS
      process (one Python process joins them all), where the kernel is asked whether
      the pick's owner still holds its slot lock;
    * one update: from a Python worker through the C ABI (`StatusBoard.update`, timed
      inside Python), from Elixir (`StatusBoard.update/2`), and a `GenServer.cast` to
      the server (cast throughput, drained by one call at the end of each batch).

  Goal (issue 16): `least_loaded/2` at least 20× faster than the GenServer call at 64
  workers.
  """

  alias Snakepit.SharedMemory.{JSON, StatusBoard}
  alias SnakepitShm.Bench.{Format, Programs, Stats}

  @sizes [8, 64, 1024]

  defmodule Server do
    @moduledoc false
    # The baseline: the same entries in a GenServer's state.
    use GenServer

    def start_link(entries), do: GenServer.start_link(__MODULE__, entries)
    @impl true
    def init(entries), do: {:ok, %{entries: entries, rotation: 0, stale_ms: 30_000}}

    @impl true
    def handle_call(:least_loaded, _from, state) do
      now = System.monotonic_time(:millisecond)
      rotation = state.rotation + 1

      {_key, ties} =
        Enum.reduce(state.entries, {nil, []}, fn {id, e}, {best, ties} ->
          if e.state in [:idle, :busy] and now - e.updated <= state.stale_ms do
            key = {if(e.state == :idle, do: 0, else: 1), e.queue + e.in_flight}

            cond do
              best == nil or key < best -> {key, [id]}
              key == best -> {best, [id | ties]}
              true -> {best, ties}
            end
          else
            {best, ties}
          end
        end)

      reply =
        case ties do
          [] -> {:error, :no_worker}
          _ -> {:ok, Enum.at(ties, rem(rotation, length(ties)))}
        end

      {:reply, reply, %{state | rotation: rotation}}
    end

    def handle_call(:sync, _from, state), do: {:reply, :ok, state}

    @impl true
    def handle_cast({:update, id, fields}, state) do
      now = System.monotonic_time(:millisecond)
      entries = Map.update!(state.entries, id, &Map.merge(&1, Map.put(fields, :updated, now)))
      {:noreply, %{state | entries: entries}}
    end
  end

  @python ~S"""
  import json, sys, time
  import snakepit_shm
  b = snakepit_shm.StatusBoard.join(json.loads(sys.argv[1]), "bench-python")
  n, rounds = int(sys.argv[2]), int(sys.argv[3])
  out = []
  for r in range(rounds):
      t0 = time.perf_counter_ns()
      for i in range(n):
          b.update(state="busy", queue=i, in_flight=1)
      out.append((time.perf_counter_ns() - t0) / n)
  b.leave()
  print(json.dumps(out), flush=True)
  """

  # One Python process owns every slot of the verify board (each join is its own open
  # of the segment, with its own slot lock), so that `verify: true` asks the kernel.
  @python_owner ~S"""
  import json, random, sys
  import snakepit_shm
  ref, n = json.loads(sys.argv[1]), int(sys.argv[2])
  random.seed(16)
  slots = []
  for i in range(n):
      b = snakepit_shm.StatusBoard.join(ref, "py-%d" % i)
      b.update(state=random.choice(["idle", "busy", "busy"]), queue=random.randrange(8))
      slots.append(b)
  print("READY", flush=True)
  sys.stdin.readline()
  """

  def run(profile, _programs) do
    {rounds, calls} = if profile.name == :quick, do: {5, 2_000}, else: {15, 20_000}
    routing = for n <- @sizes, do: routing(n, rounds, calls)

    %{
      rounds: rounds,
      calls: calls,
      routing: routing,
      verify: verify(64, rounds, calls),
      update: updates(rounds, calls)
    }
  end

  # least_loaded/2 with and without `verify: true` over slots owned by another OS
  # process (the kernel is asked whether the pick's owner holds its slot lock).
  defp verify(n, rounds, calls) do
    {:ok, board} = StatusBoard.create(name("v#{n}"), capacity: n)
    {:ok, ref} = StatusBoard.export_ref(board)
    {:ok, json} = JSON.encode(ref)

    port =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [
        :binary,
        {:line, 4096},
        args: ["-c", @python_owner, json, Integer.to_string(n)],
        env: [
          {~c"PYTHONPATH", String.to_charlist(Programs.python_client_dir())},
          {~c"PYTHONDONTWRITEBYTECODE", ~c"1"}
        ]
      ])

    receive do
      {^port, {:data, {:eol, "READY"}}} -> :ok
    after
      60_000 -> raise "the Python slot owner did not get ready"
    end

    try do
      samples =
        for _ <- 1..rounds do
          {per_call(calls, fn -> {:ok, _} = StatusBoard.least_loaded(board) end),
           per_call(calls, fn -> {:ok, _} = StatusBoard.least_loaded(board, verify: true) end)}
        end

      {plain, verified} = Enum.unzip(samples)
      %{workers: n, plain_ns: plain, verify_ns: verified}
    after
      Port.close(port)
      StatusBoard.delete(board)
    end
  end

  defp routing(n, rounds, calls) do
    {:ok, board} = StatusBoard.create(name("r#{n}"), capacity: n)
    now = System.monotonic_time(:millisecond)
    :rand.seed(:exsss, {n, 16, 2026})

    {slots, entries} =
      Enum.unzip(
        for i <- 1..n do
          state = Enum.random([:idle, :busy, :busy])
          queue = :rand.uniform(8) - 1
          id = "worker-#{i}"
          {:ok, slot} = StatusBoard.join(board, id, state: state, queue: queue)
          {slot, {id, %{state: state, queue: queue, in_flight: 0, updated: now}}}
        end
      )

    {:ok, server} = Server.start_link(Map.new(entries))

    try do
      samples =
        for r <- 1..rounds do
          board_run = fn -> per_call(calls, fn -> StatusBoard.least_loaded(board) end) end
          server_run = fn -> per_call(calls, fn -> GenServer.call(server, :least_loaded) end) end

          if rem(r, 2) == 0,
            do: {board_run.(), server_run.()},
            else: Enum.reverse([server_run.(), board_run.()]) |> List.to_tuple()
        end

      {board_ns, server_ns} = Enum.unzip(samples)
      true = length(slots) == n
      %{workers: n, board_ns: board_ns, genserver_ns: server_ns}
    after
      GenServer.stop(server)
      StatusBoard.delete(board)
    end
  end

  defp updates(rounds, calls) do
    {:ok, board} = StatusBoard.create(name("u"), capacity: 4)
    {:ok, slot} = StatusBoard.join(board, "bench-elixir", state: :idle)

    {:ok, server} =
      Server.start_link(%{"w" => %{state: :idle, queue: 0, in_flight: 0, updated: 0}})

    try do
      {:ok, ref} = StatusBoard.export_ref(board)
      {:ok, json} = JSON.encode(ref)
      python = python_updates(json, calls * 10, rounds)

      elixir =
        for _ <- 1..rounds,
            do: per_call(calls, fn -> StatusBoard.update(slot, state: :busy, queue: 1) end)

      cast =
        for _ <- 1..rounds do
          per_call(calls, fn -> GenServer.cast(server, {:update, "w", %{queue: 1}}) end,
            then: fn -> GenServer.call(server, :sync, 60_000) end
          )
        end

      %{python_ns: python, elixir_ns: elixir, genserver_cast_ns: cast}
    after
      GenServer.stop(server)
      StatusBoard.delete(board)
    end
  end

  defp python_updates(json, n, rounds) do
    {out, 0} =
      System.cmd(
        "/usr/bin/python3",
        ["-c", @python, json, Integer.to_string(n), Integer.to_string(rounds)],
        env: [{"PYTHONPATH", Programs.python_client_dir()}, {"PYTHONDONTWRITEBYTECODE", "1"}]
      )

    {:ok, samples} = out |> String.split("\n", trim: true) |> List.last() |> JSON.decode()
    samples
  end

  defp per_call(n, fun, opts \\ []) do
    then = Keyword.get(opts, :then, fn -> :ok end)
    t0 = System.monotonic_time(:nanosecond)
    Enum.each(1..n, fn _ -> fun.() end)
    then.()
    (System.monotonic_time(:nanosecond) - t0) / n
  end

  defp name(tag), do: "bench#{tag}_#{System.unique_integer([:positive]) |> rem(100_000)}"

  # ---- report ----

  @doc "The RESULTS.md section."
  def report(b) do
    rows =
      for r <- b.routing do
        [
          r.workers,
          Format.time_summary(r.board_ns),
          Format.time_summary(r.genserver_ns),
          Format.ratio(Stats.paired_ratio(r.genserver_ns, r.board_ns))
        ]
      end

    u = b.update

    verify_rows =
      case Map.get(b, :verify) do
        nil ->
          []

        v ->
          [
            [
              v.workers,
              Format.time_summary(v.plain_ns),
              Format.time_summary(v.verify_ns)
            ]
          ]
      end

    update_rows = [
      ["Python `StatusBoard.update` (C ABI, timed in CPython)", Format.time_summary(u.python_ns)],
      ["Elixir `StatusBoard.update/2` (NIF)", Format.time_summary(u.elixir_ns)],
      ["`GenServer.cast` of an update (drained)", Format.time_summary(u.genserver_cast_ns)]
    ]

    """
    ## Status board

    `least_loaded/2` (one NIF call scanning every slot in place) against `GenServer.call`
    to a server holding the same entries and running the same algorithm; per call,
    #{b.calls} calls per round, #{b.rounds} rounds, order alternated.

    #{Format.table(["workers", "least_loaded/2", "GenServer.call", "speed-up (paired)"], rows)}
    The same pick over slots owned by another OS process (one Python process holding
    every slot), without and with `verify: true` (the kernel confirms that the pick's
    owner holds its slot lock: one `F_OFD_GETLK`):

    #{Format.table(["workers", "least_loaded/2", "least_loaded(verify: true)"], verify_rows)}
    One update of a worker's entry (per call):

    #{Format.table(["update", "time"], update_rows)}
    """
  end

  @doc "The issue-16 target, if the part ran."
  def targets(%{board: b}) do
    case Enum.find(b.routing, &(&1.workers == 64)) do
      nil ->
        []

      r ->
        ratio = Stats.paired_ratio(r.genserver_ns, r.board_ns)
        met = ratio.median >= 20

        [
          %{
            part: "board",
            what: "least_loaded/2 vs GenServer.call, 64 workers",
            target: ">= 20×",
            measured: Format.ratio(ratio),
            met: met,
            reason: if(met, do: "", else: "see the status board table")
          }
        ]
    end
  end

  def targets(_), do: []
end
