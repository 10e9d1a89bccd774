defmodule SnakepitShm.Bench.Lifecycle do
  @moduledoc """
  Issue 6, parts 2 and 3: the region lifecycle through the manager's public API
  (allocate, map, write 4 KiB, unmap, deallocate) against Python's
  `multiprocessing.shared_memory` create/write/close/unlink cycle in the same rounds;
  the same cycle from 1, 10 and 100 concurrent processes; and reference count changes
  per second without a GenServer (the facade's map/unmap of an existing region, and the
  NIF hold path underneath it).
  """

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.Native
  alias SnakepitShm.Bench.Programs

  @size 4096
  @plain_cycle "raw NIF cycle, plain NIFs (create_plain ... deallocate_plain)"
  @dirty_cycle "raw NIF cycle, dirty-IO create and deallocate"
  @arena_cycle "raw NIF cycle, plain NIFs, arena chunk (what the facade's 4 KiB region is)"

  def plain_cycle_name, do: @plain_cycle
  def arena_cycle_name, do: @arena_cycle
  def dirty_cycle_name, do: @dirty_cycle
  @steps ~w(allocate_region map_region write unmap_region deallocate_region)

  def steps, do: @steps

  @doc """
  Rounds of `profile.lifecycle_cycles` cycles on each side. Returns per-round samples
  (ns per cycle, every cycle timed) and per-step samples of the product's cycle.
  """
  def latency(profile) do
    python = Programs.open_python("mp_cycle.py")
    payload = :crypto.strong_rand_bytes(@size)

    try do
      # Warm-up: code loading, the resource tracker of Python, ETS tables.
      python_cycles(python, 200)
      for _ <- 1..200, do: cycle(payload)

      rounds =
        for round <- 1..profile.lifecycle_reps do
          sides = if rem(round, 2) == 0, do: [:python, :elixir], else: [:elixir, :python]

          Map.new(sides, fn
            :python -> {:python, python_cycles(python, profile.lifecycle_cycles)}
            :elixir -> {:elixir, elixir_cycles(payload, profile.lifecycle_cycles)}
          end)
        end

      %{
        elixir: Enum.map(rounds, & &1.elixir.totals),
        elixir_steps: Enum.map(rounds, & &1.elixir.steps),
        python: Enum.map(rounds, & &1.python),
        cycles: profile.lifecycle_cycles,
        breakdown: overheads(payload, profile.lifecycle_cycles)
      }
    after
      Programs.close_python(python)
    end
  end

  defp python_cycles(port, count) do
    <<?T, data::binary>> = Programs.request(port, <<?C, count::32>>)
    for <<ns::little-64 <- data>>, do: ns
  end

  defp elixir_cycles(payload, count) do
    timed = for _ <- 1..count, do: timed_cycle(payload)
    totals = Enum.map(timed, fn {total, _} -> total end)

    steps =
      timed |> Enum.map(fn {_, steps} -> steps end) |> Enum.zip() |> Enum.map(&Tuple.to_list/1)

    %{totals: totals, steps: Enum.zip(@steps, steps)}
  end

  defp timed_cycle(payload) do
    t0 = System.monotonic_time(:nanosecond)
    {:ok, id} = SM.allocate_region(@size)
    t1 = System.monotonic_time(:nanosecond)
    {:ok, mapping} = SM.map_region(id, access_mode: :read_write)
    t2 = System.monotonic_time(:nanosecond)
    :ok = SM.write(mapping, 0, payload)
    t3 = System.monotonic_time(:nanosecond)
    :ok = SM.unmap_region(mapping)
    t4 = System.monotonic_time(:nanosecond)
    :ok = SM.deallocate_region(id)
    t5 = System.monotonic_time(:nanosecond)
    {t5 - t0, [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4]}
  end

  @doc """
  Where the cycle's time goes below the facade, `count` samples each (ns): the same
  cycle on the raw NIFs (no ETS, quota, stats or monitors), with the plain (normal
  scheduler) create/deallocate when the NIF has them and with the dirty-IO ones, one
  call of a dirty-IO NIF
  that returns at once (deallocate of a deallocated region: the cost of moving the
  call to a dirty scheduler and back), and one call of a plain NIF (`hold_counts/1`).
  """
  def overheads(payload, count) do
    {:ok, dead, _} = Native.create(@size, native_opts())
    :ok = Native.deallocate(dead, false)
    {:ok, live, _} = Native.create(@size, native_opts())

    native_cycle = fn ->
      {:ok, region, _} = Native.create(@size, native_opts())
      {:ok, mapping} = Native.map(region, :read_write)
      :ok = Native.write(mapping, 0, payload)
      :ok = Native.unmap(mapping)
      :ok = Native.deallocate(region, false)
    end

    plain_cycle = fn ->
      {:ok, region, _} = apply(Native, :create_plain, [@size, native_opts()])
      {:ok, mapping} = Native.map(region, :read_write)
      :ok = Native.write(mapping, 0, payload)
      :ok = Native.unmap(mapping)
      :ok = apply(Native, :deallocate_plain, [region, false])
    end

    # The facade puts a 4 KiB region in an arena by default (issue 14): the raw cycle
    # on an arena chunk is the floor the facade's cycle is measured against.
    arena_cycle = fn ->
      {:ok, region, _} =
        apply(Native, :create_plain, [@size, Map.put(native_opts(), :arena, true)])

      {:ok, mapping} = Native.map(region, :read_write)
      :ok = Native.write(mapping, 0, payload)
      :ok = Native.unmap(mapping)
      :ok = apply(Native, :deallocate_plain, [region, false])
    end

    plain =
      if function_exported?(Native, :create_plain, 2),
        do: %{
          @plain_cycle => sample(plain_cycle, count),
          @arena_cycle => sample(arena_cycle, count)
        },
        else: %{}

    try do
      Map.merge(plain, %{
        @dirty_cycle => sample(native_cycle, count),
        "dirty-IO NIF call that returns at once" =>
          sample(fn -> {:error, _} = Native.deallocate(dead, false) end, count),
        "plain NIF call (hold_counts/1)" => sample(fn -> Native.hold_counts(live) end, count)
      })
    after
      Native.deallocate(live, false)
    end
  end

  defp sample(fun, count) do
    for _ <- 1..count do
      t0 = System.monotonic_time(:nanosecond)
      fun.()
      System.monotonic_time(:nanosecond) - t0
    end
  end

  @doc "One lifecycle cycle, untimed; raises on any error."
  def cycle(payload) do
    {:ok, id} = SM.allocate_region(@size)
    {:ok, mapping} = SM.map_region(id, access_mode: :read_write)
    :ok = SM.write(mapping, 0, payload)
    :ok = SM.unmap_region(mapping)
    :ok = SM.deallocate_region(id)
  end

  @doc """
  Aggregate lifecycle cycles per second with each of `profile.concurrency_levels`
  processes running cycles for `profile.concurrency_ms`, `profile.concurrency_reps`
  rounds. Returns `%{level => [cycles/s per round]}`.
  """
  def concurrency(profile) do
    payload = :crypto.strong_rand_bytes(@size)

    rounds =
      for _ <- 1..profile.concurrency_reps,
          level <- profile.concurrency_levels,
          do: {level, run_parallel(level, profile.concurrency_ms, fn -> cycle(payload) end)}

    Enum.group_by(rounds, &elem(&1, 0), &elem(&1, 1))
  end

  @doc """
  Reference count changes per second without a GenServer, with 1 process and with one
  process per scheduler: `:facade` (map_region/unmap_region of one existing region: two
  changes per pair) and `:nif` (Native.map/unmap: the hold path underneath).
  Returns `%{{kind, processes} => [changes/s per round]}`.
  """
  def refcount(profile) do
    {:ok, id} = SM.allocate_region(@size, cleanup_policy: :manual)
    {:ok, region, _info} = Native.create(@size, native_opts())
    schedulers = System.schedulers_online()

    facade = fn ->
      {:ok, mapping} = SM.map_region(id, access_mode: :read_write)
      :ok = SM.unmap_region(mapping)
    end

    nif = fn ->
      {:ok, mapping} = Native.map(region, :read_write)
      :ok = Native.unmap(mapping)
    end

    try do
      rounds =
        for _ <- 1..profile.concurrency_reps,
            {kind, fun} <- [facade: facade, nif: nif],
            procs <- Enum.uniq([1, schedulers]) do
          {{kind, procs}, 2 * run_parallel(procs, profile.refcount_ms, fun)}
        end

      Enum.group_by(rounds, &elem(&1, 0), &elem(&1, 1))
    after
      SM.deallocate_region(id)
      Native.deallocate(region, false)
    end
  end

  @doc "Options of `Native.create/2` for a plain owner-only memfd region (the bench's raw NIF paths)."
  @spec native_opts() :: map()
  def native_opts do
    %{
      backend: :memfd,
      name: nil,
      open_mode: :create,
      mode: 0o600,
      security_level: 0,
      encrypted: false,
      lock_memory: false,
      metadata: "{}",
      idle_timeout_ms: 0
    }
  end

  # Runs `fun` in a loop in `count` processes for `ms` milliseconds (all released at
  # once); returns the aggregate calls per second.
  defp run_parallel(count, ms, fun) do
    parent = self()
    go = make_ref()

    pids =
      for _ <- 1..count do
        spawn_link(fn ->
          receive do
            {^go, deadline} -> send(parent, {self(), loop(fun, deadline, 0)})
          end
        end)
      end

    start = System.monotonic_time(:nanosecond)
    deadline = start + ms * 1_000_000
    Enum.each(pids, &send(&1, {go, deadline}))
    total = Enum.reduce(pids, 0, fn pid, acc -> receive(do: ({^pid, n} -> acc + n)) end)
    elapsed = System.monotonic_time(:nanosecond) - start
    total / (elapsed / 1.0e9)
  end

  defp loop(fun, deadline, n) do
    if System.monotonic_time(:nanosecond) >= deadline do
      n
    else
      # 16 calls per clock read keeps the clock out of the measurement.
      for _ <- 1..16, do: fun.()
      loop(fun, deadline, n + 16)
    end
  end
end
