Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.RegistryTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Registry, TestSupport}

  require Registry

  setup do
    on_exit(fn -> TestSupport.free_everything() end)
    :ok
  end

  describe "lookup/1, take/1, insert_new/1" do
    test "take hands a record to exactly one caller" do
      {:ok, id} = SM.allocate_region(10, cleanup_policy: :manual)
      record = Registry.lookup(id)
      assert Registry.region(record, :id) == id
      refute Registry.insert_new(record)
      # Readers get the record without its quota charge; take/1 hands over the charge.
      assert Registry.region(record, :quota) == nil
      taken = Registry.take(id)
      assert Registry.region(taken, :quota) != nil
      assert Registry.region(taken, quota: nil) == record
      assert Registry.take(id) == nil
      assert Registry.lookup(id) == nil
      assert Registry.insert_new(taken)
    end
  end

  describe "mapped_by/1 and mappings_of_pid/1" do
    test "list live mappings" do
      {:ok, id} = SM.allocate_region(10)
      {:ok, _} = SM.map_region(id)
      {:ok, _} = SM.map_region(id)
      assert Registry.mapped_by(id) == [self()]
      assert length(Registry.mappings_of_pid(self())) == 2
      assert length(Registry.mappings_of(id)) == 2
    end
  end

  describe "owned_by/1, ids/0, count/0" do
    test "select by owner" do
      {:ok, a} = SM.allocate_region(10)
      other = spawn(fn -> Process.sleep(:infinity) end)
      {:ok, b} = SM.allocate_region(10, owner: other)
      assert Enum.map(Registry.owned_by(self()), &Registry.region(&1, :id)) == [a]
      assert Enum.sort(Registry.ids()) == Enum.sort([a, b])
      assert Registry.count() == 2
      Process.exit(other, :kill)
    end
  end

  describe "register_caller/0" do
    test "records the caller once and the manager monitors it" do
      parent = self()

      pid =
        spawn(fn ->
          Registry.register_caller()
          Registry.register_caller()
          send(parent, :registered)
          Process.sleep(:infinity)
        end)

      assert_receive :registered
      assert pid in Registry.callers()
      Process.exit(pid, :kill)
      assert Snakepit.SharedMemory.ShmHelpers.wait_until(fn -> pid not in Registry.callers() end)
    end
  end
end
