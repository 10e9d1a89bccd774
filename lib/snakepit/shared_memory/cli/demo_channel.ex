defmodule Snakepit.SharedMemory.CLI.DemoChannel do
  @moduledoc false
  # The channel step of `mix snakepit.shm.demo`: a few thousand 64-byte round trips
  # between this VM and a Python worker over Snakepit.SharedMemory.Channel, next to the
  # same round trips over an Erlang Port ({packet, 4}) to the same Python interpreter.

  alias Snakepit.SharedMemory.{Channel, JSON}

  @rounds 3_000
  @size 64

  @channel_worker ~S"""
  import json, os, snakepit_shm
  with snakepit_shm.Channel.connect(json.loads(os.environ["SPSHM_CHANNEL_REF"])) as ch:
      try:
          while True:
              ch.send(ch.recv())
      except snakepit_shm.ChannelClosed:
          pass
  """

  @port_worker ~S"""
  import os, struct, sys
  r, w = sys.stdin.buffer, sys.stdout.buffer
  while True:
      h = r.read(4)
      if len(h) < 4:
          break
      body = r.read(struct.unpack(">I", h)[0])
      w.write(h + body)
      w.flush()
  """

  @doc "Runs the round trips; `{:ok, report}` or `{:error, message}`."
  @spec run(String.t(), String.t(), (String.t() -> any())) :: {:ok, map()} | {:error, String.t()}
  def run(python, priv, say) do
    env = [
      {~c"PYTHONPATH", String.to_charlist(Path.join(priv, "python"))},
      {~c"SNAKEPIT_SHM_LIB", String.to_charlist(Path.join(priv, "libsnakepit_shm.so"))}
    ]

    msg = :binary.copy(<<42>>, @size)

    with {:ok, channel_us, stats} <- channel_rtts(python, env, msg),
         {:ok, port_us} <- port_rtts(python, env, msg) do
      say.("""

      8b. Message channel (Snakepit.SharedMemory.Channel: two rings in a sealed memfd,
          eventfd doorbells, a Unix socket for the handshake and peer death), #{@rounds}
          round trips of #{@size} bytes with a Python worker:
            channel (#{stats.transport})            median #{fmt(median(channel_us))} µs, p99 #{fmt(p99(channel_us))} µs
            Erlang Port ({packet, 4})     median #{fmt(median(port_us))} µs, p99 #{fmt(p99(port_us))} µs
          doorbells rung: #{stats.doorbells_rung} for #{stats.messages_sent + stats.messages_received} messages
      """)

      {:ok,
       %{
         rounds: @rounds,
         channel_median_us: median(channel_us),
         port_median_us: median(port_us),
         transport: stats.transport
       }}
    end
  end

  defp channel_rtts(python, env, msg) do
    {:ok, ch} = Channel.open(active: true)
    {:ok, json} = JSON.encode(Channel.export_ref(ch))

    port =
      Port.open({:spawn_executable, python}, [
        :binary,
        :exit_status,
        args: ["-c", @channel_worker],
        env: [{~c"SPSHM_CHANNEL_REF", String.to_charlist(json)} | env]
      ])

    try do
      times = for _ <- 1..@rounds, do: rtt(fn -> channel_echo(ch, msg) end)
      {:ok, times, Channel.stats(ch)}
    catch
      :throw, {:demo, message} -> {:error, message}
    after
      Channel.close(ch)

      receive do
        {^port, {:exit_status, _}} -> :ok
      after
        5_000 -> :ok
      end
    end
  end

  defp channel_echo(ch, msg) do
    :ok = Channel.send(ch, msg)

    receive do
      {:snakepit_shm_channel, ^ch, ^msg} -> :ok
      {:snakepit_shm_channel_closed, ^ch, reason} -> throw({:demo, "channel closed: #{reason}"})
    after
      10_000 -> throw({:demo, "the channel worker did not answer"})
    end
  end

  defp port_rtts(python, env, msg) do
    port =
      Port.open({:spawn_executable, python}, [
        :binary,
        {:packet, 4},
        :exit_status,
        args: ["-c", @port_worker],
        env: env
      ])

    try do
      times =
        for _ <- 1..@rounds do
          rtt(fn ->
            Port.command(port, msg)

            receive do
              {^port, {:data, ^msg}} -> :ok
            after
              10_000 -> throw({:demo, "the Port worker did not answer"})
            end
          end)
        end

      {:ok, times}
    catch
      :throw, {:demo, message} -> {:error, message}
    after
      Port.close(port)
    end
  end

  defp rtt(fun) do
    t0 = System.monotonic_time(:nanosecond)
    fun.()
    (System.monotonic_time(:nanosecond) - t0) / 1000
  end

  defp median(list), do: list |> Enum.sort() |> Enum.at(div(length(list), 2))
  defp p99(list), do: list |> Enum.sort() |> Enum.at(div(length(list) * 99, 100))
  defp fmt(us), do: :erlang.float_to_binary(us * 1.0, decimals: 1)
end
