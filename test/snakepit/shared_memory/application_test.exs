defmodule Snakepit.SharedMemory.ApplicationTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.{HealthMonitor, Manager, TableOwner}

  describe "start/2" do
    test "starts the table owner, then the manager's own supervisor, the health monitor, the cluster directory and the presence, under :rest_for_one" do
      children = Supervisor.which_children(Snakepit.SharedMemory.Supervisor)
      # (which_children lists the last started first.) No :host_quota configured here,
      # so no host quota client between the table owner and the manager's supervisor;
      # first of all, the registry of open message channels.
      assert [
               {Snakepit.SharedMemory.PeersSupervisor, peers, :supervisor, _},
               {Snakepit.SharedMemory.Cluster.Supervisor, cluster, :supervisor, _},
               {Snakepit.SharedMemory.HealthSupervisor, health, :supervisor, _},
               {Snakepit.SharedMemory.ManagerSupervisor, sup, :supervisor, _},
               {TableOwner, owner, :worker, _},
               {Snakepit.SharedMemory.HostQuota.Supervisor, hq, :supervisor, _},
               {Snakepit.SharedMemory.ChannelRegistry, _, :supervisor, [Registry]}
             ] = children

      assert is_pid(cluster) and is_pid(health) and is_pid(hq) and is_pid(peers)
      assert is_pid(sup) and is_pid(owner)

      assert [{Manager, manager, :worker, _}] =
               Supervisor.which_children(Snakepit.SharedMemory.ManagerSupervisor)

      assert is_pid(manager)

      assert [{HealthMonitor, monitor, :worker, _}] =
               Supervisor.which_children(Snakepit.SharedMemory.HealthSupervisor)

      assert is_pid(monitor)

      assert %{strategy: :rest_for_one} =
               :sys.get_state(Snakepit.SharedMemory.Supervisor) |> supervisor_strategy()

      assert %{strategy: :one_for_one} =
               :sys.get_state(Snakepit.SharedMemory.ManagerSupervisor) |> supervisor_strategy()
    end
  end

  describe "crash loops" do
    # Found by attack run 3: the health monitor sat directly under the top supervisor (10
    # restarts in 5 s) and the cluster directory's supervisor allowed 10 in 5 s too: killed
    # every few milliseconds, either one stopped the whole application, freeing every
    # region (the table owner went with it).
    for victim <- [HealthMonitor, Snakepit.SharedMemory.Cluster.Directory] do
      test "#{inspect(victim)} killed every 2 ms for 1 s: the application and its regions stay" do
        owner = Process.whereis(TableOwner)
        top = Process.whereis(Snakepit.SharedMemory.Supervisor)
        {:ok, id} = Snakepit.SharedMemory.allocate_region(4096, cleanup_policy: :manual)
        deadline = System.monotonic_time(:millisecond) + 1_000

        Stream.repeatedly(fn ->
          case Process.whereis(unquote(victim)) do
            nil -> :ok
            pid -> Process.exit(pid, :kill)
          end

          Process.sleep(2)
        end)
        |> Enum.find(fn _ -> System.monotonic_time(:millisecond) > deadline end)

        assert Snakepit.SharedMemory.ShmHelpers.wait_until(
                 fn -> is_pid(Process.whereis(unquote(victim))) end,
                 5_000
               )

        assert Process.whereis(Snakepit.SharedMemory.Supervisor) == top
        assert Process.whereis(TableOwner) == owner
        assert {:ok, %{id: ^id}} = Snakepit.SharedMemory.get_region_info(id)
        assert :ok = Snakepit.SharedMemory.deallocate_region(id)
      end
    end
  end

  # :supervisor's state is a record: {:state, name, strategy, ...}.
  defp supervisor_strategy(state), do: %{strategy: elem(state, 2)}
end
