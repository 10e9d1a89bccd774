defmodule Snakepit.SharedMemory.ReliabilityHelpers do
  @moduledoc false
  # Shared by the reliability suites (test/reliability/): scaling for `make soak`, the
  # figures each suite records, resource counters (fds, mappings, /dev/shm), and
  # subprocess helpers (Python workers, a second VM).

  alias Snakepit.SharedMemory.{Native, ShmHelpers}

  @root Path.expand("../..", __DIR__)

  @doc "True under `make soak` (SNAKEPIT_SHM_SOAK=1)."
  @spec soak?() :: boolean()
  def soak?, do: System.get_env("SNAKEPIT_SHM_SOAK") in ["1", "true"]

  @doc "`count` for `make test`, ten times it under `make soak`."
  @spec scale(pos_integer()) :: pos_integer()
  def scale(count), do: if(soak?(), do: count * 10, else: count)

  @doc "The repository root."
  def root, do: @root

  @doc """
  The seed of a randomised suite: SNAKEPIT_SHM_FUZZ_SEED if set (to replay a failure),
  else ExUnit's seed. Printed in every failure message of the suites.
  """
  @spec seed() :: integer()
  def seed do
    case System.get_env("SNAKEPIT_SHM_FUZZ_SEED") do
      nil -> ExUnit.configuration()[:seed] || :erlang.unique_integer([:positive])
      value -> String.to_integer(value)
    end
  end

  @doc """
  Appends the figures of a suite run (a map) as one JSON line to
  `_build/reliability/figures.jsonl`: docs/RELIABILITY.md quotes the soak run's lines.
  """
  @spec record(String.t(), map()) :: :ok
  def record(suite, figures) do
    dir = Path.join(@root, "_build/reliability")
    File.mkdir_p!(dir)

    line =
      figures
      |> Map.merge(%{
        suite: suite,
        soak: soak?(),
        asan: System.get_env("SNAKEPIT_SHM_ASAN_PROBE") == "1",
        at: DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601()
      })
      |> Snakepit.SharedMemory.JSON.encode()
      |> then(fn {:ok, json} -> json end)

    File.write!(Path.join(dir, "figures.jsonl"), line <> "\n", [:append])
  end

  @doc """
  Under scripts/test-asan-nif.sh (SNAKEPIT_SHM_ASAN_PROBE=1): checks that this VM has
  the ASan runtime mapped and the NIF loaded from SNAKEPIT_SHM_NIF_DIR, and says so on
  stdout (the script looks for that line). Raises if either is missing.
  """
  @spec asan_probe!() :: :ok | :skipped
  def asan_probe! do
    if System.get_env("SNAKEPIT_SHM_ASAN_PROBE") == "1" do
      maps = File.read!("/proc/self/maps")
      nif = Path.join(System.fetch_env!("SNAKEPIT_SHM_NIF_DIR"), "snakepit_shm_nif.so")
      # Make sure the NIF is loaded (its module is loaded on first use).
      _ = Native.self_info()
      maps = maps <> File.read!("/proc/self/maps")

      unless maps =~ "libasan.so",
        do: raise("ASan probe: libasan is not mapped into the VM (LD_PRELOAD lost?)")

      unless String.contains?(maps, Path.expand(nif)),
        do: raise("ASan probe: #{nif} is not mapped: the NIF was loaded from elsewhere")

      IO.puts("asan probe: libasan mapped, NIF from priv/asan (#{nif})")
      :ok
    else
      :skipped
    end
  end

  # ---- resources of this VM ----

  @doc """
  Runs a fuzz suite's batches: at least `calls` calls, in whole rounds of `concurrency`
  batches of `batch` calls run at once (`driver.run_batch(seed, batch, base)`) against a
  base pool made for the round (`driver.base_pool/0`, freed by `driver.free_base_pool/1`).
  Returns `{figures, rounds}`, the figures of every batch summed (20 failures at most).
  """
  @spec fuzz_rounds(module(), integer(), pos_integer(), pos_integer(), pos_integer()) ::
          {map(), pos_integer()}
  def fuzz_rounds(driver, seed, calls, batch, concurrency) do
    rounds = max(div(calls + batch * concurrency - 1, batch * concurrency), 1)
    empty = %{calls: 0, ok: 0, errors: 0, raised: 0, reasons: %{}, failures: []}

    figures =
      Enum.reduce(1..rounds, empty, fn round, acc ->
        base = driver.base_pool()

        results =
          1..concurrency
          |> Task.async_stream(
            fn i -> driver.run_batch(seed + round * 100 + i, batch, base) end,
            timeout: :infinity,
            ordered: false
          )
          |> Enum.map(fn {:ok, figures} -> figures end)

        driver.free_base_pool(base)
        Enum.reduce(results, acc, &merge_figures/2)
      end)

    {figures, rounds}
  end

  defp merge_figures(a, b) do
    %{
      calls: a.calls + b.calls,
      ok: a.ok + b.ok,
      errors: a.errors + b.errors,
      raised: a.raised + b.raised,
      reasons: Map.merge(a.reasons, b.reasons, fn _k, x, y -> x + y end),
      failures: Enum.take(a.failures ++ b.failures, 20)
    }
  end

  @doc """
  Waits for a line starting with `prefix` from `port` (opened with `{:line, n}`), skipping
  others; returns the rest of the line. Flunks if the port exits or after `timeout` ms.
  """
  @spec await_line(port(), String.t(), timeout()) :: String.t()
  def await_line(port, prefix, timeout) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        if String.starts_with?(line, prefix),
          do: String.replace_prefix(line, prefix, ""),
          else: await_line(port, prefix, timeout)

      {^port, {:exit_status, status}} ->
        ExUnit.Assertions.flunk("the VM exited with #{status}")
    after
      timeout -> ExUnit.Assertions.flunk("no #{prefix} line in time")
    end
  end

  @doc """
  Waits for a line starting with each of `prefixes`, in any order (a NIF writes to
  stderr directly while the VM's `IO.puts` goes through its group leader, so their lines
  may swap): `%{prefix => rest of the line}`. Flunks if the port exits or after `timeout`.
  """
  @spec await_lines(port(), [String.t()], timeout(), map()) :: map()
  def await_lines(port, prefixes, timeout, found \\ %{}) do
    if map_size(found) == length(prefixes) do
      found
    else
      receive do
        {^port, {:data, {:eol, line}}} ->
          found =
            case Enum.find(prefixes, &String.starts_with?(line, &1)) do
              nil -> found
              prefix -> Map.put(found, prefix, String.replace_prefix(line, prefix, ""))
            end

          await_lines(port, prefixes, timeout, found)

        {^port, {:data, _}} ->
          await_lines(port, prefixes, timeout, found)

        {^port, {:exit_status, status}} ->
          ExUnit.Assertions.flunk("the VM exited with #{status} (seen: #{inspect(found)})")
      after
        timeout ->
          ExUnit.Assertions.flunk("no #{inspect(prefixes -- Map.keys(found))} line in time")
      end
    end
  end

  @doc """
  A Python worker attaches region `id` by its bare id and prints its first `length`
  bytes; the /proc scan (and with `arena_walk: false` the arena walk) makes it fail, so
  the lookup must come from the runtime index. `{exit status, trimmed output}`.
  """
  @spec python_read_by_index(String.t(), pos_integer(), keyword()) ::
          {non_neg_integer(), String.t()}
  def python_read_by_index(id, length, opts \\ []) do
    no_walk =
      if Keyword.get(opts, :arena_walk, true),
        do: "",
        else: """
        def no_walk(path, region_id):
            raise AssertionError("walked an arena")
        _locate._find_in_arena = no_walk
        """

    script = """
    import sys, snakepit_shm
    from snakepit_shm import _locate
    def no_scan(uid):
        raise AssertionError("scanned /proc")
    _locate._pids_of_uid = no_scan
    #{no_walk}with snakepit_shm.attach(sys.argv[1]) as region:
        print(region.read(0, #{length}).decode())
    """

    {out, status} = python(script, [id])
    {status, String.trim(out)}
  end

  @doc "Open file descriptors of this VM."
  @spec fd_count() :: non_neg_integer()
  def fd_count, do: "/proc/self/fd" |> File.ls!() |> length()

  @doc "Lines of /proc/self/maps that map a segment of ours (memfd or /dev/shm)."
  @spec shm_mappings() :: non_neg_integer()
  def shm_mappings do
    "/proc/self/maps"
    |> File.read!()
    |> String.split("\n")
    |> Enum.count(&String.contains?(&1, "spshm_"))
  end

  @doc "Bytes used in /dev/shm by the segments this VM created."
  @spec shm_bytes() :: non_neg_integer()
  def shm_bytes do
    for name <- own_segments(),
        {:ok, %File.Stat{size: size}} <- [File.stat(Path.join("/dev/shm", name))],
        reduce: 0,
        do: (acc -> acc + size)
  end

  @doc """
  Segments in /dev/shm created by this VM (by their header) that are not in `keep`:
  what a suite leaked. Segments of other VMs (other suites running at the same time on
  a developer machine) are ignored.
  """
  @spec own_segments([String.t()]) :: [String.t()]
  def own_segments(keep \\ []) do
    me = Native.self_info()

    for name <- ShmHelpers.our_segments(),
        name not in keep,
        created_by_me?(name, me),
        do: name
  end

  defp created_by_me?(name, me) do
    case Native.inspect_path(Path.join("/dev/shm", name)) do
      {:ok, h} -> h.creator_pid == me.os_pid and h.creator_start_time == me.start_time
      # Unreadable (corrupt, mid-creation): count it as ours only if we cannot tell.
      {:error, _} -> false
    end
  end

  @doc """
  For a suite's `setup_all`: at the end of the module, fails if a segment this VM
  created is left in /dev/shm (each suite ends by asserting none of ours remains).
  """
  def check_segments_on_exit do
    before = ShmHelpers.our_segments()

    ExUnit.Callbacks.on_exit(fn ->
      unless ShmHelpers.wait_until(fn -> own_segments(before) == [] end, 5_000) do
        raise ExUnit.AssertionError,
          message: "segments of ours left in /dev/shm: #{inspect(own_segments(before))}"
      end
    end)

    :ok
  end

  @doc "Removes leaked segments of this VM; returns their names."
  @spec remove_own_segments([String.t()]) :: [String.t()]
  def remove_own_segments(keep \\ []) do
    leaked = own_segments(keep)
    for id <- leaked, do: Native.unlink_segment(id)
    leaked
  end

  # ---- subprocesses ----

  @doc "Environment for a Python worker using the client of this tree."
  def python_env do
    [
      {~c"PYTHONPATH", String.to_charlist(Path.join(@root, "priv/python"))},
      {~c"SNAKEPIT_SHM_LIB", String.to_charlist(Path.join(@root, "priv/libsnakepit_shm.so"))},
      {~c"PYTHONDONTWRITEBYTECODE", ~c"1"}
    ]
  end

  @doc "Runs a Python script with /usr/bin/python3 and the client; {output, status}."
  @spec python(String.t(), [String.t()]) :: {String.t(), non_neg_integer()}
  def python(script, args \\ []) do
    env = for {k, v} <- python_env(), do: {List.to_string(k), List.to_string(v)}
    System.cmd(ShmHelpers.python(), ["-c", script | args], env: env, stderr_to_stdout: true)
  end

  @doc "Runs a mix task of this project in a subprocess (MIX_ENV=test); {output, status}."
  @spec mix_task([String.t()], [{String.t(), String.t()}]) :: {String.t(), non_neg_integer()}
  def mix_task(args, env \\ []) do
    System.cmd("mix", args,
      cd: @root,
      env: [{"MIX_ENV", "test"} | env],
      stderr_to_stdout: true
    )
  end

  @doc """
  Runs Elixir `code` in a new VM (the `elixir` launcher, not mix) with this project's
  compiled code on the path, optionally under a `:umask`; {output, status}. The
  application is not started: `code` starts it if it needs it.
  """
  @spec elixir_vm(String.t(), keyword()) :: {String.t(), non_neg_integer()}
  def elixir_vm(code, opts \\ []) do
    System.cmd("sh", ["-c", elixir_command(opts[:umask])],
      env: [{"SNAKEPIT_SHM_VM_CODE", code} | Keyword.get(opts, :env, [])],
      stderr_to_stdout: true,
      cd: @root
    )
  end

  @doc "The shell command elixir_vm/2 runs (code in $SNAKEPIT_SHM_VM_CODE)."
  def elixir_command(umask \\ nil) do
    ebin = Path.join(Mix.Project.app_path(), "ebin")
    prefix = if umask, do: "umask #{umask}; ", else: ""
    prefix <> ~s(exec elixir -pa "#{ebin}" -e "$SNAKEPIT_SHM_VM_CODE")
  end

  @doc """
  True if the segment `id` in /dev/shm has no header yet (empty, or zero magic). Never
  opens anything but a regular file: a FIFO planted under that name would block
  open(2), and `:file` cannot open with O_NONBLOCK.
  """
  @spec header_less?(String.t(), String.t()) :: boolean()
  def header_less?(id, dir \\ "/dev/shm") do
    path = Path.join(dir, id)

    with {:ok, %File.Stat{type: :regular}} <- File.lstat(path),
         {:ok, magic} <- File.open(path, [:read, :binary, :raw], &IO.binread(&1, 8)) do
      magic == :eof or
        (is_binary(magic) and magic == <<0::size(byte_size(magic))-unit(8)>>)
    else
      _ -> false
    end
  end

  @doc "kill -9 an OS process."
  def kill9(os_pid), do: System.cmd("kill", ["-9", Integer.to_string(os_pid)])

  @doc "True while an OS process exists (a zombie counts as gone)."
  def os_alive?(os_pid) do
    case File.read("/proc/#{os_pid}/stat") do
      {:ok, stat} -> not String.match?(stat, ~r/\) [ZX] /)
      {:error, _} -> false
    end
  end
end
