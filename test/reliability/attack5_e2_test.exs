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
