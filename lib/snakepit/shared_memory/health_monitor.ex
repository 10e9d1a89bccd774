defmodule Snakepit.SharedMemory.HealthMonitor do
  @moduledoc """
  Runs the health checks (`Snakepit.SharedMemory.Health`) every
  `:health_check_interval` ms (`false`: only on demand, `Snakepit.SharedMemory.health/0`)
  and alerts on transitions, not on ticks.

  Its own process under the application supervisor: a check reads counters, ETS and
  `/proc`, never calls the manager, so neither allocations nor the manager wait for it.

  Per check:

    * every run emits `[:snakepit_shm, :health, :check]` with measurements `%{value,
      limit, percent}` plus the check's own measurements (numbers only) and metadata
      `%{name, status, message}`;
    * a change of status logs once (`:critical`: error, `:degraded`: warning, back to
      `:ok`: notice) and emits `[:snakepit_shm, :health, :transition]` with measurements
      `%{value, percent}` and metadata `%{name, from, to, message}`.

  Allocation failures that mean a limit or a resource ran out (`:region_limit_exceeded`,
  `:no_space`, `:mlock_failed`, ...) are not logged per call: once a second, a reason
  that failed since the last second gets one warning line with its count, and
  `[:snakepit_shm, :health, :failures]` (measurements `%{count}`, metadata `%{reason}`).
  """

  use GenServer

  require Logger

  alias Snakepit.SharedMemory.{Config, Health, Stats}

  @summary_ms 1_000
  @summarised [
    :region_limit_exceeded,
    :memory_limit_exceeded,
    :process_limit_exceeded,
    :size_exceeds_limit,
    :no_space,
    :mlock_failed,
    :holder_table_full,
    :io_error,
    :disabled
  ]
  @advice %{
    region_limit_exceeded: "deallocate regions or raise max_regions",
    memory_limit_exceeded: "deallocate regions or raise max_total_memory",
    process_limit_exceeded: "a process owns too many regions: raise max_regions_per_process",
    size_exceeds_limit: "regions larger than max_region_size were asked for",
    no_space: "the shm filesystem or RAM is full: see Snakepit.SharedMemory.health()",
    mlock_failed: "RLIMIT_MEMLOCK is exhausted by :maximum regions",
    holder_table_full: "64 processes already hold a region",
    io_error: "an OS call failed (file descriptors exhausted?)",
    disabled: "the application runs with enabled: false"
  }

  @doc false
  def start_link(_arg), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc """
  Runs the checks now, with the same alerting as a periodic run, and returns the report.
  Outside the application (it is not running) the checks run in the caller, without
  alerts.
  """
  @spec check_now() :: Health.report()
  def check_now do
    GenServer.call(__MODULE__, :check_now, 30_000)
  catch
    :exit, _ -> not_running(Health.run())
  end

  # The monitor is not there: unless the application is merely restarting it, nothing
  # of this VM's shared memory works (allocate_region/2 fails), whatever the host's
  # measurements say. The report says so first, and is critical.
  defp not_running(report) do
    if Enum.any?(Application.started_applications(), &(elem(&1, 0) == :snakepit_shm)) do
      report
    else
      check = %{
        name: :application,
        status: :critical,
        value: nil,
        limit: nil,
        percent: nil,
        measurements: %{running: false},
        message:
          "the snakepit_shm application is not running: start it " <>
            "(Application.ensure_all_started(:snakepit_shm)); the checks below measure " <>
            "the host only"
      }

      %{report | status: :critical, checks: [check | report.checks]}
    end
  end

  @doc "The last report (nil before the first check)."
  @spec last() :: Health.report() | nil
  def last do
    GenServer.call(__MODULE__, :last, 30_000)
  catch
    :exit, _ -> nil
  end

  @impl true
  def init(nil) do
    interval = Config.get(:health_check_interval)
    if interval, do: schedule(:check, interval)
    schedule(:summary, @summary_ms)

    {:ok,
     %{
       statuses: %{},
       since: Health.counters(),
       failures: Stats.errors(@summarised),
       report: nil,
       interval: interval
     }}
  end

  @impl true
  def handle_call(:check_now, _from, state) do
    state = check(state)
    {:reply, state.report, state}
  end

  def handle_call(:last, _from, state), do: {:reply, state.report, state}

  @impl true
  def handle_info(:check, state) do
    schedule(:check, state.interval)
    {:noreply, check(state)}
  end

  def handle_info(:summary, state) do
    schedule(:summary, @summary_ms)
    {:noreply, summarise_failures(state)}
  end

  def handle_info(_message, state), do: {:noreply, state}

  # ---- checks and transitions ----

  defp check(state) do
    since = Health.counters()
    report = Health.run(state.statuses, state.since)

    for check <- report.checks do
      Stats.telemetry(
        [:snakepit_shm, :health, :check],
        check_measurements(check),
        %{name: check.name, status: check.status, message: check.message}
      )

      from = Map.get(state.statuses, check.name, :ok)
      if from != check.status, do: transition(check, from)
    end

    statuses = Map.new(report.checks, &{&1.name, &1.status})
    %{state | statuses: statuses, since: since, report: report}
  end

  defp check_measurements(check) do
    numbers = for {k, v} <- check.measurements, is_number(v), into: %{}, do: {k, v}

    Map.merge(numbers, %{
      value: check.value,
      limit: if(is_number(check.limit), do: check.limit),
      percent: check.percent
    })
  end

  defp transition(check, from) do
    text = "snakepit_shm health: #{check.name} #{from} -> #{check.status}"

    case check.status do
      :critical -> Logger.error("#{text}: #{check.message}")
      :degraded -> Logger.warning("#{text}: #{check.message}")
      :ok -> Logger.notice("#{text}: recovered (#{describe(check)})")
    end

    Stats.telemetry(
      [:snakepit_shm, :health, :transition],
      %{value: check.value, percent: check.percent},
      %{name: check.name, from: from, to: check.status, message: check.message}
    )
  end

  defp describe(%{percent: nil, value: value}), do: "value #{inspect(value)}"
  defp describe(%{percent: p}), do: "#{p} % of its limit"

  # ---- failure floods ----

  defp summarise_failures(state) do
    now = Stats.errors(@summarised)

    for reason <- @summarised,
        count = Map.fetch!(now, reason) - Map.get(state.failures, reason, 0),
        count > 0 do
      Logger.warning(
        "snakepit_shm: #{count} operation(s) failed with #{inspect(reason)} in the last " <>
          "#{div(@summary_ms, 1000)} s (#{@advice[reason]}); failures are summarised, not " <>
          "logged one by one"
      )

      Stats.telemetry([:snakepit_shm, :health, :failures], %{count: count}, %{reason: reason})
    end

    %{state | failures: now}
  end

  defp schedule(message, ms), do: Process.send_after(self(), message, ms)
end
