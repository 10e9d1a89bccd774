defmodule SnakepitShm.Bench.SchedulerProbe do
  @moduledoc """
  Issue 12: how late a process on a normal scheduler wakes from a 1 ms sleep while the
  product does each of its heavy operations: create (plain and encrypted), write,
  encrypt, decrypt, zero (deallocating a `:high` region), deallocate, the garbage
  collection of the last reference to a large region, and a sweep of large orphans.
  Beside each round, the same probe over OTP's own `crypto:hash/2` of the same bytes
  (OTP runs it on the normal schedulers, in slices) and over an idle sleep: what the
  machine does to the probe anyway. The target is < 2 ms on a quiet machine. The same rounds run again in a peer
  VM started with `+sbwt none` (no busy wait of the normal schedulers: what
  docs/OPERATIONS.md recommends where millisecond timers matter), reported beside them.
  """

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Native, Sweep}
  alias SnakepitShm.Bench.Crypto

  @doc """
  `%{size, gc_size, ops: %{op => [max overshoot ns per round]}, durations: %{op => [ns]},
  phases: %{op => [phase of the worst overshoot per round]}, sbwt_none: same keys}`: the
  phase is the step of the operation (for example `:map`, `:write`, `:unmap`) that
  overlapped the worst late sleep most, `:outside` when it fell outside every step (the
  probe's own start or end). `sbwt_none` holds the same rounds run in a peer VM started
  with `+sbwt none` (or `%{error: reason}`).
  """
  def run(profile, payload, _programs) do
    size = profile.crypto_size
    data = binary_part(payload, 0, min(size, byte_size(payload)))

    profile
    |> measure(data)
    |> Map.put(:sbwt_none, in_peer_without_busy_wait(profile))
  end

  @doc """
  The same rounds in this VM on `size` random bytes (called in the peer VM of
  `in_peer_without_busy_wait/1`).
  """
  def run_here(profile), do: measure(profile, :crypto.strong_rand_bytes(profile.crypto_size))

  defp measure(profile, data) do
    gc_size = if profile.name == :quick, do: 256 * 1024 * 1024, else: 1024 * 1024 * 1024
    rounds = for _ <- 1..profile.crypto_reps, do: round(data, gc_size)

    %{
      size: byte_size(data),
      gc_size: gc_size,
      ops: collect(rounds, :probe),
      durations: collect(rounds, :ns),
      phases: collect(rounds, :phase)
    }
  end

  # The same rounds in a peer VM started with `+sbwt none` (its normal schedulers do not
  # busy-wait before they sleep: docs/OPERATIONS.md): what that VM flag changes, beside
  # the default flags measured above (the target is judged on the default). The result of
  # run_here/1 there, or `%{error: reason}` when the peer cannot run it.
  defp in_peer_without_busy_wait(profile) do
    unless Node.alive?() do
      System.cmd("epmd", ["-daemon"])
      name = :"snakepit_shm_bench_#{System.unique_integer([:positive])}"
      {:ok, _} = :net_kernel.start([name, :shortnames])
    end

    {:ok, peer, node} =
      :peer.start(%{
        name: :peer.random_name(~c"snakepit_shm_probe_peer"),
        args: [~c"-setcookie", Atom.to_charlist(Node.get_cookie()), ~c"+sbwt", ~c"none"],
        wait_boot: 120_000
      })

    try do
      :ok = :erpc.call(node, :code, :add_paths, [:code.get_path()])

      for {key, value} <- Application.get_all_env(:snakepit_shm),
          do: :erpc.call(node, Application, :put_env, [:snakepit_shm, key, value])

      :erpc.call(node, Application, :put_env, [:logger, :level, :warning])
      {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:snakepit_shm])
      # The bench modules are compiled in memory (mix snakepit.shm.bench): the peer
      # compiles the two this part needs from their files.
      dir = Path.dirname(__ENV__.file)

      for file <- ~w(lifecycle.ex scheduler_probe.ex),
          do: :erpc.call(node, Code, :compile_file, [Path.join(dir, file)], :infinity)

      :erpc.call(node, __MODULE__, :run_here, [profile], :infinity)
    after
      :peer.stop(peer)
    end
  catch
    kind, reason -> %{error: Exception.format_banner(kind, reason)}
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
      {:create,
       fn -> step(:allocate, fn -> Process.put(:plain, SM.allocate_region(size)) end) end},
      {:write, fn -> :ok = write(:plain, data) end},
      {:deallocate, fn -> :ok = dealloc(:plain) end},
      {:create_encrypted,
       fn ->
         step(:allocate, fn ->
           Process.put(:high, SM.allocate_region(size, security_level: :high))
         end)
       end},
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

        {ns, late, phase} = probe_steps(fun)
        {op, ns, late, phase}
      end

    %{
      probe: Map.new(results, fn {op, _, late, _} -> {op, late} end),
      ns: Map.new(results, fn {op, ns, _, _} -> {op, ns} end),
      phase: Map.new(results, fn {op, _, _, phase} -> {op, phase} end)
    }
  end

  # Crypto.probe_run/1 with the steps the operation
  # went through (step/2): {ns taken, worst overshoot, the step that overlapped the worst
  # late sleep most}.
  defp probe_steps(fun) do
    Process.put(:probe_steps, [])
    {start, stop, samples} = Crypto.probe_run(fun)
    steps = Process.delete(:probe_steps)
    steps = if steps == [], do: [{:whole, start, stop}], else: steps

    case Enum.max_by(samples, fn {late, _} -> late end, fn -> nil end) do
      nil -> {stop - start, 0, :none}
      {late, woke} -> {stop - start, late, phase(steps, woke - late, woke)}
    end
  end

  # The step that overlapped [from, to] most; :outside when none did.
  defp phase(steps, from, to) do
    {name, overlap} =
      steps
      |> Enum.map(fn {name, a, b} -> {name, min(b, to) - max(a, from)} end)
      |> Enum.max_by(fn {_, overlap} -> overlap end)

    if overlap > 0, do: name, else: :outside
  end

  # Runs one step of an operation, recording its name and time span for the report.
  defp step(name, fun) do
    from = System.monotonic_time(:nanosecond)
    result = fun.()
    to = System.monotonic_time(:nanosecond)
    Process.put(:probe_steps, [{name, from, to} | Process.get(:probe_steps, [])])
    result
  end

  defp write(key, data) do
    {:ok, id} = Process.get(key)
    {:ok, m} = step(:map, fn -> SM.map_region(id) end)
    :ok = step(:write, fn -> SM.write(m, 0, data) end)
    :ok = step(:unmap, fn -> SM.unmap_region(m) end)
  end

  defp read(key, size) do
    {:ok, id} = Process.get(key)
    {:ok, m} = step(:map, fn -> SM.map_region(id) end)
    {:ok, _} = step(:read, fn -> SM.read(m, 0, size) end)
    :ok = step(:unmap, fn -> SM.unmap_region(m) end)
  end

  defp dealloc(key) do
    {:ok, id} = Process.delete(key)
    step(:deallocate_region, fn -> SM.deallocate_region(id) end)
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

    step(:exit_and_gc, fn ->
      receive do
        {:DOWN, ^ref, :process, ^pid, _} -> :ok
      end
    end)

    # the reaper thread's munmap runs after the DOWN: probed while the probe goes on
    step(:after_exit, fn -> Process.sleep(20) end)
  end

  # Set up outside the probe window: a large POSIX segment nobody uses any more (what a
  # killed VM leaves). Probed: the sweep that removes it. The task that made it let go of
  # it when it exited, but its mapping is unmapped by the reaper thread afterwards (the
  # garbage collection of the last reference, probed on its own above): until then the
  # segment is in use, not an orphan, so the setup waits for a dry-run sweep to say it
  # would be removed.
  defp orphan_setup(size) do
    id =
      Task.async(fn ->
        {:ok, region, info} =
          Native.create(size, %{SnakepitShm.Bench.Lifecycle.native_opts() | backend: :posix})

        {:ok, m} = Native.map(region, :read_write)
        :ok = Native.write_dirty(m, size - 4, "last")
        info.id
      end)
      |> Task.await(:infinity)

    wait_orphan(id, 500)
  end

  defp wait_orphan(id, 0), do: id

  defp wait_orphan(id, tries) do
    case Native.sweep_segment(id, true) do
      {:ok, :removed} ->
        id

      _ ->
        Process.sleep(10)
        wait_orphan(id, tries - 1)
    end
  end

  defp sweep_big_orphans(id) do
    step(:garbage_collect, fn -> :erlang.garbage_collect() end)
    wait_removed(id, 50)
  end

  defp wait_removed(_id, 0), do: :ok

  defp wait_removed(id, tries) do
    step(:sweep_orphans, fn -> Sweep.sweep_orphans() end)

    if File.exists?("/dev/shm/" <> id) do
      step(:wait, fn -> Process.sleep(10) end)
      wait_removed(id, tries - 1)
    else
      :ok
    end
  end
end
