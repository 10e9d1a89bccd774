defmodule Snakepit.SharedMemory.HostQuota.Supervisor do
  @moduledoc """
  Supervises this VM's host quota client and, while this VM serves, the server.
  Started by the application; both children are started on demand.
  """
  use DynamicSupervisor

  @doc false
  def start_link(_arg), do: DynamicSupervisor.start_link(__MODULE__, nil, name: __MODULE__)

  @impl true
  def init(nil) do
    # Workers started by this VM find its quota directory (see RuntimeDir.export_env/1).
    :ok = Snakepit.SharedMemory.HostQuota.RuntimeDir.export_env()
    DynamicSupervisor.init(strategy: :one_for_one)
  end
end
