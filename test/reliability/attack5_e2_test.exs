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

  # A POSIX output given up (keep_seconds here; discard() or the exit grace alike) while
  # the VM adopts it. The worker decided from a read of the header's state and then
  # removed the name: an adoption in between (made wide here: the worker's unlink waits
  # 1 s) registered a region no other process could open by name any more, and the
  # worker warned that the result was lost. The give-up is now one compare-and-swap
  # against the adoption's: exactly one wins, and both sides agree.
  @slow_give_up ~S"""
  import json, time, snakepit_shm
  from snakepit_shm import _outputs
  unlink = _outputs._unlink_quietly
  def slow(path):
      print(json.dumps({"unlinking": path}), flush=True)
      time.sleep(1.0)
      unlink(path)
  _outputs._unlink_quietly = slow
  with snakepit_shm.allocate(4096, backend="posix", keep_seconds=0.2) as out:
      out.write(0, b"result")
  print(json.dumps(out.ref), flush=True)
  time.sleep(3)
  """

  test "a POSIX output given up while the VM adopts it: one of the two wins, never both" do
    worker = PythonWorker.start(@slow_give_up)

    try do
      ref = PythonWorker.ask(worker, "")
      port = worker.port
      assert_receive {^port, {:data, {:eol, "{\"unlinking\"" <> _}}}, 5_000

      case SM.adopt_region(ref) do
        {:error, %{reason: :deallocated, message: m}} ->
          assert m =~ "gave the output up"

        {:ok, id} ->
          # (before the fix) adopted, then its name removed under the VM: the VM lost
          # the region too within a second (:not_found from then on).
          Process.sleep(1_500)
          info = SM.get_region_info(id)
          path = Path.join(Snakepit.SharedMemory.Platform.current().shm_dir(), id)
          exists = File.exists?(path)
          _ = SM.deallocate_region(id)
          flunk("adopted while given up: name kept #{exists}, region now #{inspect(info)}")
      end
    after
      System.cmd("kill", ["-9", Integer.to_string(worker.os_pid)])
    end
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
