defmodule Snakepit.SharedMemory.Reliability.Attack4BTest do
  # Session-4 attack (regions and the manager, as users meet them): containers' small
  # /dev/shm and descriptor limits, on VMs of their own.
  use Snakepit.SharedMemory.ReliabilityCase, async: false

  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.ReliabilityHelpers

  # A container's small tmpfs as shm_path (the documented way out of Docker's 64 MiB
  # /dev/shm): a POSIX allocation that did not fit said "free space in /dev/shm (df -h
  # /dev/shm), enlarge it (mount -o remount,size=... /dev/shm ...)", a directory this VM
  # does not use, and the Elixir layer appended a second advice naming /dev/shm again.
  @full_shm_path ~S"""
  dir = System.get_env("SHM_DIR")
  Application.put_env(:snakepit_shm, :shm_path, dir)
  Application.put_env(:logger, :level, :error)
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM

  for opts <- [[backend: :posix], [name: "attack4big"], [backend: :posix, security_level: :high]] do
    {:error, e} = SM.allocate_region(2 * 1024 * 1024, opts)
    IO.puts("ERROR #{e.reason} #{e.message}")
  end

  {:ok, id} = SM.allocate_region(100_000, backend: :posix)
  :ok = SM.deallocate_region(id)
  # (Segments only: the presence directory snakepit_shm-<uid> stays, empty.)
  IO.puts("LEFT #{inspect(Enum.filter(File.ls!(dir), &String.starts_with?(&1, "spshm_")))}")
  """

  test "a full shm_path tmpfs: the :no_space message names that directory, once" do
    dir = Path.join(System.tmp_dir!(), "spshm_attack4_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)

    case System.cmd("mount", ["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", dir],
           stderr_to_stdout: true
         ) do
      {_, 0} ->
        try do
          {out, status} = ReliabilityHelpers.elixir_vm(@full_shm_path, env: [{"SHM_DIR", dir}])

          assert status == 0, out

          errors =
            for line <- String.split(out, "\n"), String.starts_with?(line, "ERROR "), do: line

          assert length(errors) == 3, out

          for line <- errors do
            assert line =~ "ERROR no_space ", line
            assert line =~ "shared memory directory #{dir} has too little space left", line
            assert line =~ "mount -o remount,size=... #{dir}", line
            refute line =~ "/dev/shm", line
            # one advice, not the core's and then the Elixir layer's
            assert length(String.split(line, "free regions")) == 2, line
          end

          assert out =~ "LEFT []", out
        after
          System.cmd("umount", ["-l", dir], stderr_to_stdout: true)
          File.rm_rf(dir)
        end

      {why, _} ->
        File.rm_rf(dir)
        IO.puts("skipped: cannot mount a tmpfs here (#{String.trim(why)})")
    end
  end

  # RLIMIT_NOFILE exhausted in interactive mode (mix run, iex): a new arena failed with
  # :no_space and the advice "the shared memory filesystem or RAM is full ... grow
  # /dev/shm ... or use backend: :memfd" (the arena is a memfd; the limit is the
  # descriptors), and list_regions/1 raised UndefinedFunctionError: Stream.Reducers
  # (Enum.chunk_every/2) could not be loaded from its .beam any more.
  @nofile_listing ~S"""
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM
  # What this script itself uses after the limit is loaded before it.
  _ = inspect({:error, %RuntimeError{}, :x, "s", %{a: [1]}, 1.5})
  _ = Enum.reduce_while([1], 0, fn _, a -> {:halt, a} end)
  _ = Enum.frequencies_by([{:ok, 1}], &elem(&1, 0))
  # the background preload of the application (interactive mode) has run by then
  Process.sleep(3000)
  open = length(File.ls!("/proc/self/fd"))
  {_, 0} = System.cmd("prlimit", ["--pid", System.pid(), "--nofile=#{open + 30}"])

  ids =
    Enum.reduce_while(1..1000, [], fn _, acc ->
      case SM.allocate_region(4096, arena: false, cleanup_policy: :manual) do
        {:ok, id} -> {:cont, [id | acc]}
        {:error, _} -> {:halt, acc}
      end
    end)

  # arena regions until the arena in use is full and a new one cannot be made
  {small, error} =
    Enum.reduce_while(1..5000, {[], nil}, fn _, {acc, _} ->
      case SM.allocate_region(4096, cleanup_policy: :manual) do
        {:ok, id} -> {:cont, {[id | acc], nil}}
        {:error, e} -> {:halt, {acc, e}}
      end
    end)

  try do
    case error do
      nil -> IO.puts("ARENA never failed")
      e -> IO.puts("ARENA #{e.reason} #{e.message}")
    end

    r = fn name, f ->
      try do
        IO.puts("CALL #{name} #{elem(f.(), 0)}")
      rescue
        e -> IO.puts("CALL #{name} raised #{Exception.format(:error, e)}")
      end
    end

    r.("list_regions", fn -> SM.list_regions(%{}) end)
    r.("stats", fn -> SM.stats() end)
    r.("get_region_info", fn -> SM.get_region_info(hd(ids)) end)
    r.("export_ref", fn -> SM.export_ref(hd(ids)) end)
    r.("cleanup_regions", fn -> SM.cleanup_regions(dry_run: true) end)
  rescue
    e -> IO.puts("RAISED #{Exception.format(:error, e)}")
  end

  for id <- ids ++ small, do: :ok = SM.deallocate_region(id)
  {:ok, id} = SM.allocate_region(4096, arena: false)
  :ok = SM.deallocate_region(id)
  IO.puts("ALIVE OK #{length(ids)}")
  """

  test "RLIMIT_NOFILE exhausted: an arena says too many open files; listing and stats work" do
    {out, status} = ReliabilityHelpers.elixir_vm(@nofile_listing)
    assert status == 0, "the VM died (exit #{status}):\n#{out}"
    assert out =~ "ALIVE OK", out
    assert [arena] = Regex.run(~r/^ARENA .*$/m, out), out
    assert arena =~ ~r/^ARENA io_error .*[Tt]oo many open files/, arena
    refute arena =~ "/dev/shm", arena

    for call <- ~w(list_regions stats get_region_info export_ref cleanup_regions) do
      assert out =~ "CALL #{call} ok", out
    end

    refute out =~ "raised", out
  end

  # to_nx/1 is a read, yet it mapped the region and unmapped it: the unmap of that one
  # mapping was "the last holder letting go", and a :reference_counted region that
  # nothing else held yet was freed (a second to_nx/1, map_region/2, a worker's attach:
  # :not_found). A fetch/2 of such a region from another node freed it on its own node
  # the same way (the sender's mapping).
  describe "passing reads of a :reference_counted region free nothing" do
    alias Snakepit.SharedMemory, as: SHM

    test "to_nx/1 (Nx loaded or not) leaves the region as it found it" do
      for backend <- [:memfd, :posix], arena <- [true, false], sealed <- [false, true] do
        {:ok, id} =
          SHM.allocate_region(16,
            cleanup_policy: :reference_counted,
            metadata: %{dtype: "float32", shape: [4]},
            backend: backend,
            arena: arena
          )

        if sealed, do: :ok = SHM.seal(id)
        _ = SHM.to_nx(id)
        _ = SHM.to_nx(id)
        Process.sleep(250)
        label = "#{backend} arena=#{arena} sealed=#{sealed}"
        assert {:ok, %{reference_count: 0}} = SHM.get_region_info(id), label

        # and the policy still works: the first real holder letting go frees it
        {:ok, m} = SHM.map_region(id, access_mode: :read_only)
        _ = SHM.to_nx(id)
        :ok = SHM.unmap_region(m)
        assert {:error, %{reason: :not_found}} = SHM.get_region_info(id), label
      end
    end

    test "fetch/2 from another node leaves the source region alive" do
      import Snakepit.SharedMemory.ClusterHelpers
      ensure_distributed!()
      {peer, a} = start_peer!("shm4b")

      try do
        owner = Node.spawn(a, Process, :sleep, [:infinity])

        {:ok, id} =
          :erpc.call(a, SHM, :allocate_region, [
            4096,
            [cleanup_policy: :reference_counted, owner: owner]
          ])

        {:ok, copy} = SHM.fetch(id, node: a)
        :ok = SHM.deallocate_region(copy)
        Process.sleep(250)
        assert {:ok, %{reference_count: 0}} = :erpc.call(a, SHM, :get_region_info, [id])
        :ok = :erpc.call(a, SHM, :deallocate_region, [id])
      after
        stop_peer(peer)
      end
    end
  end

  # adopt_region(ref, cleanup_policy: :reference_counted) of a worker's output (the
  # worker made it, wrote it and closed it, as in the README) freed it within one
  # cleanup tick: the worker's own holds before adoption made it look "held once, now
  # unreferenced", and the result was lost before anything could map it.
  # With argv[2] == "keep", the worker keeps its output attached (the README's
  # from_array flow returns the ref of an output it never closes) until told to drop it.
  @worker_output ~S"""
  import gc, json, sys, snakepit_shm
  out = snakepit_shm.allocate(64, backend=sys.argv[1])
  out.buf[:5] = b"hello"
  ref = out.ref
  if sys.argv[2] != "keep":
      out.close()
  print(json.dumps(ref), flush=True)
  sys.stdin.readline()
  del out
  gc.collect()
  print("dropped", flush=True)
  sys.stdin.read()
  """

  test "an adopted :reference_counted worker output lives until a holder of it lets go" do
    alias Snakepit.SharedMemory, as: SHM

    for backend <- ["memfd", "posix"], keep <- ["close", "keep"] do
      port =
        Port.open({:spawn_executable, "/usr/bin/python3"}, [
          :binary,
          :exit_status,
          line: 1_000_000,
          env: ReliabilityHelpers.python_env(),
          args: ["-c", @worker_output, backend, keep]
        ])

      try do
        json =
          receive do
            {^port, {:data, {:eol, line}}} -> line
          after
            15_000 -> flunk("the worker made no output")
          end

        {:ok, id} = SHM.adopt_region(json, cleanup_policy: :reference_counted)
        # several cleanup ticks (cleanup_interval 100 ms here)
        Process.sleep(500)
        assert {:ok, _} = SHM.get_region_info(id), "#{backend} #{keep}"
        # the worker lets go of its own output
        Port.command(port, "drop\n")

        receive do
          {^port, {:data, {:eol, "dropped"}}} -> :ok
        after
          15_000 -> flunk("the worker did not drop its output")
        end

        Process.sleep(500)
        assert {:ok, %{reference_count: 0}} = SHM.get_region_info(id), "#{backend} #{keep}"
        {:ok, m} = SHM.map_region(id, access_mode: :read_only)
        assert {:ok, "hello"} = SHM.read(m, 0, 5)
        # the policy holds from there: its last holder letting go frees it
        :ok = SHM.unmap_region(m)
        assert {:error, %{reason: :not_found}} = SHM.get_region_info(id), backend
      after
        Port.close(port)
      end
    end
  end

  # The same for a named region another VM created and held before: a VM opening it
  # with :open_only and cleanup_policy: :reference_counted dropped it on its first
  # cleanup tick (the creator's holds made it "held once, now unreferenced").
  @open_named ~S"""
  Application.put_env(:snakepit_shm, :cleanup_interval, 100)
  Application.put_env(:snakepit_shm, :orphan_sweep, false)
  Application.put_env(:logger, :level, :error)
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM
  name = System.get_env("REGION_NAME")

  {:ok, id} =
    SM.allocate_region(:any, name: name, open_mode: :open_only, cleanup_policy: :reference_counted)

  Process.sleep(600)
  IO.puts("AFTER #{elem(SM.get_region_info(id), 0)}")
  {:ok, m} = SM.map_region(id, access_mode: :read_only)
  IO.puts("READ #{inspect(SM.read(m, 0, 5))}")
  :ok = SM.unmap_region(m)
  IO.puts("UNMAPPED #{elem(SM.get_region_info(id), 0)}")
  """

  test "a named region opened :reference_counted by another VM lives until its holders go" do
    alias Snakepit.SharedMemory, as: SHM
    name = "a4b#{System.unique_integer([:positive])}"
    {:ok, id} = SHM.allocate_region(4096, name: name, cleanup_policy: :manual)

    try do
      {:ok, m} = SHM.map_region(id, access_mode: :read_write)
      :ok = SHM.write(m, 0, "named")
      :ok = SHM.unmap_region(m)

      {out, status} = ReliabilityHelpers.elixir_vm(@open_named, env: [{"REGION_NAME", name}])

      assert status == 0, out
      assert out =~ "AFTER ok", out
      assert out =~ ~s(READ {:ok, "named"}), out
      assert out =~ "UNMAPPED error", out
      # the other VM only closed its open: the creator's region is intact
      {:ok, m} = SHM.map_region(id, access_mode: :read_only)
      assert {:ok, "named"} = SHM.read(m, 0, 5)
      :ok = SHM.unmap_region(m)
    after
      SHM.deallocate_region(id)
    end
  end

  # A region a live VM freed and still has open (a freed arena chunk, the default for
  # small regions, or a memfd, whose resource the VM has not collected yet) was listed "orphaned" by the offline mix tasks: `list --orphaned`
  # ("owner VM gone") listed it though its VM was alive, the doctor warned of leftover
  # segments, and `cleanup` said "owner VM <pid> is gone" and counted it as refused.
  test "a region a live VM freed is not an orphan to the mix tasks" do
    alias Snakepit.SharedMemory, as: SHM

    held =
      for arena <- [true, false] do
        {:ok, id} = SHM.allocate_region(4096, arena: arena)
        # what the allocating process's heap holds until it is collected
        [record] = :ets.lookup(Snakepit.SharedMemory.Registry.regions_table(), id)
        :ok = SHM.deallocate_region(id)
        {id, Snakepit.SharedMemory.Registry.region(record, :ref)}
      end

    {out, 0} =
      ReliabilityHelpers.mix_task(
        ~w(snakepit.shm.list --format json),
        [{"MIX_QUIET", "1"}]
      )

    {:ok, listed} = SHM.JSON.decode(out)

    for {id, _m} <- held do
      case Enum.find(listed["regions"], &(&1["id"] == id)) do
        # collected meanwhile: nothing to show
        nil -> :ok
        entry -> refute entry["orphaned"], "#{id}: #{inspect(entry)}"
      end
    end

    {out, _} = ReliabilityHelpers.mix_task(~w(snakepit.shm.cleanup --dry-run))

    for {id, _m} <- held do
      refute out =~ id, out
    end

    # keep the region resources alive until here
    for {_id, ref} <- held, do: assert(is_reference(ref))
  end

  # A worker given the ref of a small (arena) region the VM had freed got CorruptRegion
  # ("its header is not published ... its creator died ... damaged ... cleanup removes
  # ours", or "it holds region <other>" once the chunk was reused), where a dedicated
  # memfd's stale ref says RegionNotFound.
  @attach_stale ~S"""
  import sys, snakepit_shm
  for ref in sys.argv[1:]:
      try:
          snakepit_shm.attach(ref).close()
          print("ATTACHED")
      except snakepit_shm.SnakepitShmError as e:
          print(type(e).__name__, e)
  """

  test "a stale ref of a freed arena region is RegionNotFound for a worker" do
    alias Snakepit.SharedMemory, as: SHM
    {:ok, keep} = SHM.allocate_region(4096)

    stale = fn ->
      {:ok, id} = SHM.allocate_region(4096)
      {:ok, ref} = SHM.export_ref(id)
      assert ref["control_offset"] != nil
      {:ok, json} = SHM.JSON.encode(ref)
      :ok = SHM.deallocate_region(id)
      # the region resource goes, its chunk is cleared
      :erlang.garbage_collect()
      {id, json}
    end

    {freed, freed_json} = stale.()
    Process.sleep(100)
    {reused, reused_json} = stale.()
    {:ok, others} = for(_ <- 1..4, do: SHM.allocate_region(4096)) |> then(&{:ok, &1})
    {out, 0} = ReliabilityHelpers.python(@attach_stale, [freed_json, reused_json])
    lines = String.split(out, "\n", trim: true)
    assert length(lines) == 2, out

    for {line, id} <- Enum.zip(lines, [freed, reused]) do
      assert line =~ ~r/^RegionNotFound region #{id} no longer exists/, out
    end

    for {:ok, id} <- others, do: :ok = SHM.deallocate_region(id)
    :ok = SHM.deallocate_region(keep)
  end

  # cleanup_regions/1 whose manager was killed during the call (a crash, an operator's
  # kill: its supervisor restarts it) answered "the :snakepit_shm application is not
  # running ({:killed, {GenServer, :call, ...}}): start it with
  # Application.ensure_all_started(:snakepit_shm)": the application ran all along.
  test "cleanup_regions/1 when the manager dies during the call says so, not 'start the app'" do
    alias Snakepit.SharedMemory, as: SHM
    {:ok, id} = SHM.allocate_region(4096, cleanup_policy: :manual)
    manager = Process.whereis(Snakepit.SharedMemory.Manager)
    :ok = :sys.suspend(manager)
    task = Task.async(fn -> SHM.cleanup_regions(ids: [id]) end)
    # the call is in the suspended manager's queue
    assert Snakepit.SharedMemory.ShmHelpers.wait_until(
             fn -> Process.info(manager, :message_queue_len) |> elem(1) > 0 end,
             5_000
           )

    Process.exit(manager, :kill)
    assert {:error, %{reason: :unavailable, message: message}} = Task.await(task, 10_000)
    assert message =~ "manager", message
    assert message =~ "call cleanup_regions/1 again", message
    refute message =~ "not running", message
    refute message =~ "ensure_all_started", message
    refute message =~ "GenServer", message
    # it was restarted, and the call works again
    assert Snakepit.SharedMemory.ShmHelpers.wait_until(
             fn -> Process.whereis(Snakepit.SharedMemory.Manager) not in [nil, manager] end,
             5_000
           )

    # orphans: false: what other suites' killed VMs left in /dev/shm is theirs to sweep.
    assert {:ok, [%{region_id: ^id}]} = SHM.cleanup_regions(ids: [id], orphans: false)
  end

  # read/3 and write/3 with an offset or length beyond 2^64 - 1 (a bignum) answered
  # :out_of_bounds naming 18446744073709551615, a number the caller never gave.
  test "read/3 and write/3 name the caller's own huge offset and length" do
    alias Snakepit.SharedMemory, as: SHM
    {:ok, id} = SHM.allocate_region(4096)
    {:ok, m} = SHM.map_region(id, access_mode: :read_write)
    huge = Integer.to_string(2 ** 70)

    for result <- [SHM.read(m, 2 ** 70, 1), SHM.read(m, 0, 2 ** 70), SHM.write(m, 2 ** 64, "x")] do
      assert {:error, %{reason: :out_of_bounds, message: message}} = result
      refute message =~ "18446744073709551615", message
      assert message =~ huge or message =~ Integer.to_string(2 ** 64), message
    end

    :ok = SHM.deallocate_region(id)
  end
end
