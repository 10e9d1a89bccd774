defmodule Snakepit.SharedMemory.TaskHelpers do
  @moduledoc false
  # Running the mix tasks as a user would, and making real segments for them to find:
  # orphans of a VM killed with SIGKILL, a corrupted header, a planted symlink.

  import ExUnit.CaptureIO

  alias Snakepit.SharedMemory.JSON

  @doc """
  Runs `mix <task> args` in this VM (Mix.Task.rerun). Returns `{stdout, stderr, status}`,
  the status being what `mix` would exit with.
  """
  @spec run_task(String.t(), [String.t()]) :: {String.t(), String.t(), non_neg_integer()}
  def run_task(task, args) do
    parent = self()

    stderr =
      capture_io(:stderr, fn ->
        stdout = capture_io(fn -> send(parent, {:status, status_of(task, args)}) end)
        send(parent, {:stdout, stdout})
      end)

    assert_received_once = fn tag ->
      receive do
        {^tag, value} -> value
      after
        0 -> raise "no #{tag} from #{task}"
      end
    end

    {assert_received_once.(:stdout), stderr, assert_received_once.(:status)}
  end

  defp status_of(task, args) do
    Mix.Task.rerun(task, args)
    0
  catch
    :exit, {:shutdown, status} -> status
  end

  @doc """
  Runs `mix <args>` in a subprocess with MIX_ENV=test: `{stdout, status}`. With
  `quiet: true`, also MIX_QUIET=1 (what a script reading `--format json` sets).
  """
  @spec mix_cmd([String.t()], keyword()) :: {String.t(), non_neg_integer()}
  def mix_cmd(args, opts \\ []) do
    env = [{"MIX_ENV", "test"}] ++ if(opts[:quiet], do: [{"MIX_QUIET", "1"}], else: [])
    # stderr joins stdout for text runs (so a failure shows why); JSON runs keep it apart.
    System.cmd("mix", args, env: env, cd: File.cwd!(), stderr_to_stdout: !opts[:quiet])
  end

  @doc "Decodes JSON or fails the test with the text."
  @spec json!(String.t()) :: term()
  def json!(text) do
    case JSON.decode(String.trim(text)) do
      {:ok, value} -> value
      {:error, error} -> raise "not JSON (#{error.message}): #{text}"
    end
  end

  @doc """
  Starts a second VM (`elixir`) with this project's code, runs `body` (Elixir source that
  must print a line starting with READY) and returns `{port, ready_line_words}`. The
  application starts with its start-up orphan sweep off, so it leaves our orphans alone.
  """
  @spec start_vm(String.t(), [String.t()]) :: {port(), [String.t()]}
  def start_vm(body, extra_args \\ []) do
    ebin = Path.join(Mix.Project.app_path(), "ebin")
    elixir = System.find_executable("elixir") || raise "elixir not on PATH"

    args =
      extra_args ++
        ["--erl", "-snakepit_shm orphan_sweep false", "-pa", ebin, "-e", body]

    port =
      Port.open({:spawn_executable, elixir}, [:binary, :exit_status, {:line, 4096}, args: args])

    {port, await_ready(port, "")}
  end

  defp await_ready(port, log) do
    receive do
      {^port, {:data, {:eol, "READY " <> rest}}} -> String.split(rest)
      {^port, {:data, {_, line}}} -> await_ready(port, log <> line <> "\n")
      {^port, {:exit_status, status}} -> raise "the second VM exited with #{status}:\n#{log}"
    after
      30_000 -> raise "the second VM did not get ready:\n#{log}"
    end
  end

  @doc "Kills an OS process with SIGKILL and waits until it is gone."
  @spec kill9(String.t() | integer()) :: :ok
  def kill9(os_pid) do
    {_, 0} = System.cmd("kill", ["-9", to_string(os_pid)])
    wait_gone(to_string(os_pid), 200)
  end

  defp wait_gone(_pid, 0), do: raise("process did not die")

  defp wait_gone(pid, tries) do
    case File.read("/proc/#{pid}/stat") do
      {:error, _} ->
        :ok

      {:ok, stat} ->
        # A zombie (state Z) is dead too: its parent just has not reaped it yet.
        if stat |> String.split(") ") |> List.last() |> String.starts_with?("Z") do
          :ok
        else
          Process.sleep(10)
          wait_gone(pid, tries - 1)
        end
    end
  end

  @doc "Overwrites `bytes` at `offset` of a /dev/shm segment (a damaged header)."
  @spec corrupt!(String.t(), non_neg_integer(), binary()) :: :ok
  def corrupt!(id, offset, bytes) do
    {:ok, file} =
      :file.open(~c"/dev/shm/" ++ String.to_charlist(id), [:read, :write, :raw, :binary])

    :ok = :file.pwrite(file, offset, bytes)
    :ok = :file.close(file)
  end

  @doc "A random, well-formed region id (nothing of that name exists yet)."
  @spec random_id() :: String.t()
  def random_id do
    alphabet = ~c"abcdefghijklmnopqrstuvwxyz234567"
    "spshm_" <> for(_ <- 1..20, into: "", do: <<Enum.random(alphabet)>>)
  end

  @doc "Ids among `ids` that still exist in /dev/shm (as files or links)."
  @spec present([String.t()]) :: [String.t()]
  def present(ids), do: Enum.filter(ids, &match?({:ok, _}, File.lstat("/dev/shm/" <> &1)))
end
