defmodule Snakepit.SharedMemory.Application do
  @moduledoc """
  The `:snakepit_shm` application.

  Validates the configuration (an invalid key fails the start with a message naming
  it), sets up the statistics counters, and starts, under a `:rest_for_one`
  supervisor, the table owner and then a supervisor of the manager.

  Why two levels: the manager is the only process with logic, so it is the one that can
  crash, and a crash loop (killed every 100 ms under load) must not reach the table
  owner, whose death would drop every region of the registry. The manager's own
  supervisor restarts it up to 1000 times a second; only a manager that cannot start
  at all exhausts that and reaches the top supervisor. The NIF's state (region
  resources in the registry, their liveness locks) lives in the tables, so it survives
  every manager restart too.
  """

  use Application

  alias Snakepit.SharedMemory.{Config, Manager, Platform, Stats, TableOwner}

  @doc false
  def manager_supervisor_spec do
    %{
      id: Snakepit.SharedMemory.ManagerSupervisor,
      type: :supervisor,
      start:
        {Supervisor, :start_link,
         [
           [Manager],
           [
             strategy: :one_for_one,
             max_restarts: 1000,
             max_seconds: 1,
             name: Snakepit.SharedMemory.ManagerSupervisor
           ]
         ]}
    }
  end

  @impl true
  def start(_type, _args) do
    with {:ok, _config} <- Config.load(),
         {:ok, _platform} <- Platform.select(:os.type()) do
      Stats.setup()

      Supervisor.start_link([TableOwner, manager_supervisor_spec()],
        strategy: :rest_for_one,
        max_restarts: 3,
        max_seconds: 5,
        name: Snakepit.SharedMemory.Supervisor
      )
    else
      {:error, message} -> {:error, {:snakepit_shm, message}}
    end
  end
end
