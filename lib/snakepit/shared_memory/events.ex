defmodule Snakepit.SharedMemory.Events do
  @moduledoc """
  The VM's event socket: how the manager learns that an OS process (a Python worker)
  took or dropped a hold on a region, or joined a status board, without polling.

  One Unix datagram socket per VM, `ev-<os_pid>-<start_time>.sock` in the private
  runtime directory (`Snakepit.SharedMemory.HostQuota.RuntimeDir`: mode 0700, owned by
  this uid, so only this user can send to it). Its path is also put in this VM's
  environment as `SNAKEPIT_SHM_EVENTS`, so every worker the VM spawns inherits it. The
  Python client sends one non-blocking datagram after it registered a hold (`A<id>`)
  and after it released one (`R<id>`), to the socket of the region's creator (named
  after the header's creator pid and start time) and to the inherited one.

  A datagram is only a hint of *which region to look at*: the manager then reads that
  region's header and the kernel's locks, exactly as a full scan would, and believes
  nothing else. So a forged, garbage, duplicated or lost datagram, or a worker killed
  mid-announce, costs at most one header read (the kernel-held slot lock stays the
  truth of liveness; the periodic cleanup still frees a `:reference_counted` region
  whose last hold went away unannounced). Datagrams are parsed strictly (`parse/1`),
  ids of regions this VM does not hold are dropped without any NIF call, and repeated
  ids are coalesced before any work.

  Where the socket cannot be opened (no runtime directory, a platform without Unix
  sockets), the manager falls back to scanning every `:holder_scan_interval` ms.
  """

  require Logger

  alias Snakepit.SharedMemory.HostQuota.RuntimeDir
  alias Snakepit.SharedMemory.{Native, Platform}

  @env "SNAKEPIT_SHM_EVENTS"
  # Datagrams handed to the manager per `{:active, n}` round: a flood cannot fill its
  # mailbox faster than it reads (the kernel queue then makes senders' sendto fail
  # with EAGAIN, which they ignore).
  @batch 64
  @max_id 255

  @type t :: %{socket: port(), path: String.t(), inode: non_neg_integer()}

  @doc "The environment variable that names this VM's event socket for its workers."
  @spec env_var() :: String.t()
  def env_var, do: @env

  @doc "The socket path of the VM with this OS identity inside `dir`."
  @spec path(String.t(), non_neg_integer(), non_neg_integer()) :: String.t()
  def path(dir, os_pid, start_time), do: Path.join(dir, "ev-#{os_pid}-#{start_time}.sock")

  @doc """
  Opens (binds) this VM's event socket, delivering datagrams to the calling process
  as `{:udp, socket, address, port, data}`. `{:error, why}` if it cannot.
  """
  @spec open() :: {:ok, t()} | {:error, String.t()}
  def open do
    with :ok <- supported(),
         {:ok, dir} <- runtime_dir() do
      me = Native.self_info()

      with {:ok, events} <- bind(path(dir, me.os_pid, me.start_time)) do
        sweep_stale(dir, events.path)
        {:ok, events}
      end
    end
  end

  defp supported do
    if Platform.current().shm_dir(),
      do: :ok,
      else: {:error, "this platform has no event socket"}
  end

  defp runtime_dir do
    case RuntimeDir.ensure(RuntimeDir.default_dir()) do
      {:ok, dir} -> {:ok, dir}
      {:error, error} -> {:error, Exception.message(error)}
    end
  end

  defp bind(path) do
    # A previous manager of this very VM (same pid and start time: nobody else) left
    # its socket file when it was killed: replace it. Anything else of that name in
    # our private directory is ours to replace too.
    _ = File.rm(path)

    opts = [:local, :binary, {:ifaddr, {:local, path}}, {:active, @batch}, {:recbuf, 262_144}]

    case :gen_udp.open(0, opts) do
      {:ok, socket} ->
        _ = File.chmod(path, 0o600)

        case File.lstat(path) do
          {:ok, %File.Stat{type: :other, inode: inode}} ->
            System.put_env(@env, path)
            {:ok, %{socket: socket, path: path, inode: inode}}

          _ ->
            :gen_udp.close(socket)
            {:error, "#{path} vanished right after it was bound"}
        end

      {:error, reason} ->
        {:error, "cannot bind #{path}: #{:inet.format_error(reason)}"}
    end
  end

  @stale_after_s 60

  @doc """
  Removes the sockets of VMs that are gone (killed before they could remove theirs):
  a socket nobody is bound to refuses a datagram (`ECONNREFUSED`). Only files older
  than a minute whose inode is still the one that refused are removed, so a VM binding
  its socket right now is never disturbed. Returns the removed paths.
  """
  @spec sweep_stale(String.t(), String.t() | nil, integer()) :: [String.t()]
  def sweep_stale(dir, own \\ nil, now_s \\ System.os_time(:second)) do
    case File.ls(dir) do
      {:ok, names} ->
        candidates =
          for name <- names,
              String.starts_with?(name, "ev-") and String.ends_with?(name, ".sock"),
              path = Path.join(dir, name),
              path != own,
              do: path

        if candidates == [], do: [], else: probe_all(candidates, now_s - @stale_after_s)

      {:error, _} ->
        []
    end
  end

  defp probe_all(paths, old) do
    {:ok, probe} = :gen_udp.open(0, [:local, :binary, {:active, false}])

    try do
      for path <- paths, stale?(probe, path, old), do: path
    after
      :gen_udp.close(probe)
    end
  end

  defp stale?(probe, path, old) do
    with {:ok, %File.Stat{type: :other, inode: inode, ctime: ctime}} <-
           File.lstat(path, time: :posix),
         true <- ctime < old,
         {:error, :econnrefused} <- :gen_udp.send(probe, {:local, path}, 0, <<>>),
         {:ok, %File.Stat{inode: ^inode}} <- File.lstat(path),
         :ok <- File.rm(path) do
      true
    else
      _ -> false
    end
  end

  @doc """
  Checks that the socket file is still the one bound (a cleaner of old files in
  `/tmp`, an operator's `rm`, may have removed it, and then no worker could reach this
  VM); binds a new one if not. O(1): one `lstat`. Returns the events to use (nil if a
  new socket could not be bound: the manager then scans instead).
  """
  @spec check(t()) :: t() | nil
  def check(%{path: path, inode: inode} = events) do
    case File.lstat(path) do
      {:ok, %File.Stat{type: :other, inode: ^inode}} ->
        events

      _ ->
        Logger.warning("snakepit_shm: event socket #{path} was removed: binding it again")
        _ = :gen_udp.close(events.socket)

        case bind(path) do
          {:ok, events} -> events
          {:error, _} -> nil
        end
    end
  end

  @doc "Re-arms delivery after `{:udp_passive, socket}`."
  @spec rearm(t()) :: :ok
  def rearm(%{socket: socket}) do
    _ = :inet.setopts(socket, active: @batch)
    :ok
  end

  @doc "Closes the socket and removes its file (a normal stop)."
  @spec close(t() | nil) :: :ok
  def close(nil), do: :ok

  def close(%{socket: socket, path: path, inode: inode}) do
    _ = :gen_udp.close(socket)
    # Only our own file: never one a later bind of the same name made.
    with {:ok, %File.Stat{inode: ^inode}} <- File.lstat(path), do: File.rm(path)

    if System.get_env(@env) == path, do: System.delete_env(@env)
    :ok
  end

  @doc """
  Parses one datagram: `{:attach, id}` or `{:release, id}`, or `:error` for anything
  else (empty, too long, unknown kind, an id with bytes no region id has).
  """
  @spec parse(term()) :: {:attach | :release, String.t()} | :error
  def parse(<<kind, id::binary>>) when kind in [?A, ?R] and byte_size(id) in 1..@max_id do
    if id_bytes?(id), do: {if(kind == ?A, do: :attach, else: :release), id}, else: :error
  end

  def parse(_other), do: :error

  defp id_bytes?(<<>>), do: true

  defp id_bytes?(<<c, rest::binary>>)
       when c in ?a..?z or c in ?A..?Z or c in ?0..?9 or c in [?_, ?-, ?.],
       do: id_bytes?(rest)

  defp id_bytes?(_), do: false
end
