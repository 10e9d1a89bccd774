defmodule Mix.Tasks.Compile.SnakepitShmNif do
  @moduledoc """
  Builds the C++ NIF and the C ABI library with CMake into `priv/`.

  Defined here, in `mix.exs`, so that it exists before anything else of the project is
  compiled: the NIF is in `priv/` on the very first clean build, before tests load it.
  Set `SNAKEPIT_SHM_SANITIZE=1` to build with AddressSanitizer and UBSan (into
  `_build/cmake-asan`, output `priv/asan/`).
  """
  use Mix.Task.Compiler

  @impl true
  def run(_args) do
    root = File.cwd!()
    sanitize? = System.get_env("SNAKEPIT_SHM_SANITIZE") in ["1", "true"]
    build_dir = Path.join(root, if(sanitize?, do: "_build/cmake-asan", else: "_build/cmake"))
    out_dir = Path.join(root, if(sanitize?, do: "priv/asan", else: "priv"))

    erts_include =
      Path.join([:code.root_dir(), "erts-#{:erlang.system_info(:version)}", "include"])

    configure = [
      "-S",
      root,
      "-B",
      build_dir,
      "-DCMAKE_BUILD_TYPE=Release",
      "-DERTS_INCLUDE_DIR=#{erts_include}",
      "-DSPSHM_OUTPUT_DIR=#{out_dir}",
      "-DSPSHM_SANITIZE=#{if sanitize?, do: "ON", else: "OFF"}",
      "-DSPSHM_BUILD_TESTS=OFF"
    ]

    with :ok <- cmd("cmake", configure),
         :ok <- cmd("cmake", ["--build", build_dir, "--parallel", "2"]) do
      {:ok, []}
    else
      {:error, message} ->
        Mix.shell().error(message)
        {:error, []}
    end
  end

  defp cmd(exe, args) do
    case System.find_executable(exe) do
      nil ->
        {:error, "#{exe} not found: run `make deps` (scripts/install-deps.sh) first"}

      path ->
        case System.cmd(path, args, stderr_to_stdout: true) do
          {out, 0} ->
            if System.get_env("SNAKEPIT_SHM_VERBOSE_BUILD"), do: Mix.shell().info(out)
            :ok

          {out, status} ->
            {:error, out <> "\n#{exe} #{Enum.join(args, " ")} failed with status #{status}"}
        end
    end
  end
end

defmodule SnakepitShm.MixProject do
  use Mix.Project

  def project do
    [
      app: :snakepit_shm,
      version: "0.1.0",
      elixir: "~> 1.14",
      compilers: [:snakepit_shm_nif] ++ Mix.compilers(),
      start_permanent: Mix.env() == :prod,
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: [],
      docs: [main: "readme"],
      test_coverage: [summary: [threshold: 0]]
    ]
  end

  def application do
    [
      extra_applications: [:logger, :crypto],
      mod: {Snakepit.SharedMemory.Application, []}
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
