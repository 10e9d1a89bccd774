defmodule Snakepit.SharedMemory.TestSupport do
  @moduledoc false
  # Helpers of the test/snakepit suites (required with Code.require_file/2).

  import ExUnit.Assertions

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Config, Manager, Quota, Registry}
  alias Snakepit.SharedMemory.ShmHelpers

  @doc "Frees every region and waits for the manager to settle."
  def free_everything do
    Manager.sync()
    {:ok, _} = SharedMemory.cleanup_regions(all: true, orphans: false)
    Manager.sync()
    :ok
  end

  @doc """
  ExUnit setup (`setup do: TestSupport.no_leaks()`): when the test ends, frees what it
  left and asserts that nothing of this VM is live and no new segment is left.
  """
  def no_leaks do
    before = vm_segments()

    ExUnit.Callbacks.on_exit(fn ->
      free_everything()
      assert_nothing_live(before)
    end)

    :ok
  end

  @doc "Registry, quota counters and /dev/shm all say: nothing (of this VM) is live."
  def assert_nothing_live(segments_before \\ []) do
    assert ShmHelpers.wait_until(fn -> Registry.count() == 0 end, 5_000),
           "registry still holds #{inspect(Registry.ids())}"

    Manager.sync()
    # A killed caller's charge gives itself back as its heap is freed, which ERTS may
    # finish a moment after the DOWN message.
    assert ShmHelpers.wait_until(fn -> Quota.totals() == %{regions: 0, bytes: 0} end, 5_000),
           "quota counters: #{inspect(Quota.totals())}"

    # Rows of live owners stay (at 0); none counts a region.
    for {owner, _counter} <- :ets.tab2list(Registry.owners_table()),
        do: assert(Quota.owned(owner) == 0, "#{inspect(owner)} still counts regions")

    assert :ets.tab2list(Registry.mappings_table()) == []

    assert ShmHelpers.wait_until(
             fn -> vm_segments() -- segments_before == [] end,
             5_000
           ),
           "segments left: #{inspect(vm_segments() -- segments_before)}"
  end

  @doc """
  Segments in /dev/shm created by this VM. Other suites (other VMs) may run at the same
  time on a shared machine, so only these are this suite's to account for.
  """
  def vm_segments do
    me = String.to_integer(System.pid())

    for name <- ShmHelpers.our_segments(),
        {:ok, %{creator_pid: ^me}} <- [
          Snakepit.SharedMemory.Native.inspect_path("/dev/shm/" <> name)
        ],
        do: name
  end

  @doc "Runs `fun` with application settings changed, then restores them."
  def with_config(settings, fun) do
    old = for {key, _} <- settings, do: {key, Application.fetch_env(:snakepit_shm, key)}
    for {key, value} <- settings, do: Application.put_env(:snakepit_shm, key, value)
    {:ok, _} = Config.load()

    try do
      fun.()
    after
      for {key, previous} <- old do
        case previous do
          {:ok, value} -> Application.put_env(:snakepit_shm, key, value)
          :error -> Application.delete_env(:snakepit_shm, key)
        end
      end

      {:ok, _} = Config.load()
    end
  end

  @doc "Runs `fun` while the manager is suspended; resumes it whatever happens."
  def with_manager_suspended(fun) do
    manager = Process.whereis(Snakepit.SharedMemory.Manager)
    :sys.suspend(manager)

    try do
      fun.()
    after
      :sys.resume(manager)
    end
  end

  @doc "Waits until `pid` is dead."
  def await_death(pid) do
    ref = Process.monitor(pid)
    assert_receive {:DOWN, ^ref, :process, ^pid, _}, 5_000
  end

  @doc """
  Starts a Python worker that attaches `ref` (an export_ref map) and then sleeps. Returns
  {port, os_pid} once it printed that it attached. `prelude` is Python run after
  `import snakepit_shm` and before the attach (e.g. to silence the announce).
  """
  def python_holder(ref, mode \\ "r", prelude \\ "") do
    {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)

    script = """
    import sys, time, json, warnings
    warnings.simplefilter("ignore")
    import snakepit_shm
    #{prelude}
    region = snakepit_shm.attach(json.loads(sys.argv[1]), mode=sys.argv[2])
    print("ATTACHED", flush=True)
    time.sleep(120)
    """

    {port, os_pid} = python_port(script, [json, mode])

    receive do
      {^port, {:data, {:eol, "ATTACHED"}}} -> {port, os_pid}
      {^port, {:exit_status, status}} -> flunk("python holder exited with #{status}")
    after
      10_000 -> flunk("python holder did not attach")
    end
  end

  @doc """
  Runs `script` (Python source) with `args` under this checkout's client, in a Port
  that delivers lines; returns {port, os_pid}.
  """
  def python_port(script, args) do
    root = Path.expand("../..", __DIR__)

    port =
      Port.open({:spawn_executable, ShmHelpers.python()}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: ["-c", script | args],
        env: [
          {~c"PYTHONPATH", String.to_charlist(Path.join(root, "priv/python"))},
          {~c"SNAKEPIT_SHM_LIB", String.to_charlist(Path.join(root, "priv/libsnakepit_shm.so"))}
        ]
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    {port, os_pid}
  end

  @doc """
  Runs `fun` with call tracing of the calling process on `mfas` (each with the match
  spec `spec`: `true`, or e.g. `[{:_, [], [{:return_trace}]}]`), from a separate tracer
  process (a process cannot be its own tracer). Returns `{result, events}`: every trace
  message, in order, delivered before this returns.
  """
  def trace_calls(mfas, spec, fun) do
    me = self()
    tracer = spawn_link(fn -> collect_traces([]) end)
    for mfa <- mfas, do: :erlang.trace_pattern(mfa, spec, [:local])
    :erlang.trace(me, true, [:call, {:tracer, tracer}])
    result = fun.()
    :erlang.trace(me, false, [:call])
    ref = :erlang.trace_delivered(me)

    receive do
      {:trace_delivered, ^me, ^ref} -> :ok
    end

    send(tracer, {:events, me})

    receive do
      {:events, events} -> {result, events}
    end
  end

  defp collect_traces(acc) do
    receive do
      {:events, to} -> send(to, {:events, Enum.reverse(acc)})
      trace when elem(trace, 0) == :trace -> collect_traces([trace | acc])
    end
  end

  @doc "kill -9 an OS process."
  def kill9(os_pid), do: System.cmd("kill", ["-9", Integer.to_string(os_pid)])
end
