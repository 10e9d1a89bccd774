defmodule Snakepit.SharedMemory.StaleMappingTest do
  # Issue 13, Seen 6: a mapping whose region was freed by someone else answers
  # :deallocated with what happened, not ":closed ... map it again".
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.Error

  test "reading and writing after deallocate_region/1 say :deallocated and why" do
    {:ok, id} = SHM.allocate_region(4096)
    {:ok, mapping} = SHM.map_region(id)
    :ok = SHM.deallocate_region(id)

    assert {:error, %Error{reason: :deallocated, message: message, details: details}} =
             SHM.read(mapping, 0, 16)

    assert message =~ "deallocate_region/1 was called"
    refute message =~ "map it again"
    assert details.freed_because == :deallocated
    assert {:error, %Error{reason: :deallocated}} = SHM.write(mapping, 0, "x")
    assert {:error, %Error{reason: :not_found}} = SHM.map_region(id)
  end

  test "after the owner's death the mapping of another process says the owner died" do
    parent = self()

    owner =
      spawn(fn ->
        {:ok, id} = SHM.allocate_region(4096)
        send(parent, {:id, id})
        Process.sleep(:infinity)
      end)

    id = receive(do: ({:id, id} -> id))
    {:ok, mapping} = SHM.map_region(id)
    ref = Process.monitor(owner)
    Process.exit(owner, :kill)
    assert_receive {:DOWN, ^ref, _, _, _}

    assert eventually(fn ->
             match?({:error, %Error{reason: :deallocated}}, SHM.read(mapping, 0, 4))
           end)

    {:error, %Error{message: message}} = SHM.read(mapping, 0, 4)
    assert message =~ "owner process died"
  end

  test "an unmapped mapping still says :closed (nobody freed the region)" do
    {:ok, id} = SHM.allocate_region(4096)
    {:ok, mapping} = SHM.map_region(id)
    :ok = SHM.unmap_region(mapping)
    assert {:error, %Error{reason: :closed}} = SHM.read(mapping, 0, 4)
    :ok = SHM.deallocate_region(id)
  end

  # 1200 tries of 25 ms: at least 30 s for the manager to handle the owner's death.
  defp eventually(fun, tries \\ 1200) do
    cond do
      fun.() -> true
      tries == 0 -> false
      true -> Process.sleep(25) && eventually(fun, tries - 1)
    end
  end
end
