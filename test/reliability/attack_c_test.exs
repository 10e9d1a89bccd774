defmodule Snakepit.SharedMemory.Reliability.AttackCTest do
  # Attacks on the core region API (allocate, map, read, write, seal, deallocate). Each
  # runs where a failure cannot take the test VM down with it (a VM of its own) when the
  # break could be a dead VM.
  use Snakepit.SharedMemory.ReliabilityCase, async: false

  alias Snakepit.SharedMemory.ReliabilityHelpers

  # seal/1 racing deallocate_region/1 of the same memfd region: the deallocation retired
  # the data area (closed the memfd, moved the mapping out of the region) while the seal
  # still used them, so the seal failed with :io_error "Bad file descriptor" (F_SEAL_WRITE
  # on a closed descriptor) or, once the number was reused by the next region's memfd,
  # sealed that one instead. The seal now holds the data area like a read or a write
  # does. The core's test hook parks the seal (SNAKEPIT_SHM_TEST_PARK=seal=...) after its
  # checks, before the kernel seal, so that the deallocation and a new allocation happen
  # exactly there.
  @seal_vs_deallocate ~S"""
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM

  for round <- 1..3 do
    {:ok, id} = SM.allocate_region(1_048_576, backend: :memfd, cleanup_policy: :manual)
    parent = self()
    spawn(fn -> send(parent, {:sealed, SM.seal(id)}) end)
    Process.sleep(300)
    :ok = SM.deallocate_region(id)
    # The next regions take the lowest free descriptor numbers: the one just closed.
    others = for _ <- 1..4, do: elem(SM.allocate_region(4096, backend: :memfd), 1)

    seal =
      receive do
        {:sealed, :ok} -> :ok
        {:sealed, {:error, %{reason: reason, message: message}}} -> {reason, message}
      after
        30_000 -> :timeout
      end

    IO.puts("SEAL #{round} #{inspect(seal)}")
    for other <- others do
      {:ok, info} = SM.get_region_info(other)
      IO.puts("OTHER #{round} sealed=#{info.sealed}")
      {:ok, m} = SM.map_region(other)
      IO.puts("OTHER #{round} write=#{inspect(SM.write(m, 0, "x"))}")
      :ok = SM.unmap_region(m)
      :ok = SM.deallocate_region(other)
    end
  end

  IO.puts("DONE")
  """

  # With zero_on_free (and at :high, :maximum) a region is zeroed when freed, so that
  # processes still mapping it (a worker) read zeros, not its data. A deallocate_region/1 that came while a seal/1 committed
  # (the seal holding the region's gate) found it "being sealed", and the free fell back
  # to no zeroing at all, with only a warning in the log: the data stayed readable. The
  # free now waits for the commit (bounded like the seal's own wait), then zeroes. The
  # core's test hook parks the seal inside the gate (SNAKEPIT_SHM_TEST_PARK=seal_commit).
  @deallocate_while_sealing ~S"""
  Application.load(:snakepit_shm)
  Application.put_env(:snakepit_shm, :zero_on_free, true)
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM

  {:ok, id} = SM.allocate_region(4096, backend: :posix, cleanup_policy: :manual)

  {:ok, m} = SM.map_region(id)
  :ok = SM.write(m, 0, "secret")
  :ok = SM.unmap_region(m)
  {:ok, ref} = SM.export_ref(id)
  # A peer's view of the data, kept across the free.
  {:ok, fd} = :file.open(String.to_charlist(ref["data_path"]), [:read, :raw, :binary])
  parent = self()
  spawn(fn -> send(parent, {:sealed, SM.seal(id)}) end)
  Process.sleep(300)
  IO.puts("DEALLOCATE #{inspect(SM.deallocate_region(id))}")
  receive do
    {:sealed, result} -> IO.puts("SEAL #{inspect(result)}")
  after
    30_000 -> IO.puts("SEAL timeout")
  end
  {:ok, bytes} = :file.pread(fd, ref["data_offset"], 6)
  IO.puts("AFTER #{inspect(bytes)}")
  """

  test "posix, zero_on_free: a free racing a seal's commit still zeroes the data" do
    {out, status} =
      ReliabilityHelpers.elixir_vm(@deallocate_while_sealing,
        env: [{"SNAKEPIT_SHM_TEST_PARK", "seal_commit=800"}]
      )

    assert status == 0, "the VM died (exit #{status}):\n#{out}"
    assert out =~ "DEALLOCATE :ok", out
    assert out =~ ~s(AFTER <<0, 0, 0, 0, 0, 0>>), out
    refute out =~ "freed without zeroing", out
  end

  # Native.info/1 (get_region_info/1, export_ref/2, seal/1's zero-copy answer) read the
  # region's data descriptor (data_path, the kernel seal) without holding the data area,
  # so a deallocation on another scheduler could retire it in between: the data race
  # showed as "/proc/<pid>/fd/-1" (the descriptor moved out), or the number of a
  # descriptor already closed and reused. The core's test hook parks data_path between
  # its check and its read (SNAKEPIT_SHM_TEST_PARK=data_path=...).
  @info_vs_deallocate ~S"""
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory.Native

  opts = %{backend: :memfd, name: nil, open_mode: :create, mode: 0o600, security_level: 0,
           encrypted: false, lock_memory: false, metadata: "{}", idle_timeout_ms: 0}

  now = fn -> System.monotonic_time(:millisecond) end
  busy_wait = fn wait, until -> if now.() < until, do: wait.(wait, until) end

  for round <- 1..3 do
    {:ok, ref, %{data_path: path}} = Native.create(1_048_576, opts)
    parent = self()
    spawn(fn -> i = Native.info(ref); send(parent, {:info, i, now.()}) end)
    # Not Process.sleep/1: a timer on the wheel of the scheduler the parked call blocks
    # would not fire before it is back.
    busy_wait.(busy_wait, now.() + 300)
    freed_at = now.()
    :ok = Native.deallocate(ref, false)
    # The next regions take the lowest free descriptor numbers: the one just closed.
    others = for _ <- 1..4, do: elem(Native.create(4096, opts), 1)

    receive do
      {:info, info, done_at} ->
        IO.puts("ROUND #{round} overlap=#{freed_at < done_at} same=#{info.data_path == path} " <>
                  "zero_copy=#{info.zero_copy} #{info.data_path}")
    after
      30_000 -> IO.puts("ROUND #{round} timeout")
    end

    Enum.each(others, &Native.deallocate(&1, false))
  end

  IO.puts("DONE")
  """

  test "memfd: Native.info/1 racing a deallocation never reads a retired descriptor" do
    {out, status} =
      ReliabilityHelpers.elixir_vm(@info_vs_deallocate,
        # Enough normal schedulers that the call parked on one leaves the others running.
        env: [
          {"SNAKEPIT_SHM_TEST_PARK", "data_path=800"},
          {"ERL_FLAGS", "+S 4:4 +swt very_low +sbwt very_long"}
        ]
      )

    assert status == 0, "the VM died (exit #{status}):\n#{out}"
    assert out =~ "DONE"
    rounds = Regex.scan(~r/^ROUND \d overlap=(\w+) same=(\w+) zero_copy=(\w+)/m, out)
    assert length(rounds) == 3, out
    assert Enum.any?(rounds, fn [_, overlap | _] -> overlap == "true" end), out
    for [_, _, same, zero_copy] <- rounds, do: assert({same, zero_copy} == {"true", "false"}, out)
  end

  test "memfd: seal/1 racing deallocate_region/1 neither uses a closed descriptor nor another region's" do
    {out, status} =
      ReliabilityHelpers.elixir_vm(@seal_vs_deallocate,
        env: [{"SNAKEPIT_SHM_TEST_PARK", "seal=800"}]
      )

    assert status == 0, "the VM died (exit #{status}):\n#{out}"
    assert out =~ "DONE"

    for line <- String.split(out, "\n"), String.starts_with?(line, "SEAL ") do
      assert line =~ ~r/^SEAL \d (:ok|\{:deallocated, )/, out
    end

    refute out =~ "sealed=true", out
    refute out =~ "write={:error", out
  end
end
