defmodule Snakepit.SharedMemory.Reliability.SealLockTest do
  # A sealer killed between setting and clearing the header's `sealing` bit used to leave
  # the region unwritable for good: every later write answered busy ("is being sealed")
  # until a seal by its owner committed. Now a sealer holds the seal lock (an OFD lock of
  # byte 2 of the control object) from before it sets the bit until after it clears it,
  # and whoever finds the bit with that lock free clears it (docs/FORMAT.md, "Sealing").
  #
  # For real: a second VM opens our named region and seals it, parked by the core's test
  # hook (SNAKEPIT_SHM_TEST_PARK=seal=..., c_src/core/park.hpp) with the bit set and the
  # lock held; it is SIGKILLed there. A Python worker writes through the C ABI's check.
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

  @sealer """
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  name = System.get_env("SEAL_NAME")
  {:ok, id} = Snakepit.SharedMemory.allocate_region(4096, name: name, open_mode: :open_only)
  IO.puts("OPENED " <> System.pid())
  IO.puts("SEAL " <> inspect(Snakepit.SharedMemory.seal(id)))
  Process.sleep(:infinity)
  """

  test "a VM SIGKILLed mid-seal: its bit stands while it lives, then our writes succeed" do
    name = ShmHelpers.unique_name("seal")
    {:ok, id} = SM.allocate_region(4096, name: name, cleanup_policy: :manual)
    {:ok, m} = SM.map_region(id)
    :ok = SM.write(m, 0, "before")

    sealer = start_sealer(name)
    %{"OPENED " => os_pid} = await_parked(sealer)
    assert sealing?(id)

    # Alive, parked with the lock: our writes and a Python worker's are refused, and
    # neither clears its bit (a live sealer's bit is never cleared by anyone else).
    assert {:error, %Error{reason: :busy, message: msg}} = SM.write(m, 0, "during")
    assert msg =~ "being sealed"
    assert python_write(id) =~ "BUSY"
    assert {:error, %Error{reason: :busy}} = SM.seal(id)
    assert sealing?(id)

    # SIGKILLed with the bit set: the kernel drops its lock; the bit is now stale.
    {_, 0} = System.cmd("kill", ["-9", os_pid])
    assert_receive {^sealer, {:exit_status, _}}, 30_000
    assert sealing?(id)

    # A Python worker's write clears it (spshm_clear_stale_sealing), then ours work too.
    assert python_write(id) =~ "WROTE"
    refute sealing?(id)
    assert :ok = SM.write(m, 0, "after!")
    assert {:ok, "after!"} = SM.read(m, 0, 6)
    :ok = SM.unmap_region(m)
    assert :ok = SM.seal(id)
    assert {:ok, %{sealed: true}} = SM.get_region_info(id)
    :ok = SM.deallocate_region(id)
  end

  test "our own write clears the stale bit of a VM killed mid-seal" do
    name = ShmHelpers.unique_name("seal")
    {:ok, id} = SM.allocate_region(4096, name: name, cleanup_policy: :manual)
    {:ok, m} = SM.map_region(id)

    sealer = start_sealer(name)
    %{"OPENED " => os_pid} = await_parked(sealer)
    {_, 0} = System.cmd("kill", ["-9", os_pid])
    assert_receive {^sealer, {:exit_status, _}}, 30_000
    assert sealing?(id)

    assert :ok = SM.write(m, 0, "mine")
    refute sealing?(id)
    :ok = SM.unmap_region(m)
    :ok = SM.deallocate_region(id)
  end

  test "the seal lock byte: one value in the core's layout, docs/FORMAT.md and the tests" do
    {:ok, layout} =
      Snakepit.SharedMemory.JSON.decode(Snakepit.SharedMemory.Native.header_layout())

    assert layout["seal_lock_byte"] == 2
    assert layout["data_lock_byte"] == 1
    assert layout["states"]["sealing"] == 4

    locks =
      File.read!(Path.join(ReliabilityHelpers.root(), "docs/FORMAT.md"))
      |> String.split("\n## Locks\n")
      |> Enum.at(1)
      |> String.split("\n## ")
      |> hd()

    assert [_, meaning] =
             Regex.run(~r/^\| #{layout["seal_lock_byte"]} \|[^|]*\|[^|]*\|([^|]*)\|/m, locks)

    assert meaning =~ "**seal lock**"
  end

  # The parked line (stderr, written by the core) may come before OPENED (stdout, through
  # the VM's group leader): both, in either order.
  defp await_parked(sealer),
    do:
      ReliabilityHelpers.await_lines(sealer, ["OPENED ", "snakepit_shm: parked at seal"], 120_000)

  defp start_sealer(name) do
    Port.open({:spawn_executable, "/bin/sh"}, [
      :binary,
      :exit_status,
      :stderr_to_stdout,
      {:line, 4096},
      args: ["-c", ReliabilityHelpers.elixir_command()],
      env: [
        {~c"SNAKEPIT_SHM_VM_CODE", String.to_charlist(@sealer)},
        {~c"SEAL_NAME", String.to_charlist(name)},
        {~c"SNAKEPIT_SHM_TEST_PARK", ~c"seal=600000"}
      ]
    ])
  end

  # The header's state word, read from the segment (bit 4: sealing).
  defp sealing?(id) do
    {:ok, bytes} = File.open("/dev/shm/" <> id, [:read, :binary, :raw], &:file.pread(&1, 2048, 4))
    {:ok, <<state::little-32>>} = bytes
    Bitwise.band(state, 4) != 0
  end

  defp python_write(id) do
    script = """
    import sys, snakepit_shm
    with snakepit_shm.attach(sys.argv[1], mode="rw") as region:
        try:
            region.write(0, b"python")
            print("WROTE")
        except snakepit_shm.RegionBusy as exc:
            print("BUSY", exc)
    """

    {out, status} = ReliabilityHelpers.python(script, [id])
    assert status == 0, out
    out
  end
end
