defmodule Snakepit.SharedMemory.ApplicationTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{Manager, TableOwner}

  describe "start/2" do
    test "starts the table owner, then the manager's own supervisor, under :rest_for_one" do
      children = Supervisor.which_children(Snakepit.SharedMemory.Supervisor)

      assert [
               {Snakepit.SharedMemory.ManagerSupervisor, sup, :supervisor, _},
               {TableOwner, owner, :worker, _}
             ] = children

      assert is_pid(sup) and is_pid(owner)

      assert [{Manager, manager, :worker, _}] =
               Supervisor.which_children(Snakepit.SharedMemory.ManagerSupervisor)

      assert is_pid(manager)

      assert %{strategy: :rest_for_one} =
               :sys.get_state(Snakepit.SharedMemory.Supervisor) |> supervisor_strategy()

      assert %{strategy: :one_for_one} =
               :sys.get_state(Snakepit.SharedMemory.ManagerSupervisor) |> supervisor_strategy()
    end
  end

  # :supervisor's state is a record: {:state, name, strategy, ...}.
  defp supervisor_strategy(state), do: %{strategy: elem(state, 2)}
end
