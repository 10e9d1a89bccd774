defmodule Snakepit.SharedMemory.Platform do
  @moduledoc """
  What the operating system offers, chosen in one place from `:os.type/0`.

  Each platform module implements this behaviour:

    * `Snakepit.SharedMemory.Platform.Linux` - `:memfd` (default) and `:posix`,
      segments visible in `/dev/shm`, so the orphan sweep can find them.
    * `Snakepit.SharedMemory.Platform.MacOS` - `:posix` only (no memfd); POSIX objects are
      not visible in the file system, so there is no orphan sweep.
    * `Snakepit.SharedMemory.Platform.Windows` - `:windows` named file mappings, freed by
      the kernel with their last handle, so nothing can leak.
  """

  @type backend :: :posix | :memfd | :windows

  @doc "A short name of the platform."
  @callback name() :: String.t()
  @doc "Backends available here, the default first."
  @callback backends() :: [backend(), ...]
  @doc "The backend `:auto` picks when nothing requires another."
  @callback default_backend() :: backend()
  @doc "The backend that supports names and group/other permissions, if any."
  @callback named_backend() :: backend() | nil
  @doc "The directory where POSIX segments appear as files, or `nil` if they do not."
  @callback shm_dir() :: String.t() | nil

  @doc "The platform module of this machine."
  @spec current() :: module()
  def current do
    case :persistent_term.get({__MODULE__, :current}, nil) do
      nil ->
        module = select!(:os.type())
        :persistent_term.put({__MODULE__, :current}, module)
        module

      module ->
        module
    end
  end

  @doc """
  The platform module for an `:os.type/0` value.

  ## Examples

      iex> Snakepit.SharedMemory.Platform.select({:unix, :linux})
      {:ok, Snakepit.SharedMemory.Platform.Linux}
      iex> Snakepit.SharedMemory.Platform.select({:unix, :sunos})
      {:error, "snakepit_shm supports Linux, macOS and Windows, not {:unix, :sunos}"}
  """
  @spec select({atom(), atom()}) :: {:ok, module()} | {:error, String.t()}
  def select({:unix, :linux}), do: {:ok, __MODULE__.Linux}
  def select({:unix, :darwin}), do: {:ok, __MODULE__.MacOS}
  def select({:win32, _}), do: {:ok, __MODULE__.Windows}

  def select(other),
    do: {:error, "snakepit_shm supports Linux, macOS and Windows, not #{inspect(other)}"}

  defp select!(os_type) do
    case select(os_type) do
      {:ok, module} -> module
      {:error, message} -> raise ArgumentError, message
    end
  end

  @doc """
  Points the native layer at the configured directory of POSIX segments
  (`config :snakepit_shm, shm_path:`), on platforms whose segments are files (Linux).
  The application calls it at start, the offline tools before they scan. Returns an
  error message naming the setting if the directory cannot be used.
  """
  @spec apply_shm_path(module(), String.t() | nil) :: :ok | {:error, String.t()}
  def apply_shm_path(platform \\ current(), shm_path) do
    cond do
      platform.shm_dir() == nil and shm_path != nil ->
        {:error,
         "config :snakepit_shm, shm_path: #{inspect(shm_path)}: #{platform.name()} POSIX " <>
           "shared memory is not a directory of files; remove the setting"}

      platform.shm_dir() == nil ->
        :ok

      true ->
        dir = shm_path || "/dev/shm"

        case Snakepit.SharedMemory.Native.set_shm_dir(dir) do
          :ok ->
            :ok

          {:error, {_reason, message, _errno}} ->
            {:error,
             "invalid configuration: config :snakepit_shm, shm_path: #{inspect(dir)}: " <>
               message <>
               " (create the directory, e.g. mount a tmpfs there: " <>
               "mount -t tmpfs -o size=2g,mode=1777 tmpfs #{dir})"}
        end
    end
  end

  @doc """
  Logs a warning if the configured `shm_path` is not a tmpfs (it works, but its pages are
  written back to disk), and one if other users may write it without the sticky bit
  (they could delete or rename our segments; `/dev/shm` is mode 1777). The application
  calls it once at start.
  """
  @spec warn_unless_tmpfs(String.t() | nil) :: :ok
  def warn_unless_tmpfs(nil), do: :ok

  def warn_unless_tmpfs(dir) do
    warn_if_others_may_remove(dir)

    case Snakepit.SharedMemory.Native.fs_stat(dir) do
      {:ok, %{tmpfs: false}} ->
        require Logger

        Logger.warning(
          "snakepit_shm: shm_path #{dir} is not a tmpfs: POSIX regions there are backed by " <>
            "disk and written back; mount a tmpfs there (mount -t tmpfs -o size=2g tmpfs #{dir})"
        )

      _ ->
        :ok
    end
  end

  defp warn_if_others_may_remove(dir) do
    import Bitwise

    case File.stat(dir) do
      {:ok, %{mode: mode}} when (mode &&& 0o022) != 0 and (mode &&& 0o1000) == 0 ->
        require Logger

        Logger.warning(
          "snakepit_shm: shm_path #{dir} is writable by other users without the sticky " <>
            "bit (mode #{Integer.to_string(mode &&& 0o7777, 8)}): any of them can delete or " <>
            "rename the segments of this VM; chmod +t #{dir} (as /dev/shm, mode 1777) or " <>
            "use a directory only this user can write"
        )

      _ ->
        :ok
    end
  end

  @doc """
  Resolves a requested backend (`:auto` or a concrete one) for a region that does or
  does not `need_name?` (a well-known name or group/other permissions).
  """
  @spec resolve_backend(module(), :auto | backend(), boolean()) ::
          {:ok, backend()} | {:error, String.t()}
  def resolve_backend(platform, :auto, true) do
    case platform.named_backend() do
      nil -> {:error, "#{platform.name()} has no backend for named or shared-permission regions"}
      backend -> {:ok, backend}
    end
  end

  def resolve_backend(platform, :auto, false), do: {:ok, platform.default_backend()}

  def resolve_backend(platform, backend, need_name?) do
    cond do
      backend not in platform.backends() ->
        {:error,
         "backend #{inspect(backend)} is not available on #{platform.name()}: " <>
           "use :auto or one of #{Enum.map_join(platform.backends(), ", ", &inspect/1)}"}

      need_name? and backend != platform.named_backend() ->
        {:error,
         "backend #{inspect(backend)} cannot carry a well-known :name or group/other " <>
           "permissions (a memfd has no name: other processes reach it only through " <>
           "/proc/<pid>/fd, which the kernel restricts to the same user): use backend " <>
           "#{inspect(platform.named_backend())} or :auto"}

      true ->
        {:ok, backend}
    end
  end
end
