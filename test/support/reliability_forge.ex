defmodule Snakepit.SharedMemory.ReliabilityForge do
  @moduledoc false
  # Forges POSIX segments in /dev/shm for the malformed-segment suite
  # (test/reliability/malformed_segments_test.exs), starting from the bytes of a real
  # region made by the core and patching fields at the offsets of docs/FORMAT.md.
  #
  # Every forged segment claims to come from a *dead* creator (the pid of a process that
  # has exited), so a valid one is an orphan that every sweep must remove, and a
  # malformed one is exactly what a sweep must refuse to touch.

  import Bitwise

  alias Snakepit.SharedMemory.{Native, ShmHelpers}

  @shm "/dev/shm"
  @crc_prefix 132

  @kinds [
    :valid,
    :bad_magic,
    :future_version,
    :size_beyond_file,
    :bad_crc,
    :truncated,
    :symlink,
    :foreign_owner
  ]

  @doc "Every kind of forged segment `forge/1` makes."
  def kinds, do: @kinds

  @doc "A fresh random region id."
  def random_id do
    alphabet = ~c"abcdefghijklmnopqrstuvwxyz234567"
    "spshm_" <> for(_ <- 1..20, into: "", do: <<Enum.random(alphabet)>>)
  end

  @doc """
  Bytes of a real, valid POSIX region of `data_size` bytes (header + data), made by the
  core in this VM and freed at once. Its data holds a recognisable pattern.
  """
  def template(data_size \\ 8192) do
    {:ok, region, info} =
      Native.create(data_size, ShmHelpers.create_opts(backend: :posix, metadata: ~s({"f":1})))

    {:ok, m} = Native.map(region, :read_write)
    :ok = Native.write(m, 0, :binary.copy("forged!!", div(data_size, 8)))
    :ok = Native.unmap(m)
    # Read before deallocation: the state bits are still zero, no holder is left.
    bytes = File.read!(info.control_path)
    :ok = Native.deallocate(region, false)
    bytes
  end

  @doc "The OS pid of a process that has exited (and its start time is not ours)."
  def dead_os_pid do
    {out, 0} = System.cmd("sh", ["-c", "echo $$"])
    out |> String.trim() |> String.to_integer()
  end

  # ---- field patching ----

  def put_u32(bin, offset, value),
    do: binary_part(bin, 0, offset) <> <<value::little-32>> <> tail(bin, offset + 4)

  def put_u64(bin, offset, value),
    do: binary_part(bin, 0, offset) <> <<value::little-64>> <> tail(bin, offset + 8)

  def put_bytes(bin, offset, bytes),
    do: binary_part(bin, 0, offset) <> bytes <> tail(bin, offset + byte_size(bytes))

  defp tail(bin, from), do: binary_part(bin, from, byte_size(bin) - from)

  @doc "Sets the region id field (offset 96, 32 bytes NUL padded)."
  def put_id(bin, id), do: put_bytes(bin, 96, String.pad_trailing(id, 32, <<0>>))

  @doc "Recomputes header_crc32 (offset 132): CRC-32 of [0,132) ++ metadata."
  def reseal_crc(bin) do
    <<prefix::binary-size(@crc_prefix), _::binary>> = bin
    <<length::little-32>> = binary_part(bin, 128, 4)
    metadata = binary_part(bin, 256, length)
    put_u32(bin, @crc_prefix, :erlang.crc32(prefix <> metadata))
  end

  @doc "A valid header of `id` whose creator is the dead process `dead_pid`."
  def orphan_bytes(template, id, dead_pid) do
    template |> put_id(id) |> put_u32(48, dead_pid) |> reseal_crc()
  end

  # ---- forging ----

  @doc """
  Forges one segment of `kind` in /dev/shm. Returns %{id, path, kind, extra} where
  `extra` lists other files it made (a symlink's target) for `remove/1`.
  """
  def forge(kind, template, dead_pid) do
    id = random_id()
    path = Path.join(@shm, id)
    valid = orphan_bytes(template, id, dead_pid)
    extra = write_kind(kind, path, id, valid)
    %{id: id, path: path, kind: kind, extra: extra}
  end

  defp write_kind(:valid, path, _id, valid), do: write!(path, valid)

  defp write_kind(:bad_magic, path, _id, valid),
    do: write!(path, valid |> put_bytes(0, "SPSHMXXX") |> reseal_crc())

  defp write_kind(:future_version, path, _id, valid),
    do: write!(path, valid |> put_u32(8, 2) |> reseal_crc())

  defp write_kind(:size_beyond_file, path, _id, valid) do
    big = 64 * 1024 * 1024
    write!(path, valid |> put_u64(16, big) |> put_u64(24, big) |> reseal_crc())
  end

  defp write_kind(:bad_crc, path, _id, valid) do
    <<crc::little-32>> = binary_part(valid, @crc_prefix, 4)
    write!(path, put_u32(valid, @crc_prefix, bxor(crc, 0x5A5A_5A5A)))
  end

  defp write_kind(:truncated, path, _id, valid), do: write!(path, binary_part(valid, 0, 1000))

  # A name of ours that is a symbolic link to a file that looks exactly like a valid
  # orphan: following it would find a removable segment.
  defp write_kind(:symlink, path, id, valid) do
    target = Path.join(System.tmp_dir!(), "reliability_target_" <> id)
    write!(target, valid)
    File.ln_s!(target, path)
    [target]
  end

  # A valid orphan header in a file owned by another user (nobody, 65534).
  defp write_kind(:foreign_owner, path, _id, valid) do
    write!(path, valid)
    :ok = File.chown(path, 65_534)
    :ok = File.chgrp(path, 65_534)
    []
  end

  defp write!(path, bytes) do
    File.write!(path, bytes)
    File.chmod!(path, 0o600)
    []
  end

  @doc "Sets the modification time of a forged segment `seconds` in the past."
  def age!(%{path: path}, seconds) do
    {_, 0} = System.cmd("touch", ["-h", "-d", "@#{System.os_time(:second) - seconds}", path])
    :ok
  end

  @doc "True if the forged file (or link) is still there."
  def present?(%{path: path}), do: match?({:ok, _}, File.lstat(path))

  @doc "Removes a forged segment and what it made."
  def remove(%{path: path, extra: extra}) do
    File.rm(path)
    Enum.each(extra, &File.rm/1)
  end
end
