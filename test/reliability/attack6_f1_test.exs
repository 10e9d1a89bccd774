defmodule Snakepit.SharedMemory.Reliability.Attack6F1Test do
  # Attack run 6 (F1): the message channel (Snakepit.SharedMemory.Channel and the Python
  # worker's end), attacked as a careless user, a flooding worker or a SIGKILL would.
  use ExUnit.Case, async: false

  import Bitwise
  import Snakepit.SharedMemory.ChannelHelpers

  alias Snakepit.SharedMemory.{Channel, Error, ReliabilityHelpers}

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

  # A process that collects `n` messages about `ch` (in its mailbox order) once told to,
  # and sends them to the test.
  defp collector(ch, n) do
    parent = self()

    spawn(fn ->
      receive do
        :go ->
          got =
            for _ <- 1..n do
              receive do
                {:snakepit_shm_channel, ^ch, m} -> {:msg, m}
                {:snakepit_shm_channel_passive, ^ch} -> :passive
                {:snakepit_shm_channel_closed, ^ch, reason} -> {:closed, reason}
              after
                10_000 -> :nothing
              end
            end

          send(parent, {:collected, got})
          Process.sleep(:infinity)
      end
    end)
  end

  test "controlling_process/2 moves the messages already in the old owner's mailbox" do
    # Were: left in the old owner's mailbox (as documented, unlike :gen_tcp): a worker's
    # first messages, sent while the process that opened the channel handed it over,
    # were lost with that process.
    {:ok, ch} = Channel.open(active: true)
    w = start_worker(ch, "burst", [100, 8])
    assert await_received(ch, 100) >= 100
    # to itself: nothing to move (and no loop moving its messages to itself)
    :ok = Channel.controlling_process(ch, self())
    heir = collector(ch, 100)
    :ok = Channel.controlling_process(ch, heir)
    refute_received {:snakepit_shm_channel, ^ch, _}
    send(heir, :go)
    assert_receive {:collected, got}, 20_000
    assert got == for(i <- 0..99, do: {:msg, <<i::little-32, i::little-32>>})
    # the active mode is restored for the new owner
    assert %{active: true, owner: ^heir} = Channel.stats(ch)
    :ok = Channel.close(ch)
    assert {0, _} = await_exit(w.port)
  end

  test "controlling_process/2 moves the passive message too, and keeps active: false" do
    {:ok, ch} = Channel.open(active: 3)
    w = start_worker(ch, "burst", [3, 8])
    # all three and the passive message are in this mailbox once the channel's process
    # answered after taking them
    assert await_received(ch, 3) == 3
    heir = collector(ch, 4)
    :ok = Channel.controlling_process(ch, heir)
    send(heir, :go)
    assert_receive {:collected, got}, 20_000
    assert got == for(i <- 0..2, do: {:msg, <<i::little-32, i::little-32>>}) ++ [:passive]
    assert %{active: false, owner: ^heir} = Channel.stats(ch)
    :ok = Channel.close(ch)
    assert {0, _} = await_exit(w.port)
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

  # The worker waits for "go", then sends a region message (its memfd travels by
  # SCM_RIGHTS: the VM needs a free descriptor to receive it).
  @region_after_go ~S"""
  import json, os, snakepit_shm
  with snakepit_shm.Channel.connect(json.loads(os.environ["SPSHM_CHANNEL_REF"])) as ch:
      print("connected", flush=True)
      ch.recv(timeout=30)
      ch.send(b"r" * (ch.inline_max + 1))
      try:
          ch.recv(timeout=30)
      except snakepit_shm.ChannelClosed:
          pass
  """

  test "an :io_error of this side says what failed, not only \"failed: io_error\"" do
    # Were: {:error, %Error{reason: :io_error, message: "channel spshm_ch_... failed:
    # io_error"}}: the cause (here the VM out of descriptors, the region message's memfd
    # dropped by the kernel) and what to do were only in stats/1's close_detail.
    env =
      for {k, v} <- ReliabilityHelpers.python_env(),
          do: ~s({~c"#{k}", ~c"#{v}"})

    code = """
    alias Snakepit.SharedMemory.{Channel, JSON}
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    {:ok, ch} = Channel.open()
    {:ok, json} = JSON.encode(Channel.export_ref(ch))
    env = [{~c"SPSHM_CHANNEL_REF", String.to_charlist(json)} | [#{Enum.join(env, ", ")}]]
    port =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [:binary, :exit_status,
        {:line, 1000}, env: env, args: ["-c", #{inspect(@region_after_go)}]])
    receive do
      {^port, {:data, {:eol, "connected"}}} -> :ok
    after
      30_000 -> raise "no worker"
    end
    grab = fn grab, acc ->
      case :file.open(~c"/dev/null", [:read, :raw]) do
        {:ok, f} -> grab.(grab, [f | acc])
        _ -> acc
      end
    end
    held = grab.(grab, [])
    :ok = Channel.send(ch, "go")
    Process.sleep(200)
    more = grab.(grab, [])
    result = Channel.recv(ch, 30_000)
    Enum.each(held ++ more, &:file.close/1)
    IO.puts("HELD \#{length(held)} MORE \#{length(more)}")
    IO.puts("RESULT \#{inspect(result)}")
    """

    {out, status} =
      System.cmd(
        "sh",
        ["-c", "ulimit -n 200; " <> ReliabilityHelpers.elixir_command()],
        env: [{"SNAKEPIT_SHM_VM_CODE", code}],
        stderr_to_stdout: true,
        cd: ReliabilityHelpers.root()
      )

    assert status == 0, out
    assert out =~ "reason: :io_error", out
    assert out =~ "failed on this side (io_error): this process is out of file descriptors", out
    assert out =~ "raise the limit", out
  end

  test "a worker SIGKILLed in a stream of region messages: :peer_closed within 1 s, nothing left" do
    # Held: every message published before the kill is delivered, then :peer_closed; the
    # memfds of messages in flight (a carrier sent, its frame not yet published) go with
    # the socket.
    fds_before = fd_count()
    maps_before = channel_memfds()
    shm_before = File.ls!("/dev/shm") |> Enum.sort()
    {:ok, ch} = Channel.open(ring_size: 16_384, active: true)
    w = start_worker(ch, "burst", [1_000_000, 6000])
    assert_receive {:snakepit_shm_channel, ^ch, _}, 10_000
    Process.sleep(100)
    t0 = System.monotonic_time(:millisecond)
    kill9(w.os_pid)
    assert await_closed(ch) == :peer_closed
    assert System.monotonic_time(:millisecond) - t0 < 1_000
    :ok = Channel.close(ch)
    assert await_exit(w.port) |> elem(0) != 0
    assert await_fds(fds_before) <= fds_before
    assert await_channel_memfds(maps_before) <= maps_before
    assert Enum.sort(File.ls!("/dev/shm")) == shm_before
  end

  test "close while 50 processes send region messages into a full ring: every fd is freed" do
    # Held: senders blocked for space get :closed; their prepared memfds and the carriers
    # already in the socket are closed with it.
    fds_before = fd_count()
    maps_before = channel_memfds()
    {:ok, ch} = Channel.open(ring_size: 16_384)
    w = start_worker(ch, "hang")
    msg = :binary.copy("m", 20_000)
    tasks = for _ <- 1..50, do: Task.async(fn -> for _ <- 1..20, do: Channel.send(ch, msg) end)
    Process.sleep(300)
    :ok = Channel.close(ch)
    results = tasks |> Task.await_many(10_000) |> List.flatten()
    assert Enum.any?(results, &match?({:error, %Error{reason: :closed}}, &1)), inspect(results)
    refute Enum.any?(results, &(&1 not in [:ok] and not match?({:error, %Error{}}, &1)))
    kill9(w.os_pid)
    await_exit(w.port)
    assert await_fds(fds_before) <= fds_before
    assert await_channel_memfds(maps_before) <= maps_before
  end

  defp await_closed(ch) do
    receive do
      {:snakepit_shm_channel, ^ch, _} -> await_closed(ch)
      {:snakepit_shm_channel_closed, ^ch, reason} -> reason
    after
      1_000 -> :timeout
    end
  end
end
