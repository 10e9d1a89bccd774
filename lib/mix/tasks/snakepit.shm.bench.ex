defmodule Mix.Tasks.Snakepit.Shm.Bench do
  @shortdoc "Benchmarks snakepit_shm against its alternatives; writes bench/RESULTS.md"

  @help """
  Runs the benchmarks of bench/ (issue 6) in one VM and writes bench/RESULTS.md and the
  PNG plots beside it: the handoff of an Elixir binary to a persistent Python worker
  (fresh and warm regions against an Erlang Port, a Unix socket and a C++ memcpy),
  region lifecycle latency against Python's multiprocessing.shared_memory, concurrency
  and reference-count rates, zero-copy reads, encryption and zeroing against libsodium,
  10 000 live regions, and the cost of fresh pages.

      mix snakepit.shm.bench [--quick] [--only PART[,PART...]] [--out DIR]
                             [--report-only] [--fail-on-miss] [--format table|json]

  Needs g++, libsodium-dev, gnuplot and /usr/bin/python3 with numpy (`make bench`
  installs them). C++ helpers are built into _build/bench. Every comparison is measured
  in the same run, in rounds; ratios come from paired rounds. Do not run it beside other
  heavy work: results are only as quiet as the machine.

  ## Options

    * `--quick` - the smoke profile (under 2 minutes). Defaults to the full profile
      (under 15 minutes).
    * `--only PART[,PART...]` - run only these parts: handoff, lifecycle, concurrency,
      zero_copy, crypto, scale, fresh_pages, health, cluster, board, host_quota, channel,
      scheduler, per_request.
      Defaults to all.
    * `--out DIR` - where RESULTS.md and the plots go. Defaults to `bench` for a full
      run of every part (the committed report), and to `_build/bench-quick` for
      `--quick` or `--only` runs, which never touch the committed report.
    * `--report-only` - measure nothing: write RESULTS.md and the plots again from the
      last full run's results (`_build/bench/last_results.etf`), e.g. after a change to the
      report. Defaults to off.
    * `--fail-on-miss` - exit with status 1 when a target is missed. Defaults to off:
      a missed target is reported in RESULTS.md, and the run still succeeds.
    * `--format table|json` - what to print at the end: the targets as a table, or as
      JSON. Defaults to `table`.

  ## Exit status

  0 when every part ran and RESULTS.md was written (and, with `--fail-on-miss`, every
  target was met), 1 when a part failed or a target was missed under `--fail-on-miss`,
  2 on bad usage.
  """
  @moduledoc @help

  use Mix.Task

  alias Snakepit.SharedMemory.CLI.Command

  @switches [
    quick: :boolean,
    only: :string,
    out: :string,
    fail_on_miss: :boolean,
    report_only: :boolean
  ]

  @impl true
  def run(argv) do
    %{opts: opts, format: format} =
      Command.parse!("snakepit.shm.bench", @help, argv, @switches, remote: false)

    load_bench_code()
    # Compiled at run time from bench/lib: called through variables.
    runner = SnakepitShm.Bench.Runner
    targets_mod = SnakepitShm.Bench.Targets
    parts = parts!(opts[:only], runner.parts())
    # The product logs each free at :debug; keep the console (and its cost) out of the
    # measurements, before and after the application's config is loaded.
    Application.put_env(:logger, :level, :warning)
    Logger.configure(level: :warning)
    Mix.Task.run("app.start")
    Logger.configure(level: :warning)

    results =
      try do
        if opts[:report_only] do
          runner.report_only(opts[:out] || "bench")
        else
          runner.run(
            profile: if(opts[:quick], do: :quick, else: :full),
            only: parts,
            out: opts[:out]
          )
        end
      rescue
        e ->
          Command.fail!(
            "mix snakepit.shm.bench: failed: " <> Exception.format(:error, e, __STACKTRACE__)
          )
      end

    targets = targets_mod.evaluate(results)
    print(targets, format)
    missed = Enum.reject(targets, & &1.met)
    Command.finish(if opts[:fail_on_miss] == true and missed != [], do: 1, else: 0)
  end

  # The parts are the runner's (bench/lib/runner.ex): one list.
  defp parts!(nil, all), do: all

  defp parts!(text, all) do
    names = Enum.map(all, &Atom.to_string/1)
    parts = text |> String.split(",", trim: true) |> Enum.map(&String.trim/1)

    case Enum.reject(parts, &(&1 in names)) do
      [] when parts != [] ->
        Enum.map(parts, &String.to_existing_atom/1)

      _ ->
        Command.usage_error!(
          "snakepit.shm.bench",
          "--only takes a comma-separated list of #{Enum.join(names, ", ")}, got: #{inspect(text)}"
        )
    end
  end

  # The bench modules live in bench/lib (not part of the library): compiled in memory.
  defp load_bench_code do
    files = Path.wildcard(Path.join(File.cwd!(), "bench/lib/*.ex"))
    if files == [], do: Command.fail!("bench/lib/*.ex not found: run from the project root")
    {:ok, _modules, _warnings} = Kernel.ParallelCompiler.require(files)
  end

  defp print(targets, :json), do: Command.print_json(%{targets: targets})

  defp print(targets, :table) do
    for t <- targets do
      status = if t.met, do: "met   ", else: "MISSED"
      Mix.shell().info("#{status}  #{t.what}: #{t.measured} (target #{t.target})")
    end
  end
end
