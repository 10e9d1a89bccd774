defmodule Snakepit.SharedMemory.HostQuota.RuntimeDir do
  @moduledoc """
  The private directory of the host quota server and the files in it.

  The directory is, in order of preference:

    1. the `:dir` option, else the `SNAKEPIT_SHM_QUOTA_DIR` environment variable, else
       the `:host_quota_dir` setting (used as given: tests point it at a fresh directory);
    2. `$XDG_RUNTIME_DIR/snakepit_shm`;
    3. `/run/user/<uid>/snakepit_shm`;
    4. `/tmp/snakepit_shm-<uid>`.

  It is created with mode 0700. An existing one is used only if it is a real directory
  (not a symlink) owned by this uid with no group or other bits; anything else is
  refused with an error that says what is wrong, because a directory someone else
  controls would let them impersonate the server.

  Inside it: `quota.sock` (the server's socket, mode 0600) and `election` (a random
  token, mode 0600, that names the abstract socket whose bind decides who serves; other
  users cannot read it, so they cannot squat that name).
  """

  alias Snakepit.SharedMemory.{Error, PrivateDir}

  @socket "quota.sock"
  @token "election"

  @doc "Resolves, creates if needed and verifies the directory. Returns its path."
  @spec ensure(String.t() | nil) :: {:ok, String.t()} | {:error, Error.t()}
  def ensure(dir \\ nil) do
    path = dir || default_dir()

    with :ok <- make(path),
         :ok <- verify(path),
         :ok <- check_length(socket_path(path)) do
      {:ok, path}
    end
  end

  @doc """
  The directory to use when none is given: `SNAKEPIT_SHM_QUOTA_DIR`, the
  `:host_quota_dir` setting, else the first of the defaults (not created).
  """
  @spec default_dir() :: String.t()
  def default_dir, do: configured() || default()

  @doc """
  Exports `dir` (default: `default_dir/0`) to the OS environment of this VM as
  `SNAKEPIT_SHM_VM_QUOTA_DIR`, which every program it starts inherits: the Python
  client (`snakepit_shm.HostQuota.connect()`) then finds the directory this VM uses,
  `:host_quota_dir` included. `SNAKEPIT_SHM_QUOTA_DIR`, when set, still wins on both
  sides. Called at application start and when this VM's client starts.
  """
  @spec export_env(String.t() | nil) :: :ok
  def export_env(dir \\ nil) do
    # Absolute: a worker started in another working directory must find the same one
    # (a relative `:host_quota_dir` is relative to this VM's working directory).
    System.put_env("SNAKEPIT_SHM_VM_QUOTA_DIR", Path.expand(dir || default_dir()))
  end

  @doc "The socket path inside `dir`."
  @spec socket_path(String.t()) :: String.t()
  def socket_path(dir), do: Path.join(dir, @socket)

  @doc """
  The name of the abstract socket whose bind elects the server of `dir` (a NUL byte,
  then a prefix and the directory's random token).
  """
  @spec election_name(String.t()) :: {:ok, binary()} | {:error, Error.t()}
  def election_name(dir) do
    with {:ok, token} <- token(dir), do: {:ok, <<0, "snakepit_shm_quota_", token::binary>>}
  end

  @doc "The current OS user id."
  @spec uid() :: non_neg_integer()
  def uid do
    case :persistent_term.get({__MODULE__, :uid}, nil) do
      nil ->
        uid = read_uid()
        :persistent_term.put({__MODULE__, :uid}, uid)
        uid

      uid ->
        uid
    end
  end

  defp read_uid do
    with {:ok, status} <- File.read("/proc/self/status"),
         [_, uid] <- Regex.run(~r/^Uid:\s+(\d+)/m, status) do
      String.to_integer(uid)
    else
      _ -> "id" |> System.cmd(["-u"]) |> elem(0) |> String.trim() |> String.to_integer()
    end
  end

  defp configured do
    case System.get_env("SNAKEPIT_SHM_QUOTA_DIR") do
      dir when is_binary(dir) and dir != "" -> dir
      _ -> Application.get_env(:snakepit_shm, :host_quota_dir)
    end
  end

  defp default do
    xdg = System.get_env("XDG_RUNTIME_DIR")
    run_user = "/run/user/#{uid()}"

    cond do
      is_binary(xdg) and xdg != "" and owned_dir?(xdg) -> Path.join(xdg, "snakepit_shm")
      owned_dir?(run_user) -> Path.join(run_user, "snakepit_shm")
      true -> "/tmp/snakepit_shm-#{uid()}"
    end
  end

  defp owned_dir?(path) do
    me = uid()

    case File.lstat(path) do
      {:ok, %File.Stat{type: :directory, uid: ^me}} -> true
      _ -> false
    end
  end

  defp make(path) do
    with {:error, why} <- PrivateDir.make(path), do: fail(path, why)
  end

  @doc """
  Verifies that `path` is a directory (not a symlink) owned by this uid with mode bits
  only for the owner.
  """
  @spec verify(String.t()) :: :ok | {:error, Error.t()}
  def verify(path) do
    with {:error, why} <- PrivateDir.verify(path, uid()), do: fail(path, why)
  end

  defp check_length(socket) do
    # sun_path holds 108 bytes with the terminating NUL.
    if byte_size(socket) <= 107,
      do: :ok,
      else: fail(socket, "the socket path is longer than 107 bytes")
  end

  defp token(dir) do
    path = Path.join(dir, @token)

    # Only a regular file is read: a FIFO planted there would block the read (and the
    # client standing for election) forever, a symlink could point anywhere.
    case File.lstat(path) do
      {:ok, %File.Stat{type: :regular}} ->
        read_token(path)

      {:ok, %File.Stat{type: type}} ->
        fail(path, "the election token is not a regular file (#{type}): remove it")

      {:error, _} ->
        read_token(path)
    end
  end

  defp read_token(path) do
    case File.read(path) do
      {:ok, <<token::binary-size(32)>>} ->
        {:ok, token}

      {:ok, _other} ->
        # It is written whole and linked into place, so only someone else can have made
        # it like this. Replacing it here could give two VMs two different tokens (two
        # servers): a person decides.
        fail(path, "the election token is damaged (not 32 bytes): remove it")

      {:error, :enoent} ->
        create_token(path)

      {:error, errno} ->
        fail(path, "cannot read the election token (#{:file.format_error(errno)})")
    end
  end

  # Written whole into a temporary file, then hard-linked into place: link fails if the
  # name exists, so two VMs racing here both end up reading the one token that won.
  defp create_token(path) do
    token = Base.encode32(:crypto.strong_rand_bytes(20), case: :lower, padding: false)
    tmp = path <> ".#{System.unique_integer([:positive])}.#{System.pid()}"

    try do
      with :ok <- File.write(tmp, token, [:exclusive]),
           :ok <- File.chmod(tmp, 0o600) do
        case File.ln(tmp, path) do
          :ok -> {:ok, token}
          {:error, :eexist} -> token(Path.dirname(path))
          {:error, errno} -> fail(path, "cannot create the election token (#{errno})")
        end
      else
        {:error, errno} -> fail(path, "cannot create the election token (#{errno})")
      end
    after
      File.rm(tmp)
    end
  end

  defp fail(path, why) do
    Error.error(
      :permission_denied,
      "host quota directory #{path}: #{why}. Set SNAKEPIT_SHM_QUOTA_DIR (or " <>
        "config :snakepit_shm, host_quota_dir:) to a private directory of your own",
      %{path: path}
    )
  end
end
