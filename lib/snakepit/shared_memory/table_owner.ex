defmodule Snakepit.SharedMemory.TableOwner do
  @moduledoc """
  Owns the registry's ETS tables and the quota counters, and does nothing else.

  ETS tables die with their owner. Keeping them in a process with no logic means a
  crash of the manager (which does all the work) loses no region: the restarted
  manager finds the registry as it was. This process is started before the manager
  under a `:rest_for_one` supervisor; if it dies anyway, the manager is restarted after
  it and rebuilds the registry from the segments' own headers (see
  `Snakepit.SharedMemory.Sweep.adopt_own_segments/0`).
  """

  use GenServer

  alias Snakepit.SharedMemory.{Quota, Registry}

  @doc false
  def start_link(_arg), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @impl true
  def init(nil) do
    for {name, options} <- Registry.tables(), do: :ets.new(name, options)
    Registry.new_incarnation()
    Quota.setup()
    Registry.set_flag(:initialized, false)
    {:ok, nil}
  end
end
