defmodule Snakepit.SharedMemory.ChannelTest do
  # The message channel between Elixir and a real Python worker, over both transports
  # (the same suite runs with transport: :shm and transport: :socket).
  use ExUnit.Case, async: false

  import Bitwise
  import Snakepit.SharedMemory.ChannelHelpers

  alias Snakepit.SharedMemory.{Channel, Error}

  @moduletag timeout: 300_000

  # 1 M messages in soak runs, 100 k in `make test` (CI budget).
  @count if System.get_env("SNAKEPIT_SHM_SOAK") in ["1", "true"], do: 1_000_000, else: 100_000

  test "the layout constants agree with the C++ definition and docs/CHANNEL.md" do
    layout = Channel.layout()
    assert layout["magic"] == "SPSHMCHN"
    assert layout["header_size"] == 4096
    assert layout["fields"]["rings"] == [128, 256]
    assert layout["ring_control"]["tail"] == 64
    doc = File.read!(Path.expand("../../../docs/CHANNEL.md", __DIR__))

    for {name, [offset, size]} <- layout["fields"] do
      assert doc =~ ~r/\|\s*#{offset}\s*\|\s*#{size}\s*\|\s*`#{name}`/,
             "docs/CHANNEL.md has no row | #{offset} | #{size} | `#{name}`"
    end
  end

  test "options are validated with clear errors" do
    assert {:error, %Error{reason: :invalid_option, message: msg}} = Channel.open(ring_size: 5000)
    assert msg =~ "multiple of 4096"
    assert {:error, %Error{reason: :invalid_option}} = Channel.open(bogus: 1)

    assert {:error, %Error{reason: :invalid_argument}} =
             Channel.open(ring_size: 4096, inline_threshold: 2000)
  end

  for transport <- [:shm, :socket] do
    describe "transport #{transport}" do
      @describetag transport: transport

      test "ordering and content over many messages of random sizes (0 B .. 4x the ring)",
           %{transport: transport} do
        ring = 16_384
        {:ok, ch} = Channel.open(transport: transport, ring_size: ring, active: true)
        w = start_worker(ch, "echo_checksum")
        assert w.transport == Atom.to_string(transport)
        :rand.seed(:exsss, {1, 2, 3})
        # Mostly small messages, some up to the inline threshold, some up to 4x the ring
        # (region messages).
        sizes =
          for i <- 1..@count do
            r = :rand.uniform(1000)

            cond do
              rem(i, 2000) == 0 -> 4 * ring
              r <= 940 -> :rand.uniform(65) - 1
              r <= 995 -> :rand.uniform(ring)
              true -> :rand.uniform(4 * ring)
            end
          end

        owner = self()
        payload = :crypto.strong_rand_bytes(4 * ring)

        sender =
          spawn_link(fn ->
            for {size, i} <- Enum.with_index(sizes) do
              start = rem(i * 7, 4 * ring - size + 1)
              :ok = Channel.send(ch, binary_part(payload, start, size))
            end

            send(owner, :sent)
          end)

        for {size, i} <- Enum.with_index(sizes) do
          start = rem(i * 7, 4 * ring - size + 1)
          expected = "#{size}:#{:erlang.crc32(binary_part(payload, start, size))}"

          receive do
            {:snakepit_shm_channel, ^ch, reply} ->
              assert reply == expected, "message #{i} of #{size} bytes: #{reply} != #{expected}"
          after
            30_000 -> flunk("no reply for message #{i} (#{size} bytes)")
          end
        end

        assert_receive :sent, 30_000
        refute Process.alive?(sender)
        stats = Channel.stats(ch)
        assert stats.messages_sent == @count
        assert stats.messages_received == @count
        assert stats.region_messages_sent > 0
        assert stats.transport == transport
        :ok = Channel.close(ch)
        assert {0, _} = await_exit(w.port)
      end

      test "messages from the worker arrive in order, region messages zero-copy",
           %{transport: transport} do
        {:ok, ch} = Channel.open(transport: transport, ring_size: 16_384)
        w = start_worker(ch, "burst", [2000, 12_000])
        # 12 000 bytes > 4096 inline threshold: region messages.
        for i <- 0..1999 do
          assert {:ok, msg} = Channel.recv(ch, 10_000)
          assert byte_size(msg) == 12_000
          assert msg == :binary.copy(<<i::little-32>>, 3000)
        end

        assert Channel.stats(ch).region_messages_received == 2000
        :ok = Channel.send(ch, "stop")
        assert {0, _} = await_exit(w.port)
      end

      test "inline messages as large as the threshold (partial socket writes) round-trip",
           %{transport: transport} do
        {:ok, ch} = Channel.open(transport: transport, ring_size: 4 * 1024 * 1024, active: true)
        w = start_worker(ch, "echo")
        msg = :crypto.strong_rand_bytes(1024 * 1024)

        for _ <- 1..20 do
          :ok = Channel.send(ch, msg)
          assert_receive {:snakepit_shm_channel, ^ch, ^msg}, 10_000
        end

        assert Channel.stats(ch).region_messages_sent == 0
        :ok = Channel.close(ch)
        await_exit(w.port)
      end

      test "1 GiB goes through as one region message (socket: 256 MiB outside soak)",
           %{transport: transport} do
        {:ok, ch} = Channel.open(transport: transport)
        w = start_worker(ch, "echo_checksum")
        # Over the socket a region message is the same sealed memfd, passed with
        # SCM_RIGHTS instead of the ring: its size changes nothing but the time.
        size =
          if transport == :socket and not Snakepit.SharedMemory.ReliabilityHelpers.soak?(),
            do: 256 <<< 20,
            else: 1 <<< 30

        big = :binary.copy(<<1, 2, 3, 4, 5, 6, 7, 8>>, div(size, 8))
        :ok = Channel.send(ch, big)
        expected = "#{byte_size(big)}:#{:erlang.crc32(big)}"
        assert {:ok, ^expected} = Channel.recv(ch, 120_000)
        :ok = Channel.close(ch)
        assert {0, _} = await_exit(w.port)
      end

      test "back-pressure: a slow consumer blocks send; send_timeout: 0 gives :would_block",
           %{transport: transport} do
        {:ok, ch} = Channel.open(transport: transport, ring_size: 4096, send_timeout: 0)
        w = start_worker(ch, "slow")
        msg = :binary.copy("x", 900)
        # Fill the ring (and, for the socket, the kernel buffers): eventually refused.
        results = for _ <- 1..2000, do: Channel.send(ch, msg)
        assert Enum.any?(results, &match?({:error, %Error{reason: :would_block}}, &1))
        sent = Enum.count(results, &(&1 == :ok))
        # A blocking send waits for the slow consumer and then succeeds.
        :ok = Channel.setopts(ch, send_timeout: :infinity)
        :ok = Channel.send(ch, "last")
        :ok = Channel.setopts(ch, active: true)

        for _ <- 1..sent do
          assert_receive {:snakepit_shm_channel, ^ch, ^msg}, 60_000
        end

        assert_receive {:snakepit_shm_channel, ^ch, "last"}, 10_000
        assert Channel.stats(ch).would_blocks > 0
        :ok = Channel.close(ch)
        await_exit(w.port)
      end

      test "active modes: true, :once, n, false", %{transport: transport} do
        {:ok, ch} = Channel.open(transport: transport, active: :once)
        w = start_worker(ch, "echo")
        for m <- ["a", "b", "c"], do: :ok = Channel.send(ch, m)
        assert_receive {:snakepit_shm_channel, ^ch, "a"}, 5_000
        refute_receive {:snakepit_shm_channel, ^ch, _}, 200
        # :once fell back to passive: the rest waits in the ring for recv/2.
        assert {:ok, "b"} = Channel.recv(ch, 5_000)
        :ok = Channel.setopts(ch, active: 2)
        assert_receive {:snakepit_shm_channel, ^ch, "c"}, 5_000
        :ok = Channel.send(ch, "d")
        assert_receive {:snakepit_shm_channel, ^ch, "d"}, 5_000
        assert_receive {:snakepit_shm_channel_passive, ^ch}, 5_000
        :ok = Channel.setopts(ch, active: true)
        for m <- ["e", "f"], do: :ok = Channel.send(ch, m)
        assert_receive {:snakepit_shm_channel, ^ch, "e"}, 5_000
        assert_receive {:snakepit_shm_channel, ^ch, "f"}, 5_000
        :ok = Channel.setopts(ch, active: false)
        :ok = Channel.send(ch, "g")
        refute_receive {:snakepit_shm_channel, ^ch, _}, 200
        assert {:ok, "g"} = Channel.recv(ch, 5_000)
        assert {:error, %Error{reason: :timeout}} = Channel.recv(ch, 50)
        :ok = Channel.close(ch)
        await_exit(w.port)
      end

      test "active :once and n deliver in order", %{transport: transport} do
        {:ok, ch} = Channel.open(transport: transport, active: false)
        w = start_worker(ch, "echo")
        for i <- 1..10, do: :ok = Channel.send(ch, "m#{i}")
        :ok = Channel.setopts(ch, active: :once)
        assert_receive {:snakepit_shm_channel, ^ch, "m1"}, 5_000
        refute_receive {:snakepit_shm_channel, ^ch, _}, 100
        :ok = Channel.setopts(ch, active: 3)

        for i <- 2..4 do
          expected = "m#{i}"
          assert_receive {:snakepit_shm_channel, ^ch, ^expected}, 5_000
        end

        assert_receive {:snakepit_shm_channel_passive, ^ch}, 5_000
        for i <- 5..10, do: assert({:ok, "m#{i}"} == Channel.recv(ch, 5_000))
        assert {:error, %Error{reason: :timeout}} = Channel.recv(ch, 50)
        :ok = Channel.setopts(ch, active: true)
        assert {:error, %Error{reason: :active_mode}} = Channel.recv(ch, 0)
        :ok = Channel.close(ch)
        await_exit(w.port)
      end

      test "controlling_process hands the channel over", %{transport: transport} do
        {:ok, ch} = Channel.open(transport: transport, active: true)
        w = start_worker(ch, "echo")
        parent = self()

        heir =
          spawn(fn ->
            receive do
              :go ->
                :ok = Channel.send(ch, "to heir")

                receive do
                  {:snakepit_shm_channel, ^ch, m} -> send(parent, {:heir_got, m})
                end
            end

            Process.sleep(:infinity)
          end)

        assert {:error, %Error{reason: :not_owner}} =
                 Task.async(fn -> Channel.controlling_process(ch, self()) end) |> Task.await()

        :ok = Channel.controlling_process(ch, heir)
        send(heir, :go)
        assert_receive {:heir_got, "to heir"}, 5_000
        refute_receive {:snakepit_shm_channel, ^ch, _}, 100
        # The heir's death now closes the channel (not ours).
        Process.exit(heir, :kill)
        assert {0, out} = await_exit(w.port)
        assert "closed peer_closed" in out
      end

      test "worker SIGKILL: closed within 1 s, nothing leaked", %{transport: transport} do
        fds_before = fd_count()
        maps_before = channel_memfds()
        {:ok, ch} = Channel.open(transport: transport, active: true)
        path = Channel.export_ref(ch)["path"]
        w = start_worker(ch, "hang")
        refute File.exists?(path), "the socket file must be removed once the worker is in"
        refute File.exists?(Path.dirname(path))
        t0 = System.monotonic_time(:millisecond)
        kill9(w.os_pid)
        assert_receive {:snakepit_shm_channel_closed, ^ch, :peer_closed}, 1_000
        assert System.monotonic_time(:millisecond) - t0 < 1_000
        assert {:error, %Error{reason: :peer_closed}} = Channel.send(ch, "x")
        assert Channel.stats(ch).close_reason == :peer_closed
        await_exit(w.port)
        :ok = Channel.close(ch)
        assert await_fds(fds_before) <= fds_before
        assert await_channel_memfds(maps_before) <= maps_before
      end

      test "owner death closes the channel and frees it; the worker sees peer_closed",
           %{transport: transport} do
        fds_before = fd_count()
        parent = self()

        owner =
          spawn(fn ->
            {:ok, ch} = Channel.open(transport: transport)
            send(parent, {:ch, ch})
            Process.sleep(:infinity)
          end)

        assert_receive {:ch, ch}, 5_000
        w = start_worker(ch, "echo")
        Process.exit(owner, :kill)
        assert {0, out} = await_exit(w.port, 5_000)
        assert "closed peer_closed" in out
        refute Process.alive?(ch.server)
        assert await_fds(fds_before) <= fds_before
      end

      test "close/1 from Elixir: the worker sees peer_closed; calls then fail cleanly",
           %{transport: transport} do
        {:ok, ch} = Channel.open(transport: transport)
        w = start_worker(ch, "echo")
        :ok = Channel.close(ch)
        :ok = Channel.close(ch)
        assert {0, out} = await_exit(w.port, 5_000)
        assert "closed peer_closed" in out
        assert {:error, %Error{reason: :closed}} = Channel.send(ch, "x")
        assert {:error, %Error{reason: :closed}} = Channel.recv(ch, 0)
      end

      test "the worker closing delivers what it sent, then :peer_closed", %{transport: transport} do
        {:ok, ch} = Channel.open(transport: transport, ring_size: 16_384)
        w = start_worker(ch, "burst", [50, 100])
        :ok = Channel.send(ch, "stop")
        assert {0, _} = await_exit(w.port)

        for i <- 0..49 do
          assert {:ok, msg} = Channel.recv(ch, 5_000)
          assert msg == :binary.copy(<<i::little-32>>, 25)
        end

        assert {:error, %Error{reason: :peer_closed}} = Channel.recv(ch, 5_000)
      end
    end
  end

  test "a memfd refused falls back to the socket transport (and stats say so)" do
    try do
      {:ok, ch} = Channel.open(simulate_memfd_failure: true)
      stats = Channel.stats(ch)
      assert stats.transport == :socket
      assert stats.fallbacks == 1
      assert stats.fallback_reason =~ "memfd"

      assert {:error, %Error{reason: :unsupported}} =
               Channel.open(transport: :shm, simulate_memfd_failure: true)

      w = start_worker(ch, "echo")
      assert w.transport == "socket"
      :ok = Channel.send(ch, "over the socket")
      assert {:ok, "over the socket"} = Channel.recv(ch, 5_000)
      :ok = Channel.close(ch)
      await_exit(w.port)
    after
      :ok
    end
  end

  test "channels are listed with their stats" do
    {:ok, ch} = Channel.open()
    assert Enum.any?(Channel.list(), fn {c, s} -> c.id == ch.id and s.state == :listening end)
    :ok = Channel.close(ch)
    refute Enum.any?(Channel.list(), fn {c, _} -> c.id == ch.id end)
  end
end
