defmodule Snakepit.SharedMemory.Reliability.ChannelRingPropertyTest do
  # Stateful property test (PropEr) of the channel ring's indices: the real C++ ring
  # must agree with Snakepit.SharedMemory.ChannelRingModel on every write (fits or
  # full), every read (which bytes) and, after every run, on head / acknowledged tail /
  # private tail, under each acknowledgement mode and across many wrap-arounds.
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.ChannelRingModel, as: Model

  @numtests String.to_integer(System.get_env("SNAKEPIT_SHM_CHANNEL_MODEL_TESTS", "150"))

  setup_all do
    proper = :code.lib_dir(:proper)
    assert is_list(proper), "erlang-proper is not installed (apt-get install erlang-proper)"
    Code.prepend_path(Path.join(proper, "ebin"))
    assert {:module, :proper_statem} = Code.ensure_loaded(:proper_statem)
    :ok
  end

  for {name, mode, batch} <- [{"immediate", 0, 1}, {"batch", 1, 3}, {"deferred", 2, 1}] do
    test "the ring agrees with the model (#{name} acknowledgements)" do
      Model.setup(4096, unquote(mode), unquote(batch))

      property =
        :proper.forall(:proper_statem.commands(Model), fn commands ->
          Model.setup(4096, unquote(mode), unquote(batch))
          {history, state, result} = :proper_statem.run_commands(Model, commands)

          :proper.whenfail(
            fn ->
              IO.puts(
                "ring disagreement: #{inspect(result)}\n#{inspect(:proper_statem.zip(commands, Enum.map(history, &elem(&1, 1))), limit: 80)}"
              )
            end,
            fn -> result == :ok and Model.indices_agree?(state) end
          )
        end)

      assert :proper.quickcheck(property, [
               {:numtests, @numtests},
               {:start_size, 10},
               {:max_size, 200},
               :quiet
             ]) == true
    end
  end
end
