defmodule Snakepit.SharedMemory.Reliability.LoadTest do
  # Sustained allocation churn by 100 processes for a bounded time: BEAM memory,
  # descriptors, mappings of segments and /dev/shm usage stay flat while it runs, and
  # come back to where they started when it stops. Not a benchmark: nothing is timed.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Manager, Registry, ReliabilityHelpers, ShmHelpers}

  @moduletag :reliability
  @moduletag :capture_log
  @moduletag timeout: 1_800_000

  @processes 100
  @duration_ms ReliabilityHelpers.scale(
                 String.to_integer(System.get_env("SNAKEPIT_SHM_LOAD_MS", "8000"))
               )
  @sample_ms 250
  # How much more the second half of the run may use than the first (medians of the
  # samples): growth beyond this is a leak, not noise. Each process holds at most one
  # 64 KiB region at a time, but the descriptors and mapping of a freed memfd region go
  # only when the process that held its resource garbage-collects: a few per process.
  # The exact check is the return to the baseline after the run.
  @memory_slack 48 * 1024 * 1024
  @fd_slack 200
  @maps_slack 200

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    :ok
  end

  test "100 processes churning regions: memory, fds, mappings and /dev/shm stay flat" do
    Manager.sync()
    segments_before = ShmHelpers.our_segments()
    registry_before = Registry.count()
    baseline = sample()
    counter = :counters.new(2, [:write_concurrency])
    stop = :atomics.new(1, [])

    pids = for i <- 1..@processes, do: spawn_link(fn -> churn(i, counter, stop) end)
    samples = sample_during(@duration_ms)
    :atomics.put(stop, 1, 1)
    for pid <- pids, do: await_exit(pid)

    Manager.sync()

    settled =
      ShmHelpers.wait_until(
        fn ->
          for pid <- Process.list(), do: :erlang.garbage_collect(pid)
          after_run = sample()

          Registry.count() == registry_before and after_run.fds <= baseline.fds + 4 and
            after_run.maps <= baseline.maps + 2 and after_run.shm <= baseline.shm
        end,
        10_000
      )

    final = sample()
    {first, second} = Enum.split(Enum.reverse(samples), div(length(samples), 2))
    peak = fn list, key -> list |> Enum.map(&Map.fetch!(&1, key)) |> Enum.max() end

    median = fn list, key ->
      list |> Enum.map(&Map.fetch!(&1, key)) |> Enum.sort() |> Enum.at(div(length(list), 2))
    end

    cycles = :counters.get(counter, 1)

    ReliabilityHelpers.record("load", %{
      processes: @processes,
      duration_ms: @duration_ms,
      regions_churned: cycles,
      errors: :counters.get(counter, 2),
      samples: length(samples),
      memory_first_half_median: median.(first, :memory),
      memory_second_half_median: median.(second, :memory),
      fds_peak: peak.(samples, :fds),
      baseline: baseline,
      final: final
    })

    assert :counters.get(counter, 2) == 0, "operations failed under load"
    assert cycles > @processes * 10, "only #{cycles} cycles: the churn did not run"

    assert length(samples) >= 4, "only #{length(samples)} samples"

    assert median.(second, :memory) <= median.(first, :memory) + @memory_slack,
           "BEAM memory grew: #{inspect(Enum.map(samples, & &1.memory))}"

    assert median.(second, :fds) <= median.(first, :fds) + @fd_slack,
           "descriptors grew: #{inspect(Enum.map(samples, & &1.fds))}"

    assert median.(second, :maps) <= median.(first, :maps) + @maps_slack,
           "mappings grew: #{inspect(Enum.map(samples, & &1.maps))}"

    assert settled,
           "not back to the baseline after the run: #{inspect(baseline)} -> #{inspect(final)}, " <>
             "registry #{registry_before} -> #{Registry.count()}"

    assert ReliabilityHelpers.own_segments(segments_before) == []
  end

  defp sample do
    %{
      memory: :erlang.memory(:total),
      fds: ReliabilityHelpers.fd_count(),
      maps: ReliabilityHelpers.shm_mappings(),
      shm: ReliabilityHelpers.shm_bytes()
    }
  end

  # Sampled by a high-priority process, so that 100 busy processes do not starve it.
  defp sample_during(duration_ms) do
    deadline = System.monotonic_time(:millisecond) + duration_ms

    task =
      Task.async(fn ->
        Process.flag(:priority, :high)
        collect_samples(deadline, [])
      end)

    Task.await(task, duration_ms + 60_000)
  end

  defp collect_samples(deadline, acc) do
    if System.monotonic_time(:millisecond) >= deadline do
      acc
    else
      Process.sleep(@sample_ms)
      collect_samples(deadline, [sample() | acc])
    end
  end

  defp churn(i, counter, stop) do
    :rand.seed(:exsss, {i, i, i})
    churn_loop(counter, stop, :binary.copy(<<i>>, 4096))
  end

  defp churn_loop(counter, stop, payload) do
    if :atomics.get(stop, 1) == 0 do
      size = Enum.random([4096, 16_384, 65_536])
      backend = Enum.random([:memfd, :posix])
      policy = Enum.random([:automatic, :manual, :reference_counted])

      result =
        with {:ok, id} <-
               SharedMemory.allocate_region(size, backend: backend, cleanup_policy: policy),
             {:ok, m} <- SharedMemory.map_region(id),
             :ok <- SharedMemory.write(m, 0, payload),
             {:ok, ^payload} <- SharedMemory.read(m, 0, 4096),
             :ok <- SharedMemory.unmap_region(m) do
          # A :reference_counted region was freed by its last unmap.
          case SharedMemory.deallocate_region(id) do
            {:error, %{reason: :not_found}} when policy == :reference_counted -> :ok
            other -> other
          end
        end

      :counters.add(counter, if(result == :ok, do: 1, else: 2), 1)
      churn_loop(counter, stop, payload)
    end
  end

  defp await_exit(pid) do
    ref = Process.monitor(pid)

    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> :ok
    end
  end
end
