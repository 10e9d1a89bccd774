defmodule Snakepit.SharedMemory.MemoryLimits do
  @moduledoc """
  How much memory this VM may still use: the host's (`/proc/meminfo`) and its memory
  cgroup's (a container's limit), read from the files the kernel publishes.

  In a container the host's `MemAvailable` says nothing about the limit that matters:
  a 512 MiB allocation inside a 256 MiB memory cgroup passes a host-wide check and then
  gets the VM OOM-killed. Shared memory (POSIX segments in `/dev/shm` and memfds alike)
  is charged to the cgroup of the process that allocates it, so the allocation guard
  (`check/1`, called by the allocator) refuses what would not fit in the cgroup's
  headroom.

  Cgroups:

    * v2 (unified): the `0::<path>` line of `/proc/self/cgroup`, files `memory.max`
      (`max` = no limit) and `memory.current` under `/sys/fs/cgroup<path>` (or
      `/sys/fs/cgroup/unified<path>` on hybrid hosts);
    * v1: the line naming the `memory` controller, files `memory.limit_in_bytes` (a
      value near 2^63 means no limit) and `memory.usage_in_bytes` under
      `/sys/fs/cgroup/memory<path>`.

  The limit in force is the smallest of the group's and its ancestors'. Inside a cgroup
  namespace (most containers) the path is `/` and the files are at the mount's root;
  when the path does not exist under the mount (a container that sees the host's path
  but mounts its own group), the mount's root is used.
  """

  @type cgroup :: %{
          version: 1 | 2,
          path: String.t(),
          max: non_neg_integer() | :infinity,
          current: non_neg_integer()
        }
  @type t :: %{
          host: %{total: non_neg_integer(), available: non_neg_integer()},
          cgroup: cgroup() | nil
        }

  # v1 reports "no limit" as the largest page-aligned signed 64-bit value.
  @v1_unlimited 0x7FFF_FFFF_FFFF_0000
  # Allocations below this size are not checked (each check reads a few small files).
  @check_threshold 1_048_576

  @doc "The host's memory and this process's memory cgroup (nil if it has none)."
  @spec snapshot() :: t()
  def snapshot, do: %{host: host(), cgroup: cgroup()}

  @doc """
  `:ok` if `size` more bytes fit in the memory cgroup's headroom (limit minus usage),
  else `{:error, message}`. Sizes under 1 MiB, and processes without a limited memory
  cgroup, always pass.
  """
  @spec check(non_neg_integer()) :: :ok | {:error, String.t()}
  def check(size) when size < @check_threshold, do: :ok

  def check(size) do
    case cgroup() do
      %{max: max, current: current, path: path, version: version} when is_integer(max) ->
        headroom = max(max - current, 0)

        if size > headroom,
          do:
            {:error,
             "allocating #{size} bytes would exceed the memory cgroup's limit (cgroup v#{version} " <>
               "#{path}: #{current} of #{max} bytes in use, #{headroom} left) and get this VM " <>
               "OOM-killed: free memory in the container, raise its memory limit, or allocate less"},
          else: :ok

      _ ->
        :ok
    end
  end

  # ---- host ----

  defp host do
    case File.read("/proc/meminfo") do
      {:ok, text} ->
        %{total: meminfo(text, "MemTotal"), available: meminfo(text, "MemAvailable")}

      {:error, _} ->
        %{total: 0, available: 0}
    end
  end

  defp meminfo(text, key) do
    case Regex.run(~r/^#{key}:\s+(\d+) kB/m, text) do
      [_, kb] -> String.to_integer(kb) * 1024
      nil -> 0
    end
  end

  # ---- cgroup ----

  defp cgroup do
    with {:ok, text} <- File.read("/proc/self/cgroup") do
      lines = String.split(text, "\n", trim: true)
      v2(lines) || v1(lines)
    else
      _ -> nil
    end
  end

  defp v2(lines) do
    with "0::" <> path <- Enum.find(lines, &String.starts_with?(&1, "0::")),
         mount when is_binary(mount) <-
           Enum.find(["/sys/fs/cgroup", "/sys/fs/cgroup/unified"], &v2_memory?/1) do
      dir = group_dir(mount, path)

      %{
        version: 2,
        path: path,
        max: limit(mount, dir, "memory.max"),
        current: read_int(Path.join(dir, "memory.current")) || 0
      }
    else
      _ -> nil
    end
  end

  defp v2_memory?(mount) do
    case File.read(Path.join(mount, "cgroup.controllers")) do
      {:ok, controllers} -> "memory" in String.split(controllers)
      _ -> false
    end
  end

  defp v1(lines) do
    mount = "/sys/fs/cgroup/memory"

    with [_, path] <-
           Enum.find_value(lines, fn line ->
             case String.split(line, ":", parts: 3) do
               [_, controllers, path] ->
                 if "memory" in String.split(controllers, ","), do: [nil, path]

               _ ->
                 nil
             end
           end),
         true <- File.exists?(Path.join(mount, "memory.usage_in_bytes")) do
      dir = group_dir(mount, path)

      %{
        version: 1,
        path: path,
        max: limit(mount, dir, "memory.limit_in_bytes"),
        current: read_int(Path.join(dir, "memory.usage_in_bytes")) || 0
      }
    else
      _ -> nil
    end
  end

  defp group_dir(mount, path) do
    dir = Path.join(mount, path)
    if File.dir?(dir), do: dir, else: mount
  end

  # The smallest limit of the group and its ancestors up to the mount.
  defp limit(mount, dir, file) do
    dir
    |> ancestors(mount)
    |> Enum.map(&read_limit(Path.join(&1, file)))
    |> Enum.reduce(:infinity, fn
      :infinity, acc -> acc
      value, :infinity -> value
      value, acc -> min(value, acc)
    end)
  end

  defp ancestors(dir, mount) do
    if dir == mount or not String.starts_with?(dir, mount),
      do: [mount],
      else: [dir | ancestors(Path.dirname(dir), mount)]
  end

  defp read_limit(path) do
    case File.read(path) do
      {:ok, "max" <> _} -> :infinity
      {:ok, text} -> parse_limit(text)
      _ -> :infinity
    end
  end

  defp parse_limit(text) do
    case Integer.parse(String.trim(text)) do
      {value, ""} when value >= @v1_unlimited -> :infinity
      {value, ""} -> value
      _ -> :infinity
    end
  end

  defp read_int(path) do
    with {:ok, text} <- File.read(path),
         {value, _} <- Integer.parse(String.trim(text)) do
      value
    else
      _ -> nil
    end
  end
end
