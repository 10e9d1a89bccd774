defmodule Snakepit.SharedMemory.Stats do
  @moduledoc """
  Lock-free counters, latency histograms and telemetry.

  One `:counters` array (write-concurrent) created when the application starts and kept
  in `:persistent_term`. Its layout:

    * one slot per event (`#{inspect(:allocations)}`, `:expired`, ...);
    * one slot per error reason, plus `:other`;
    * per operation (`:allocate`, `:map`, ...) #{64} log2 buckets of the duration in
      nanoseconds: bucket `b` counts durations in `[2^b, 2^(b+1))` ns.

  Percentiles are read from the buckets, so they are exact to within a factor of two
  (reported as the geometric middle of the bucket). Updating costs two `:counters.add/3`
  calls; nothing here takes a lock or sends a message.

  Telemetry events go through `:telemetry.execute/3` only if the `:telemetry` module is
  loaded at run time (this project has no compile-time dependency on it):

    * `[:snakepit_shm, :region, op]` for `op` in #{inspect([:allocate, :deallocate, :map, :unmap, :write, :read, :seal, :export])},
      measurements `%{duration: native_time}`, metadata `%{result: :ok | reason, ...}`;
    * `[:snakepit_shm, :region, event]` for `:expired`, `:owner_down`, `:unreferenced`,
      `:vanished`, `:access_denied`, measurements `%{count: 1}`;
    * `[:snakepit_shm, :cleanup, :orphans | :leaked]`, measurements `%{count: n}`;
    * `[:snakepit_shm, :audit]` for every access to a `:maximum` region.
  """

  import Bitwise

  @key {__MODULE__, :counters}
  @buckets 64

  @ops [:allocate, :deallocate, :map, :unmap, :write, :read, :seal, :export]
  @events [
    :allocations,
    :deallocations,
    :maps,
    :unmaps,
    :writes,
    :reads,
    :bytes_written,
    :bytes_read,
    :seals,
    :exports,
    :expired,
    :owner_down,
    :unreferenced,
    :vanished,
    :orphans,
    :leaked,
    :os_holders_released,
    :access_denied,
    :adopted
  ]
  @reasons [
    :invalid_option,
    :invalid_size,
    :size_exceeds_limit,
    :memory_limit_exceeded,
    :region_limit_exceeded,
    :process_limit_exceeded,
    :invalid_metadata,
    :metadata_too_large,
    :not_found,
    :permission_denied,
    :closed,
    :not_sealed,
    :already_exists,
    :unsupported,
    :unavailable,
    :invalid_argument,
    :no_space,
    :too_large,
    :corrupt,
    :sealed,
    :busy,
    :expired,
    :deallocated,
    :out_of_bounds,
    :tampered,
    :holder_table_full,
    :mlock_failed,
    :io_error,
    :disabled,
    :other
  ]

  @event_index @events |> Enum.with_index(1) |> Map.new()
  # Counted by stop/4 on success (allocations and deallocations are counted where they
  # happen, so that frees by policies count too).
  @op_event %{
    map: :maps,
    unmap: :unmaps,
    write: :writes,
    read: :reads,
    seal: :seals,
    export: :exports
  }
  @reason_index @reasons
                |> Enum.with_index(length(@events) + 1)
                |> Map.new()
  @hist_base length(@events) + length(@reasons) + 1
  @op_index @ops
            |> Enum.with_index()
            |> Map.new(fn {op, i} -> {op, @hist_base + i * @buckets} end)
  @size @hist_base + length(@ops) * @buckets

  @type op :: :allocate | :deallocate | :map | :unmap | :write | :read | :seal | :export

  @doc "Creates the counters (again, resetting them). Called by the application."
  @spec setup() :: :ok
  def setup do
    :persistent_term.put({__MODULE__, :reaped_base}, reaped_holds())
    :persistent_term.put(@key, :counters.new(@size, [:write_concurrency]))
  end

  # :os_holders_released is counted where dead holders' slots are reaped, in the NIF
  # (Native.reaped_holds/0: hold_counts/1 of a periodic check may reap a dead worker's
  # slot before the manager's release_everywhere gets there): the event counter reads
  # that total, from the last setup/0 on.
  defp reaped_holds do
    Snakepit.SharedMemory.Native.reaped_holds()
  rescue
    _ -> 0
  end

  defp with_reaped(events) do
    case events do
      %{os_holders_released: n} ->
        base = :persistent_term.get({__MODULE__, :reaped_base}, 0)
        %{events | os_holders_released: n + max(reaped_holds() - base, 0)}

      _ ->
        events
    end
  end

  defp ref do
    case :persistent_term.get(@key, nil) do
      nil ->
        # Used before the application started (unit tests of single modules).
        setup()
        :persistent_term.get(@key)

      ref ->
        ref
    end
  end

  @doc "A start timestamp for `stop/4`."
  @spec start() :: integer()
  def start, do: System.monotonic_time()

  @doc """
  Records the outcome of operation `op` started at `start`: the duration histogram, the
  error counter of a failure, a telemetry event. Returns `result` unchanged.
  """
  @spec stop(op(), integer(), result, map()) :: result when result: term()
  def stop(op, start, result, metadata \\ %{}) do
    duration = System.monotonic_time() - start
    counters = ref()
    ns = :erlang.convert_time_unit(duration, :native, :nanosecond)
    :counters.add(counters, Map.fetch!(@op_index, op) + bucket(ns), 1)

    outcome =
      case result do
        {:error, %{reason: reason}} ->
          :counters.add(counters, Map.get(@reason_index, reason, @reason_index.other), 1)
          reason

        _ ->
          case Map.fetch(@op_event, op) do
            {:ok, event} -> :counters.add(counters, Map.fetch!(@event_index, event), 1)
            :error -> :ok
          end

          :ok
      end

    # The metadata map is only built when there is someone to send it to.
    if :erlang.function_exported(:telemetry, :execute, 3),
      do:
        telemetry(
          [:snakepit_shm, :region, op],
          %{duration: duration},
          Map.put(metadata, :result, outcome)
        )

    result
  end

  # floor(log2(ns)) by halving the search range: six comparisons, no loop over bits.
  defp bucket(ns) when ns <= 1, do: 0
  defp bucket(ns), do: log2(ns, 0, 32)

  defp log2(_n, acc, 0), do: acc

  defp log2(n, acc, step) do
    if n >>> step > 0,
      do: log2(n >>> step, acc + step, div(step, 2)),
      else: log2(n, acc, div(step, 2))
  end

  @doc "Adds `by` to an event counter."
  @spec count(atom(), integer()) :: :ok
  def count(event, by \\ 1), do: :counters.add(ref(), Map.fetch!(@event_index, event), by)

  @doc "The current values of some event counters (no histogram is read)."
  @spec events([atom()]) :: %{atom() => integer()}
  def events(names) do
    counters = ref()
    Map.new(names, &{&1, :counters.get(counters, Map.fetch!(@event_index, &1))}) |> with_reaped()
  end

  @doc "The current failure counts of some error reasons (unknown reasons count as `:other`)."
  @spec errors([atom()]) :: %{atom() => integer()}
  def errors(reasons) do
    counters = ref()

    Map.new(reasons, fn reason ->
      {reason, :counters.get(counters, Map.get(@reason_index, reason, @reason_index.other))}
    end)
  end

  @doc """
  Counts `event` and emits `[:snakepit_shm, :region, event]` (or `[:snakepit_shm,
  :cleanup, event]` for `:orphans` and `:leaked`). The counter grows by
  `measurements.count` (default 1).
  """
  @spec event(atom(), map(), map()) :: :ok
  def event(event, measurements, metadata) do
    count(event, Map.get(measurements, :count, 1))
    prefix = if event in [:orphans, :leaked], do: :cleanup, else: :region
    telemetry([:snakepit_shm, prefix, event], measurements, metadata)
  end

  @doc "Emits a telemetry event if `:telemetry` is loaded; otherwise does nothing."
  @spec telemetry([atom()], map(), map()) :: :ok
  def telemetry(name, measurements, metadata) do
    # config :snakepit_shm, telemetry: false (Snakepit's telemetry_enabled: false) silences it.
    if :erlang.function_exported(:telemetry, :execute, 3) and
         Snakepit.SharedMemory.Config.get(:telemetry) do
      apply(:telemetry, :execute, [name, measurements, metadata])
    end

    :ok
  end

  @doc """
  A snapshot: event counts, errors by reason (non-zero only) and, per operation, the
  count and the p50/p90/p99/max duration in microseconds.
  """
  @spec snapshot() :: %{events: map(), errors: map(), operations: map()}
  def snapshot do
    counters = ref()

    events =
      Map.new(@events, fn e -> {e, :counters.get(counters, @event_index[e])} end) |> with_reaped()

    errors =
      for reason <- @reasons,
          n = :counters.get(counters, @reason_index[reason]),
          n > 0,
          into: %{},
          do: {reason, n}

    operations = Map.new(@ops, fn op -> {op, histogram(counters, @op_index[op])} end)
    %{events: events, errors: errors, operations: operations}
  end

  defp histogram(counters, base) do
    buckets = for b <- 0..(@buckets - 1), do: :counters.get(counters, base + b)
    total = Enum.sum(buckets)

    if total == 0 do
      %{count: 0, p50_us: nil, p90_us: nil, p99_us: nil, max_us: nil}
    else
      last = buckets |> Enum.with_index() |> Enum.filter(&(elem(&1, 0) > 0)) |> List.last()

      %{
        count: total,
        p50_us: percentile(buckets, total, 0.50),
        p90_us: percentile(buckets, total, 0.90),
        p99_us: percentile(buckets, total, 0.99),
        max_us: bucket_us(elem(last, 1))
      }
    end
  end

  defp percentile(buckets, total, p) do
    rank = max(1, ceil(total * p))

    buckets
    |> Enum.with_index()
    |> Enum.reduce_while(0, fn {n, b}, seen ->
      if seen + n >= rank, do: {:halt, {:bucket, b}}, else: {:cont, seen + n}
    end)
    |> then(fn {:bucket, b} -> bucket_us(b) end)
  end

  # Geometric middle of [2^b, 2^(b+1)) ns, in microseconds.
  defp bucket_us(b), do: Float.round(:math.pow(2, b + 0.5) / 1000, 3)
end
