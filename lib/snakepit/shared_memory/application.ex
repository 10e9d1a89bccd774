defmodule Snakepit.SharedMemory.Application do
  @moduledoc """
  The `:snakepit_shm` application.

  Validates the configuration (an invalid key fails the start with a message naming
  it), sets up the statistics counters, and starts, under a `:rest_for_one`
  supervisor, the table owner and then the manager.
  """

  use Application

  alias Snakepit.SharedMemory.{Config, HostQuota, Manager, Platform, Stats, TableOwner}

  @impl true
  def start(_type, _args) do
    with {:ok, config} <- Config.load(),
         {:ok, _platform} <- Platform.select(:os.type()) do
      Stats.setup()

      # The host quota client (when configured) starts before the manager, so that a
      # restart of the client restarts the manager, which re-declares every region.
      children =
        [HostQuota.Supervisor, TableOwner] ++ HostQuota.Regions.children(config) ++ [Manager]

      Supervisor.start_link(children,
        strategy: :rest_for_one,
        max_restarts: 10,
        max_seconds: 5,
        name: Snakepit.SharedMemory.Supervisor
      )
    else
      {:error, message} -> {:error, {:snakepit_shm, message}}
    end
  end
end
