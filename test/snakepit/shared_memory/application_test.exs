defmodule Snakepit.SharedMemory.ApplicationTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{HealthMonitor, Manager, TableOwner}

  describe "start/2" do
    test "starts the table owner, then the manager's own supervisor, the health monitor and the cluster directory, under :rest_for_one" do
      children = Supervisor.which_children(Snakepit.SharedMemory.Supervisor)
      # (which_children lists the last started first.) No :host_quota configured here,
      # so no host quota client between the table owner and the manager's supervisor;
      # first of all, the registry of open message channels.
      assert [
               {Snakepit.SharedMemory.Cluster.Supervisor, cluster, :supervisor, _},
               {HealthMonitor, health, :worker, _},
               {Snakepit.SharedMemory.ManagerSupervisor, sup, :supervisor, _},
               {TableOwner, owner, :worker, _},
               {Snakepit.SharedMemory.HostQuota.Supervisor, hq, :supervisor, _},
               {Snakepit.SharedMemory.ChannelRegistry, _, :supervisor, [Registry]}
             ] = children

      assert is_pid(cluster) and is_pid(health) and is_pid(hq)
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
