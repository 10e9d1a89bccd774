defmodule Snakepit.SharedMemory.MemoryLimits do
  @moduledoc """
  How much memory this VM may still use: the host's (`/proc/meminfo`) and that of the
  memory cgroup it runs in (a container's limit).

    * cgroup v2: `memory.max` and `memory.current` of the VM's cgroup (from
      `/proc/self/cgroup`, line `0::/path`) or of the ancestor with the tightest limit;
    * cgroup v1: `memory.limit_in_bytes` and `memory.usage_in_bytes` of the `memory`
      hierarchy (a v1 "no limit" of about 2^63 reads as `:infinity`).

  Mount points come from `/proc/self/mountinfo` (normally `/sys/fs/cgroup` for v2 and
  `/sys/fs/cgroup/memory` for v1), found once. Only files are read, no process is asked.
  A check reads the limit and usage files of the cgroup and its ancestors, all in one
  dirty I/O NIF call (`Native.read_small_files/1`; `File.read/1` took three dirty calls
  per file through Erlang's file server, ~100 µs per file on a 2-vCPU VM whose dirty
  schedulers sleep), except when the last check found no limit anywhere: then no file
  is read for a second, so a limit set on a running container applies within 1 s.

  Shared memory (POSIX segments and memfds alike) is charged to the cgroup of the process
  that allocates it, and in a container the host's `MemAvailable` says nothing about the
  limit that matters: a 512 MiB allocation inside a 256 MiB memory cgroup passes a
  host-wide check and then gets the VM OOM-killed. So the allocation guard (`check/1`,
  called by the allocator) refuses what would not fit in the cgroup's headroom.
  """

  import Bitwise

  @type cgroup :: %{
          version: 1 | 2,
          path: String.t(),
          max: non_neg_integer() | :infinity,
          current: non_neg_integer()
        }
  @type snapshot :: %{
          host: %{total: non_neg_integer(), available: non_neg_integer()},
          cgroup: nil | cgroup()
        }

  # Allocations below this size are not checked (each check reads a few small files).
  @check_threshold 1_048_576

  # How long "no memory limit" is believed without reading the limit files again.
  @unlimited_ttl_ms 1_000

  # v1 reports "unlimited" as PAGE_COUNTER_MAX pages: anything this large is no limit.
  @unlimited 1 <<< 62

  @doc "The host's memory and the VM's memory cgroup (nil when there is none or no limit file)."
  @spec snapshot() :: snapshot()
  def snapshot, do: %{host: host(), cgroup: cgroup()}

  @doc """
  `:ok` if `size` more bytes fit in the memory cgroup's headroom (limit minus usage, of
  the group or ancestor that leaves the least), else `{:error, message}`. Sizes under
  1 MiB, and processes without a limited memory cgroup, always pass.
  """
  @spec check(non_neg_integer()) :: :ok | {:error, String.t()}
  def check(size) when size < @check_threshold, do: :ok

  def check(size) do
    if unlimited_recently?(), do: :ok, else: check_headroom(size)
  end

  defp check_headroom(size) do
    case current_cgroup() do
      %{max: max, current: current, path: path, version: version} when is_integer(max) ->
        headroom = max(max - current, 0)

        if size > headroom,
          do:
            {:error,
             "allocating #{size} bytes would exceed the memory cgroup's limit (cgroup v#{version} " <>
               "#{path}: #{current} of #{max} bytes in use, #{headroom} left) and get this VM " <>
               "OOM-killed: free memory in the container, raise its memory limit, or allocate less"},
          else: :ok

      cgroup ->
        # No limit anywhere up the hierarchy (or no memory cgroup): nothing to read again
        # for a while. A limit set later (docker update --memory) applies within 1 s.
        if cgroup == nil or cgroup.max == :infinity, do: unlimited_for(@unlimited_ttl_ms)
        :ok
    end
  end

  # The deadline (monotonic ms) until which the VM is known to have no memory limit, in
  # an atomic: updating it costs no global GC (as a persistent_term value would).
  defp deadline_atomic do
    key = {__MODULE__, :unlimited_until}

    case :persistent_term.get(key, nil) do
      nil ->
        ref = :atomics.new(1, signed: true)
        :atomics.put(ref, 1, -(1 <<< 62))
        # Two processes racing here each put an atomic; the last one stays (harmless).
        :persistent_term.put(key, ref)
        ref

      ref ->
        ref
    end
  end

  defp unlimited_recently?,
    do: :atomics.get(deadline_atomic(), 1) > System.monotonic_time(:millisecond)

  defp unlimited_for(ms),
    do: :atomics.put(deadline_atomic(), 1, System.monotonic_time(:millisecond) + ms)

  @doc "MemTotal and MemAvailable of `/proc/meminfo`, in bytes (0 when unreadable)."
  @spec host() :: %{total: non_neg_integer(), available: non_neg_integer()}
  def host do
    case File.read("/proc/meminfo") do
      {:ok, text} -> %{total: meminfo(text, "MemTotal"), available: meminfo(text, "MemAvailable")}
      {:error, _} -> %{total: 0, available: 0}
    end
  end

  defp meminfo(text, key) do
    case Regex.run(~r/^#{key}:\s+(\d+)/m, text) do
      [_, kib] -> String.to_integer(kib) * 1024
      nil -> 0
    end
  end

  @doc """
  The memory cgroup of `pid_dir` (default `/proc/self`): v1 if the `memory` controller
  is mounted as a v1 hierarchy, else v2; nil if neither has a readable limit.
  """
  @spec cgroup(String.t()) :: cgroup() | nil
  def cgroup(pid_dir \\ "/proc/self"), do: pid_dir |> discover() |> read_limits()

  # The allocation guard's cgroup: where this VM's limit files are is found once (from
  # /proc/self/cgroup and /proc/self/mountinfo, ~100 us of parsing) and kept; only the
  # two or so limit files are read per check. Found again when they cannot be read (the
  # VM was moved to another cgroup, or the hierarchy was remounted).
  defp current_cgroup do
    key = {__MODULE__, :limit_files}

    case :persistent_term.get(key, :unknown) do
      :unknown ->
        rediscover(key)

      # No memory cgroup with a limit file (none mounted, or not readable here).
      nil ->
        nil

      found ->
        case read_limits(found) do
          nil -> rediscover(key)
          cgroup -> cgroup
        end
    end
  end

  defp rediscover(key) do
    found = discover("/proc/self")
    # persistent_term: replacing a value costs a global GC, so only when it changed.
    if :persistent_term.get(key, :unknown) != found, do: :persistent_term.put(key, found)
    read_limits(found)
  end

  # Where the memory cgroup's limit files are: {:v1, dir}, {:v2, [own dir | ancestors]}
  # or nil.
  defp discover(pid_dir) do
    with {:ok, lines} <- read_lines(Path.join(pid_dir, "cgroup")),
         {:ok, mounts} <- read_lines(Path.join(pid_dir, "mountinfo")) do
      v1_dir(lines, mounts) || v2_dirs(lines, mounts)
    else
      _ -> nil
    end
  end

  defp read_limits(nil), do: nil

  defp read_limits({:v1, dir}) do
    case read_values([
           Path.join(dir, "memory.limit_in_bytes"),
           Path.join(dir, "memory.usage_in_bytes")
         ]) do
      [{:ok, max}, {:ok, current}] -> %{version: 1, path: dir, max: max, current: current}
      _ -> nil
    end
  end

  defp read_limits({:v2, dirs}) do
    values =
      dirs
      |> Enum.flat_map(&[Path.join(&1, "memory.max"), Path.join(&1, "memory.current")])
      |> read_values()
      |> Enum.chunk_every(2)

    dirs
    |> Enum.zip(values)
    |> Enum.flat_map(fn
      {dir, [{:ok, max}, {:ok, current}]} ->
        [%{version: 2, path: dir, max: max, current: current}]

      _ ->
        []
    end)
    |> tightest()
  end

  defp read_lines(path) do
    case File.read(path) do
      {:ok, text} -> {:ok, String.split(text, "\n", trim: true)}
      error -> error
    end
  end

  # "4:memory:/docker/abc" (or "4:cpu,memory:/x")
  defp v1_dir(lines, mounts) do
    with path when is_binary(path) <-
           Enum.find_value(lines, fn line ->
             case String.split(line, ":", parts: 3) do
               [_, controllers, path] ->
                 if "memory" in String.split(controllers, ","), do: path

               _ ->
                 nil
             end
           end),
         {root, mount} <- mount_point(mounts, "cgroup", &("memory" in String.split(&1, ","))) do
      dir = Path.join(mount, relative(path, root))
      # Without a readable limit file the v1 hierarchy does not count: try v2.
      if read_limits({:v1, dir}), do: {:v1, dir}
    else
      _ -> nil
    end
  end

  # "0::/user.slice/..." ; the tightest memory.max from the cgroup up to the mount root.
  defp v2_dirs(lines, mounts) do
    with path when is_binary(path) <-
           Enum.find_value(lines, fn line ->
             case String.split(line, ":", parts: 3) do
               ["0", "", path] -> path
               _ -> nil
             end
           end),
         {root, mount} <- mount_point(mounts, "cgroup2", fn _ -> true end) do
      own = Path.join(mount, relative(path, root))
      {:v2, ancestors(own, mount)}
    else
      _ -> nil
    end
  end

  defp ancestors(dir, mount) do
    if dir == mount or not String.starts_with?(dir, mount),
      do: [mount],
      else: [dir | ancestors(Path.dirname(dir), mount)]
  end

  # The cgroup that leaves the least headroom (its own if no ancestor limits more).
  defp tightest([]), do: nil

  defp tightest([own | _] = all) do
    limited = Enum.filter(all, &(&1.max != :infinity))

    if limited == [],
      do: own,
      else: Enum.min_by(limited, &(&1.max - &1.current))
  end

  defp relative(path, "/"), do: String.trim_leading(path, "/")

  defp relative(path, root) do
    # Inside a cgroup namespace the path may already be relative to the mount's root.
    if String.starts_with?(path, root),
      do: path |> String.replace_prefix(root, "") |> String.trim_leading("/"),
      else: String.trim_leading(path, "/")
  end

  # mountinfo: "id parent maj:min root mount_point opts - fstype source super_opts"
  defp mount_point(mounts, fstype, super_ok?) do
    Enum.find_value(mounts, fn line ->
      case String.split(line, " - ", parts: 2) do
        [left, right] ->
          case {String.split(left, " "), String.split(right, " ")} do
            {[_, _, _, root, mount | _], [^fstype, _source, super | _]} ->
              if super_ok?.(super), do: {unescape(root), unescape(mount)}

            _ ->
              nil
          end

        _ ->
          nil
      end
    end)
  end

  defp unescape(text), do: String.replace(text, "\\040", " ")

  defp read_values(paths), do: paths |> read_files() |> Enum.map(&parse_value/1)

  # One dirty NIF call for all of them; File.read/1 where the NIF is not loaded (or
  # refuses the list: more than 64 files).
  defp read_files(paths) do
    Snakepit.SharedMemory.Native.read_small_files(paths)
  rescue
    _ in [ErlangError, ArgumentError, UndefinedFunctionError] ->
      Enum.map(paths, fn path ->
        case File.read(path) do
          {:ok, text} -> text
          {:error, _} -> :error
        end
      end)
  end

  defp parse_value(:error), do: :error

  defp parse_value(text) do
    case String.trim(text) do
      "max" ->
        {:ok, :infinity}

      digits ->
        case Integer.parse(digits) do
          {n, ""} when n >= @unlimited -> {:ok, :infinity}
          {n, ""} -> {:ok, n}
          _ -> :error
        end
    end
  end
end
