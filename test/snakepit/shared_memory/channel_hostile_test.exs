defmodule Snakepit.SharedMemory.ChannelHostileTest do
  # A hostile worker (test/support/python/channel_hostile.py) speaks the handshake with
  # raw sockets, maps the rings and writes malformed frames and indices straight into
  # them: the channel closes with :protocol_error, the VM stays up, nothing leaks.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.ChannelHelpers

  alias Snakepit.SharedMemory.{Channel, Error, JSON, ReliabilityHelpers}

  @moduletag timeout: 300_000
  @script Path.expand("../../support/python/channel_hostile.py", __DIR__)
  @rounds if System.get_env("SNAKEPIT_SHM_SOAK") in ["1", "true"], do: 2000, else: 150

  setup do
    port =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 65_536},
        args: [@script, "attack", "7"],
        env: ReliabilityHelpers.python_env()
      ])

    assert await_line(port, 30_000) == "connected hostile"
    on_exit(fn -> if Port.info(port), do: Port.close(port) end)
    %{port: port}
  end

  defp attack(port, ch, case_name) do
    {:ok, json} = JSON.encode(Channel.export_ref(ch))
    Port.command(port, "#{case_name} #{json}\n")
    assert await_line(port, 30_000) == "done #{case_name}"
  end

  for transport <- [:shm, :socket] do
    cases =
      ~w(bad_type huge_len inline_too_big region_nofd region_unsealed) ++
        if(transport == :shm, do: ~w(head_beyond region_bad_seq), else: [])

    for case_name <- cases do
      test "#{transport}: #{case_name} closes the channel with :protocol_error", %{port: port} do
        fds = fd_count()
        {:ok, ch} = Channel.open(transport: unquote(transport), active: true, ring_size: 16_384)
        attack(port, ch, unquote(case_name))
        assert_receive {:snakepit_shm_channel_closed, ^ch, :protocol_error}, 5_000
        assert {:error, %Error{reason: :protocol_error}} = Channel.send(ch, "x")
        :ok = Channel.close(ch)
        assert await_fds(fds + 2) <= fds + 2
      end
    end
  end

  test "shm: a doorbell storm neither closes nor spins the channel",
       %{port: port} do
    {:ok, ch} = Channel.open(transport: :shm, active: true, ring_size: 16_384)
    attack(port, ch, "doorbell_storm")
    # Ringing is not a protocol error: the frame published after the storm arrives.
    assert_receive {:snakepit_shm_channel, ^ch, "after"}, 10_000
    refute_received {:snakepit_shm_channel_closed, ^ch, _}
    # The channel's process is asleep again, not looping on a doorbell nobody reads.
    Process.sleep(100)
    {:reductions, r1} = Process.info(ch.server, :reductions)
    Process.sleep(300)
    {:reductions, r2} = Process.info(ch.server, :reductions)
    assert r2 - r1 < 1_000
    assert %{state: :connected} = Channel.stats(ch)
    :ok = Channel.close(ch)
  end

  test "shm: a consumer index out of bounds fails the owner's next send", %{port: port} do
    {:ok, ch} = Channel.open(transport: :shm, ring_size: 4096, send_timeout: 0)
    attack(port, ch, "tail_beyond")

    results =
      Enum.reduce_while(1..100, nil, fn _, _ ->
        case Channel.send(ch, :binary.copy("y", 500)) do
          :ok -> {:cont, :ok}
          other -> {:halt, other}
        end
      end)

    assert {:error, %Error{reason: :protocol_error}} = results
    :ok = Channel.close(ch)
  end

  for transport <- [:shm, :socket] do
    test "#{transport}: random garbage in the ring or on the socket never crashes the VM",
         %{port: port} do
      fds = fd_count()

      verdicts =
        for _ <- 1..@rounds do
          {:ok, ch} = Channel.open(transport: unquote(transport), active: true, ring_size: 4096)
          attack(port, ch, "random")

          verdict =
            receive do
              {:snakepit_shm_channel_closed, ^ch, reason} -> reason
            after
              300 -> :still_open
            end

          :ok = Channel.close(ch)
          # Whatever it delivered before, it is gone with the channel.
          flush(ch)
          verdict
        end

      assert Enum.all?(verdicts, &(&1 in [:protocol_error, :still_open, :peer_closed]))
      assert Enum.count(verdicts, &(&1 == :protocol_error)) > div(@rounds, 2)
      assert await_fds(fds + 2) <= fds + 2
    end
  end

  defp flush(ch) do
    receive do
      {:snakepit_shm_channel, ^ch, _} -> flush(ch)
      {:snakepit_shm_channel_closed, ^ch, _} -> flush(ch)
    after
      0 -> :ok
    end
  end
end
