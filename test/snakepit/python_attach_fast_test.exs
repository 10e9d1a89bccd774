defmodule Snakepit.SharedMemory.PythonAttachFastTest do
  # The worker's one-call attach (issue 14, c_src/capi/capi_attach.cpp) of what a
  # Snakepit tool attaches on every request: a large region whose data memfd was reused
  # from the VM's warm pool (its name is the header's data_name, not <id>.data), by ref
  # and by bare id (the runtime index hint). The worker's step-by-step path is disabled,
  # so a refusal of the fast path fails the test instead of silently costing its price;
  # the warm pool's guarantees hold through it.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.WarmPool
  alias Snakepit.SharedMemory.Test.PythonWorker

  @mib 1024 * 1024
  # Sizes no other test allocates: the pool is per VM.
  @size 7 * @mib + 4096
  @other 7 * @mib + 8192

  @worker ~S"""
  import json, sys
  import snakepit_shm
  from snakepit_shm import _attach, _locate

  def step_by_step(*args, **kwargs):
      raise AssertionError("the step-by-step attach ran")

  strict = {"on": False}
  real = (_attach._open_control, _locate._indexed)
  held = {}
  for line in sys.stdin:
      cmd, _, arg = line.strip().partition(" ")
      try:
          if cmd == "strict":
              strict["on"] = arg == "on"
              _attach._open_control, _locate._indexed = \
                  (step_by_step, step_by_step) if strict["on"] else real
              print(json.dumps({"ok": True}), flush=True)
          elif cmd == "attach":
              key, _, target = arg.partition(" ")
              target = json.loads(target) if target.startswith("{") else target
              r = snakepit_shm.attach(target, mode="r")
              held[key] = r
              print(json.dumps({"ok": bytes(r.buf[:4]).hex(), "size": r.size}), flush=True)
          elif cmd == "close":
              held.pop(arg).close()
              print(json.dumps({"ok": True}), flush=True)
          elif cmd == "try":
              target = json.loads(arg) if arg.startswith("{") else arg
              try:
                  with snakepit_shm.attach(target, mode="r") as r:
                      data = bytes(r.buf[:4]).hex()
                  print(json.dumps({"attached": data}), flush=True)
              except snakepit_shm.SnakepitShmError as exc:
                  print(json.dumps({"refused": type(exc).__name__, "message": str(exc)}),
                        flush=True)
      except Exception as exc:
          print(json.dumps({"error": repr(exc)}), flush=True)
  """

  setup do
    before = WarmPool.stats()
    :ok = WarmPool.set_budget(0)
    :ok = WarmPool.set_budget(max(before.budget, 64 * @mib))

    on_exit(fn ->
      :ok = WarmPool.set_budget(0)
      :ok = WarmPool.set_budget(WarmPool.default_budget())
    end)

    worker = PythonWorker.start(@worker)
    on_exit(fn -> PythonWorker.stop(worker) end)
    %{worker: worker}
  end

  defp fill(id, byte, size) do
    {:ok, m} = SM.map_region(id, access_mode: :read_write)
    :ok = SM.write(m, 0, :binary.copy(<<byte>>, size))
    :ok = SM.unmap_region(m)
  end

  defp ref_json(id) do
    {:ok, ref} = SM.export_ref(id)
    {:ok, text} = Snakepit.SharedMemory.JSON.encode(ref)
    IO.iodata_to_binary(text)
  end

  # A region whose data memfd comes from the pool: allocate, free (pooled), allocate.
  defp pooled_region(byte) do
    {:ok, first} = SM.allocate_region(@size)
    s0 = WarmPool.stats()
    :ok = SM.deallocate_region(first)
    assert WarmPool.stats().entries == s0.entries + 1
    {:ok, id} = SM.allocate_region(@size)
    assert WarmPool.stats().hits == s0.hits + 1
    fill(id, byte, @size)
    {first, id}
  end

  test "a region reusing a pooled data memfd attaches in one call, by ref and by bare id",
       %{worker: worker} do
    {_first, id} = pooled_region(0x3C)
    # The bare id's index entry is written at creation for a dedicated memfd region.
    assert %{"ok" => true} = PythonWorker.ask(worker, "strict on")
    assert %{"attached" => "3c3c3c3c"} = PythonWorker.ask(worker, "try " <> ref_json(id))
    assert %{"attached" => "3c3c3c3c"} = PythonWorker.ask(worker, "try " <> id)
    # Closed: the data lock is gone with the mapping, so the pool takes it back.
    s0 = WarmPool.stats()
    :ok = SM.deallocate_region(id)
    assert WarmPool.stats().entries == s0.entries + 1
  end

  test "a fast-attached worker keeps the pool from handing its memory to a new owner",
       %{worker: worker} do
    {_first, id} = pooled_region(0x5D)
    assert %{"ok" => true} = PythonWorker.ask(worker, "strict on")
    assert %{"ok" => "5d5d5d5d"} = PythonWorker.ask(worker, "attach a " <> id)
    s0 = WarmPool.stats()
    :ok = SM.deallocate_region(id)
    s1 = WarmPool.stats()
    # Its data lock (taken by the one call) refuses the offer: not pooled.
    assert s1.refused == s0.refused + 1
    assert s1.entries == s0.entries
    {:ok, next} = SM.allocate_region(@size)
    assert WarmPool.stats().misses == s1.misses + 1
    fill(next, 0x77, @size)
    assert %{"ok" => true} = PythonWorker.ask(worker, "close a")
    :ok = SM.deallocate_region(next)
  end

  test "the old ref and id of a pooled object attach nothing", %{worker: worker} do
    {:ok, first} = SM.allocate_region(@other)
    fill(first, 0x11, @other)
    old_ref = ref_json(first)
    :ok = SM.deallocate_region(first)
    {:ok, id} = SM.allocate_region(@other)
    fill(id, 0x99, @other)

    # (The fast path refuses them; the step-by-step path then says why.)
    assert %{"refused" => "RegionNotFound"} = PythonWorker.ask(worker, "try " <> old_ref)
    assert %{"refused" => "RegionNotFound"} = PythonWorker.ask(worker, "try " <> first)

    assert %{"ok" => true} = PythonWorker.ask(worker, "strict on")
    assert %{"attached" => "99999999"} = PythonWorker.ask(worker, "try " <> ref_json(id))
    :ok = SM.deallocate_region(id)
  end
end
