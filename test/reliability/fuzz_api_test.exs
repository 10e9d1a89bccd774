defmodule Snakepit.SharedMemory.Reliability.FuzzApiTest do
  # Fuzzing of the public API, Snakepit.SharedMemory (driver:
  # Snakepit.SharedMemory.ReliabilityApiFuzz): random terms, forged mappings and valid
  # ids/mappings, two batches at once against a shared pool. Afterwards the registry,
  # the quota counters and /dev/shm hold nothing the suite made, and the API still works.
  # Replay a failure with SNAKEPIT_SHM_FUZZ_SEED=<seed printed>.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Manager, Registry, ReliabilityApiFuzz, ReliabilityHelpers}
  alias Snakepit.SharedMemory.ShmHelpers

  @moduletag :reliability
  @moduletag :capture_log
  @moduletag timeout: 3_600_000

  @calls ReliabilityHelpers.scale(
           String.to_integer(System.get_env("SNAKEPIT_SHM_FUZZ_API_CALLS", "60000"))
         )
  @batch 2_000
  @concurrency 2

  setup_all do
    ReliabilityHelpers.asan_probe!()
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    :ok
  end

  test "the fuzzer covers every public function" do
    public = for {f, _arity} <- SharedMemory.__info__(:functions), uniq: true, do: f
    assert Enum.sort(public) -- ReliabilityApiFuzz.functions() == []
  end

  test "every public function returns :ok, {:ok, _} or an Error, or raises ArgumentError" do
    seed = ReliabilityHelpers.seed()
    Manager.sync()
    registry_before = MapSet.new(Registry.ids())
    segments_before = ShmHelpers.our_segments()

    {figures, rounds} =
      ReliabilityHelpers.fuzz_rounds(ReliabilityApiFuzz, seed, @calls, @batch, @concurrency)

    # The batch processes are gone: the manager frees what their deaths leave.
    Manager.sync()

    left =
      ShmHelpers.wait_until(
        fn ->
          Manager.sync()
          MapSet.difference(MapSet.new(Registry.ids()), registry_before) |> MapSet.size() == 0
        end,
        10_000
      )

    leftover = MapSet.difference(MapSet.new(Registry.ids()), registry_before) |> MapSet.to_list()
    {:ok, _} = SharedMemory.cleanup_regions(ids: leftover, orphans: false)
    leaked = ReliabilityHelpers.remove_own_segments(segments_before)

    # The API still works.
    {:ok, id} = SharedMemory.allocate_region(4096)
    {:ok, m} = SharedMemory.map_region(id)
    :ok = SharedMemory.write(m, 0, "alive")
    assert {:ok, "alive"} = SharedMemory.read(m, 0, 5)
    :ok = SharedMemory.deallocate_region(id)

    ReliabilityHelpers.record("fuzz_api", %{
      seed: seed,
      calls: figures.calls,
      ok: figures.ok,
      errors: figures.errors,
      raised: figures.raised,
      failures: length(figures.failures),
      leaked_regions: length(leftover),
      leaked_segments: length(leaked)
    })

    assert figures.failures == [],
           "seed #{seed}: calls with an unexpected outcome:\n" <>
             Enum.join(figures.failures, "\n")

    assert figures.calls == rounds * @batch * @concurrency
    assert figures.ok > div(figures.calls, 20), inspect(figures, limit: 30)
    assert map_size(figures.reasons) >= 8, inspect(figures.reasons)
    assert left, "regions the fuzzed calls left registered: #{inspect(leftover)}"
    assert leaked == [], "seed #{seed}: segments left: #{inspect(leaked)}"
  end
end
