defmodule SnakepitShm.Bench.Programs do
  @moduledoc """
  The helper programs of the bench: C++ references built with g++ into `_build/bench`,
  and persistent Python processes (`/usr/bin/python3`), all driven as Erlang ports so
  that every comparison is measured in the same rounds of the same run.
  """

  @python "/usr/bin/python3"
  @build_dir "_build/bench"
  @reply_timeout 600_000

  @programs %{
    handoff_ref: {"handoff_ref.cpp", []},
    crypto_ref: {"crypto_ref.cpp", ["pkg-config:libsodium"]},
    fresh_pages: {"fresh_pages.cpp", []},
    make_orphans: {"make_orphans.cpp", ["core", "pkg-config:libsodium"]},
    robust_quota: {"robust_quota.cpp", ["-lpthread"]}
  }

  @doc "Directory of the bench sources (bench/)."
  def bench_dir, do: Path.expand("bench", File.cwd!())

  @doc "Builds every C++ program that is missing or older than its sources. Returns paths."
  @spec build_all() :: %{atom() => String.t()}
  def build_all do
    File.mkdir_p!(@build_dir)
    Map.new(@programs, fn {name, spec} -> {name, build(name, spec)} end)
  end

  defp build(name, {source, libs}) do
    src = Path.join([bench_dir(), "cpp", source])
    out = Path.expand(Path.join(@build_dir, Atom.to_string(name)))
    deps = [src, Path.join([bench_dir(), "cpp", "bench_util.hpp"])] ++ core_deps(libs)

    if stale?(out, deps) do
      args =
        ["-std=c++17", "-O2", "-Wall", "-Wextra", "-o", out, src] ++
          Enum.flat_map(libs, &link_args/1)

      case System.cmd("g++", args, stderr_to_stdout: true) do
        {_, 0} -> :ok
        {log, status} -> Mix.raise("g++ failed (#{status}) building #{source}:\n#{log}")
      end
    end

    out
  end

  defp core_deps(libs), do: if("core" in libs, do: [core_lib()], else: [])

  defp core_lib, do: Path.expand("_build/cmake/libspshm_core.a")

  defp link_args("core") do
    unless File.exists?(core_lib()),
      do: Mix.raise("#{core_lib()} is missing: run `mix compile` first")

    [core_lib()]
  end

  defp link_args("-l" <> _ = flag), do: [flag]

  defp link_args("pkg-config:" <> lib) do
    case System.cmd("pkg-config", ["--cflags", "--libs", lib], stderr_to_stdout: true) do
      {flags, 0} -> String.split(flags)
      {log, _} -> Mix.raise("pkg-config #{lib} failed (install it: make deps-test): #{log}")
    end
  end

  defp stale?(out, deps) do
    case File.stat(out, time: :posix) do
      {:ok, %{mtime: built}} ->
        Enum.any?(deps, fn dep -> File.stat!(dep, time: :posix).mtime > built end)

      {:error, _} ->
        true
    end
  end

  # ---- C++ programs speaking one line per request ----

  @doc "Starts a persistent C++ program that answers one line per request line."
  @spec open_line_port(String.t(), [String.t()]) :: port()
  def open_line_port(exe, args \\ []) do
    Port.open({:spawn_executable, exe}, [:binary, {:line, 4096}, :exit_status, args: args])
  end

  @doc "Sends one request line and returns the answer line."
  @spec line_request(port(), iodata()) :: String.t()
  def line_request(port, request) do
    Port.command(port, [request, ?\n])

    receive do
      {^port, {:data, {:eol, "error " <> why}}} -> raise "#{inspect(port)}: #{why}"
      {^port, {:data, {:eol, line}}} -> line
      {^port, {:exit_status, status}} -> raise "helper program exited with status #{status}"
    after
      @reply_timeout -> raise "helper program did not answer #{inspect(request)}"
    end
  end

  @doc "Asks a line port to quit and waits for it to exit."
  def close_line_port(port) do
    Port.command(port, "quit\n")
    await_exit(port)
  end

  @doc "Runs a C++ program to completion and returns its stdout."
  @spec run(String.t(), [String.t()]) :: String.t()
  def run(exe, args) do
    case System.cmd(exe, args, stderr_to_stdout: false) do
      {out, 0} -> out
      {out, status} -> raise "#{exe} #{Enum.join(args, " ")} exited #{status}: #{out}"
    end
  end

  # ---- Python processes speaking {packet, 4} ----

  @doc "Starts `bench/python/<script>` under #{@python} as a `{packet, 4}` port."
  @spec open_python(String.t(), [String.t()]) :: port()
  def open_python(script, args \\ []) do
    unless File.exists?(@python),
      do: Mix.raise("#{@python} is missing: the bench needs Debian's python3 with numpy")

    path = Path.join([bench_dir(), "python", script])

    Port.open({:spawn_executable, @python}, [
      :binary,
      {:packet, 4},
      :exit_status,
      args: [path | args]
    ])
  end

  @doc "Sends one framed request and returns the framed answer."
  @spec request(port(), iodata()) :: binary()
  def request(port, body) do
    Port.command(port, body)
    await_reply(port)
  end

  @doc "Waits for the next framed answer of `port`."
  @spec await_reply(port()) :: binary()
  def await_reply(port) do
    receive do
      {^port, {:data, data}} -> data
      {^port, {:exit_status, status}} -> raise "python helper exited with status #{status}"
    after
      @reply_timeout -> raise "python helper did not answer"
    end
  end

  @doc "Asks a Python port to quit and waits for it to exit."
  def close_python(port) do
    Port.command(port, "Q")
    await_exit(port)
  end

  defp await_exit(port) do
    receive do
      {^port, {:exit_status, _}} -> :ok
    after
      10_000 ->
        if Port.info(port) != nil, do: Port.close(port)
        :ok
    end
  end

  @doc "priv/python of the application (where snakepit_shm lives)."
  def python_client_dir, do: Path.join(:code.priv_dir(:snakepit_shm), "python")
end
