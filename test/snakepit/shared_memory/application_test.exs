defmodule Snakepit.SharedMemory.ApplicationTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{Manager, TableOwner}

  describe "start/2" do
    test "starts the table owner, then the manager, under :rest_for_one" do
      children = Supervisor.which_children(Snakepit.SharedMemory.Supervisor)
      # (plus, first, the registry of open message channels)
      assert [{Manager, manager, :worker, _}, {TableOwner, owner, :worker, _} | rest] = children
      assert [{Snakepit.SharedMemory.ChannelRegistry, _, :supervisor, [Registry]}] = rest
      assert is_pid(manager) and is_pid(owner)

      assert %{strategy: :rest_for_one} =
               :sys.get_state(Snakepit.SharedMemory.Supervisor) |> supervisor_strategy()
    end
  end

  # :supervisor's state is a record: {:state, name, strategy, ...}.
  defp supervisor_strategy(state), do: %{strategy: elem(state, 2)}
end
