defmodule Snakepit.SharedMemory.ChannelMisuseTest do
  # What a careless or hostile caller of Snakepit.SharedMemory.Channel does: odd but
  # legal arguments, calls in the wrong mode, hand-overs that fail. Each must give a
  # clear error (or work) and leave the channel as it was: no crash of the channel's
  # process, no caller blocked forever.
  use ExUnit.Case, async: false

  import Bitwise
  import Snakepit.SharedMemory.ChannelHelpers

  alias Snakepit.SharedMemory.{Channel, Error, Native, ReliabilityHelpers}

  @moduletag timeout: 120_000

  # No spshm_* segment of this VM may be left in /dev/shm (other VMs' are ignored).
  setup_all do
    ReliabilityHelpers.check_segments_on_exit()
  end

  test "recv/2 with a timeout too large for a timer neither crashes nor closes the channel" do
    fds = fd_count()
    {:ok, ch} = Channel.open()
    # A legal timeout (a non-negative integer) above what erlang:send_after/3 accepts.
    task = Task.async(fn -> Channel.recv(ch, 1 <<< 45) end)
    assert Task.yield(task, 300) == nil
    assert Process.alive?(ch.server)
    assert %{state: :listening} = Channel.stats(ch)
    :ok = Channel.close(ch)
    assert {:ok, {:error, %Error{reason: :closed}}} = Task.yield(task, 1_000)
    assert await_fds(fds) <= fds
  end

  test "a :send_timeout too large for a timer waits on a full ring instead of closing it" do
    {:ok, ch} = Channel.open(ring_size: 4096, send_timeout: 1 <<< 45)
    w = start_worker(ch, "hang")
    fill = :binary.copy("x", 1000)
    # The ring takes a few messages, then senders wait for space.
    tasks = for _ <- 1..8, do: Task.async(fn -> Channel.send(ch, fill) end)
    Process.sleep(300)
    assert Process.alive?(ch.server)
    assert %{state: :connected} = Channel.stats(ch)
    :ok = Channel.close(ch)
    results = Enum.map(tasks, &Task.await(&1, 5_000))
    assert Enum.all?(results, &(&1 == :ok or match?({:error, %Error{reason: :closed}}, &1)))
    kill9(w.os_pid)
    await_exit(w.port)
  end

  test "a :send_timeout beyond 64 bits is an invalid option, not a crash" do
    assert {:error, %Error{reason: :invalid_option, message: msg}} =
             Channel.open(send_timeout: 1 <<< 70)

    assert msg =~ "send_timeout"
    {:ok, ch} = Channel.open()

    assert {:error, %Error{reason: :invalid_option}} = Channel.setopts(ch, send_timeout: 1 <<< 70)

    :ok = Channel.close(ch)
  end

  for transport <- [:shm, :socket] do
    test "#{transport}: a recv/2 pending when active mode is switched on does not hang" do
      {:ok, ch} = Channel.open(transport: unquote(transport))
      w = start_worker(ch, "echo")
      task = Task.async(fn -> Channel.recv(ch) end)
      Process.sleep(100)
      :ok = Channel.setopts(ch, active: true)
      # The waiting caller is answered as a recv/2 in active mode would be.
      assert {:ok, {:error, %Error{reason: :active_mode}}} = Task.yield(task, 1_000)
      :ok = Channel.send(ch, "hello")
      assert_receive {:snakepit_shm_channel, ^ch, "hello"}, 5_000
      :ok = Channel.close(ch)
      await_exit(w.port)
    end
  end

  test "controlling_process/2 to a dead pid keeps the resource's monitor of the owner" do
    parent = self()

    owner =
      spawn(fn ->
        {:ok, ch} = Channel.open()
        send(parent, {:ch, ch})

        receive do
          :hand_over_to_dead ->
            dead = spawn(fn -> :ok end)
            ref = Process.monitor(dead)
            receive do: ({:DOWN, ^ref, _, _, _} -> :ok)
            send(parent, {:cp, Channel.controlling_process(ch, dead)})
            Process.sleep(:infinity)
        end
      end)

    assert_receive {:ch, ch}, 5_000
    w = start_worker(ch, "echo")
    send(owner, :hand_over_to_dead)
    assert_receive {:cp, {:error, %Error{reason: :not_found}}}, 5_000
    # With the channel's process held up, only the resource's own monitor of the owner
    # can close the channel when the owner dies (docs/CHANNEL.md).
    :sys.suspend(ch.server)
    Process.exit(owner, :kill)
    assert {0, out} = await_exit(w.port, 5_000)
    assert "closed peer_closed" in out
    assert Native.channel_stats(ch.resource).state == :closed
    :sys.resume(ch.server)
  end

  test "a duplicated option is reported as invalid, not as unknown" do
    assert {:error, %Error{reason: :invalid_option, message: msg}} =
             Channel.open(active: true, active: :bad)

    refute msg =~ "unknown"
    assert msg =~ ":bad"
  end

  # RLIMIT_FSIZE (ulimit -f, systemd LimitFSIZE=) bounds memfds too, and a file grown past
  # it raises SIGXFSZ, whose default action ends the whole VM (the BEAM does not ignore
  # it, Python does). The limit is set on this VM for the test only.
  describe "under a file size limit (RLIMIT_FSIZE)" do
    setup do
      # The soft limit only: it can be raised back (the hard one could not, without
      # CAP_SYS_RESOURCE).
      limit = 4 <<< 20
      {_, 0} = System.cmd("prlimit", ["--pid", System.pid(), "--fsize=#{limit}:"])

      on_exit(fn ->
        {_, 0} = System.cmd("prlimit", ["--pid", System.pid(), "--fsize=unlimited:"])
      end)

      %{limit: limit}
    end

    test "a region message above the limit is an error, not the VM's death", %{limit: limit} do
      fds = fd_count()
      {:ok, ch} = Channel.open()
      w = start_worker(ch, "echo_checksum")

      assert {:error, %Error{reason: :too_large, message: msg}} =
               Channel.send(ch, :binary.copy("a", 2 * limit))

      assert msg =~ "file size limit"
      # The channel is still usable, for a region message under the limit too.
      big = :binary.copy("b", div(limit, 2))
      :ok = Channel.send(ch, big)
      assert {:ok, reply} = Channel.recv(ch, 10_000)
      assert reply == "#{byte_size(big)}:#{:erlang.crc32(big)}"
      :ok = Channel.close(ch)
      await_exit(w.port)
      assert await_fds(fds) <= fds
    end

    test "rings larger than the limit are an error at open/1", %{limit: limit} do
      fds = fd_count()

      assert {:error, %Error{reason: :too_large}} =
               Channel.open(transport: :shm, ring_size: 4 * limit)

      # :auto falls back to the socket transport, as when a memfd cannot be created.
      assert {:ok, ch} = Channel.open(ring_size: 4 * limit)
      assert %{transport: :socket} = Channel.stats(ch)
      :ok = Channel.close(ch)
      assert await_fds(fds) <= fds
    end
  end

  test "open/1 with an :owner that dies while the channel opens returns an error, never exits" do
    # The window is between the channel process's start and its first answer: many tries
    # (5 000; 50 000 in soak).
    results =
      for i <- 1..ReliabilityHelpers.scale(5_000) do
        owner = spawn(fn -> Process.sleep(rem(i, 3)) end)

        try do
          case Channel.open(owner: owner) do
            {:ok, ch} -> Channel.close(ch)
            {:error, %Error{reason: :not_found}} -> :ok
          end
        catch
          kind, reason -> {kind, reason}
        end
      end

    assert Enum.reject(results, &(&1 == :ok)) == []
  end

  # A pid of another node (the channel's monitors are local: enif_monitor_process).
  defp remote_pid do
    :erlang.binary_to_term(<<131, 88, 100, 0, 9, "foo@bar.x"::binary, 5::32, 0::32, 1::32>>)
  end

  test "open/1 with the pid of another node as :owner is an invalid option" do
    assert {:error, %Error{reason: :invalid_option, message: msg}} =
             Channel.open(owner: remote_pid())

    assert msg =~ ":owner"
  end

  test "controlling_process/2 to the pid of another node fails and leaves the channel open" do
    {:ok, ch} = Channel.open()
    w = start_worker(ch, "echo")

    assert {:error, %Error{reason: :invalid_argument, message: msg}} =
             Channel.controlling_process(ch, remote_pid())

    assert msg =~ "local"
    assert Process.alive?(ch.server)
    :ok = Channel.send(ch, "still open")
    assert {:ok, "still open"} = Channel.recv(ch, 5_000)
    :ok = Channel.close(ch)
    await_exit(w.port)
  end

  for transport <- [:shm, :socket] do
    test "#{transport}: a recv/2 caller killed while it waits does not take the next message" do
      {:ok, ch} = Channel.open(transport: unquote(transport))
      w = start_worker(ch, "echo")
      waiters = for _ <- 1..3, do: Task.async(fn -> Channel.recv(ch) end)
      Process.sleep(100)
      Enum.each(waiters, &Task.shutdown(&1, :brutal_kill))
      :ok = Channel.send(ch, "first")
      :ok = Channel.send(ch, "second")
      assert {:ok, "first"} = Channel.recv(ch, 5_000)
      assert {:ok, "second"} = Channel.recv(ch, 5_000)
      :ok = Channel.close(ch)
      await_exit(w.port)
    end
  end

  # Carried note (attack run 4 A): the errors of a region message the VM cannot prepare
  # were worded for regions ("a region message needs ... or use smaller regions") and
  # did not say that the channel's message failed, nor that a smaller one goes inline.
  # (Out of descriptors, the same core message, is tested from Python: a VM at its fd
  # limit cannot load the modules its logger needs.)
  @region_message_failures ~S"""
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory.Channel
  {:ok, ch} = Channel.open()
  inline = Channel.export_ref(ch)["inline_max"]
  big = :binary.copy("x", inline + 1)
  _ = inspect({:error, %RuntimeError{}, :x, "s", %{a: [1]}})
  {_, 0} = System.cmd("prlimit", ["--pid", System.pid(), "--fsize=#{inline}:unlimited"])
  IO.puts("FSIZE #{inspect(Channel.send(ch, big))}")
  :ok = Channel.close(ch)
  """

  test "a region message the VM cannot prepare names the channel's message, cause and remedy" do
    {out, status} = ReliabilityHelpers.elixir_vm(@region_message_failures)
    assert status == 0, out
    [fsize] = Regex.run(~r/^FSIZE .*$/m, out)
    assert fsize =~ "reason: :too_large"
    assert fsize =~ "as a region message"
    assert fsize =~ "RLIMIT_FSIZE"
    assert fsize =~ "send smaller messages"
    assert fsize =~ "errno: 27"
    refute fsize =~ ~r/smaller regions|free regions|\/dev\/shm|backend/
  end

  test "the channel's own failures name the channel option to change, not a region's" do
    # Was: "memfd_create refused (simulated)" (no remedy).
    assert {:error, %Error{reason: :unsupported, message: msg}} =
             Channel.open(transport: :shm, simulate_memfd_failure: true)

    assert msg =~ "cannot open the channel with transport :shm"
    assert msg =~ "transport :auto"

    # Was: "mkdtemp(...): Not a directory".
    assert {:error, %Error{message: msg}} = Channel.open(socket_dir: "/proc/self/status")
    assert msg =~ "cannot open the channel"
    assert msg =~ ":socket_dir"

    # Was: "message larger than max_message_size".
    {:ok, ch} = Channel.open(max_message_size: 1 <<< 20)
    big = :binary.copy("x", (1 <<< 20) + 1)

    assert {:error, %Error{reason: :too_large, message: msg}} = Channel.send(ch, big)
    assert msg =~ "cannot send the 1048577-byte message"
    assert msg =~ ":max_message_size"
    :ok = Channel.close(ch)
  end
end
