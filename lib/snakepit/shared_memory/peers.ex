defmodule Snakepit.SharedMemory.Peers do
  @moduledoc """
  The other VMs of this OS user that keep their POSIX segments in the same shm
  directory, and the moment each of them dies.

  A VM killed with SIGKILL leaves its POSIX segments in the shm directory. The orphan
  sweep of the next VM to *start* removes them (`Snakepit.SharedMemory.Sweep`); on a host
  where the other VMs keep running and none starts, they would stay. So every VM is
  present to the others: it listens on a Unix socket in
  `<shm directory>/snakepit_shm-<euid>/vms/` (a real directory owned by this user with
  no group or other permission, never a symlink; otherwise presence is off, with a
  warning) and connects at start to every socket already there. Each pair of VMs
  shares one connection, and the kernel closes it when either VM dies, however it
  died: the survivor reads end-of-file (no PID is trusted, nothing is polled, PID
  namespaces do not matter). The survivor then asks the manager for an orphan sweep
  (only if `:orphan_sweep` is on), where, as at start-up, the liveness locks decide what
  goes; the dead VM's segments that some process still holds (its workers, or its own
  descriptors not closed yet at the instant of the end-of-file) join the held orphans
  the manager sweeps again (1 s, then backing off).

  Each side first sends its identity (`Native.self_info/0`: OS pid, start time and boot
  id, as its segment headers name their creator; a JSON object, docs/FORMAT.md
  "Presence sockets"), so that the survivor knows which held segments were the dead
  VM's. A Python worker that creates a POSIX output connects the same way
  (`snakepit_shm._presence`): the VMs then sweep what it leaves the moment it dies. A connection that says nothing valid first, or
  nothing within 10 s, is closed, and its end triggers nothing; at most 1024 connections
  are kept, and at most a quarter of the VM's descriptor limit (`ulimit -n`): a process
  of the user connecting in a loop, or many workers, cannot take the VM's descriptors. A socket of a VM that died is refused by the
  kernel (`ECONNREFUSED`) and removed by the next VM that finds it. A VM publishes
  its socket under a temporary name and renames it once it listens, so a name in the
  directory never refuses a connection while its VM lives (a temporary name older than
  60 s that refuses connections is a VM killed in between: the next VM start removes it).
  """

  use GenServer

  require Logger

  alias Snakepit.SharedMemory.{JSON, Native, Platform, PrivateDir}

  @prefix "vm-"
  @suffix ".sock"
  # sun_path holds 108 bytes with the terminating NUL.
  @max_path 107
  @hello_max 512
  @connect_timeout 1_000
  # All the connections of a start together.
  @connect_budget 3_000
  # A connection must introduce itself this fast; at most this many are kept, and at most
  # a quarter of the VM's descriptor limit (a process of the user connecting in a loop,
  # or many workers, must not take the descriptors the VM needs for its regions).
  @hello_timeout 10_000
  @max_connections 1_024

  @typedoc "A peer VM's identity, as its segment headers name their creator."
  @type identity :: %{os_pid: non_neg_integer(), start_time: non_neg_integer(), boot_id: binary()}

  @doc false
  def start_link(_arg), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc """
  The peers this VM is connected to: one identity per connection whose peer introduced
  itself, other VMs and Python workers that made a POSIX output alike (the hello does
  not tell them apart; `[]` when presence is off).
  """
  @spec list() :: [identity()]
  def list do
    GenServer.call(__MODULE__, :list)
  catch
    :exit, _ -> []
  end

  @doc "The presence directory of shm directory `shm_dir` for the user `uid`."
  @spec directory(String.t(), non_neg_integer()) :: String.t()
  def directory(shm_dir, uid), do: Path.join([shm_dir, "snakepit_shm-#{uid}", "vms"])

  # ---- GenServer ----

  @impl true
  def init(nil) do
    Process.flag(:trap_exit, true)

    with {:unix, :linux} <- :os.type(),
         shm_dir when is_binary(shm_dir) <- Platform.current().shm_dir(),
         {:ok, uid} <- euid(),
         dir = directory(shm_dir, uid),
         :ok <- ensure_directory(dir, uid),
         {:ok, listener, path} <- listen(dir) do
      server = self()
      acceptor = spawn_link(fn -> accept_loop(listener, server) end)

      state = %{
        dir: dir,
        path: path,
        listener: listener,
        acceptor: acceptor,
        hello: hello(),
        peers: %{},
        max_connections: max_connections()
      }

      # Connected before the start returns: a VM whose application started is known to
      # every VM that was there.
      {:ok, connect_all(state)}
    else
      {:error, message} when is_binary(message) ->
        Logger.warning(
          "snakepit_shm: #{message}; POSIX segments of VMs that die while this one runs " <>
            "are removed only by the next VM start or `mix snakepit.shm.cleanup`"
        )

        :ignore

      _ ->
        :ignore
    end
  end

  defp connect_all(state) do
    own = Path.basename(state.path)
    names = with {:ok, names} <- File.ls(state.dir), do: names, else: (_ -> [])
    entries = Enum.filter(names, &(peer_name?(&1) and &1 != own))
    deadline = System.monotonic_time(:millisecond) + @connect_budget
    in_time? = fn -> System.monotonic_time(:millisecond) < deadline end

    state =
      Enum.reduce(entries, state, fn name, state ->
        # VMs that do not accept in time (stopped, hung, or listeners that are not VMs at
        # all) must not hold the application's start: the rest is skipped.
        if in_time?.(), do: connect(Path.join(state.dir, name), state), else: state
      end)

    # Within the same budget (the directory may hold anything a process of the user put there).
    Enum.each(names, &if(in_time?.(), do: remove_if_abandoned(state.dir, &1)))
    state
  end

  @impl true
  def handle_call(:list, _from, state) do
    {:reply, for({_socket, %{} = peer} <- state.peers, do: peer), state}
  end

  @impl true
  def handle_info({:accepted, socket}, state) do
    if map_size(state.peers) >= state.max_connections do
      :gen_tcp.close(socket)
      {:noreply, state}
    else
      {:noreply, introduce(socket, state)}
    end
  end

  def handle_info({:hello_timeout, socket}, state) do
    case Map.fetch(state.peers, socket) do
      {:ok, :unknown} -> {:noreply, drop(socket, state)}
      _ -> {:noreply, state}
    end
  end

  # The first packet of a connection is the peer's identity; anything after it is not
  # our protocol: the connection is dropped without a sweep.
  def handle_info({:tcp, socket, data}, state) do
    case Map.fetch(state.peers, socket) do
      {:ok, :unknown} ->
        case decode_hello(data) do
          {:ok, peer} -> {:noreply, put_in(state.peers[socket], peer)}
          :error -> {:noreply, drop(socket, state)}
        end

      _ ->
        {:noreply, drop(socket, state)}
    end
  end

  def handle_info({:tcp_closed, socket}, state), do: {:noreply, peer_gone(socket, state)}

  def handle_info({:tcp_error, socket, _reason}, state) do
    {:noreply, peer_gone(socket, state)}
  end

  # The acceptor ends only with the listener: presence is over, start again.
  def handle_info({:EXIT, pid, reason}, %{acceptor: pid} = state) do
    {:stop, {:acceptor_down, reason}, state}
  end

  def handle_info({:EXIT, _pid, _reason}, state), do: {:noreply, state}

  def handle_info(message, state) do
    Logger.debug("snakepit_shm peers: unexpected message #{inspect(message)}")
    {:noreply, state}
  end

  @impl true
  def terminate(_reason, state) do
    # Removed first: from here on a new VM finds no name to connect to.
    _ = File.rm(state.path)
    :gen_tcp.close(state.listener)
    :ok
  end

  # ---- helpers ----

  # A temporary name (`.tmp-<token>`) of a VM killed between its listen and its rename:
  # nobody else would ever remove it. Only old ones (a VM renames its socket right after
  # binding it) that refuse connections (nobody listens).
  @abandoned_after_s 60

  defp remove_if_abandoned(dir, ".tmp-" <> _ = name) do
    path = Path.join(dir, name)

    with {:ok, %File.Stat{mtime: mtime}} <- File.lstat(path, time: :posix),
         true <- System.os_time(:second) - mtime > @abandoned_after_s,
         {:error, :econnrefused} <- connect_local(path, [:binary, active: false], 100) do
      _ = File.rm(path)
    else
      {:ok, socket} -> :gen_tcp.close(socket)
      _ -> :ok
    end
  end

  defp remove_if_abandoned(_dir, _name), do: :ok

  # :gen_tcp.connect/4 exits with :badarg on a path longer than sun_path: a name nobody
  # listens on (a VM refuses such a path), planted by anyone of the user, must not crash
  # the start.
  defp connect_local(path, options, timeout) do
    if byte_size(path) > @max_path,
      do: {:error, :enametoolong},
      else: :gen_tcp.connect({:local, path}, 0, options, timeout)
  catch
    :exit, :badarg -> {:error, :badarg}
  end

  # ulimit -n as the emulator saw it at start (its poll sets' max_fds).
  defp max_connections do
    max_fds =
      [:erlang.system_info(:check_io)]
      |> List.flatten()
      |> Enum.find_value(fn
        {:max_fds, n} when is_integer(n) and n > 0 -> n
        _ -> nil
      end)

    if max_fds, do: min(@max_connections, div(max_fds, 4)), else: @max_connections
  end

  defp peer_name?(name),
    do: String.starts_with?(name, @prefix) and String.ends_with?(name, @suffix)

  defp connect(path, state) do
    case connect_local(path, socket_options(), @connect_timeout) do
      {:ok, socket} ->
        introduce(socket, state)

      # Nobody listens: its VM died (a listening VM's name appears only once it listens).
      {:error, :econnrefused} ->
        _ = File.rm(path)
        state

      {:error, _} ->
        state
    end
  end

  defp introduce(socket, state) do
    with :ok <- :gen_tcp.send(socket, state.hello),
         :ok <- :inet.setopts(socket, active: true) do
      timeout = :persistent_term.get({__MODULE__, :hello_timeout_ms}, @hello_timeout)
      Process.send_after(self(), {:hello_timeout, socket}, timeout)
      put_in(state.peers[socket], :unknown)
    else
      {:error, _} ->
        :gen_tcp.close(socket)
        state
    end
  end

  defp drop(socket, state) do
    :gen_tcp.close(socket)
    %{state | peers: Map.delete(state.peers, socket)}
  end

  defp peer_gone(socket, state) do
    {peer, peers} = Map.pop(state.peers, socket)
    :gen_tcp.close(socket)
    if is_map(peer), do: Snakepit.SharedMemory.Manager.peer_down(peer)
    %{state | peers: peers}
  end

  defp socket_options,
    do: [:binary, packet: 4, packet_size: @hello_max, active: false, send_timeout: 1_000]

  # The hello (docs/FORMAT.md "Presence sockets"): one {packet, 4} frame holding a JSON
  # object, so that a Python worker can say it too.
  defp hello do
    %{os_pid: pid, start_time: start, boot_id: boot} = Native.self_info()

    {:ok, json} =
      JSON.encode(%{
        "snakepit_shm_peer" => 1,
        "os_pid" => pid,
        "start_time" => start,
        "boot_id" => boot
      })

    json
  end

  defp decode_hello(data) do
    case JSON.decode(data) do
      {:ok,
       %{"snakepit_shm_peer" => 1, "os_pid" => pid, "start_time" => start, "boot_id" => boot}}
      when is_integer(pid) and pid > 0 and is_integer(start) and start >= 0 and
             is_binary(boot) and byte_size(boot) <= 64 ->
        {:ok, %{os_pid: pid, start_time: start, boot_id: boot}}

      _ ->
        :error
    end
  end

  defp listen(dir) do
    token = Base.encode32(:crypto.strong_rand_bytes(10), case: :lower, padding: false)
    path = Path.join(dir, @prefix <> token <> @suffix)
    temporary = Path.join(dir, ".tmp-" <> token)

    if byte_size(path) > @max_path do
      {:error, "no presence socket: #{inspect(path)} is longer than a Unix socket path may be"}
    else
      options = [ifaddr: {:local, temporary}, backlog: 128] ++ socket_options()

      with {:ok, listener} <- :gen_tcp.listen(0, options),
           :ok <- rename(temporary, path, listener) do
        {:ok, listener, path}
      else
        {:error, reason} when is_atom(reason) ->
          _ = File.rm(temporary)
          {:error, "no presence socket in #{dir}: #{:file.format_error(reason)}"}

        {:error, _} = error ->
          error
      end
    end
  end

  defp rename(temporary, path, listener) do
    case File.rename(temporary, path) do
      :ok ->
        :ok

      {:error, reason} ->
        :gen_tcp.close(listener)
        {:error, reason}
    end
  end

  defp accept_loop(listener, server) do
    case :gen_tcp.accept(listener) do
      {:ok, socket} ->
        case :gen_tcp.controlling_process(socket, server) do
          :ok -> send(server, {:accepted, socket})
          {:error, _} -> :gen_tcp.close(socket)
        end

        accept_loop(listener, server)

      {:error, :closed} ->
        :ok

      # EMFILE and the like: the connection stays in the backlog; try again shortly.
      {:error, _} ->
        Process.sleep(100)
        accept_loop(listener, server)
    end
  end

  # <shm dir>/snakepit_shm-<euid>/vms: created 0700 where missing; used only if both
  # levels are real directories of this user with no group or other permission.
  defp ensure_directory(dir, uid) do
    with :ok <- ensure_one(Path.dirname(dir), uid), do: ensure_one(dir, uid)
  end

  defp ensure_one(dir, uid) do
    with :ok <- PrivateDir.make(dir), :ok <- PrivateDir.verify(dir, uid) do
      :ok
    else
      {:error, why} -> {:error, "no presence socket: #{dir}: #{why}"}
    end
  end

  # The effective uid (the second field of /proc/self/status's Uid line).
  defp euid do
    with {:ok, status} <- File.read("/proc/self/status"),
         [_, uid] <- Regex.run(~r/^Uid:\s+\d+\s+(\d+)/m, status) do
      {:ok, String.to_integer(uid)}
    else
      _ -> {:error, "no presence socket: /proc/self/status has no Uid line"}
    end
  end
end
