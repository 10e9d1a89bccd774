defmodule Snakepit.SharedMemory.Reliability.FoundBugsTest do
  # Regression tests of bugs the reliability suites found, one test per bug, each
  # reduced to the smallest call that showed it. docs/RELIABILITY.md lists them.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Error, Manager, Mapping, Native, ReliabilityForge}
  alias Snakepit.SharedMemory.ReliabilityHelpers
  alias Snakepit.SharedMemory.{Registry, ShmHelpers}

  @moduletag :reliability
  @moduletag :capture_log

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    ReliabilityHelpers.check_segments_on_exit()
    :ok
  end

  describe "unmap_region/1" do
    # Found by the API fuzzer: the :closed message interpolated the region id, so a
    # Mapping whose region_id is not a string raised Protocol.UndefinedError.
    test "a mapping struct with a non-string region id is an error, not an exception" do
      {:ok, id} = SharedMemory.allocate_region(4096)
      {:ok, mapping} = SharedMemory.map_region(id)

      for bad <- [%{a: 1}, self(), 12, fn -> :ok end] do
        forged = %Mapping{mapping | region_id: bad}
        assert {:error, %Error{reason: :invalid_argument}} = SharedMemory.unmap_region(forged)
      end

      assert :ok = SharedMemory.unmap_region(mapping)
      assert :ok = SharedMemory.deallocate_region(id)
    end
  end

  describe "Native.unlink_segment/1 (and mix snakepit.shm.cleanup, which calls it)" do
    # Found by the malformed-segment suite: any file of ours smaller than a header was
    # taken for the leftover of a creator that died before writing the header, and
    # removed once stale, even when it starts with the magic: a region truncated after
    # creation (damaged), which the core's own policy says to leave to the operator.
    test "a stale truncated segment that has a magic is damaged, not incomplete: kept" do
      template = ReliabilityForge.template()
      seg = ReliabilityForge.forge(:truncated, template, ReliabilityForge.dead_os_pid())

      try do
        ReliabilityForge.age!(seg, 3_600)
        assert {:error, {:corrupt, message, _}} = Native.unlink_segment(seg.id)
        assert message =~ "not removed"
        assert ReliabilityForge.present?(seg)
      after
        ReliabilityForge.remove(seg)
      end
    end

    test "a stale empty segment (its creator died before sizing it) is still removed" do
      id = ReliabilityForge.random_id()
      path = Path.join("/dev/shm", id)
      File.write!(path, "")
      seg = %{id: id, path: path, extra: []}

      try do
        ReliabilityForge.age!(seg, 3_600)
        assert :ok = Native.unlink_segment(id)
        refute ReliabilityForge.present?(seg)
      after
        ReliabilityForge.remove(seg)
      end
    end
  end

  describe "the start-up orphan sweep" do
    # Found by the chaos suite (a VM SIGKILLed while churning POSIX regions, about one
    # run in six): a VM killed between shm_open and publishing the header left a
    # header-less segment (zero magic) that the next VM's start-up sweep skipped
    # (unreadable); only `mix snakepit.shm.cleanup`, 10 s later, removed it. Fixed in
    # 2258e17: sweeps remove header-less segments that no process has open.
    test "removes a header-less segment left by a VM killed while creating it" do
      id = ReliabilityForge.random_id()
      path = Path.join("/dev/shm", id)
      # Exactly what the core leaves after shm_open + fchmod + posix_fallocate.
      File.write!(path, <<0::size(12_288)-unit(8)>>)
      File.chmod!(path, 0o600)
      # Unlocked header-less segments are left 10 s (a creator of an older version takes
      # no lock): this one was left by a VM killed a minute ago.
      File.touch!(path, System.os_time(:second) - 60)

      try do
        code = """
        {:ok, _} = Application.ensure_all_started(:snakepit_shm)
        IO.puts("STARTED")
        """

        {out, 0} = Snakepit.SharedMemory.ReliabilityHelpers.elixir_vm(code)
        assert out =~ "STARTED"
        refute File.exists?(path), "the next start's sweep left #{id}"
      after
        File.rm(path)
      end
    end
  end

  describe "the manager's leak sweep" do
    # Found by the chaos suite (owners and the manager killed during churn, about one run
    # in three when the machine was loaded): a caller killed after Native.create/2 but
    # before registering leaves a POSIX segment. The manager remembered it only in its
    # state (the journal row was forgotten at once) and swept it 100 ms later; a manager
    # killed in between lost it for good. There is no leak sweep any more: the segment
    # loses its name with the dead caller's last reference to it, whatever the manager
    # does (here it is killed, and then kept suspended).
    test "a segment of a caller killed before registering it goes, even with the manager killed" do
      parent = self()
      size = 12_345

      caller =
        spawn(fn ->
          Registry.register_caller()
          opts = ShmHelpers.create_opts(backend: :posix) |> Map.put(:drop_name, true)
          {:ok, _region, info} = Native.create(size, opts)
          send(parent, {:created, info.id})
          Process.sleep(:infinity)
        end)

      assert_receive {:created, id}, 5_000

      try do
        Manager.sync()
        old = Process.whereis(Manager)
        Process.exit(old, :kill)
        assert ShmHelpers.wait_until(fn -> Process.whereis(Manager) not in [nil, old] end, 5_000)
        Manager.sync()

        manager = Process.whereis(Manager)
        :sys.suspend(manager)

        try do
          ref = Process.monitor(caller)
          Process.exit(caller, :kill)
          assert_receive {:DOWN, ^ref, :process, ^caller, _}

          assert ShmHelpers.wait_until(fn -> not File.exists?("/dev/shm/" <> id) end, 5_000),
                 "#{id} leaked"
        after
          :sys.resume(manager)
        end
      after
        Native.unlink_segment(id)
      end
    end
  end

  describe "cleanup_policy: :reference_counted" do
    # Found by the chaos suite under ASan (about one run in five): when a Python worker
    # died, the manager released its holds on every region, and releasing nothing still
    # bumped each header's holder generation. A :reference_counted region never mapped
    # yet then looked "held once, now unreferenced" and was freed under its owner, who
    # got :deallocated or :closed from its first map, write or read.
    test "the death of a worker holding another region does not free a never-held one" do
      {:ok, held} = SharedMemory.allocate_region(4096)
      {:ok, fresh} = SharedMemory.allocate_region(4096, cleanup_policy: :reference_counted)
      {:ok, ref} = SharedMemory.export_ref(held)
      {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)

      script = """
      import json, sys, time, warnings
      warnings.simplefilter("ignore")
      import snakepit_shm
      region = snakepit_shm.attach(json.loads(sys.argv[1]))
      print("ATTACHED", flush=True)
      time.sleep(60)
      """

      port =
        Port.open({:spawn_executable, ShmHelpers.python()}, [
          :binary,
          :exit_status,
          {:line, 4096},
          args: ["-c", script, json],
          env: ReliabilityHelpers.python_env()
        ])

      {:os_pid, os_pid} = Port.info(port, :os_pid)
      assert_receive {^port, {:data, {:eol, "ATTACHED"}}}, 10_000

      try do
        # The manager watches the worker, which holds `held`; then the worker dies.
        assert ShmHelpers.wait_until(fn ->
                 Manager.sync()
                 match?({:ok, %{reference_count: 1}}, SharedMemory.get_region_info(held))
               end)

        ReliabilityHelpers.kill9(os_pid)

        assert ShmHelpers.wait_until(fn ->
                 match?({:ok, %{reference_count: 0}}, SharedMemory.get_region_info(held))
               end)

        Manager.sync()
        Manager.sync()

        assert match?({:ok, _}, SharedMemory.get_region_info(fresh)),
               "the never-held :reference_counted region was freed"

        assert {:ok, m} = SharedMemory.map_region(fresh)
        assert :ok = SharedMemory.write(m, 0, "still mine")
      after
        ReliabilityHelpers.kill9(os_pid)
        SharedMemory.deallocate_region(held)
        SharedMemory.deallocate_region(fresh)
      end
    end
  end
end
