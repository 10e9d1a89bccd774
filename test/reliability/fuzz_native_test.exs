defmodule Snakepit.SharedMemory.Reliability.FuzzNativeTest do
  # Fuzzing of every NIF of Snakepit.SharedMemory.Native with random terms mixed with
  # valid handles (see Snakepit.SharedMemory.ReliabilityNativeFuzz). Two batches run at
  # once against a shared pool of regions, so deallocation, sealing and unlinking race
  # with reads, writes and maps. scripts/test-asan-nif.sh runs this file under
  # AddressSanitizer. Replay a failure with SNAKEPIT_SHM_FUZZ_SEED=<seed printed>.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{Native, ReliabilityHelpers, ReliabilityNativeFuzz, ShmHelpers}

  @moduletag :reliability
  @moduletag timeout: 3_600_000

  @calls ReliabilityHelpers.scale(
           String.to_integer(System.get_env("SNAKEPIT_SHM_FUZZ_NATIVE_CALLS", "200000"))
         )
  @batch 3_000
  @concurrency 2

  setup_all do
    ReliabilityHelpers.asan_probe!()
    # The fuzzer sets random warm-pool budgets: give the next suites the default back.
    on_exit(fn ->
      Snakepit.SharedMemory.WarmPool.set_budget(Snakepit.SharedMemory.WarmPool.default_budget())
    end)

    :ok
  end

  test "the fuzzer covers every NIF" do
    nifs = for {f, _arity} <- Native.__info__(:functions), f != :load_nif, uniq: true, do: f

    assert Enum.sort(nifs) -- ReliabilityNativeFuzz.functions() == [],
           "NIFs the fuzzer does not call: add them to ReliabilityNativeFuzz"
  end

  test "every NIF returns a well-shaped result or raises ArgumentError; the VM survives" do
    seed = ReliabilityHelpers.seed()
    :erlang.garbage_collect()
    fds_before = ReliabilityHelpers.fd_count()
    segments_before = ShmHelpers.our_segments()

    {figures, rounds} =
      ReliabilityHelpers.fuzz_rounds(ReliabilityNativeFuzz, seed, @calls, @batch, @concurrency)

    # The VM is alive and the NIF still works.
    {:ok, region, _} = Native.create(4096, ShmHelpers.create_opts())
    {:ok, m} = Native.map(region, :read_write)
    :ok = Native.write(m, 10, "alive")
    assert {:ok, "alive"} = Native.read(m, 10, 5)
    :ok = Native.unmap(m)
    :ok = Native.deallocate(region, false)

    # Nothing leaked: segments (each batch deallocated what it made), descriptors
    # (memfds, pidfds of watches: the batch processes are gone).
    # (Names of regions dropped after a fuzzed keep_name(region, false), like those of
    # large unpublished ones, are removed by the reaper thread a moment later.)
    ShmHelpers.wait_until(fn -> ReliabilityHelpers.own_segments(segments_before) == [] end, 5_000)
    leaked = ReliabilityHelpers.remove_own_segments(segments_before)

    fds_settled =
      ShmHelpers.wait_until(
        fn ->
          :erlang.garbage_collect()
          ReliabilityHelpers.fd_count() <= fds_before + 2
        end,
        5_000
      )

    ReliabilityHelpers.record("fuzz_native", %{
      seed: seed,
      calls: figures.calls,
      ok: figures.ok,
      errors: figures.errors,
      raised: figures.raised,
      failures: length(figures.failures),
      leaked_segments: length(leaked),
      leaked_fds: max(ReliabilityHelpers.fd_count() - fds_before, 0)
    })

    assert figures.failures == [],
           "seed #{seed}: calls with an unexpected outcome:\n" <>
             Enum.join(figures.failures, "\n")

    assert figures.calls == rounds * @batch * @concurrency
    # The mix reached deep paths: successes and many distinct error reasons, not only badarg.
    assert figures.ok > div(figures.calls, 20), inspect(figures, limit: 30)
    assert map_size(figures.reasons) >= 8, inspect(figures.reasons)
    assert leaked == [], "seed #{seed}: segments left by the fuzzed calls: #{inspect(leaked)}"

    assert fds_settled,
           "descriptors leaked: #{fds_before} before, #{ReliabilityHelpers.fd_count()} after"
  end
end
