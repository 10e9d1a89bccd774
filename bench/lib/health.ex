defmodule SnakepitShm.Bench.Health do
  @moduledoc """
  Issue 19, part "health": the cost of one health check
  (`Snakepit.SharedMemory.Health`) with `profile.scale_regions` (10 000) live regions,
  a tenth of them with an idle timeout (so the expired-but-held scan has work to do).

  Measured: `Health.run/2` itself (in this process) and a full periodic check through
  the health monitor (`Snakepit.SharedMemory.health/0`: checks, telemetry, transition
  bookkeeping). Neither runs in the manager: the manager's time spent on health is
  zero by design, and the target (< 5 ms) applies to the whole check. The latency of a
  `Manager.sync/0`-free probe, an allocation + deallocation, is measured while checks
  run back to back in another process, next to the same probe without checks.
  """

  import SnakepitShm.Bench.Format

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.Health

  @size 4096

  def run(profile) do
    count = profile.scale_regions
    reps = max(profile.scale_reps * 10, 20)

    ids =
      for i <- 1..count do
        opts = if rem(i, 10) == 0, do: [timeout: 3_600_000], else: []

        case SM.allocate_region(@size, [backend: :posix] ++ opts) do
          {:ok, id} -> id
          {:error, e} -> raise "allocating a region for the health bench failed: #{e.message}"
        end
      end

    try do
      # Warm up (first reads of /proc files, code loading).
      _ = Health.run()
      run_ns = for _ <- 1..reps, do: timed(fn -> Health.run() end)
      monitor_ns = for _ <- 1..reps, do: timed(fn -> SM.health() end)
      quiet = probe(reps * 5)
      busy = with_checks_running(fn -> probe(reps * 5) end)

      %{
        regions: count,
        run_ns: run_ns,
        monitor_ns: monitor_ns,
        alloc_probe_ns: quiet,
        alloc_probe_during_checks_ns: busy,
        checks: length(Health.names())
      }
    after
      Enum.each(ids, &SM.deallocate_region/1)
    end
  end

  defp probe(n) do
    for _ <- 1..n do
      timed(fn ->
        {:ok, id} = SM.allocate_region(@size)
        :ok = SM.deallocate_region(id)
      end)
    end
  end

  defp with_checks_running(fun) do
    parent = self()

    checker =
      spawn_link(fn ->
        loop = fn loop ->
          receive do
            :stop -> send(parent, :stopped)
          after
            0 ->
              Health.run()
              loop.(loop)
          end
        end

        loop.(loop)
      end)

    try do
      fun.()
    after
      send(checker, :stop)

      receive do
        :stopped -> :ok
      end
    end
  end

  defp timed(fun) do
    start = System.monotonic_time(:nanosecond)
    fun.()
    System.monotonic_time(:nanosecond) - start
  end

  @doc "The report section."
  def section(h) do
    rows = [
      ["live regions", "#{h.regions} (POSIX, a tenth with an idle timeout)"],
      ["checks per run", "#{h.checks}"],
      ["Health.run() (the checks alone)", time_summary(h.run_ns)],
      [
        "Snakepit.SharedMemory.health() (through the monitor, with telemetry)",
        time_summary(h.monitor_ns)
      ],
      [
        "manager time per check",
        "0 (the checks run in the health monitor, never in the manager)"
      ],
      ["allocate + deallocate 4 KiB, no check running", time_summary(h.alloc_probe_ns)],
      [
        "allocate + deallocate 4 KiB, checks running back to back",
        time_summary(h.alloc_probe_during_checks_ns)
      ]
    ]

    """
    ## Health checks (issue 19)

    The cost of one health check with #{h.regions} live regions (target: < 5 ms).

    #{table(["what", "time"], rows)}
    """
  end

  @doc "The target of issue 19."
  def targets(%{health: h}) do
    median = SnakepitShm.Bench.Stats.summary(h.monitor_ns).median

    [
      %{
        part: "19",
        what: "a health check with #{h.regions} live regions",
        target: "< 5 ms",
        measured: time_summary(h.monitor_ns),
        met: median < 5.0e6,
        reason: if(median < 5.0e6, do: "", else: "see the health table")
      }
    ]
  end

  def targets(_), do: []
end
