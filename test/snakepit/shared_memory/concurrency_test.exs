Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.ConcurrencyTest do
  # 100 processes run allocate/map/write/read/unmap/deallocate cycles at once while a
  # random tenth of them is killed mid-cycle. Afterwards the registry, the quota
  # counters and /dev/shm must all agree: nothing is live.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Manager, Quota, Registry}
  alias Snakepit.SharedMemory.TestSupport

  @processes 100

  setup do
    before = TestSupport.vm_segments()
    on_exit(fn -> TestSupport.free_everything() end)
    {:ok, before: before}
  end

  defp worker(parent, cycles, seed) do
    spawn(fn ->
      :rand.seed(:exsss, {seed, seed, seed})

      # A victim cycles until it is killed, so every kill lands mid-run however fast
      # the machine is; the others run `cycles` cycles.
      indices = if cycles == :until_killed, do: Stream.iterate(1, &(&1 + 1)), else: 1..cycles

      for i <- indices do
        backend = if rem(i + seed, 2) == 0, do: :posix, else: :memfd
        policy = if rem(i, 3) == 0, do: :reference_counted, else: :automatic
        size = 4096 + :rand.uniform(4096)
        {:ok, id} = SM.allocate_region(size, backend: backend, cleanup_policy: policy)
        {:ok, m} = SM.map_region(id)
        data = :binary.copy(<<seed, i::24>>, div(size, 4))
        :ok = SM.write(m, 0, data)
        {:ok, ^data} = SM.read(m, 0, byte_size(data))
        :ok = SM.unmap_region(m)

        case SM.deallocate_region(id) do
          :ok -> :ok
          # reference_counted regions are freed by the unmap of their last hold
          {:error, %{reason: :not_found}} when policy == :reference_counted -> :ok
        end
      end

      send(parent, {:done, self()})
    end)
  end

  defp run(cycles, kill_window_ms, before) do
    parent = self()
    victim_seeds = Enum.take_random(1..@processes, div(@processes, 10))

    workers =
      for n <- 1..@processes do
        {n, worker(parent, if(n in victim_seeds, do: :until_killed, else: cycles), n)}
      end

    victims = for {n, pid} <- workers, n in victim_seeds, do: pid
    workers = Enum.map(workers, &elem(&1, 1))

    # Monitors before any kill: a victim never finishes, so it is always monitored alive;
    # a fast non-victim may already have finished (:noproc) after sending {:done, pid}.
    refs = Map.new(workers, fn pid -> {Process.monitor(pid), pid} end)

    killer =
      Task.async(fn ->
        for victim <- victims do
          Process.sleep(:rand.uniform(kill_window_ms))
          Process.exit(victim, :kill)
        end
      end)

    Task.await(killer, :infinity)
    outcomes = for _ <- refs, do: await_worker(refs)
    killed = Enum.count(outcomes, &(&1 == :killed))
    assert killed == length(victims)
    assert Enum.all?(outcomes, &(&1 in [:normal, :noproc, :killed])), inspect(Enum.uniq(outcomes))

    Manager.sync()
    TestSupport.assert_nothing_live(before)
    assert Quota.totals() == %{regions: 0, bytes: 0}
    assert Registry.count() == 0
    {:ok, stats} = SM.stats()
    assert stats.active_regions == 0
    assert stats.active_bytes == 0
  end

  defp await_worker(refs) do
    receive do
      {:DOWN, ref, :process, _pid, reason} when is_map_key(refs, ref) ->
        receive do
          {:done, _} -> :ok
        after
          0 -> :ok
        end

        reason
    after
      120_000 -> flunk("workers did not finish")
    end
  end

  @tag timeout: 120_000
  test "100 processes x 150 cycles with a tenth killed mid-cycle", %{before: before} do
    run(150, 800, before)
  end

  @tag :soak
  @tag timeout: 900_000
  test "100 processes x 1000 cycles with a tenth killed mid-cycle", %{before: before} do
    run(1000, 5_000, before)
  end
end
