defmodule SnakepitShm.Bench.Meta do
  @moduledoc "What a run was: machine, date, commit, versions, profile and duration."

  @doc "Collects the description of this run."
  def collect(profile, duration_ms) do
    %{
      date: DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601(),
      commit: commit(),
      machine: machine(),
      kernel: cmd("uname", ["-r"]),
      otp: System.otp_release(),
      elixir: System.version(),
      python:
        cmd("/usr/bin/python3", [
          "-c",
          "import sys, numpy; print(sys.version.split()[0], 'numpy', numpy.__version__)"
        ]),
      schedulers: System.schedulers_online(),
      dirty_cpu_schedulers: :erlang.system_info(:dirty_cpu_schedulers_online),
      profile: profile.name,
      load_average: load_average(),
      duration_s: duration_ms / 1000
    }
  end

  @doc "1, 5 and 15 minute load averages now: how quiet the machine is."
  def load_average do
    case File.read("/proc/loadavg") do
      {:ok, text} -> text |> String.split() |> Enum.take(3) |> Enum.join(" ")
      _ -> "unknown"
    end
  end

  defp commit do
    sha = cmd("git", ["rev-parse", "--short=10", "HEAD"])
    dirty = cmd("git", ["status", "--porcelain", "--untracked-files=no"])
    if dirty in ["", "unknown"], do: sha, else: sha <> "+dirty"
  end

  # "AMD EPYC, 2 cores, 23.4 GiB" from /proc (Linux).
  defp machine do
    cpu =
      case File.read("/proc/cpuinfo") do
        {:ok, text} ->
          case Regex.run(~r/^model name\s*:\s*(.+)$/m, text) do
            [_, name] -> String.trim(name)
            _ -> "unknown CPU"
          end

        _ ->
          "unknown CPU"
      end

    mem =
      case File.read("/proc/meminfo") do
        {:ok, text} ->
          case Regex.run(~r/^MemTotal:\s*(\d+) kB/m, text) do
            [_, kb] -> "#{Float.round(String.to_integer(kb) / 1024 / 1024, 1)} GiB"
            _ -> "? GiB"
          end

        _ ->
          "? GiB"
      end

    "#{cpu}, #{:erlang.system_info(:logical_processors_available)} cores, #{mem}"
  end

  defp cmd(exe, args) do
    case System.find_executable(exe) && System.cmd(exe, args, stderr_to_stdout: true) do
      {out, 0} -> String.trim(out)
      _ -> "unknown"
    end
  rescue
    _ -> "unknown"
  end
end
