defmodule Snakepit.SharedMemory.CLI.ChannelScan do
  @moduledoc false
  # Message channels of this host, for `mix snakepit.shm.list` / `stats`: an offline
  # scan of /proc/*/maps for the channel's ring memfd (`memfd:snakepit-channel`), grouped by
  # inode: each channel is mapped by its owner VM and, once connected, its worker. Only
  # processes of our uid are readable. Within a VM, Channel.list/0 gives the full stats.

  alias Snakepit.SharedMemory.CLI.ProcessIdentity

  @doc "[%{inode: integer, pids: [os_pid], bytes: integer}] sorted by inode."
  @spec scan() :: [map()]
  def scan do
    for pid <- ProcessIdentity.proc_pids(),
        {inode, bytes} <- rings(pid),
        reduce: %{} do
      acc ->
        Map.update(acc, inode, %{inode: inode, pids: [pid], bytes: bytes}, fn e ->
          %{e | pids: Enum.uniq([pid | e.pids])}
        end)
    end
    |> Map.values()
    |> Enum.map(&%{&1 | pids: Enum.sort(&1.pids)})
    |> Enum.sort_by(& &1.inode)
  end

  @doc "Human lines for the table output."
  @spec lines([map()]) :: String.t()
  def lines([]), do: "channels: none"

  def lines(channels) do
    rows =
      for c <- channels do
        "  inode #{c.inode}  #{div(c.bytes, 1024)} KiB  mapped by #{Enum.join(c.pids, ", ")}"
      end

    Enum.join(["channels: #{length(channels)}" | rows], "\n")
  end

  defp rings(pid) do
    case File.read("/proc/#{pid}/maps") do
      {:ok, maps} ->
        for line <- String.split(maps, "\n"),
            String.contains?(line, "memfd:snakepit-channel "),
            [range, _perms, _off, _dev, inode | _] <- [String.split(line)],
            [from, to] <- [String.split(range, "-")],
            uniq: true do
          {String.to_integer(inode), String.to_integer(to, 16) - String.to_integer(from, 16)}
        end

      {:error, _} ->
        []
    end
  end
end
