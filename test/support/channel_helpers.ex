defmodule Snakepit.SharedMemory.ChannelHelpers do
  @moduledoc false
  # Workers and leak checks of the channel tests (test/snakepit/shared_memory/channel_*).

  alias Snakepit.SharedMemory.{Channel, JSON, ReliabilityHelpers}

  @root Path.expand("../..", __DIR__)
  @worker Path.join(@root, "test/support/python/channel_worker.py")
  @hostile Path.join(@root, "test/support/python/channel_hostile.py")

  @doc "Starts test/support/python/channel_worker.py MODE ARGS on `ch`; waits until connected."
  def start_worker(ch, mode, args \\ [], script \\ @worker) do
    {:ok, json} = JSON.encode(Channel.export_ref(ch))
    env = [{~c"SPSHM_CHANNEL_REF", String.to_charlist(json)} | ReliabilityHelpers.python_env()]

    port =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 65_536},
        args: [script, mode | Enum.map(args, &to_string/1)],
        env: env
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    line = await_line(port, 30_000)
    unless String.starts_with?(line, "connected"), do: raise("worker said: #{line}")
    %{port: port, os_pid: os_pid, transport: String.trim_leading(line, "connected ")}
  end

  def start_hostile(ch, mode), do: start_worker(ch, mode, [], @hostile)

  @doc "The next line the worker printed."
  def await_line(port, timeout \\ 10_000) do
    receive do
      {^port, {:data, {:eol, line}}} -> line
      {^port, {:exit_status, status}} -> "exit #{status}"
    after
      timeout -> raise "no line from the worker within #{timeout} ms"
    end
  end

  @doc "Waits for the worker to exit; its remaining output."
  def await_exit(port, timeout \\ 10_000, acc \\ []) do
    receive do
      {^port, {:data, {:eol, line}}} -> await_exit(port, timeout, [line | acc])
      {^port, {:exit_status, status}} -> {status, Enum.reverse(acc)}
    after
      timeout -> raise "the worker did not exit within #{timeout} ms: #{inspect(acc)}"
    end
  end

  @doc "Open file descriptors of this VM."
  def fd_count, do: length(File.ls!("/proc/self/fd"))

  @doc "Waits until fd_count/0 is at most `expected` (resources are freed by GC / stop callbacks)."
  def await_fds(expected, deadline_ms \\ 30_000),
    do: await_count(&fd_count/0, expected, deadline_ms)

  @doc """
  Waits until at most `expected` channel memfds are left (channel_memfds/0): the
  mappings go when the channel's resources are collected, after its processes end.
  Returns the last count (returns at once when it is reached).
  """
  def await_channel_memfds(expected, deadline_ms \\ 30_000),
    do: await_count(&channel_memfds/0, expected, deadline_ms)

  # Collects this process's garbage and reads `count` until it is at most `expected` or
  # the deadline passed; returns the last count.
  defp await_count(count, expected, deadline_ms) do
    deadline = System.monotonic_time(:millisecond) + deadline_ms
    do_await_count(count, expected, deadline)
  end

  defp do_await_count(count, expected, deadline) do
    :erlang.garbage_collect()
    n = count.()

    cond do
      n <= expected -> n
      System.monotonic_time(:millisecond) > deadline -> n
      true -> Process.sleep(20) && do_await_count(count, expected, deadline)
    end
  end

  @doc "Memfds of the channel (rings and messages) this VM still has open or mapped."
  def channel_memfds do
    maps = File.read!("/proc/self/maps")
    Regex.scan(~r/memfd:snakepit-channel\S*/, maps) |> length()
  end

  def kill9(os_pid), do: System.cmd("kill", ["-9", to_string(os_pid)])
end
