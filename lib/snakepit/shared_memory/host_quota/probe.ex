defmodule Snakepit.SharedMemory.HostQuota.Probe do
  @moduledoc """
  One short session to read the server's state without joining the election: connect
  to `quota.sock`, HELLO, USAGE, close. For tools (`mix snakepit.shm.quota`): it never
  starts a server, so looking cannot change who serves.
  """

  alias Snakepit.SharedMemory.Error
  alias Snakepit.SharedMemory.HostQuota.{Protocol, RuntimeDir}

  @timeout 5_000

  @doc """
  Asks the server of `dir` (nil: the default directory) for the usage of `name` (nil:
  every quota). Returns the quotas and the server's OS pid and label.
  """
  @spec usage(String.t() | nil, String.t() | nil) ::
          {:ok,
           %{
             quotas: [Protocol.quota_usage()],
             server_os_pid: non_neg_integer(),
             server: String.t(),
             dir: String.t()
           }}
          | {:error, Error.t()}
  def usage(dir, name) do
    path_dir = dir || RuntimeDir.default_dir()
    path = RuntimeDir.socket_path(path_dir)
    opts = [:binary, packet: 4, packet_size: Protocol.max_frame(), active: false]

    with :ok <- RuntimeDir.verify(path_dir),
         {:ok, socket} <- connect(path, opts) do
      try do
        hello = Protocol.encode_request({:hello, 0, os_pid(), :other, "mix snakepit.shm.quota"})

        # A send fails when the server hung up first (killed, or closing the session).
        with :ok <- send_request(socket, hello),
             :ok <- send_request(socket, Protocol.encode_request({:usage, 1, name})),
             {:ok, {:welcome, server_pid, label}} <- recv(socket),
             {:ok, {:usage, 1, quotas}} <- recv(socket) do
          {:ok, %{quotas: quotas, server_os_pid: server_pid, server: label, dir: path_dir}}
        else
          {:error, %Error{}} = error -> error
          other -> Error.error(:io_error, "unexpected answer from #{path}: #{inspect(other)}")
        end
      after
        :gen_tcp.close(socket)
      end
    end
  end

  defp connect(path, opts) do
    case :gen_tcp.connect({:local, path}, 0, opts, @timeout) do
      {:ok, socket} ->
        {:ok, socket}

      {:error, reason} ->
        Error.error(
          :unavailable,
          "no host quota server at #{path} (#{reason}): no VM configured for host quotas " <>
            "is running as this user, or it uses another directory (--dir, " <>
            "SNAKEPIT_SHM_QUOTA_DIR)"
        )
    end
  end

  defp send_request(socket, data) do
    case :gen_tcp.send(socket, data) do
      :ok ->
        :ok

      {:error, reason} ->
        Error.error(:unavailable, "the quota server hung up: #{inspect(reason)}")
    end
  end

  defp recv(socket) do
    case :gen_tcp.recv(socket, 0, @timeout) do
      {:ok, data} ->
        case Protocol.decode_reply(data) do
          {:ok, reply} -> {:ok, reply}
          {:error, why} -> Error.error(:io_error, "bad answer from the quota server: #{why}")
        end

      {:error, reason} ->
        Error.error(:unavailable, "the quota server did not answer: #{inspect(reason)}")
    end
  end

  defp os_pid, do: String.to_integer(System.pid())
end
