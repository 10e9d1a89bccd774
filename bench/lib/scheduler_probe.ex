defmodule SnakepitShm.Bench.SchedulerProbe do
  @moduledoc """
  Issue 12: how late a process on a normal scheduler wakes from a 1 ms sleep while the
  product does each of its heavy operations: create (plain and encrypted), write,
  encrypt, decrypt, zero (deallocating a `:high` region), deallocate, the garbage
  collection of the last reference to a large region, and a sweep of large orphans.
  Beside each round, the same probe over OTP's own `crypto:hash/2` of the same bytes (a
  dirty NIF that is not ours) and over an idle sleep: what the machine does to the probe
  anyway. The target is < 2 ms on a quiet machine.
  """

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Native, Sweep}
  alias SnakepitShm.Bench.Crypto

  @doc """
  `%{size, gc_size, ops: %{op => [max overshoot ns per round]}, durations: %{op => [ns]}}`.
  """
  def run(profile, payload, _programs) do
    size = profile.crypto_size
    data = binary_part(payload, 0, min(size, byte_size(payload)))
    gc_size = if profile.name == :quick, do: 256 * 1024 * 1024, else: 1024 * 1024 * 1024
    rounds = for _ <- 1..profile.crypto_reps, do: round(data, gc_size)

    %{
      size: byte_size(data),
      gc_size: gc_size,
      ops: collect(rounds, :probe),
      durations: collect(rounds, :ns)
    }
  end

  defp collect(rounds, key) do
    keys = rounds |> hd() |> Map.fetch!(key) |> Map.keys()
    Map.new(keys, fn k -> {k, Enum.map(rounds, &get_in(&1, [key, k]))} end)
  end

  defp round(data, gc_size) do
    size = byte_size(data)

    measures = [
      {:idle_sleep, fn -> Process.sleep(50) end},
      {:otp_crypto_hash, fn -> :crypto.hash(:sha256, data) end},
      {:create, fn -> Process.put(:plain, SM.allocate_region(size)) end},
      {:write, fn -> :ok = write(:plain, data) end},
      {:deallocate, fn -> :ok = dealloc(:plain) end},
      {:create_encrypted,
       fn -> Process.put(:high, SM.allocate_region(size, security_level: :high)) end},
      {:encrypt, fn -> :ok = write(:high, data) end},
      {:decrypt, fn -> read(:high, size) end},
      {:zero, fn -> :ok = dealloc(:high) end},
      {:gc_last_reference, {fn -> gc_setup(gc_size) end, &gc_last_reference/1}},
      {:sweep_big_orphans, {fn -> orphan_setup(gc_size) end, &sweep_big_orphans/1}}
    ]

    results =
      for {op, work} <- measures do
        fun =
          case work do
            {setup, run} ->
              arg = setup.()
              fn -> run.(arg) end

            fun ->
              fun
          end

        {ns, samples} = Crypto.probe_during(fun)
        {op, ns, Enum.max(samples, fn -> 0 end)}
      end

    %{
      probe: Map.new(results, fn {op, _, late} -> {op, late} end),
      ns: Map.new(results, fn {op, ns, _} -> {op, ns} end)
    }
  end

  defp write(key, data) do
    {:ok, id} = Process.get(key)
    {:ok, m} = SM.map_region(id)
    :ok = SM.write(m, 0, data)
    :ok = SM.unmap_region(m)
  end

  defp read(key, size) do
    {:ok, id} = Process.get(key)
    {:ok, m} = SM.map_region(id)
    {:ok, _} = SM.read(m, 0, size)
    :ok = SM.unmap_region(m)
  end

  defp dealloc(key) do
    {:ok, id} = Process.delete(key)
    SM.deallocate_region(id)
  end

  # Set up outside the probe window: a process holding the only reference to a large,
  # written memfd region. Probed: its death, the VM collecting it, the region resource's
  # destructor (its munmap and close go to the reaper thread).
  defp gc_setup(size) do
    parent = self()

    pid =
      spawn(fn ->
        {:ok, region, _} = Native.create(size, SnakepitShm.Bench.Lifecycle.native_opts())
        {:ok, m} = Native.map(region, :read_write)
        :ok = Native.write_dirty(m, size - 4, "last")
        send(parent, {:ready, self()})

        receive do
          :die -> :ok
        end
      end)

    receive do
      {:ready, ^pid} -> pid
    end
  end

  defp gc_last_reference(pid) do
    ref = Process.monitor(pid)
    send(pid, :die)

    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> :ok
    end
  end

  # Set up outside the probe window: a large POSIX segment nobody uses any more (what a
  # killed VM leaves). Probed: the sweep that removes it.
  defp orphan_setup(size) do
    Task.async(fn ->
      {:ok, region, info} =
        Native.create(size, %{SnakepitShm.Bench.Lifecycle.native_opts() | backend: :posix})

      {:ok, m} = Native.map(region, :read_write)
      :ok = Native.write_dirty(m, size - 4, "last")
      info.id
    end)
    |> Task.await(:infinity)
  end

  defp sweep_big_orphans(id) do
    :erlang.garbage_collect()
    wait_removed(id, 50)
  end

  defp wait_removed(_id, 0), do: :ok

  defp wait_removed(id, tries) do
    Sweep.sweep_orphans()

    if File.exists?("/dev/shm/" <> id) do
      Process.sleep(10)
      wait_removed(id, tries - 1)
    else
      :ok
    end
  end
end
