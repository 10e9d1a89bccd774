defmodule Snakepit.SharedMemory.Incomplete do
  @moduledoc """
  Segments whose creation was cut short: a VM killed inside `Native.create/2` leaves a
  POSIX segment of ours with no header yet (the core sizes the object first and writes
  the magic last: the file is empty or its first 8 bytes are zero). Such a segment names
  no creator, so the orphan sweep cannot ask whether its creator is alive.

  The proof used instead: a creator holds the segment's descriptor from `shm_open` until
  it has finished (and nothing can attach a segment without a header), so a header-less
  segment that no process has open is one whose creator is gone. The open descriptors
  of every process are read from `/proc/*/fd` (Linux), only when such segments exist.
  A segment of another user, a symlink, or one with any non-zero magic byte (damaged
  rather than incomplete) is never touched.
  """

  require Logger

  @magic_bytes 8

  @doc """
  Removes (or, with `dry_run`, lists) the header-less segments in `dir` among `names`
  that no process has open. Returns the ids.
  """
  @spec sweep(String.t(), [String.t()], boolean()) :: [String.t()]
  def sweep(dir, names, dry_run) do
    case Enum.filter(names, &incomplete?(Path.join(dir, &1))) do
      [] ->
        []

      candidates ->
        open = open_paths()

        for name <- candidates,
            path = Path.join(dir, name),
            not MapSet.member?(open, path),
            dry_run or remove(path),
            do: name
    end
  end

  @doc "True for a regular file of our user that is empty or starts with a zero magic."
  @spec incomplete?(String.t()) :: boolean()
  def incomplete?(path) do
    with {:ok, %File.Stat{type: :regular, uid: uid, size: size}} <- File.lstat(path),
         true <- uid == own_uid() do
      size == 0 or zero_magic?(path)
    else
      _ -> false
    end
  end

  defp zero_magic?(path) do
    case File.open(path, [:read, :binary, :raw], &IO.binread(&1, @magic_bytes)) do
      {:ok, bytes} when is_binary(bytes) -> bytes == :binary.copy(<<0>>, byte_size(bytes))
      _ -> false
    end
  end

  defp own_uid do
    case File.stat("/proc/self") do
      {:ok, %File.Stat{uid: uid}} -> uid
      _ -> nil
    end
  end

  @doc "Paths every process of this machine (that we may look at) has open."
  @spec open_paths() :: MapSet.t(String.t())
  def open_paths do
    case File.ls("/proc") do
      {:ok, entries} ->
        for pid <- entries,
            pid =~ ~r/\A\d+\z/,
            fd_dir = "/proc/#{pid}/fd",
            {:ok, fds} <- [File.ls(fd_dir)],
            fd <- fds,
            {:ok, target} <- [:file.read_link_all(Path.join(fd_dir, fd))],
            into: MapSet.new(),
            do: IO.chardata_to_string(target)

      {:error, _} ->
        MapSet.new()
    end
  end

  defp remove(path) do
    case File.rm(path) do
      :ok ->
        Logger.warning(
          "snakepit_shm: removed #{path}: its creator died before writing its header"
        )

        true

      {:error, reason} ->
        Logger.warning("snakepit_shm: could not remove #{path}: #{:file.format_error(reason)}")
        false
    end
  end
end
