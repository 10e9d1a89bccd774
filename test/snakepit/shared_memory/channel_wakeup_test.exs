defmodule Snakepit.SharedMemory.ChannelWakeupTest do
  # How the owner's side of a channel wakes up (docs/CHANNEL.md, "Elixir side"): the
  # doorbell read by an fd port of the channel's process, the brief spin after the last
  # message (:spin), and what happens to them when the channel's process dies.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.ChannelHelpers

  alias Snakepit.SharedMemory.{Channel, Error}

  @moduletag timeout: 120_000

  defp doorbell_ports(ch) do
    {:links, links} = Process.info(ch.server, :links)
    Enum.filter(links, &is_port/1)
  end

  test ":spin is validated" do
    assert {:error, %Error{reason: :invalid_option}} = Channel.open(spin: -1)
    assert {:error, %Error{reason: :invalid_option}} = Channel.open(spin: :fast)
    {:ok, ch} = Channel.open(spin: 0)
    :ok = Channel.close(ch)
  end

  test "shared memory: the doorbell is one fd port of the channel's process; socket: none" do
    {:ok, shm} = Channel.open(transport: :shm)
    {:ok, sock} = Channel.open(transport: :socket)
    assert [port] = doorbell_ports(shm)
    assert Port.info(port, :name) != nil
    assert doorbell_ports(sock) == []
    :ok = Channel.close(shm)
    :ok = Channel.close(sock)
    # closed with the channel, before close/1 returned
    assert Port.info(port) == nil
  end

  for spin <- [0, 50] do
    test "active stream with spin: #{spin}: order, content, every message delivered once" do
      fds_before = fd_count()
      {:ok, ch} = Channel.open(transport: :shm, active: true, spin: unquote(spin))
      w = start_worker(ch, "echo")

      # bursts (a full batch answers :spin) and lone round trips (the spin window, then
      # the announced sleep and the doorbell)
      for round <- 1..200 do
        n = if rem(round, 10) == 0, do: 150, else: 1

        msgs =
          for i <- 1..n, do: <<round::32, i::32, :crypto.strong_rand_bytes(rem(i, 97))::binary>>

        for m <- msgs, do: :ok = Channel.send(ch, m)

        for m <- msgs do
          assert_receive {:snakepit_shm_channel, ^ch, ^m}, 10_000
        end

        if rem(round, 50) == 0, do: Process.sleep(20)
      end

      refute_received {:snakepit_shm_channel, ^ch, _}
      stats = Channel.stats(ch)
      assert stats.messages_received == stats.messages_sent
      :ok = Channel.close(ch)
      assert {0, out} = await_exit(w.port, 5_000)
      assert "closed peer_closed" in out
      assert await_fds(fds_before) <= fds_before
    end
  end

  test "a spinning channel process still sees the worker's SIGKILL at once" do
    {:ok, ch} = Channel.open(transport: :shm, active: true, spin: 1_000_000)
    w = start_worker(ch, "echo")
    :ok = Channel.send(ch, "ping")
    assert_receive {:snakepit_shm_channel, ^ch, "ping"}, 10_000
    # the process now spins (up to 1 s): the hang-up still closes the channel
    kill9(w.os_pid)
    assert_receive {:snakepit_shm_channel_closed, ^ch, :peer_closed}, 2_000
    await_exit(w.port)
    :ok = Channel.close(ch)
  end

  test "killing the channel's process closes the channel: the worker sees EOF" do
    {:ok, ch} = Channel.open(transport: :shm, active: true)
    w = start_worker(ch, "echo")
    [port] = doorbell_ports(ch)
    Process.exit(ch.server, :kill)
    assert {0, out} = await_exit(w.port, 10_000)
    assert "closed peer_closed" in out
    assert Port.info(port) == nil
    assert {:error, %Error{reason: :closed}} = Channel.send(ch, "x")
    :erlang.garbage_collect()
  end
end
