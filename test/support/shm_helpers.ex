defmodule Snakepit.SharedMemory.ShmHelpers do
  @moduledoc false
  # Helpers shared by the ExUnit suites. Keep it small: add a function, never change one.

  @shm_dir "/dev/shm"

  @doc "Names of every segment of ours (spshm_*) in /dev/shm."
  @spec our_segments() :: [String.t()]
  def our_segments do
    case File.ls(@shm_dir) do
      {:ok, names} -> names |> Enum.filter(&String.starts_with?(&1, "spshm_")) |> Enum.sort()
      {:error, _} -> []
    end
  end

  @doc """
  Segments in /dev/shm created by the OS process `os_pid` (this VM by default), read from
  their headers: unlike our_segments/0 it ignores other VMs running on the same machine.
  """
  @spec segments_created_by(non_neg_integer()) :: [String.t()]
  def segments_created_by(os_pid \\ String.to_integer(System.pid())) do
    for name <- our_segments(),
        {:ok, %{creator_pid: ^os_pid}} <-
          [Snakepit.SharedMemory.Native.inspect_path(Path.join(@shm_dir, name))],
        do: name
  end

  @doc "Targets of this VM's descriptors whose link matches `pattern` (e.g. \"memfd:spshm_\")."
  @spec own_fds(String.t()) :: [String.t()]
  def own_fds(pattern) do
    dir = "/proc/self/fd"

    case File.ls(dir) do
      {:ok, fds} ->
        for fd <- fds,
            {:ok, target} <- [:file.read_link(Path.join(dir, fd))],
            target = List.to_string(target),
            String.contains?(target, pattern),
            do: target

      {:error, _} ->
        []
    end
  end

  @doc "A complete option map for Native.create/2, with `overrides` merged in."
  @spec create_opts(map()) :: map()
  def create_opts(overrides \\ %{}) do
    Map.merge(
      %{
        backend: :memfd,
        name: nil,
        open_mode: :create,
        mode: 0o600,
        security_level: 0,
        encrypted: false,
        lock_memory: false,
        metadata: "{}",
        idle_timeout_ms: 0
      },
      Map.new(overrides)
    )
  end

  @doc "A well-known region name unique to this VM run: [a-z0-9_], at most 21 chars."
  @spec unique_name(String.t()) :: String.t()
  def unique_name(prefix \\ "t") do
    "#{prefix}_#{System.unique_integer([:positive])}_#{System.pid()}" |> String.slice(0, 21)
  end

  @doc "Polls `fun` every 10 ms until it returns a truthy value or `timeout_ms` passes."
  @spec wait_until((() -> term()), non_neg_integer()) :: term()
  def wait_until(fun, timeout_ms \\ 2_000) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    do_wait_until(fun, deadline)
  end

  defp do_wait_until(fun, deadline) do
    case fun.() do
      result when result not in [nil, false] ->
        result

      _ ->
        if System.monotonic_time(:millisecond) >= deadline do
          false
        else
          Process.sleep(10)
          do_wait_until(fun, deadline)
        end
    end
  end

  @doc "Debian's Python (with numpy); the `python3` on PATH may be another build."
  @spec python() :: String.t()
  def python, do: "/usr/bin/python3"
end
