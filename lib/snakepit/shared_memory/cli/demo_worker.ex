defmodule Snakepit.SharedMemory.CLI.DemoWorker do
  @moduledoc false
  # The persistent Python worker of the demo (priv/python/demo_worker.py) behind an
  # Erlang Port: stdio, {packet, 4}. Requests start with "J" (a JSON command) or "B"
  # (raw bytes: the Port baseline). Every request gets one JSON reply.

  alias Snakepit.SharedMemory.JSON

  @reply_timeout 120_000

  defstruct [:port, :os_pid, :command]

  @type t :: %__MODULE__{port: port(), os_pid: pos_integer(), command: String.t()}

  @doc """
  Starts `python` on the worker script with PYTHONPATH=priv/python and
  SNAKEPIT_SHM_LIB=priv/libsnakepit_shm.so.
  """
  @spec start(String.t(), String.t()) :: {:ok, t()} | {:error, String.t()}
  def start(python, priv) do
    script = Path.join([priv, "python", "demo_worker.py"])
    library = Path.join(priv, "libsnakepit_shm.so")

    cond do
      not File.exists?(python) ->
        {:error, "#{python} not found: install python3 and python3-numpy (make deps)"}

      not File.exists?(script) ->
        {:error, "#{script} is missing"}

      not File.exists?(library) ->
        {:error, "#{library} is missing: run `mix compile` first"}

      true ->
        env = [
          {~c"PYTHONPATH", String.to_charlist(Path.join(priv, "python"))},
          {~c"SNAKEPIT_SHM_LIB", String.to_charlist(library)},
          {~c"PYTHONDONTWRITEBYTECODE", ~c"1"}
        ]

        port =
          Port.open({:spawn_executable, python}, [
            :binary,
            :exit_status,
            {:packet, 4},
            {:args, [script]},
            {:env, env}
          ])

        {:os_pid, os_pid} = Port.info(port, :os_pid)

        {:ok,
         %__MODULE__{
           port: port,
           os_pid: os_pid,
           command: "#{python} #{Path.relative_to_cwd(script)}"
         }}
    end
  end

  @doc "Sends a JSON command and waits for its reply (a map with string keys)."
  @spec request(t(), map()) :: {:ok, map()} | {:error, String.t()}
  def request(%__MODULE__{port: port} = worker, command) do
    {:ok, json} = JSON.encode(command)
    send_and_wait(worker, fn -> Port.command(port, ["J", json]) end)
  end

  @doc "Sends raw bytes through the Port itself (the baseline) and waits for the reply."
  @spec send_bytes(t(), iodata()) :: {:ok, map()} | {:error, String.t()}
  def send_bytes(%__MODULE__{port: port} = worker, bytes) do
    send_and_wait(worker, fn -> Port.command(port, ["B", bytes]) end)
  end

  defp send_and_wait(%__MODULE__{port: port}, send_fun) do
    try do
      send_fun.()
      await_reply(port)
    rescue
      ArgumentError -> {:error, "the Python worker is gone (its port is closed)"}
    end
  end

  defp await_reply(port) do
    receive do
      {^port, {:data, data}} ->
        case JSON.decode(data) do
          {:ok, %{"ok" => true} = reply} -> {:ok, reply}
          {:ok, %{"error" => message}} -> {:error, "the worker says: #{message}"}
          {:ok, other} -> {:error, "unexpected reply from the worker: #{inspect(other)}"}
          {:error, error} -> {:error, "unreadable reply from the worker: #{error.message}"}
        end

      {^port, {:exit_status, status}} ->
        {:error, "the Python worker exited with status #{status} (its error is printed above)"}
    after
      @reply_timeout ->
        {:error, "the Python worker did not answer within #{div(@reply_timeout, 1000)} s"}
    end
  end

  @doc "Asks the worker to quit and waits for its exit (killing it if it hangs)."
  @spec stop(t()) :: :ok
  def stop(%__MODULE__{port: port} = worker) do
    if Port.info(port) != nil do
      _ = request(worker, %{op: "quit"})

      receive do
        {^port, {:exit_status, _}} -> :ok
      after
        5_000 ->
          # Still running: it is our child and its port is open, so the pid is its own.
          System.cmd("kill", ["-9", Integer.to_string(worker.os_pid)], stderr_to_stdout: true)
          if Port.info(port) != nil, do: Port.close(port)
      end
    end

    :ok
  end
end
