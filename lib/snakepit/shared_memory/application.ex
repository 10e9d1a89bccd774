defmodule Snakepit.SharedMemory.Application do
  @moduledoc """
  The `:snakepit_shm` application.

  Validates the configuration (an invalid key fails the start with a message naming
  it), points the native layer at the directory of POSIX segments (`:shm_path`), sets
  up the statistics counters, and starts, under a `:rest_for_one` supervisor, the
  registry of message channels, the host quota supervisor, the table owner, the host
  quota client (when configured), then a supervisor of the manager, the health monitor
  (`Snakepit.SharedMemory.HealthMonitor`), the cluster directory (a `:pg` scope and
  this node's member of it, `Snakepit.SharedMemory.Cluster.Supervisor`), and this VM's
  presence among the host's other VMs (`Snakepit.SharedMemory.Peers`: their deaths
  trigger orphan sweeps).

  Why the manager has a supervisor of its own: the manager is the process with the most
  logic, so it is the one that can crash, and a crash loop (killed every 100 ms under
  load) must not reach the table owner, whose death would drop every region of the
  registry. The manager's own supervisor restarts it up to 1000 times a second; only a
  manager that cannot start at all exhausts that and reaches the top supervisor (which
  then restarts what comes after it, never the table owner). The health monitor, the
  cluster directory (with its `:pg` scope) and the presence have such supervisors too: a
  crash loop of any one (killed every few milliseconds) used to exhaust the top supervisor's 10
  restarts in 5 s and stop the application, freeing every region. The NIF's state (region
  resources in the registry, their liveness locks) lives in the tables, so it survives
  every manager restart too.
  """

  use Application

  alias Snakepit.SharedMemory.{
    Cluster,
    Config,
    HealthMonitor,
    HostQuota,
    Manager,
    Peers,
    Platform,
    Stats,
    TableOwner,
    WarmPool
  }

  @doc false
  def manager_supervisor_spec,
    do: own_supervisor(Snakepit.SharedMemory.ManagerSupervisor, Manager)

  @doc false
  # The health monitor under a supervisor of its own, for the same reason as the
  # manager: its crash loop must not exhaust the top supervisor, which would stop the
  # application and free every region.
  def health_supervisor_spec,
    do: own_supervisor(Snakepit.SharedMemory.HealthSupervisor, HealthMonitor)

  @doc false
  # The presence among the host's other VMs (Snakepit.SharedMemory.Peers), likewise.
  def peers_supervisor_spec, do: own_supervisor(Snakepit.SharedMemory.PeersSupervisor, Peers)

  # A supervisor of one child that restarts it up to 1000 times a second.
  defp own_supervisor(name, child) do
    %{
      id: name,
      type: :supervisor,
      start:
        {Supervisor, :start_link,
         [[child], [strategy: :one_for_one, max_restarts: 1000, max_seconds: 1, name: name]]}
    }
  end

  @impl true
  def start(_type, _args) do
    preload_modules()

    with {:ok, config} <- Config.load(),
         {:ok, platform} <- Platform.select(:os.type()),
         :ok <- Platform.apply_shm_path(platform, config.shm_path) do
      Platform.warn_unless_tmpfs(config.shm_path)
      Snakepit.SharedMemory.Arena.configure(config)
      Stats.setup()
      :ok = WarmPool.set_budget(WarmPool.budget(config.pool_bytes))

      # The host quota client (when configured) starts before the manager, so that a
      # restart of the client restarts the manager (its supervisor), which re-declares every region.
      children =
        [
          # open message channels, for Channel.list/0 and the mix tasks
          {Registry, keys: :duplicate, name: Snakepit.SharedMemory.ChannelRegistry},
          HostQuota.Supervisor,
          TableOwner
        ] ++
          HostQuota.Regions.children(config) ++
          [
            manager_supervisor_spec(),
            health_supervisor_spec(),
            Cluster.Supervisor,
            peers_supervisor_spec()
          ]

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

  # The warm pool's memfds go back to the OS when the application stops (the NIF, and
  # with it the pool, stays loaded): nothing is held for a stopped application.
  @impl true
  def stop(_state) do
    _ = WarmPool.set_budget(0)
    :ok
  end

  # In interactive mode (mix run, iex, escripts) a module is loaded from its .beam file
  # on first use. A VM out of file descriptors (RLIMIT_NOFILE: regions hold them) could
  # then not load the modules of the calls that would free them (deallocate_region/1
  # raised UndefinedFunctionError for Access) nor of an error reply (Error): every
  # module of the application is loaded at start instead (a few milliseconds).
  #
  # The modules of Elixir's standard library those calls reach were still loaded on first
  # use: list_regions/1 raised UndefinedFunctionError for Stream.Reducers (reached through
  # Enum.chunk_every/2) once descriptors were out (session-4 attack). In interactive mode
  # a process at low priority also loads, after the start, every module our modules call,
  # and every module those of Elixir call in turn (about 150 modules, 0.2 s of CPU, once).
  # A release (embedded mode) has loaded everything already.
  defp preload_modules do
    ours = Application.spec(:snakepit_shm, :modules) || []
    for module <- ours, do: Code.ensure_loaded(module)

    if :code.get_mode() == :interactive do
      spawn(fn ->
        Process.flag(:priority, :low)
        preload_callees(ours, MapSet.new(Application.spec(:elixir, :modules) || []))
      end)
    end

    :ok
  end

  @doc false
  # Loads every module the given modules call, and, through modules of `follow`, the
  # modules those call, transitively. Returns the set of modules visited.
  def preload_callees(modules, follow) do
    walk(modules, follow, MapSet.new(modules))
  end

  defp walk([], _follow, seen), do: seen

  defp walk([module | rest], follow, seen) do
    callees = Enum.reject(imported_modules(module), &MapSet.member?(seen, &1))
    _ = :code.ensure_modules_loaded(callees)
    seen = Enum.reduce(callees, seen, &MapSet.put(&2, &1))
    walk(Enum.filter(callees, &MapSet.member?(follow, &1)) ++ rest, follow, seen)
  end

  defp imported_modules(module) do
    with path when is_list(path) <- :code.which(module),
         {:ok, {_, [imports: imports]}} <- :beam_lib.chunks(path, [:imports]) do
      imports |> Enum.map(&elem(&1, 0)) |> Enum.uniq()
    else
      _ -> []
    end
  end
end
