defmodule Snakepit.SharedMemory.Reliability.Attack6F1Test do
  # Attack run 6 (F1): the message channel (Snakepit.SharedMemory.Channel and the Python
  # worker's end), attacked as a careless user, a flooding worker or a SIGKILL would.
  use ExUnit.Case, async: false

  import Bitwise
  import Snakepit.SharedMemory.ChannelHelpers

  alias Snakepit.SharedMemory.Channel

  @moduletag timeout: 300_000

  # Mappings of region messages' memfds in this VM.
  defp message_mappings do
    Regex.scan(~r/memfd:snakepit-channel-msg/, File.read!("/proc/self/maps")) |> length()
  end

  defp await_received(ch, n, deadline_ms \\ 60_000) do
    deadline = System.monotonic_time(:millisecond) + deadline_ms

    Stream.repeatedly(fn ->
      got = Channel.stats(ch).messages_received
      if got < n and System.monotonic_time(:millisecond) < deadline, do: Process.sleep(20)
      got
    end)
    |> Enum.find(&(&1 >= n or System.monotonic_time(:millisecond) >= deadline))
  end

  test "region messages an owner keeps (its mailbox in active mode) hold no mapping each" do
    # Were: each received region message was a read-only mapping of its memfd, kept for
    # as long as the binary lived: an owner in active mode that does not read its mailbox
    # while the worker streams (or that keeps its results) held one mapping per message,
    # counted against vm.max_map_count (65 530) for the whole VM.
    {:ok, ch} = Channel.open(ring_size: 16_384, active: true)
    before = message_mappings()
    w = start_worker(ch, "burst", [3000, 5000])
    # 5000 bytes > the inline threshold (4096): region messages, all left in the mailbox.
    assert await_received(ch, 3000) >= 3000
    assert Channel.stats(ch).region_messages_received == 3000
    held = message_mappings() - before
    assert held < 10, "#{held} mappings held by 3000 messages in the mailbox"

    for i <- 0..2999 do
      assert_receive {:snakepit_shm_channel, ^ch, msg}, 10_000
      assert msg == :binary.copy(<<i::little-32>>, 1250)
    end

    :ok = Channel.close(ch)
    assert {0, _} = await_exit(w.port)
  end

  test "a message above 1 MiB is still handed out zero-copy (one mapping while held)" do
    {:ok, ch} = Channel.open(ring_size: 16_384)
    before = message_mappings()
    w = start_worker(ch, "burst", [2, 2 <<< 20])
    assert {:ok, a} = Channel.recv(ch, 10_000)
    assert {:ok, b} = Channel.recv(ch, 10_000)
    assert a == :binary.copy(<<0::little-32>>, 1 <<< 19)
    assert b == :binary.copy(<<1::little-32>>, 1 <<< 19)
    assert message_mappings() - before == 2
    # (a and b still referenced here: their mappings were counted while held)
    assert byte_size(a) + byte_size(b) == 4 <<< 20
    :ok = Channel.close(ch)
    assert {0, _} = await_exit(w.port)
  end

  @tag timeout: 600_000
  test "70 000 region messages kept by the owner: the channel and the VM's mmap keep working" do
    # Were: past ~65 000 kept messages the VM's mmap failed (vm.max_map_count): the next
    # region message could not be mapped and the channel closed with :io_error, losing
    # it and the rest of the stream; every other mmap of the VM failed meanwhile.
    n = 70_000
    {:ok, ch} = Channel.open(ring_size: 16_384)
    w = start_worker(ch, "burst", [n, 4100])

    kept =
      for i <- 0..(n - 1) do
        assert {:ok, msg} = Channel.recv(ch, 30_000), "message #{i}"
        assert byte_size(msg) == 4100
        msg
      end

    assert length(kept) == n
    assert Channel.stats(ch).region_messages_received == n
    # The VM still maps memory (a channel's rings).
    assert {:ok, other} = Channel.open(ring_size: 16_384)
    :ok = Channel.close(other)
    :ok = Channel.close(ch)
    assert {0, _} = await_exit(w.port, 30_000)
  end

  test "active: n under a flooding worker takes n messages and leaves the rest in the ring" do
    {:ok, ch} = Channel.open(ring_size: 16_384, active: 5)
    w = start_worker(ch, "burst", [100_000, 8])

    for i <- 0..4 do
      assert_receive {:snakepit_shm_channel, ^ch, <<^i::little-32, ^i::little-32>>}, 10_000
    end

    assert_receive {:snakepit_shm_channel_passive, ^ch}, 10_000
    Process.sleep(300)
    refute_received {:snakepit_shm_channel, ^ch, _}
    stats = Channel.stats(ch)
    assert stats.messages_received == 5
    assert stats.in_occupancy > 8192, "the worker waits on a full ring: #{inspect(stats)}"
    :ok = Channel.close(ch)
    assert {0, _} = await_exit(w.port)
  end
end
