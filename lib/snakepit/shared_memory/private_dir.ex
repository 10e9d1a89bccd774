defmodule Snakepit.SharedMemory.PrivateDir do
  @moduledoc """
  Private directories of one OS user (the host quota's runtime directory, the presence
  directory of `Snakepit.SharedMemory.Peers`): created with mode 0700, and an existing
  one used only if it is a real directory (never a symlink) owned by the expected uid
  with no group or other permission bits. Anything else is refused with the reason,
  because a directory someone else controls would let them impersonate what listens
  there. Callers add their own context to the reason.
  """

  import Bitwise

  @doc "Creates `path` with mode 0700 unless it exists; `{:error, why}` otherwise."
  @spec make(String.t()) :: :ok | {:error, String.t()}
  def make(path) do
    case File.mkdir(path) do
      :ok ->
        # mkdir honours the umask; the mode is set explicitly, then verified.
        case File.chmod(path, 0o700) do
          :ok -> :ok
          {:error, errno} -> {:error, "cannot set its mode to 0700 (#{errno})"}
        end

      {:error, :eexist} ->
        :ok

      {:error, :enoent} ->
        {:error, "its parent directory does not exist"}

      {:error, errno} ->
        {:error, "cannot create it (#{:file.format_error(errno)})"}
    end
  end

  @doc """
  Verifies that `path` is a directory (not a symlink) owned by `uid` with mode bits only
  for the owner; `{:error, why}` otherwise.
  """
  @spec verify(String.t(), non_neg_integer()) :: :ok | {:error, String.t()}
  def verify(path, uid) do
    case File.lstat(path) do
      {:ok, %File.Stat{type: :directory, uid: ^uid, mode: mode}} when (mode &&& 0o077) == 0 ->
        :ok

      {:ok, %File.Stat{type: :directory, uid: ^uid, mode: mode}} ->
        {:error,
         "it has group/other permissions (mode #{octal(mode &&& 0o777)}); " <>
           "chmod 700 it, or remove it"}

      {:ok, %File.Stat{type: :directory, uid: other}} ->
        {:error, "it is owned by uid #{other}, not by this user (uid #{uid})"}

      {:ok, %File.Stat{type: type}} ->
        {:error, "it is a #{type}, not a directory"}

      {:error, errno} ->
        {:error, "cannot stat it (#{:file.format_error(errno)})"}
    end
  end

  defp octal(n), do: "0" <> Integer.to_string(n, 8)
end
