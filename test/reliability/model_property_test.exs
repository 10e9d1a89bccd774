defmodule Snakepit.SharedMemory.Reliability.ModelPropertyTest do
  # Stateful property test (PropEr's proper_statem, Debian erlang-proper): random
  # sequences of allocate / map / unmap / write / read / seal / deallocate / owner death
  # run against the real manager, which must agree with the model
  # (Snakepit.SharedMemory.ReliabilityModel) on every result and, after every command, on
  # which regions live, their reference counts and their sealed flags.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{ReliabilityHelpers, ReliabilityModel}

  @moduletag :reliability
  @moduletag :capture_log
  @moduletag timeout: 1_800_000

  @numtests ReliabilityHelpers.scale(
              String.to_integer(System.get_env("SNAKEPIT_SHM_MODEL_TESTS", "200"))
            )

  setup_all do
    proper = :code.lib_dir(:proper)

    assert is_list(proper),
           "erlang-proper is not installed (apt-get install erlang-proper): #{inspect(proper)}"

    Code.prepend_path(Path.join(proper, "ebin"))
    assert {:module, :proper_statem} = Code.ensure_loaded(:proper_statem)
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    :ok
  end

  test "the manager agrees with the model of the region lifecycle" do
    seed = ReliabilityHelpers.seed()
    segments_before = ReliabilityModel.segments()
    parent = self()

    property =
      :proper.forall(:proper_statem.commands(ReliabilityModel), fn commands ->
        ReliabilityModel.setup()
        {history, state, result} = :proper_statem.run_commands(ReliabilityModel, commands)
        ReliabilityModel.teardown(state)
        send(parent, {:ran, length(commands)})

        :proper.whenfail(
          fn ->
            IO.puts("""
            model disagreement: #{inspect(result, limit: 20)}
            commands: #{inspect(:proper_statem.zip(commands, Enum.map(history, &elem(&1, 1))), limit: 60, pretty: true)}
            state: #{Enum.join(ReliabilityModel.explain(state), "\n")}
            """)
          end,
          fn -> result == :ok end
        )
      end)

    result =
      :proper.quickcheck(property, [
        {:numtests, @numtests},
        {:start_size, 20},
        {:max_size, 80},
        {:constraint_tries, 200},
        :quiet,
        :long_result
      ])

    commands = count_commands(0)

    ReliabilityHelpers.record("model_property", %{seed: seed, runs: @numtests, commands: commands})

    assert result == true, "proper_statem found a counterexample: #{inspect(result, limit: 50)}"
    assert ReliabilityHelpers.own_segments(segments_before) == []
  end

  defp count_commands(acc) do
    receive do
      {:ran, n} -> count_commands(acc + n)
    after
      0 -> acc
    end
  end
end
