defmodule Snakepit.SharedMemory.ReliabilityChaos do
  @moduledoc false
  # The actors of the in-VM chaos scenario (test/reliability/chaos_test.exs):
  #
  #   * BEAM workers allocate (owner: themselves), map, write random data, read it back,
  #     seal, unmap and deallocate, in a loop. Once a region's content is final they
  #     record {id, owner, crc32, size} in the `:expected` ETS table (deleted before they
  #     deallocate it themselves). Anything unexpected an operation returns goes to the
  #     `:anomalies` table.
  #   * Python workers (/usr/bin/python3 with the client) receive refs on stdin, attach
  #     them read-only, check the CRC of the content against the one sent, hold a few,
  #     close the oldest; they report "OK id" or "BAD id ..." lines.
  #
  # The driver (the test) kills random BEAM workers, SIGKILLs Python workers, kills the
  # manager, then freezes the survivors and checks the end state.

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{JSON, ReliabilityHelpers}

  @max_live 6

  # ---- tables ----

  def new_tables do
    expected = :ets.new(:chaos_expected, [:set, :public, {:write_concurrency, true}])
    anomalies = :ets.new(:chaos_anomalies, [:bag, :public, {:write_concurrency, true}])
    counters = :counters.new(6, [:write_concurrency])
    %{expected: expected, anomalies: anomalies, counters: counters}
  end

  # Counter slots.
  @allocated 1
  @freed 2
  @bytes 3
  @python_checked 4
  def allocated, do: @allocated
  def python_checked, do: @python_checked

  # ---- BEAM workers ----

  @doc """
  Starts a BEAM worker (not linked) allocating regions of `backends`; it runs until
  killed or frozen.
  """
  def start_worker(tables, seed, backends \\ [:memfd, :posix]) do
    spawn(fn ->
      :rand.seed(:exsss, {seed, seed + 1, seed + 2})
      Process.put(:chaos_backends, backends)
      worker_loop(tables, [])
    end)
  end

  defp worker_loop(tables, live) do
    receive do
      {:freeze, from} ->
        send(from, {:frozen, self()})
        frozen(live)
    after
      0 ->
        live = worker_step(tables, live)
        worker_loop(tables, live)
    end
  end

  # A frozen worker keeps its regions and mappings and does nothing more.
  defp frozen(live) do
    receive do
      {:live, from} ->
        send(from, {:live, self(), live})
        frozen(live)
    end
  end

  defp worker_step(tables, live) do
    live =
      if length(live) >= @max_live or (:rand.uniform(4) == 1 and live != []),
        do: free_one(tables, live),
        else: live

    size = Enum.random([4096, 12_288, 65_536, 200_000])
    policy = Enum.random([:automatic, :automatic, :reference_counted])
    backend = Enum.random(Process.get(:chaos_backends))

    case SharedMemory.allocate_region(size, cleanup_policy: policy, backend: backend) do
      {:ok, id} ->
        :counters.add(tables.counters, @allocated, 1)
        fill(tables, id, size, live)

      {:error, error} ->
        anomaly(tables, :allocate, error)
        live
    end
  end

  defp fill(tables, id, size, live) do
    data = :crypto.strong_rand_bytes(size)

    with {:ok, m} <- SharedMemory.map_region(id, access_mode: :read_write),
         :ok <- SharedMemory.write(m, 0, data),
         {:ok, ^data} <- SharedMemory.read(m, 0, size),
         :ok <- maybe_seal(id) do
      :counters.add(tables.counters, @bytes, size)
      :ets.insert(tables.expected, {id, self(), :erlang.crc32(data), size})
      [{id, m} | live]
    else
      other ->
        anomaly(tables, {:fill, id}, other)
        live
    end
  end

  defp maybe_seal(id), do: if(:rand.uniform(3) == 1, do: SharedMemory.seal(id), else: :ok)

  defp free_one(tables, live) do
    {{id, m}, rest} = List.pop_at(live, :rand.uniform(length(live)) - 1)
    :ets.delete(tables.expected, id)

    result =
      if :rand.uniform(2) == 1 do
        # Let go of it: unmap (frees a :reference_counted region nobody else holds),
        # then deallocate if it is still there.
        with :ok <- SharedMemory.unmap_region(m) do
          case SharedMemory.deallocate_region(id) do
            {:error, %{reason: :not_found}} -> :ok
            other -> other
          end
        end
      else
        SharedMemory.deallocate_region(id)
      end

    if result == :ok,
      do: :counters.add(tables.counters, @freed, 1),
      else: anomaly(tables, {:free, id}, result)

    rest
  end

  defp anomaly(tables, what, detail), do: :ets.insert(tables.anomalies, {what, detail})

  @doc "Freezes a worker; returns its live {id, mapping} list (or nil if it is dead)."
  def freeze(pid) do
    ref = Process.monitor(pid)
    send(pid, {:freeze, self()})

    receive do
      {:frozen, ^pid} ->
        send(pid, {:live, self()})

        receive do
          {:live, ^pid, live} ->
            Process.demonitor(ref, [:flush])
            live
        end

      {:DOWN, ^ref, :process, ^pid, _} ->
        nil
    after
      10_000 -> raise "chaos worker #{inspect(pid)} did not freeze"
    end
  end

  # ---- Python workers ----

  @python_worker """
  import json, sys, warnings, zlib
  warnings.simplefilter("ignore")
  import snakepit_shm
  held = []
  for line in sys.stdin:
      ref, crc = json.loads(line)
      try:
          region = snakepit_shm.attach(ref)
          # Freed between attach and read: RegionDeallocated (the data is no one's).
          got = zlib.crc32(region.buf) & 0xFFFFFFFF
      except snakepit_shm.SnakepitShmError as exc:
          print("GONE", ref["region_id"], type(exc).__name__, flush=True)
          continue
      except Exception as exc:  # not the client's own error: reported, and the worker lives
          print("ERR", ref["region_id"], type(exc).__name__, repr(str(exc))[:300], flush=True)
          continue
      print("OK" if got == crc else "BAD", ref["region_id"], got, crc, flush=True)
      held.append(region)
      if len(held) > 3:
          held.pop(0).close()
  """

  @doc "Starts a Python worker: a port; {port, os_pid}."
  def start_python do
    port =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 4096},
        args: ["-c", @python_worker],
        env: ReliabilityHelpers.python_env()
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    {port, os_pid}
  end

  @doc """
  Hands a Python worker a region from the expected table (its ref and the CRC of its
  content). Sealed or not, the content of an expected region no longer changes.
  """
  def feed_python({port, _os_pid}, tables) do
    case :ets.tab2list(tables.expected) do
      [] ->
        :ok

      entries ->
        {id, _owner, crc, _size} = Enum.random(entries)

        with {:ok, ref} <- SharedMemory.export_ref(id),
             {:ok, json} <- JSON.encode([ref, crc]) do
          # A worker SIGKILLed by the chaos may be gone already: its port is closed.
          try do
            Port.command(port, json <> "\n")
          rescue
            ArgumentError -> :ok
          end
        end

        :ok
    end
  end

  @doc "Collects Python reports from the mailbox: BAD lines become anomalies."
  def drain_python(tables) do
    receive do
      {port, {:data, {:eol, "OK " <> _}}} when is_port(port) ->
        :counters.add(tables.counters, @python_checked, 1)
        drain_python(tables)

      {port, {:data, {:eol, "BAD " <> rest}}} when is_port(port) ->
        # Only a corruption if the region is still expected (not freed and reused).
        anomaly(tables, :python_crc_mismatch, rest)
        drain_python(tables)

      {port, {:data, {:eol, "GONE " <> _}}} when is_port(port) ->
        drain_python(tables)

      # The start of a line cut by a SIGKILL of the worker (ours) mid-print.
      {port, {:data, {:noeol, _}}} when is_port(port) ->
        drain_python(tables)

      {port, {:data, {:eol, line}}} when is_port(port) ->
        # Any other whole line is unexpected output of the worker (a traceback, an ERR
        # line): an anomaly, reported with the line.
        anomaly(tables, {:python_output, port, System.unique_integer()}, line)
        drain_python(tables)

      {port, {:exit_status, status}} when is_port(port) and status != 137 ->
        anomaly(tables, {:python_worker_died, port}, status)
        drain_python(tables)

      {port, {:exit_status, _}} when is_port(port) ->
        drain_python(tables)
    after
      0 -> :ok
    end
  end

  @doc "The figures of the counters."
  def figures(tables) do
    c = tables.counters

    %{
      regions_allocated: :counters.get(c, @allocated),
      regions_freed_by_workers: :counters.get(c, @freed),
      bytes_written: :counters.get(c, @bytes),
      python_checks: :counters.get(c, @python_checked)
    }
  end
end
