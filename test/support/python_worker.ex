defmodule Snakepit.SharedMemory.Test.PythonWorker do
  @moduledoc false
  # A long-lived /usr/bin/python3 process driven one line at a time (test helper):
  # each command line gets one reply line of JSON.

  alias Snakepit.SharedMemory.JSON

  defstruct [:port, :os_pid]

  @doc "Starts `script` (Python source reading commands on stdin) with python_env/0."
  def start(script, args \\ []) do
    {:ok, env} = Snakepit.SharedMemory.python_env()
    env = for {k, v} <- env, do: {String.to_charlist(k), String.to_charlist(v)}

    port =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [
        :binary,
        :exit_status,
        {:line, 1_000_000},
        args: ["-u", "-c", script | args],
        env: [{~c"PYTHONDONTWRITEBYTECODE", ~c"1"} | env]
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    %__MODULE__{port: port, os_pid: os_pid}
  end

  @doc "Sends one line and returns the decoded JSON reply."
  def ask(%__MODULE__{port: port}, line, timeout \\ 60_000) do
    Port.command(port, line <> "\n")
    reply(port, "", timeout)
  end

  defp reply(port, acc, timeout) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        case JSON.decode(acc <> line) do
          {:ok, value} -> value
          _ -> reply(port, "", timeout)
        end

      {^port, {:data, {:noeol, part}}} ->
        reply(port, acc <> part, timeout)

      {^port, {:exit_status, status}} ->
        raise "python worker exited with status #{status}"
    after
      timeout -> raise "python worker did not answer within #{timeout} ms"
    end
  end

  @doc "kill -9 the worker and wait for its port to close."
  def kill9(%__MODULE__{port: port, os_pid: os_pid}) do
    System.cmd("kill", ["-9", Integer.to_string(os_pid)])

    receive do
      {^port, {:exit_status, _}} -> :ok
    after
      30_000 -> raise "python worker #{os_pid} did not die"
    end
  end

  @doc "Closes stdin and waits for a clean exit."
  def stop(%__MODULE__{port: port}) do
    if Port.info(port) != nil do
      Port.close(port)
    end

    :ok
  end
end
