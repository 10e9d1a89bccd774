defmodule Snakepit.SharedMemory.CLI.DoctorPython do
  @moduledoc false
  # The doctor's checks of the workers' side: one run of the workers' interpreter with
  # PYTHONPATH=priv/python and SNAKEPIT_SHM_LIB=priv/libsnakepit_shm.so imports the
  # client, loads its C library, imports numpy and opens a pidfd.

  alias Snakepit.SharedMemory.CLI.Doctor

  import Doctor, only: [finding: 3, finding: 4]

  @doc "Findings about the Python client under `python`, with priv/ of the project."
  @spec checks(String.t(), String.t()) :: [Doctor.finding()]
  def checks(python, priv) do
    if File.exists?(python) do
      python_client(python, priv)
    else
      [
        finding(
          "Python client",
          :fail,
          "#{python} not found",
          "apt-get install python3 python3-numpy (`make deps`)"
        )
      ]
    end
  end

  @probe """
  import json, os, sys
  out = {"python": sys.version.split()[0], "prefix": sys.prefix,
         "base_prefix": getattr(sys, "base_prefix", sys.prefix)}
  try:
      import snakepit_shm
      out["client"] = snakepit_shm.__version__
      from snakepit_shm import _native
      _native.library()
      out["library"] = True
  except Exception as exc:
      out["error"] = f"{type(exc).__name__}: {exc}"
  try:
      import numpy
      out["numpy"] = numpy.__version__
  except ImportError as exc:
      out["numpy_error"] = str(exc)
  pidfd = getattr(os, "pidfd_open", None)
  if pidfd is not None:
      try:
          os.close(pidfd(os.getpid()))
          out["pidfd"] = True
      except OSError as exc:
          out["pidfd"] = str(exc)
  print(json.dumps(out))
  """

  defp python_client(python, priv) do
    env = [
      {"PYTHONPATH", Path.join(priv, "python")},
      {"SNAKEPIT_SHM_LIB", Path.join(priv, "libsnakepit_shm.so")},
      {"PYTHONDONTWRITEBYTECODE", "1"}
    ]

    case System.cmd(python, ["-c", @probe], env: env, stderr_to_stdout: true) do
      {out, 0} ->
        case Snakepit.SharedMemory.JSON.decode(
               out |> String.split("\n", trim: true) |> List.last() || ""
             ) do
          {:ok, probe} ->
            python_findings(python, probe)

          _ ->
            [
              finding(
                "Python client",
                :fail,
                "unexpected output: #{String.slice(out, 0, 300)}",
                "run #{python} by hand"
              )
            ]
        end

      {out, status} ->
        [
          finding(
            "Python client",
            :fail,
            "#{python} exited with #{status}: #{String.slice(out, 0, 300)}",
            "run #{python} by hand"
          )
        ]
    end
  end

  defp python_findings(python, probe) do
    client =
      case probe do
        %{"library" => true} ->
          finding(
            "Python client",
            :ok,
            "snakepit_shm #{probe["client"]} imports under #{python} #{probe["python"]} with libsnakepit_shm.so"
          )

        %{"error" => error} ->
          finding(
            "Python client",
            :fail,
            error,
            "set PYTHONPATH=priv/python and SNAKEPIT_SHM_LIB=priv/libsnakepit_shm.so for the workers; run `mix compile`"
          )
      end

    numpy =
      case probe do
        %{"numpy" => version} ->
          finding("numpy", :ok, "numpy #{version}")

        _ ->
          finding("numpy", :warn, "numpy is missing under #{python}", numpy_fix(python, probe))
      end

    pidfd =
      case probe["pidfd"] do
        true ->
          finding("pidfd", :ok, "pidfd_open works: a killed worker's holds are released at once")

        nil ->
          finding(
            "pidfd",
            :warn,
            "Python has no os.pidfd_open: not checked by behaviour",
            "see the kernel finding"
          )

        error ->
          finding(
            "pidfd",
            :warn,
            "pidfd_open failed: #{error}",
            "dead workers are found by polling: upgrade to Linux >= 5.3"
          )
      end

    [client, numpy, pidfd]
  end

  @doc false
  # How to get numpy for *this* interpreter: apt only helps Debian's own python3.
  @spec numpy_fix(String.t(), map()) :: String.t()
  def numpy_fix(python, probe) do
    cond do
      probe["prefix"] == "/usr" ->
        "apt-get install python3-numpy (Region.ndarray() needs it)"

      probe["base_prefix"] == "/usr" ->
        "#{python} is a venv of Debian's python3: apt-get install python3-numpy and recreate " <>
          "the venv with --system-site-packages, or `#{python} -m pip install numpy`"

      true ->
        "#{python} is not Debian's python3 (prefix #{probe["prefix"]}), so apt-get " <>
          "install python3-numpy does not reach it: `#{python} -m pip install numpy`, or " <>
          "run the workers with --python /usr/bin/python3 and apt-get install python3-numpy"
    end
  end
end
