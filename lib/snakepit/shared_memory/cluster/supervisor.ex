defmodule Snakepit.SharedMemory.Cluster.Supervisor do
  @moduledoc """
  The cluster part of the application: the `:pg` scope
  `#{inspect(:snakepit_shm_cluster)}` and this node's
  `Snakepit.SharedMemory.Cluster.Directory`, which joins the scope's `:managers`
  group. `:one_for_all`: a directory never outlives its scope.
  """

  use Supervisor

  alias Snakepit.SharedMemory.Cluster.Directory

  @doc false
  def start_link(arg), do: Supervisor.start_link(__MODULE__, arg, name: __MODULE__)

  @impl true
  def init(_arg) do
    children = [
      %{id: :pg, start: {:pg, :start_link, [Directory.scope()]}},
      Directory
    ]

    # As the manager's supervisor: a crash loop of the directory stays here, never
    # reaching the application's top supervisor (whose exhaustion frees every region).
    Supervisor.init(children, strategy: :one_for_all, max_restarts: 1000, max_seconds: 1)
  end
end
