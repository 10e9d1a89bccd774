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
    {out, status} = ReliabilityHelpers.elixir_vm(@renamed_truncation)
    assert status == 0, "the VM died (exit #{status}):\n#{out}"
    assert out =~ "REGION OK"
    assert out =~ "BOARD OK"
  end
end
