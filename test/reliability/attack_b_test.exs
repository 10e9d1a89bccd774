defmodule Snakepit.SharedMemory.Reliability.AttackBTest do
  # Attacks found after issues 11 and 16 merged. Each runs where a failure cannot take
  # the test VM down with it (a VM of its own) when the break was a dead VM.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.ReliabilityHelpers

  @moduletag :reliability
  @moduletag timeout: 120_000

  # A peer renames a POSIX segment, then truncates it: /proc/self/maps now names the
  # mapping after the new path, so the SIGBUS handler, which recognised our segments by
  # their name there, left the fault to the default action and the VM died (exit 135) on
  # its next access (a read of the header, a board scan). The handler now knows our
  # mappings by address.
  @renamed_truncation ~S"""
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.StatusBoard, as: SB

  truncate = fn id ->
    path = "/dev/shm/" <> id
    moved = "/dev/shm/atkb_moved_" <> id
    :ok = File.rename(path, moved)
    {:ok, f} = :file.open(String.to_charlist(moved), [:read, :write, :raw, :binary])
    {:ok, _} = :file.position(f, 0)
    :ok = :file.truncate(f)
    :ok = :file.close(f)
    :ok = File.rm(moved)
  end

  {:ok, id} = SM.allocate_region(65_536, backend: :posix)
  {:ok, m} = SM.map_region(id, access_mode: :read_write)
  :ok = SM.write(m, 0, "hello")
  truncate.(id)
  {:error, %{reason: :truncated}} = SM.read(m, 0, 5)
  {:error, %{reason: :truncated}} = SM.write(m, 0, "x")
  IO.puts("REGION OK")

  name = "atkbrn#{System.os_time()}" |> String.slice(0, 21)
  {:ok, b} = SB.create(name, capacity: 64)
  {:ok, _slot} = SB.join(b, "w1", state: :idle)
  truncate.(b.region_id)
  _ = SB.least_loaded(b)
  _ = SB.entries(b)
  IO.puts("BOARD OK")
  _ = SB.delete(b)
  _ = SM.deallocate_region(id)
  """

  test "posix: a peer that renames a segment before truncating it does not kill the VM" do
    assert_vm_lives(@renamed_truncation, ["REGION OK", "BOARD OK"])
  end

  # Runs `script` in a VM of its own: it must exit 0 and print every line of `lines`.
  defp assert_vm_lives(script, lines) do
    {out, status} = ReliabilityHelpers.elixir_vm(script)
    assert status == 0, "the VM died (exit #{status}):\n#{out}"
    for line <- lines, do: assert(out =~ line)
  end

  # A VM under a file size limit (ulimit -f, systemd LimitFSIZE=): sizing a segment, a
  # memfd or an arena past it raised SIGXFSZ, whose default action the BEAM keeps, and
  # the whole VM died (exit 153) on allocate_region/2 of a region larger than the limit.
  @file_size_limit ~S"""
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM
  {_, 0} = System.cmd("prlimit", ["--pid", System.pid(), "--fsize=3000000"])
  {:ok, small} = SM.allocate_region(4096)
  {:ok, mib} = SM.allocate_region(1_048_576)
  for opts <- [[], [backend: :posix], [security_level: :high], [arena: false]],
      size <- [4_194_304, 64 * 1_048_576] do
    {:error, %{reason: :too_large, message: message}} = SM.allocate_region(size, opts)
    true = message =~ "RLIMIT_FSIZE"
  end
  IO.puts("REFUSED OK")
  {:ok, m} = SM.map_region(mib)
  :ok = SM.write(m, 0, "still alive")
  :ok = SM.unmap_region(m)
  :ok = SM.deallocate_region(small)
  :ok = SM.deallocate_region(mib)
  IO.puts("ALIVE OK")
  """

  test "a region above the VM's file size limit is refused with :too_large, the VM lives" do
    assert_vm_lives(@file_size_limit, ["REFUSED OK", "ALIVE OK"])
  end

  # A Python worker attached to an encrypted region forks. The data lock is an OFD lock,
  # and fork() shares the open file description: parent and child both held the
  # "exclusive" lock at once, wrote one chunk together, and thousands of writes and
  # reads came back tampered; the memfd region's chunk stayed lost for good.
  @forked_encrypted_writers ~S"""
  import json, sys, time, os, snakepit_shm
  ref = json.loads(sys.argv[1])
  counts = {"ok": 0, "busy": 0, "tampered": 0, "other": 0}
  region = snakepit_shm.attach(ref, mode="rw")
  child = os.fork()
  offset = 1000 if child == 0 else 2000
  payload = bytes([offset % 251]) * 100
  end = time.monotonic() + 1.0
  while time.monotonic() < end or counts["ok"] == 0:
      try:
          region.write(offset, payload)
          counts["ok"] += 1
          region.read(0, 4096)
      except snakepit_shm.RegionBusy:
          counts["busy"] += 1
      except snakepit_shm.CorruptRegion:
          counts["tampered"] += 1
      except Exception as exc:
          counts["other"] += 1
          print("error", repr(exc), flush=True)
  if child == 0:
      print("result", json.dumps(counts), flush=True)
      os._exit(0)
  os.waitpid(child, 0)  # then print: the two lines never interleave
  print("result", json.dumps(counts), flush=True)
  region.close()
  """

  for backend <- [:memfd, :posix] do
    test "#{backend}: a forked Python writer of an encrypted region never corrupts a chunk" do
      alias Snakepit.SharedMemory, as: SM
      {:ok, id} = SM.allocate_region(4096, backend: unquote(backend), security_level: :high)
      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      {:ok, ref} = SM.export_ref(id, include_key: true)
      {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)

      try do
        {out, 0} = ReliabilityHelpers.python(@forked_encrypted_writers, [json])
        results = Regex.scan(~r/^result (.*)$/m, out, capture: :all_but_first)
        assert length(results) == 2, out

        for [line] <- results do
          {:ok, counts} = Snakepit.SharedMemory.JSON.decode(line)
          assert counts["tampered"] == 0, out
          assert counts["other"] == 0, out
          assert counts["ok"] > 0, out
        end

        assert {:ok, data} = SM.read(m, 0, 4096)
        assert binary_part(data, 1000, 100) == :binary.copy(<<rem(1000, 251)>>, 100)
        assert binary_part(data, 2000, 100) == :binary.copy(<<rem(2000, 251)>>, 100)
      after
        SM.deallocate_region(id)
      end
    end
  end

  # A Python worker that joined a board forks. The child inherited the StatusBoard
  # object: its leave() (a `with` block unwinding in the child) freed the parent's slot,
  # and its updates made two writers of one seqlock slot.
  @forked_board_worker ~S"""
  import json, sys, os, snakepit_shm
  ref = json.loads(sys.argv[1])
  board = snakepit_shm.StatusBoard.join(ref, "parent")
  board.update(state="idle", queue=1)
  child = os.fork()
  if child == 0:
      try:
          board.update(queue=99)
          print("child updated", flush=True)
      except snakepit_shm.SnakepitShmError as exc:
          print("child refused", exc, flush=True)
      board.leave()
      os._exit(0)
  os.waitpid(child, 0)
  board.update(state="idle", queue=2)
  print("parent updated", flush=True)
  sys.stdin.readline()
  board.leave()
  """

  test "a forked child can neither write nor free its parent's board slot" do
    alias Snakepit.SharedMemory.StatusBoard
    name = "atkbfork#{System.unique_integer([:positive])}"
    {:ok, board} = StatusBoard.create(name, capacity: 4)
    {:ok, ref} = StatusBoard.export_ref(board)
    {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)

    env = for {k, v} <- ReliabilityHelpers.python_env(), do: {k, v}

    port =
      Port.open(
        {:spawn_executable, Snakepit.SharedMemory.ShmHelpers.python()},
        [:binary, :exit_status, :stderr_to_stdout, {:line, 4096}] ++
          [args: ["-u", "-c", @forked_board_worker, json], env: env]
      )

    try do
      lines = collect(port, "parent updated", [])
      assert Enum.any?(lines, &String.starts_with?(&1, "child refused")), inspect(lines)
      assert {:ok, [%{worker_id: "parent", queue: 2}]} = StatusBoard.entries(board)
      Port.command(port, "bye\n")
      assert_receive {^port, {:exit_status, 0}}, 30_000
    after
      StatusBoard.delete(board)
    end
  end

  defp collect(port, last, acc) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        if line == last, do: Enum.reverse([line | acc]), else: collect(port, last, [line | acc])

      {^port, {:exit_status, status}} ->
        flunk("python exited with #{status}: #{inspect(Enum.reverse(acc))}")
    after
      30_000 -> flunk("python said no #{inspect(last)}: #{inspect(Enum.reverse(acc))}")
    end
  end
end
