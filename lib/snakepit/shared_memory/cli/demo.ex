defmodule Snakepit.SharedMemory.CLI.Demo do
  @moduledoc false
  # The end-to-end handoff of `mix snakepit.shm.demo`: Elixir writes a float32 matrix
  # into a region, a persistent Python worker attaches it zero-copy, checks it with
  # numpy and writes its row sums into a second region; then the same bytes are handed
  # over through the Port itself, a fresh region and a warm (reused) region, timed in
  # the same run; then everything is freed and the host is checked for leftovers.
  #
  # Every step is reported through `say`, a function of one string (the task prints it;
  # JSON output passes a no-op); the result is a report map.

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.CLI.{DemoData, DemoWorker, HostScan, Human, RegionView, Table}
  alias Snakepit.SharedMemory.JSON

  @type options :: %{
          mib: pos_integer(),
          backend: atom(),
          repeat: pos_integer(),
          python: String.t()
        }

  @doc "Runs the demo. `{:ok, report}` when every check passed, `{:error, message, report}` otherwise."
  @spec run(options(), (String.t() -> any())) :: {:ok, map()} | {:error, String.t(), map()}
  def run(opts, say) do
    # The body runs in its own process: when it ends, its mappings and region
    # resources are garbage, and the leftover check sees what the OS still holds.
    task = Task.async(fn -> body(opts, say) end)
    result = Task.await(task, :infinity)
    report = elem(result, tuple_size(result) - 1)
    leftovers = leftovers(Map.get(report, :region_ids, []))
    report = Map.put(report, :leftovers, leftovers)

    case {result, leftovers} do
      {{:ok, _}, []} ->
        say.(
          "#{step(9)}Freed both regions and stopped the worker. Nothing of ours is left: " <>
            "no /dev/shm/spshm_* segment and no memfd of this VM."
        )

        {:ok, report}

      {{:ok, _}, ids} ->
        {:error, "left behind after deallocation: #{Enum.join(ids, ", ")}", report}

      {{:error, message, _}, _} ->
        {:error, message, report}
    end
  end

  defp body(opts, say) do
    report = %{mib: opts.mib, bytes: opts.mib * 1_048_576, backend: opts.backend, region_ids: []}

    with {:ok, report} <- start_app(report, say),
         {:ok, payload, report} <- generate(opts, report, say),
         {:ok, worker} <- start_worker(opts, report) do
      try do
        with {:ok, report} <- hello(worker, report, say),
             {:ok, data, report} <- hand_over(opts, payload, worker, report, say),
             {:ok, report} <- compute(opts, data, worker, report, say),
             {:ok, report} <- measure(opts, payload, data, worker, report, say),
             {:ok, report} <- channel_step(opts, report, say) do
          free(data)
          {:ok, report}
        else
          {:error, message, report} -> {:error, message, report}
        end
      after
        DemoWorker.stop(worker)
      end
    end
  end

  # ---- steps ----

  defp start_app(report, say) do
    case Application.ensure_all_started(:snakepit_shm) do
      {:ok, _} ->
        say.(
          "#{step(1)}Started the :snakepit_shm application in this VM (OS pid #{System.pid()})."
        )

        {:ok, report}

      {:error, reason} ->
        {:error, "the :snakepit_shm application did not start: #{inspect(reason)}", report}
    end
  end

  defp generate(opts, report, say) do
    {us, payload} = :timer.tc(fn -> DemoData.payload(opts.mib) end)
    [rows, cols] = DemoData.shape(opts.mib)

    say.(
      "#{step(2)}Built the payload in Elixir: a #{rows} x #{cols} float32 matrix, " <>
        "values 0, 1, 2, ... (#{Human.bytes(byte_size(payload))}, #{Human.micros(us)})."
    )

    {:ok, payload, report}
  end

  defp start_worker(opts, report) do
    case DemoWorker.start(opts.python, priv_dir()) do
      {:ok, worker} -> {:ok, worker}
      {:error, message} -> {:error, message, report}
    end
  end

  defp hello(worker, report, say) do
    case DemoWorker.request(worker, %{op: "hello"}) do
      {:ok, hello} ->
        say.(
          "#{step(3)}Started a persistent Python worker through an Erlang Port: " <>
            "#{worker.command} (OS pid #{worker.os_pid}, Python #{hello["python"]}, numpy #{hello["numpy"]})."
        )

        {:ok,
         Map.put(report, :worker, %{
           os_pid: worker.os_pid,
           python: hello["python"],
           numpy: hello["numpy"]
         })}

      {:error, message} ->
        {:error, "the Python worker did not start: #{message} (is python3-numpy installed?)",
         report}
    end
  end

  defp hand_over(opts, payload, worker, report, say) do
    [rows, cols] = DemoData.shape(opts.mib)
    metadata = %{dtype: "float32", shape: [rows, cols]}

    with {:ok, data} <- new_region(byte_size(payload), opts.backend, metadata),
         report = Map.update!(report, :region_ids, &[data.id | &1]),
         {us, :ok} <- :timer.tc(fn -> SHM.write(data.mapping, 0, payload) end),
         {:ok, ref} <- SHM.export_ref(data.id),
         {:ok, json} <- JSON.encode(ref),
         {:ok, check} <- DemoWorker.request(worker, %{op: "verify", ref: ref}) do
      say.(
        "#{step(4)}Allocated region #{data.id} (#{Human.bytes(byte_size(payload))}, backend #{ref["backend"]}, " <>
          "metadata dtype float32, shape [#{rows}, #{cols}]) and wrote the payload into it (#{Human.micros(us)})."
      )

      say.(
        "#{step(5)}Sent the worker the region's ref, #{byte_size(json)} bytes of JSON instead of #{Human.bytes(byte_size(payload))}:\n     #{json}"
      )

      report = report |> Map.put(:verify, check) |> Map.put(:ref_bytes, byte_size(json))
      check_verify(data, report, opts, say)
    else
      {:error, %SHM.Error{} = error} -> {:error, "#{error.reason}: #{error.message}", report}
      {:error, message} when is_binary(message) -> {:error, message, report}
      {_us, {:error, error}} -> {:error, "write failed: #{error.message}", report}
    end
  end

  # Judges the worker's "verify" reply: values, sum, and where the array lives.
  defp check_verify(data, %{verify: v} = report, opts, say) do
    expected = DemoData.sum(opts.mib)
    mapping = v["mapping"] || %{}

    checks = [
      {v["equal"] == true,
       "every value equals the one Elixir wrote (compared with numpy, in place)"},
      {v["sum"] == expected, "sum in float64: #{v["sum"]} (expected #{expected})"},
      {v["zero_copy"] == true,
       "the array's data at 0x#{Integer.to_string(v["address"] || 0, 16)} lies inside the shared mapping " <>
         "0x#{Integer.to_string(mapping["start"] || 0, 16)}-0x#{Integer.to_string(mapping["end"] || 0, 16)} " <>
         "(#{mapping["perms"]}) of #{mapping["path"]}: no copy was made"}
    ]

    lines =
      Enum.map_join(checks, "\n", fn {ok, text} ->
        "     #{if ok, do: "ok  ", else: "FAIL"} #{text}"
      end)

    say.(
      "#{step(6)}The worker attached it (snakepit_shm.attach(ref)) and checked, as a #{v["dtype"]} array of shape #{inspect(v["shape"])}:\n#{lines}"
    )

    if Enum.all?(checks, &elem(&1, 0)),
      do: {:ok, data, report},
      else: {:error, "the worker's checks of the region failed (see above)", report}
  end

  defp compute(opts, data, worker, report, say) do
    [rows, _cols] = DemoData.shape(opts.mib)

    with {:ok, out} <- new_region(rows * 8, opts.backend, %{dtype: "float64", shape: [rows]}),
         report = Map.update!(report, :region_ids, &[out.id | &1]),
         {:ok, data_ref} <- SHM.export_ref(data.id),
         {:ok, out_ref} <- SHM.export_ref(out.id),
         {:ok, reply} <-
           DemoWorker.request(worker, %{op: "compute", ref: data_ref, out: out_ref}),
         {:ok, bytes} <- SHM.read(out.mapping, 0, rows * 8) do
      sums = for <<x::float-64-little <- bytes>>, do: x
      good = sums == DemoData.row_sums(opts.mib)
      free(out)

      say.(
        "#{step(7)}The worker attached a second region #{out.id} read-write and wrote the #{rows} row sums " <>
          "of the matrix into it (#{Human.micros(reply["worker_us"])}); Elixir read them back: " <>
          if(good, do: "all #{rows} are right.", else: "WRONG.")
      )

      if good,
        do: {:ok, Map.put(report, :row_sums_ok, true)},
        else:
          {:error, "the row sums written by the worker are wrong",
           Map.put(report, :row_sums_ok, false)}
    else
      {:error, %SHM.Error{} = error} -> {:error, "#{error.reason}: #{error.message}", report}
      {:error, message} -> {:error, message, report}
    end
  end

  # ---- timings ----

  defp measure(opts, payload, data, worker, report, say) do
    expected = DemoData.xor64(payload)

    with {:ok, port} <-
           repeat(opts.repeat, expected, fn -> DemoWorker.send_bytes(worker, payload) end),
         {:ok, fresh} <-
           repeat(opts.repeat, expected, fn -> fresh_handoff(opts, payload, worker) end),
         {:ok, _warmup} <- warm_handoff(data, payload, worker),
         {:ok, warm} <-
           repeat(opts.repeat, expected, fn -> warm_handoff(data, payload, worker) end),
         {:ok, _} <- DemoWorker.request(worker, %{op: "release"}) do
      timings = %{port: port, fresh_region: fresh, warm_region: warm}
      say.(timing_text(timings, byte_size(payload), opts.repeat))
      {:ok, Map.put(report, :timings, timings_report(timings, byte_size(payload)))}
    else
      {:error, message} -> {:error, message, report}
    end
  end

  # Runs `fun` `n` times; each returns {:ok, %{"xor" => x}}; the times in µs.
  defp repeat(n, expected, fun) do
    Enum.reduce_while(1..n, {:ok, []}, fn _, {:ok, times} ->
      {us, result} = :timer.tc(fun)

      case result do
        {:ok, %{"xor" => ^expected}} ->
          {:cont, {:ok, [us | times]}}

        {:ok, %{"xor" => other}} ->
          {:halt, {:error, "the worker read xor #{other}, expected #{expected}"}}

        {:error, message} ->
          {:halt, {:error, message}}
      end
    end)
    |> then(fn
      {:ok, times} -> {:ok, Enum.reverse(times)}
      error -> error
    end)
  end

  # Allocate, map, write, export, the worker attaches and reads every byte, then closes.
  # Freeing happens after the reply and is not part of the handoff.
  defp fresh_handoff(opts, payload, worker) do
    with {:ok, region} <- new_region(byte_size(payload), opts.backend, %{dtype: "float32"}) do
      result =
        with :ok <- SHM.write(region.mapping, 0, payload),
             {:ok, ref} <- SHM.export_ref(region.id) do
          DemoWorker.request(worker, %{op: "read", ref: ref})
        end

      free(region)
      result
    end
    |> normalize()
  end

  # The region stays allocated and attached by the worker: write, then the worker reads.
  defp warm_handoff(data, payload, worker) do
    with :ok <- SHM.write(data.mapping, 0, payload) do
      DemoWorker.request(worker, %{op: "read", ref: data.ref, keep: true})
    end
    |> normalize()
  end

  defp normalize({:error, %SHM.Error{} = e}), do: {:error, "#{e.reason}: #{e.message}"}
  defp normalize(other), do: other

  defp timing_text(timings, bytes, repeat) do
    port = median(timings.port)

    rows =
      for {label, key} <- [
            {"Erlang Port (stdio, {packet, 4})", :port},
            {"fresh region (allocate + write + attach)", :fresh_region},
            {"warm region (write + read, reused)", :warm_region}
          ] do
        us = median(timings[key])
        [label, Human.micros(us), Human.rate(bytes, us), "#{Float.round(port / us, 1)}x"]
      end

    "#{step(8)}Handing #{Human.bytes(bytes)} to the worker, which reads every byte (xor over a numpy uint64 view); " <>
      "median of #{RegionView.plural(repeat, "run")} each:\n" <>
      Table.render(["PATH", "TIME", "THROUGHPUT", "VS PORT"], rows, right: [1, 2, 3], indent: 5) <>
      "\n     A fresh region pays a page fault per 4 KiB page on first touch (about 1 s per GiB);" <>
      "\n     a warm region is reused, so only the copy into it and the worker's read pass remain."
  end

  defp timings_report(timings, bytes) do
    port = median(timings.port)

    Map.new(timings, fn {key, runs} ->
      us = median(runs)

      {key,
       %{
         runs_us: runs,
         median_us: us,
         mb_per_s: round(bytes / us),
         vs_port: Float.round(port / us, 2)
       }}
    end)
  end

  defp median(list), do: list |> Enum.sort() |> Enum.at(div(length(list), 2))

  # ---- regions ----

  defp new_region(size, backend, metadata) do
    with {:ok, id} <- SHM.allocate_region(size, backend: backend, metadata: metadata) do
      case SHM.map_region(id, access_mode: :read_write) do
        {:ok, mapping} ->
          case SHM.export_ref(id) do
            {:ok, ref} -> {:ok, %{id: id, mapping: mapping, ref: ref}}
            error -> free_and(%{id: id, mapping: mapping}, error)
          end

        error ->
          SHM.deallocate_region(id)
          error
      end
    end
  end

  defp free_and(region, result) do
    free(region)
    result
  end

  defp free(%{id: id, mapping: mapping}) do
    SHM.unmap_region(mapping)
    SHM.deallocate_region(id)
  end

  # Regions of the demo, or created by this VM, still on the host (POSIX or memfd).
  defp leftovers(ids) do
    me = System.pid() |> String.to_integer()
    deadline = System.monotonic_time(:millisecond) + 2_000
    leftovers_until(ids, me, deadline)
  end

  defp leftovers_until(ids, me, deadline) do
    found = for e <- HostScan.scan(), e.id in ids or (e[:owner] && e.owner.os_pid == me), do: e.id

    if found != [] and System.monotonic_time(:millisecond) < deadline do
      # memfds close when their resources are garbage collected: give that a moment.
      Enum.each(Process.list(), &:erlang.garbage_collect/1)
      Process.sleep(50)
      leftovers_until(ids, me, deadline)
    else
      found
    end
  end

  # The project's priv/ when run from its root (what the user sees), else the app's.
  defp priv_dir do
    cond do
      File.exists?("priv/python/demo_worker.py") -> Path.expand("priv")
      is_list(dir = :code.priv_dir(:snakepit_shm)) -> List.to_string(dir)
      true -> Path.expand("priv")
    end
  end

  defp step(n), do: "\n#{n}. "

  # The message channel next to the Port (Snakepit.SharedMemory.CLI.DemoChannel).
  defp channel_step(opts, report, say) do
    case Snakepit.SharedMemory.CLI.DemoChannel.run(opts.python, priv_dir(), say) do
      {:ok, channel} -> {:ok, Map.put(report, :channel, channel)}
      {:error, message} -> {:error, "message channel: " <> message, report}
    end
  end
end
