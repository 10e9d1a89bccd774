defmodule Snakepit.SharedMemory.StatsTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{Error, Stats}

  describe "stop/4" do
    test "records durations in log2 buckets and failures by reason" do
      before = Stats.snapshot()
      start = Stats.start()
      Process.sleep(2)
      assert :ok == Stats.stop(:seal, start, :ok)
      assert {:error, _} = Stats.stop(:seal, Stats.start(), Error.error(:busy, "busy"))
      assert {:error, _} = Stats.stop(:seal, Stats.start(), Error.error(:made_up, "x"))
      now = Stats.snapshot()
      seal = now.operations.seal
      assert seal.count - before.operations.seal.count == 3
      # One sample took at least 2 ms: the max bucket says so (within a factor of two).
      assert seal.max_us >= 1000
      assert Map.get(now.errors, :busy, 0) - Map.get(before.errors, :busy, 0) == 1
      assert Map.get(now.errors, :other, 0) - Map.get(before.errors, :other, 0) == 1
      assert now.events.seals - before.events.seals == 1
    end
  end

  describe "telemetry/3" do
    test "is silent without :telemetry, and calls it when loaded" do
      assert :ok = Stats.telemetry([:snakepit_shm, :test], %{}, %{})
      parent = self()

      # A stand-in :telemetry module, loaded only for this test.
      Code.compile_string("""
      defmodule :telemetry do
        def execute(name, measurements, metadata) do
          send(#{inspect(:erlang.pid_to_list(parent))} |> :erlang.list_to_pid(), {:telemetry, name, measurements, metadata})
          :ok
        end
      end
      """)

      try do
        Stats.stop(:map, Stats.start(), {:ok, :x}, %{region_id: "spshm_t"})

        assert_receive {:telemetry, [:snakepit_shm, :region, :map], %{duration: d},
                        %{result: :ok, region_id: "spshm_t"}}

        assert is_integer(d)
        Stats.event(:orphans, %{count: 3}, %{})
        assert_receive {:telemetry, [:snakepit_shm, :cleanup, :orphans], %{count: 3}, _}
      after
        :code.purge(:telemetry)
        :code.delete(:telemetry)
        :code.purge(:telemetry)
      end
    end
  end

  describe "count/2 and snapshot/0" do
    test "events add up" do
      before = Stats.snapshot().events.adopted
      Stats.count(:adopted, 2)
      assert Stats.snapshot().events.adopted == before + 2
    end
  end
end
