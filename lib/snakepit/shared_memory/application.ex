defmodule Snakepit.SharedMemory.Application do
  @moduledoc """
  The `:snakepit_shm` application.

  Validates the configuration (an invalid key fails the start with a message naming
  it), sets up the statistics counters, and starts, under a `:rest_for_one`
  supervisor, the table owner and then the manager.
  """

  use Application

  alias Snakepit.SharedMemory.{Config, Manager, Platform, Stats, TableOwner}

  @impl true
  def start(_type, _args) do
    with {:ok, _config} <- Config.load(),
         {:ok, _platform} <- Platform.select(:os.type()) do
      Stats.setup()

      Supervisor.start_link(
        [
          # open message channels, for Channel.list/0 and the mix tasks
          {Registry, keys: :duplicate, name: Snakepit.SharedMemory.ChannelRegistry},
          TableOwner,
          Manager
        ],
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
