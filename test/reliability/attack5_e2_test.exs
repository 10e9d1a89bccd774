defmodule Snakepit.SharedMemory.Reliability.Attack5E2Test do
  # Attack run 5 (E2): the worker-output API as a careless first-time user meets it:
  # refs passed on in the wrong shape, outputs adopted too late.
  use Snakepit.SharedMemory.ReliabilityCase, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.Test.PythonWorker

  @worker ~S"""
  import json, sys, snakepit_shm
  for line in sys.stdin:
      keep = float(line)
      out = snakepit_shm.allocate(64, dtype="float32", shape=[16], keep_seconds=keep)
      out.close()
      print(json.dumps(out.ref), flush=True)
  """

  setup do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    worker = PythonWorker.start(@worker)
    on_exit(fn -> System.cmd("kill", ["-9", Integer.to_string(worker.os_pid)]) end)
    %{worker: worker}
  end

  # Each used to be refused as "expected a ref with region_id and backend" (the atom-keyed
  # ref has both) or "not a ref or marker (JSON object)", naming neither the problem nor
  # what to pass instead.
  test "a ref in the wrong shape: the error says what is wrong with it", %{worker: worker} do
    ref = PythonWorker.ask(worker, "600")

    atoms = Map.new(ref, fn {k, v} -> {String.to_atom(k), v} end)
    assert {:error, %{reason: :invalid_argument, message: m}} = SM.adopt_region(atoms)
    assert m =~ "keys are atoms" and m =~ "string keys"

    assert {:error, %{reason: :invalid_argument, message: m}} = SM.adopt_region(ref["region_id"])

    assert m =~ "bare region id" and m =~ "whole ref"

    assert {:error, %{message: m}} = SM.adopt_region(Map.delete(ref, "backend"))
    assert m =~ ~s(no "backend")

    assert {:error, %{message: m}} = SM.adopt_region(Map.put(ref, "backend", "shm"))
    assert m =~ ~s("backend" is "shm")

    # Nothing was taken over by the refused attempts: the ref itself adopts.
    assert {:ok, id} = SM.adopt_region(ref)
    assert :ok = SM.deallocate_region(id)
  end

  # A worker that replied and then exited normally (a recycled pool worker, a one-shot
  # script) took its memfd output with it, mostly before the VM had read the reply:
  # adopt_region/2 gave :not_found and the result was lost. An exiting worker now waits
  # for the adoption of its pending outputs (SNAKEPIT_SHM_EXIT_GRACE, 5 s by default).
  @one_shot ~S"""
  import json, numpy, snakepit_shm
  out = snakepit_shm.from_array(numpy.arange(8, dtype=numpy.int64))
  out.close()
  print(json.dumps(out.ref), flush=True)
  """

  test "a worker exiting right after its reply: the VM still adopts the output" do
    worker = PythonWorker.start(@one_shot)
    ref = PythonWorker.ask(worker, "")
    # The VM reads the reply a moment later.
    Process.sleep(300)
    assert {:ok, id} = SM.adopt_region(ref)
    {:ok, mapping} = SM.map_region(id)
    assert {:ok, <<0::little-64, 1::little-64, _::binary>>} = SM.read(mapping, 0, 64)
    :ok = SM.unmap_region(mapping)
    :ok = SM.deallocate_region(id)
    # and the worker leaves once its output is adopted, not at the end of the grace
    port = worker.port
    assert_receive {^port, {:exit_status, 0}}, 3_000
  end

  # A result nobody adopted within keep_seconds is given up by the worker (by design,
  # documented now); the :not_found used to say only "adopt the ref while the worker ...
  # is alive and has not discarded it".
  test "adopting after the output's keep_seconds: :not_found names keep_seconds",
       %{worker: worker} do
    ref = PythonWorker.ask(worker, "0.1")
    Process.sleep(600)
    assert {:error, %{reason: :not_found, message: m}} = SM.adopt_region(ref)
    assert m =~ "keep_seconds"
  end
end
