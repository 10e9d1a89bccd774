Code.require_file("../../mix/support/task_helpers.exs", __DIR__)

defmodule Snakepit.SharedMemory.AdoptRegionTest do
  # Issue 13, Seen 2: workers allocate their outputs; Elixir adopts them.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.Error
  alias Snakepit.SharedMemory.Test.PythonWorker
  alias Snakepit.SharedMemory.ShmHelpers

  @worker ~S"""
  import json, sys, time
  import numpy as np
  import snakepit_shm

  for line in sys.stdin:
      words = line.split()
      if words[0] == "alloc":            # alloc BACKEND N: float32 [0, 2, 4, ...] of N items
          n = int(words[2])
          with snakepit_shm.allocate(4 * n, dtype="float32", shape=[n],
                                     backend=words[1], metadata={"by": "worker"}) as out:
              out.ndarray()[:] = np.arange(n, dtype=np.float32) * 2
              ref = out.ref
          print(json.dumps(ref))
      elif words[0] == "array":          # array N: from_array of an int64 matrix, as a marker
          n = int(words[1])
          region = snakepit_shm.from_array(np.arange(n * 3, dtype=np.int64).reshape(n, 3))
          print(json.dumps(region.zero_copy_ref()))
          region.close()
      elif words[0] == "released":       # released ID: wait until the worker let go of ID
          deadline = time.monotonic() + 30
          while words[1] in snakepit_shm.pending_outputs() and time.monotonic() < deadline:
              time.sleep(0.02)
          print(json.dumps(words[1] not in snakepit_shm.pending_outputs()))
      elif words[0] == "timed":          # timed SECONDS: an output with an idle timeout
          with snakepit_shm.allocate(16, timeout=float(words[1])) as out:
              ref = out.ref
          print(json.dumps(ref))
      elif words[0] == "pending":
          print(json.dumps(snakepit_shm.pending_outputs()))
  """

  setup do
    worker = PythonWorker.start(@worker)
    on_exit(fn -> PythonWorker.stop(worker) end)
    {:ok, worker: worker}
  end

  for backend <- ["memfd", "posix"] do
    test "a #{backend} output made by the worker is adopted, read, sealed, freed", %{
      worker: worker
    } do
      ref = PythonWorker.ask(worker, "alloc #{unquote(backend)} 1000")
      assert %{"owner" => "python", "format" => "numpy", "dtype" => "float32"} = ref
      {:ok, id} = SHM.adopt_region(ref, cleanup_policy: :manual)
      assert id == ref["region_id"]

      {:ok, info} = SHM.get_region_info(id)
      assert info.size == 4000 and info.role == :created and info.adopted
      assert info.metadata["by"] == "worker"
      assert info.cleanup_policy == :manual
      assert PythonWorker.ask(worker, "released #{id}") == true

      # Zero-copy on the Elixir side once sealed by the kernel (memfd); a POSIX segment
      # has no kernel seal, so read/3 copies it (docs/SECURITY.md).
      :ok = SHM.seal(id)
      {:ok, mapping} = SHM.map_region(id)
      {:ok, data} = SHM.read(mapping, 0, 4000)

      if unquote(backend) == "memfd" do
        # A zero-copy binary refers to the mapping: it does not own a 4000-byte copy.
        assert :binary.referenced_byte_size(data) < 4000
      else
        assert :binary.referenced_byte_size(data) == 4000
      end

      expected = for i <- 0..999, into: <<>>, do: <<i * 2.0::float-32-little>>
      assert data == expected

      assert {:error, %Error{reason: :already_adopted}} = SHM.adopt_region(ref)
      :ok = SHM.unmap_region(mapping)
      :ok = SHM.deallocate_region(id)
      refute File.exists?("/dev/shm/" <> id)
    end
  end

  test "a from_array output comes back as a Snakepit marker; its owner policy applies", %{
    worker: worker
  } do
    marker = PythonWorker.ask(worker, "array 4")
    assert %{"__snakepit_zero_copy__" => true, "kind" => "shm", "shape" => [4, 3]} = marker
    parent = self()

    owner =
      spawn(fn ->
        send(parent, SHM.adopt_region(marker))
        Process.sleep(:infinity)
      end)

    assert_receive {:ok, id}
    {:ok, %{owner: ^owner, size: 96, metadata: %{"dtype" => "int64"}}} = SHM.get_region_info(id)
    {:ok, mapping} = SHM.map_region(id)
    {:ok, <<_::binary-size(88), last::signed-64-little>>} = SHM.read(mapping, 0, 96)
    assert last == 11
    :ok = SHM.unmap_region(mapping)
    Process.exit(owner, :kill)
    assert eventually(fn -> match?({:error, _}, SHM.get_region_info(id)) end)
  end

  test "adoption honours the VM's limits and validates the ref" do
    assert {:error, %Error{reason: :invalid_argument}} = SHM.adopt_region(%{"v" => 1})

    assert {:error, %Error{reason: :invalid_argument}} =
             SHM.adopt_region(%{
               "region_id" => "spshm_aaaaaaaaaaaaaaaaaaaa",
               "backend" => "memfd",
               "control_path" => "/etc/passwd",
               "data_path" => "/etc/passwd"
             })

    assert {:error, %Error{reason: :invalid_option}} =
             SHM.adopt_region(%{"region_id" => "x", "backend" => "posix"}, size: 3)
  end

  test "a region of this VM, or one the ref's process did not create, is not adopted" do
    {:ok, own} = SHM.allocate_region(64)
    {:ok, ref} = SHM.export_ref(own)

    assert {:error, %Error{reason: :already_adopted}} = SHM.adopt_region(ref)
    :ok = SHM.deallocate_region(own)

    # A region made by this VM's core directly (not registered): still not a worker's.
    {:ok, raw, info} = Snakepit.SharedMemory.Native.create(64, ShmHelpers.create_opts())

    ref = %{
      "v" => 1,
      "region_id" => info.id,
      "backend" => "memfd",
      "control_path" => info.control_path,
      "data_path" => info.data_path
    }

    assert {:error, %Error{reason: :invalid_argument, message: m}} = SHM.adopt_region(ref)
    assert m =~ "created by this VM"
    :ok = Snakepit.SharedMemory.Native.deallocate(raw, false)
  end

  test "a memfd output of a worker killed before adoption is gone", %{worker: worker} do
    ref = PythonWorker.ask(worker, "alloc memfd 100")
    PythonWorker.kill9(worker)
    assert {:error, %Error{reason: reason}} = SHM.adopt_region(ref)
    assert reason in [:not_found, :not_ours]
  end

  test "a POSIX output of a worker killed before adoption is removed by the orphan sweep", %{
    worker: worker
  } do
    ref = PythonWorker.ask(worker, "alloc posix 100")
    id = ref["region_id"]
    assert File.exists?("/dev/shm/" <> id)
    PythonWorker.kill9(worker)
    # Dry run: a real sweep would also remove other suites' orphans on a shared machine.
    {:ok, freed} = SHM.cleanup_regions(orphans: true, dry_run: true)
    assert Enum.any?(freed, &(&1.region_id == id and &1.reason == :orphan))
    assert {:error, %Error{reason: :not_found}} = SHM.adopt_region(ref)
    :ok = Snakepit.SharedMemory.Native.unlink_segment(id)
    refute File.exists?("/dev/shm/" <> id)
  end

  test "a ref whose descriptors hold another region is refused, not adopted as that one", %{
    worker: worker
  } do
    # Found by an attack run: the region id of the ref was never compared with the
    # region its /proc paths lead to (a discarded output whose fd numbers were reused,
    # or a worker whose pid was reused), so the VM adopted some other region.
    a = PythonWorker.ask(worker, "alloc memfd 4")
    b = PythonWorker.ask(worker, "alloc memfd 8")
    forged = %{b | "region_id" => a["region_id"]}

    assert {:error, %Error{reason: :not_found, message: m}} = SHM.adopt_region(forged)
    assert m =~ b["region_id"]
    assert {:error, %Error{reason: :not_found}} = SHM.get_region_info(b["region_id"])

    for ref <- [a, b] do
      assert {:ok, id} = SHM.adopt_region(ref)
      assert id == ref["region_id"]
      :ok = SHM.deallocate_region(id)
    end
  end

  test "a :timeout too large for 64-bit nanoseconds is an error tuple, not a raise", %{
    worker: worker
  } do
    # Found by an attack run: adopt_region(ref, timeout: 2**70) raised ArgumentError
    # (badarg from the NIF) and allocate_region/2 blamed "idle_timeout_ms".
    huge = Bitwise.bsl(1, 70)
    ref = PythonWorker.ask(worker, "alloc memfd 4")

    assert {:error, %Error{reason: :invalid_option, message: m}} =
             SHM.adopt_region(ref, timeout: huge)

    assert m =~ ":timeout"

    assert {:error, %Error{reason: :invalid_option, message: ":timeout" <> _}} =
             SHM.allocate_region(16, timeout: huge)

    # Still adoptable with a sane timeout.
    assert {:ok, id} = SHM.adopt_region(ref, timeout: 60_000)
    :ok = SHM.deallocate_region(id)
  end

  test "mix snakepit.shm.cleanup leaves an adopted POSIX output alone once its worker exits",
       %{worker: worker} do
    # Found by an attack run: the offline cleanup took it for an orphan (its header
    # names the worker as creator) and removed it under the VM that adopted it.
    ref = PythonWorker.ask(worker, "alloc posix 16")
    {:ok, id} = SHM.adopt_region(ref, cleanup_policy: :manual)
    PythonWorker.stop(worker)
    path = Path.join("/dev/shm", id)

    assert eventually(fn ->
             {:ok, header} = Snakepit.SharedMemory.Native.inspect_path(path)
             not header.creator_alive
           end)

    # list/info/doctor do not call it an orphan either.
    assert %{orphaned: false} = Snakepit.SharedMemory.CLI.HostScan.find(id)

    {_out, _err, _status} =
      Snakepit.SharedMemory.TaskHelpers.run_task("snakepit.shm.cleanup", ["--id", id])

    assert File.exists?(path)
    assert {:ok, %{size: 64}} = SHM.get_region_info(id)
    :ok = SHM.deallocate_region(id)
    refute File.exists?(path)
  end

  test "the worker's timeout applies after adoption unless adopt_region/2 gives one", %{
    worker: worker
  } do
    # Found by an attack run: the documented allocate(timeout=...) was overwritten by
    # the VM's default_timeout (:infinity) at adoption.
    ref = PythonWorker.ask(worker, "timed 30")
    {:ok, id} = SHM.adopt_region(ref)
    assert {:ok, %{timeout: 30_000}} = SHM.get_region_info(id)
    :ok = SHM.deallocate_region(id)

    ref = PythonWorker.ask(worker, "timed 30")
    {:ok, id} = SHM.adopt_region(ref, timeout: 5_000)
    assert {:ok, %{timeout: 5_000}} = SHM.get_region_info(id)
    :ok = SHM.deallocate_region(id)

    ref = PythonWorker.ask(worker, "alloc memfd 4")
    {:ok, id} = SHM.adopt_region(ref)
    assert {:ok, %{timeout: :infinity}} = SHM.get_region_info(id)
    :ok = SHM.deallocate_region(id)
  end

  test "a worker that is never adopted gives up its output after keep_seconds" do
    script = ~S"""
    import json, time, snakepit_shm
    out = snakepit_shm.allocate(64, keep_seconds=0.2)
    out.close()
    time.sleep(1.0)
    print(json.dumps(snakepit_shm.pending_outputs()))
    """

    {out, 0} = Snakepit.SharedMemory.ReliabilityHelpers.python(script)
    assert out =~ "[]"
  end

  defp eventually(fun, tries \\ 400) do
    cond do
      fun.() -> true
      tries == 0 -> false
      true -> Process.sleep(25) && eventually(fun, tries - 1)
    end
  end
end
