defmodule Snakepit.SharedMemory.Application do
  @moduledoc """
  The `:snakepit_shm` application.

  Validates the configuration (an invalid key fails the start with a message naming
  it), points the native layer at the directory of POSIX segments (`:shm_path`), sets
  up the statistics counters, and starts, under a `:rest_for_one` supervisor, the table
  owner, the manager, the health monitor (`Snakepit.SharedMemory.HealthMonitor`), then
  the cluster directory (a `:pg` scope and this node's member of it,
  `Snakepit.SharedMemory.Cluster.Supervisor`).
  """

  use Application

  alias Snakepit.SharedMemory.{
    Cluster,
    Config,
    HealthMonitor,
    HostQuota,
    Manager,
    Platform,
    Stats,
    TableOwner
  }

  @impl true
  def start(_type, _args) do
    with {:ok, config} <- Config.load(),
         {:ok, platform} <- Platform.select(:os.type()),
         :ok <- Platform.apply_shm_path(platform, config.shm_path) do
      Platform.warn_unless_tmpfs(config.shm_path)
      Stats.setup()

      # The host quota client (when configured) starts before the manager, so that a
      # restart of the client restarts the manager, which re-declares every region.
      children =
        [
          # open message channels, for Channel.list/0 and the mix tasks
          {Registry, keys: :duplicate, name: Snakepit.SharedMemory.ChannelRegistry},
          HostQuota.Supervisor,
          TableOwner
        ] ++
          HostQuota.Regions.children(config) ++ [Manager, HealthMonitor, Cluster.Supervisor]

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
