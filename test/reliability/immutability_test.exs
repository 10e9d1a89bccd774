defmodule Snakepit.SharedMemory.Reliability.ImmutabilityTest do
  # Issue 11: "sealed" and "encrypted" hold against every process of the same user.
  # Each test attacks from outside the VM where it applies (a Python worker, a raw
  # open("/proc/<pid>/fd/N", O_RDWR) + mmap, fork, mprotect, ftruncate, fallocate) and
  # asserts the guarantee: after seal/1 returns :ok no process changes a byte a zero-copy
  # binary shows; concurrent encrypted writers never corrupt a chunk; a truncated POSIX
  # region gives :truncated and the VM lives.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Error, ReliabilityHelpers, ShmHelpers}

  @moduletag :reliability
  @moduletag timeout: 300_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    ReliabilityHelpers.check_segments_on_exit()
    :ok
  end

  # ---- an interactive Python peer: one line per step on stdout, commands on stdin ----

  defp start_python(script, args) do
    Port.open({:spawn_executable, ShmHelpers.python()}, [
      :binary,
      :exit_status,
      :stderr_to_stdout,
      {:line, 65_536},
      args: ["-u", "-c", script | args],
      env: ReliabilityHelpers.python_env()
    ])
  end

  defp expect(port, prefix, timeout \\ 30_000) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        if String.starts_with?(line, prefix), do: line, else: expect(port, prefix, timeout)

      {^port, {:exit_status, status}} ->
        flunk("python exited with #{status} while waiting for #{inspect(prefix)}")
    after
      timeout -> flunk("python said no #{inspect(prefix)} within #{timeout} ms")
    end
  end

  defp say(port, line), do: Port.command(port, line <> "\n")

  defp wait_exit(port) do
    receive do
      {^port, {:exit_status, status}} -> status
      {^port, {:data, _}} -> wait_exit(port)
    after
      30_000 -> flunk("python did not exit")
    end
  end

  defp hash(binary), do: :erlang.md5(binary)

  defp allocate_written(size, backend, byte \\ 7) do
    {:ok, id} = SM.allocate_region(size, backend: backend)
    {:ok, m} = SM.map_region(id, access_mode: :read_write)
    :ok = SM.write(m, 0, :binary.copy(<<byte>>, size))
    {id, m}
  end

  # ---- 1. a write in flight when seal/1 is called ----

  for backend <- [:memfd, :posix] do
    test "#{backend}: a 256 MiB write racing seal/1 either finishes before the seal or fails" do
      size = 256 * 1024 * 1024
      payload = :binary.copy(<<0xAB>>, size)

      delays =
        if ReliabilityHelpers.soak?(), do: [5, 8, 12, 16, 20], else: [5 + :rand.uniform(15)]

      for delay <- delays do
        {:ok, id} = SM.allocate_region(size, backend: unquote(backend))
        {:ok, m} = SM.map_region(id, access_mode: :read_write)
        writer = Task.async(fn -> SM.write(m, 0, payload) end)
        Process.sleep(delay)
        sealed = SM.seal(id)
        {:ok, r} = SM.map_region(id, access_mode: :read_only)

        case sealed do
          :ok ->
            {:ok, bin} = SM.read(r, 0, size)
            before = hash(bin)
            write_result = Task.await(writer, 60_000)
            assert write_result == :ok or match?({:error, %Error{}}, write_result)
            # Whatever the writer did, the bytes under the binary never change.
            assert hash(bin) == before, "a sealed binary changed (delay #{delay} ms)"
            {:ok, again} = SM.read(r, 0, size)
            assert hash(again) == before

          {:error, %Error{reason: reason}} ->
            assert reason in [:busy]
            Task.await(writer, 60_000)
        end

        :ok = SM.unmap_region(r)
        :ok = SM.unmap_region(m)
        :ok = SM.deallocate_region(id)
      end
    end
  end

  # ---- 2. a forked writer ----

  @forked_writer ~S"""
  import os, sys, snakepit_shm
  region = snakepit_shm.attach(sys.argv[1], mode="rw")
  child = os.fork()
  if child == 0:
      sys.stdin.readline()          # "write": after the VM tried to seal
      region._data_mm[0:4] = b"EVIL"
      print("child wrote", flush=True)
      sys.stdin.readline()          # "exit"
      os._exit(0)
  region.close()                    # the parent lets go: its hold is released
  print("ready", child, flush=True)
  os.waitpid(child, 0)
  print("child gone", flush=True)
  """

  test "memfd: seal/1 refuses while a forked child maps the region writable, then succeeds" do
    {id, m} = allocate_written(65_536, :memfd)
    port = start_python(@forked_writer, [id])
    expect(port, "ready")
    # The parent closed: no holder is left, only the child's inherited writable mapping.
    assert {:error, %Error{reason: :busy} = error} = SM.seal(id)
    assert error.message =~ "writable"
    # The state did not change: still writable, still copying reads.
    assert {:ok, info} = SM.get_region_info(id)
    refute info.sealed
    say(port, "write")
    expect(port, "child wrote")
    say(port, "exit")
    expect(port, "child gone")
    assert wait_exit(port) == 0
    :ok = SM.unmap_region(m)
    assert :ok = SM.seal(id)
    {:ok, r} = SM.map_region(id, access_mode: :read_only)
    {:ok, bin} = SM.read(r, 0, 65_536)
    assert binary_part(bin, 0, 4) == "EVIL"
    :ok = SM.unmap_region(r)
    :ok = SM.deallocate_region(id)
  end

  # ---- 3. mappings made before the seal ----

  @raw_mapper ~S"""
  import ctypes, os, sys
  path, size, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  libc = ctypes.CDLL(None, use_errno=True)
  libc.mmap.restype = ctypes.c_void_p
  libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                        ctypes.c_int, ctypes.c_long]
  libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  PROT_READ, PROT_WRITE, MAP_SHARED = 1, 2, 1
  fd = os.open(path, os.O_RDWR)
  prot = PROT_READ | (PROT_WRITE if how == "write" else 0)
  address = libc.mmap(None, size, prot, MAP_SHARED, fd, 0)
  assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
  os.close(fd)
  print("mapped", flush=True)
  sys.stdin.readline()              # "try": after the VM tried to seal
  if how == "write":
      ctypes.memmove(address, b"EVIL", 4)
      print("wrote", flush=True)
  elif libc.mprotect(address, size, PROT_READ | PROT_WRITE) == 0:
      ctypes.memmove(address, b"EVIL", 4)
      print("mprotect ok, wrote", flush=True)
  else:
      print("mprotect refused", ctypes.get_errno(), flush=True)
  sys.stdin.readline()              # "exit"
  """

  test "memfd: a raw writable mmap of /proc/<pid>/fd/N made before the seal blocks it" do
    {id, m} = allocate_written(65_536, :memfd)
    {:ok, ref} = SM.export_ref(id)
    port = start_python(@raw_mapper, [ref["data_path"], "65536", "write"])
    expect(port, "mapped")
    :ok = SM.unmap_region(m)
    assert {:error, %Error{reason: :busy}} = SM.seal(id)
    say(port, "try")
    expect(port, "wrote")
    say(port, "exit")
    assert wait_exit(port) == 0
    # The mapping is gone with its process: now the kernel grants the seal.
    assert :ok = SM.seal(id)
    :ok = SM.deallocate_region(id)
  end

  test "memfd: a PROT_READ mapping of an O_RDWR open made before the seal cannot write after it" do
    {id, m} = allocate_written(65_536, :memfd)
    {:ok, ref} = SM.export_ref(id)
    port = start_python(@raw_mapper, [ref["data_path"], "65536", "mprotect"])
    expect(port, "mapped")
    :ok = SM.unmap_region(m)
    sealed = SM.seal(id)
    {:ok, r} = SM.map_region(id, access_mode: :read_only)
    {:ok, bin} = SM.read(r, 0, 65_536)
    before = hash(bin)
    say(port, "try")
    line = expect(port, "mprotect")

    case sealed do
      # The kernel refuses the seal while a VM_MAYWRITE mapping exists (the mprotect
      # then works, but nothing was promised: the region is not sealed)...
      {:error, %Error{reason: :busy}} -> :ok
      # ...or it sealed, and then the old mapping can never become writable.
      :ok -> assert line =~ "refused", line
    end

    say(port, "exit")
    assert wait_exit(port) == 0
    if sealed == :ok, do: assert(hash(bin) == before)
    :ok = SM.unmap_region(r)
    :ok = SM.deallocate_region(id)
  end

  # ---- 4. the header's sealed bit is not trusted ----

  test "memfd: a forged sealed bit in the header gives no zero-copy binary, an opened region asks the kernel" do
    alias Snakepit.SharedMemory.Native
    {:ok, region, info} = Native.create(8192, ShmHelpers.create_opts(backend: :memfd))
    {:ok, mapping} = Native.map(region, :read_write)
    :ok = Native.write(mapping, 0, "abcd")
    # Any process of the uid can write the header: set the sealed bit by hand.
    {:ok, control} = :file.open(info.control_path, [:read, :write, :raw, :binary])
    :ok = :file.pwrite(control, 2048, <<1::little-32>>)
    assert Native.info(region).sealed
    assert {:error, {:invalid_argument, message, _}} = Native.read_zero_copy(mapping, 0, 4)
    assert message =~ "not by the kernel"
    refute Native.info(region).zero_copy
    :ok = :file.pwrite(control, 2048, <<0::little-32>>)
    :file.close(control)
    :ok = Native.unmap(mapping)
    # Opened read-only in this VM: its view comes from an O_RDONLY open and does not
    # block the seal; afterwards it sees the kernel's seal through F_GET_SEALS.
    {:ok, opened, opened_info} = Native.open({info.control_path, info.data_path}, false)
    refute opened_info.zero_copy
    :ok = Native.seal(region)
    assert Native.info(opened).zero_copy
    {:ok, reader} = Native.map(opened, :read_only)
    assert {:ok, "abcd"} = Native.read_zero_copy(reader, 0, 4)
    :ok = Native.unmap(reader)
    :ok = Native.deallocate(region, false)
  end

  # ---- 3b. POSIX: the owner can make the segment writable again, so reads copy ----

  @posix_writer ~S"""
  import os, sys
  path, offset = sys.argv[1], int(sys.argv[2])
  os.chmod(path, 0o600)
  fd = os.open(path, os.O_RDWR)
  os.pwrite(fd, b"EVIL", offset)
  os.close(fd)
  print("wrote", flush=True)
  """

  test "posix: a sealed region's binary does not change when its owner chmods it back and writes" do
    {id, m} = allocate_written(65_536, :posix)
    :ok = SM.seal(id)
    {:ok, info} = SM.get_region_info(id)
    assert info.sealed
    {:ok, bin} = SM.read(m, 0, 65_536)
    before = hash(bin)
    {:ok, ref} = SM.export_ref(id)

    {out, 0} =
      ReliabilityHelpers.python(@posix_writer, [ref["control_path"], "#{ref["data_offset"]}"])

    assert out =~ "wrote"
    # The write reached the segment (the seal is only a mode on POSIX)...
    {:ok, now} = SM.read(m, 0, 4)
    assert now == "EVIL"
    # ...but the binary read before is a copy and did not change.
    assert hash(bin) == before
    :ok = SM.deallocate_region(id)
  end

  # ---- 5. concurrent writers of an encrypted region ----

  @encrypted_worker ~S"""
  import json, sys, time, snakepit_shm
  ref = json.loads(sys.argv[1]); offset = int(sys.argv[2]); seconds = float(sys.argv[3])
  counts = {"ok": 0, "busy": 0, "tampered": 0, "other": 0, "reads": 0}
  Busy = getattr(snakepit_shm, "RegionBusy", ())
  with snakepit_shm.attach(ref, mode="rw") as region:
      print("ready", flush=True)
      sys.stdin.readline()
      payload = bytes([offset % 251]) * 100
      end = time.monotonic() + seconds
      while time.monotonic() < end:
          for op in ("write", "read"):
              try:
                  if op == "write":
                      region.write(offset, payload)
                      counts["ok"] += 1
                  else:
                      region.read(0, 4096)
                      counts["reads"] += 1
              except Busy:
                  counts["busy"] += 1
              except snakepit_shm.CorruptRegion:
                  counts["tampered"] += 1
              except Exception as exc:
                  counts["other"] += 1
                  print("error", repr(exc), flush=True)
  print("result", json.dumps(counts), flush=True)
  """

  for backend <- [:memfd, :posix] do
    test "#{backend}: concurrent writers of one encrypted chunk (VM and two Python workers) never corrupt it" do
      size = 4096
      {:ok, id} = SM.allocate_region(size, backend: unquote(backend), security_level: :high)
      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      {:ok, ref} = SM.export_ref(id, include_key: true)
      {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)
      seconds = "1.5"

      ports =
        for offset <- [1000, 2000],
            do: start_python(@encrypted_worker, [json, "#{offset}", seconds])

      Enum.each(ports, &expect(&1, "ready"))
      Enum.each(ports, &say(&1, "go"))
      deadline = System.monotonic_time(:millisecond) + 1500
      vm = vm_loop(m, deadline, %{ok: 0, busy: 0, tampered: 0, other: []})

      results =
        for port <- ports do
          line = expect(port, "result ")
          {:ok, counts} = Snakepit.SharedMemory.JSON.decode(String.trim_leading(line, "result "))
          wait_exit(port)
          counts
        end

      assert vm.tampered == 0, "VM saw :tampered: #{inspect(vm)}"
      assert vm.other == [], inspect(vm)
      assert vm.ok > 0

      for counts <- results do
        assert counts["tampered"] == 0, inspect(results)
        assert counts["other"] == 0, inspect(results)
        assert counts["ok"] > 0, inspect(results)
      end

      # Somebody was refused at least once (the workers really overlapped), and the
      # region is intact: every chunk authenticates and holds the last writes.
      assert vm.busy + Enum.sum(Enum.map(results, & &1["busy"])) > 0
      assert {:ok, data} = SM.read(m, 0, size)
      assert binary_part(data, 0, 100) == :binary.copy(<<1>>, 100)
      assert binary_part(data, 1000, 100) == :binary.copy(<<rem(1000, 251)>>, 100)
      assert binary_part(data, 2000, 100) == :binary.copy(<<rem(2000, 251)>>, 100)
      :ok = SM.deallocate_region(id)
    end
  end

  defp vm_loop(m, deadline, acc) do
    if System.monotonic_time(:millisecond) >= deadline do
      acc
    else
      acc = count(acc, SM.write(m, 0, :binary.copy(<<1>>, 100)))
      acc = count(acc, SM.read(m, 0, 4096))
      vm_loop(m, deadline, acc)
    end
  end

  defp count(acc, :ok), do: %{acc | ok: acc.ok + 1}
  defp count(acc, {:ok, _}), do: acc
  defp count(acc, {:error, %Error{reason: :busy}}), do: %{acc | busy: acc.busy + 1}
  defp count(acc, {:error, %Error{reason: :tampered}}), do: %{acc | tampered: acc.tampered + 1}
  defp count(acc, {:error, error}), do: %{acc | other: [error | acc.other]}

  # ---- 6. a peer truncates a POSIX segment ----

  @truncator ~S"""
  import os, sys
  fd = os.open(sys.argv[1], os.O_RDWR)
  os.ftruncate(fd, 0)
  os.close(fd)
  print("truncated", flush=True)
  """

  test "posix: a peer's ftruncate gives :truncated errors, not a dead VM" do
    size = 1024 * 1024
    {id, m} = allocate_written(size, :posix)
    {:ok, ref} = SM.export_ref(id)
    {out, 0} = ReliabilityHelpers.python(@truncator, [ref["control_path"]])
    assert out =~ "truncated"
    # Small (normal scheduler) and large (dirty scheduler) reads and writes.
    assert {:error, %Error{reason: :truncated} = e} = SM.read(m, 0, 100)
    assert e.message =~ "truncated"
    assert {:error, %Error{reason: :truncated}} = SM.read(m, 0, size)
    assert {:error, %Error{reason: :truncated}} = SM.write(m, 0, "x")
    assert {:error, %Error{reason: :truncated}} = SM.write(m, 0, :binary.copy("x", size))
    # A seal after the damage gives no zero-copy binary either.
    _ = SM.seal(id)
    assert {:error, %Error{reason: :truncated}} = SM.read(m, 0, 100)
    # The VM is alive and the region can still be freed.
    assert :ok = SM.deallocate_region(id)
  end

  test "posix: a :high region truncated by a peer is freed without a crash (zeroing is guarded)" do
    {:ok, id} = SM.allocate_region(1024 * 1024, backend: :posix, security_level: :high)
    {:ok, ref} = SM.export_ref(id)
    {_, 0} = ReliabilityHelpers.python(@truncator, [ref["control_path"]])
    # The header went with the data: map/2 itself reports it.
    assert {:error, %Error{reason: :truncated}} = SM.map_region(id, access_mode: :read_write)
    ExUnit.CaptureLog.capture_log(fn -> assert :ok = SM.deallocate_region(id) end)
  end

  # ---- 7. fallocate(PUNCH_HOLE) on a memfd ----

  @hole_puncher ~S"""
  import ctypes, os, sys
  libc = ctypes.CDLL(None, use_errno=True)
  libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
  fd = os.open(sys.argv[1], os.O_RDWR)
  FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
  rc = libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 65536)
  print("punched" if rc == 0 else "refused %d" % ctypes.get_errno(), flush=True)
  """

  test "memfd: fallocate(PUNCH_HOLE) is refused once sealed; unsealed, it zeroes and the VM lives" do
    {id, m} = allocate_written(65_536, :memfd, 9)
    {:ok, ref} = SM.export_ref(id)
    # Unsealed data is writable by design: a hole reads back as zeros, no fault.
    {out, 0} = ReliabilityHelpers.python(@hole_puncher, [ref["data_path"]])
    assert out =~ "punched"
    assert {:ok, zeros} = SM.read(m, 0, 65_536)
    assert zeros == <<0::size(65_536)-unit(8)>>
    :ok = SM.write(m, 0, :binary.copy(<<9>>, 65_536))
    :ok = SM.unmap_region(m)
    :ok = SM.seal(id)
    {:ok, r} = SM.map_region(id, access_mode: :read_only)
    {:ok, bin} = SM.read(r, 0, 65_536)
    {out, 0} = ReliabilityHelpers.python(@hole_puncher, [ref["data_path"]])
    assert out =~ "refused 1", out
    assert bin == :binary.copy(<<9>>, 65_536)
    :ok = SM.unmap_region(r)
    :ok = SM.deallocate_region(id)
  end
end
