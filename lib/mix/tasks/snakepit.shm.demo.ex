defmodule Mix.Tasks.Snakepit.Shm.Demo do
  @shortdoc "Hands a 64 MiB matrix from Elixir to a Python worker, zero-copy, and times it"

  @help """
  The end-to-end handoff that `make demo` runs, step by step:

    1. starts the :snakepit_shm application;
    2. builds a float32 matrix in Elixir (64 MiB, values 0, 1, 2, ...);
    3. starts a persistent Python worker (`/usr/bin/python3 priv/python/demo_worker.py`)
       through an Erlang Port, with PYTHONPATH=priv/python and
       SNAKEPIT_SHM_LIB=priv/libsnakepit_shm.so;
    4. allocates a region (metadata dtype/shape) and writes the matrix into it;
    5. sends the worker the region's ref (`export_ref/2`, a few hundred bytes of JSON);
    6. the worker attaches it with `snakepit_shm.attach(ref)` and checks with numpy,
       without copying: every value, the sum, and that the array's buffer lies inside
       the shared mapping of the region;
    7. the worker attaches a second region read-write and writes the row sums into it;
       Elixir reads them back and checks them;
    8. times the handoff of the same bytes three ways in this run: through the Port
       itself, through a fresh region, and through a warm (reused) region;
    9. frees everything and checks that nothing of ours is left on the host.

      mix snakepit.shm.demo [--mib N] [--backend auto|memfd|posix] [--repeat R]
                            [--python PATH] [--format table|json]

  ## Options

    * `--mib N` - payload size in MiB, 1 to 1024. Defaults to `64`.
    * `--backend auto|memfd|posix` - backend of the regions. Defaults to `auto`
      (memfd on Linux).
    * `--repeat R` - timed runs of each path, the median is shown. Defaults to `3`.
    * `--python PATH` - the Python interpreter (needs numpy). Defaults to
      `/usr/bin/python3`.
    * `--format table|json` - step-by-step text, or one JSON report. Defaults to `table`.

  ## Exit status

  0 when every check passed, 1 when one failed (the message says which), 2 on bad usage.
  """
  @moduledoc @help

  use Mix.Task

  alias Snakepit.SharedMemory.CLI.{Command, Demo}

  @task "snakepit.shm.demo"
  @switches [mib: :integer, backend: :string, repeat: :integer, python: :string]

  @impl true
  def run(argv) do
    %{opts: opts, format: format} = Command.parse!(@task, @help, argv, @switches, remote: false)
    options = options!(opts)
    Command.load_code()
    say = if format == :table, do: &Mix.shell().info/1, else: fn _ -> :ok end

    say.(
      "snakepit_shm demo: Elixir hands #{options.mib} MiB of float32 to a Python worker " <>
        "through shared memory, without copying it."
    )

    {us, result} = :timer.tc(fn -> Command.quietly(fn -> Demo.run(options, say) end) end)

    case {result, format} do
      {{:ok, report}, :json} ->
        Command.print_json(Map.merge(report, %{ok: true, seconds: us / 1.0e6}))

      {{:ok, _report}, :table} ->
        say.(
          "\nDone in #{Float.round(us / 1.0e6, 1)} s. See `mix help snakepit.shm.demo` for what each step does."
        )

      {{:error, message, report}, :json} ->
        Command.print_json(Map.merge(report, %{ok: false, error: message}))
        Command.fail!("demo failed: " <> message)

      {{:error, message, _report}, :table} ->
        Command.fail!("\ndemo FAILED: " <> message)
    end
  end

  defp options!(opts) do
    mib = Keyword.get(opts, :mib, 64)
    repeat = Keyword.get(opts, :repeat, 3)

    backend =
      case Keyword.get(opts, :backend, "auto") do
        b when b in ["auto", "memfd", "posix"] ->
          String.to_atom(b)

        other ->
          Command.usage_error!(
            @task,
            "--backend must be auto, memfd or posix, got: #{inspect(other)}"
          )
      end

    if mib not in 1..1024,
      do: Command.usage_error!(@task, "--mib must be between 1 and 1024, got: #{mib}")

    if repeat not in 1..100,
      do: Command.usage_error!(@task, "--repeat must be between 1 and 100, got: #{repeat}")

    %{
      mib: mib,
      backend: backend,
      repeat: repeat,
      python: Command.executable(Keyword.get(opts, :python, "/usr/bin/python3"))
    }
  end
end
