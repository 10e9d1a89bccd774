defmodule Snakepit.SharedMemory.ApplicationTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{HealthMonitor, Manager, TableOwner}

  describe "start/2" do
    test "starts the table owner, then the manager, then the health monitor, then the cluster directory, under :rest_for_one" do
      children = Supervisor.which_children(Snakepit.SharedMemory.Supervisor)

      assert [
               {Snakepit.SharedMemory.Cluster.Supervisor, cluster, :supervisor, _},
               {HealthMonitor, health, :worker, _},
               {Manager, manager, :worker, _},
               {TableOwner, owner, :worker, _}
             ] = children

      assert is_pid(cluster)
      assert is_pid(manager) and is_pid(owner) and is_pid(health)

      assert %{strategy: :rest_for_one} =
               :sys.get_state(Snakepit.SharedMemory.Supervisor) |> supervisor_strategy()
    end
  end

  # :supervisor's state is a record: {:state, name, strategy, ...}.
  defp supervisor_strategy(state), do: %{strategy: elem(state, 2)}
end
