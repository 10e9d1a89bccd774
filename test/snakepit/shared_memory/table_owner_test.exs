Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.TableOwnerTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Manager, Registry, ShmHelpers, TableOwner, TestSupport}

  setup do
    on_exit(fn -> TestSupport.free_everything() end)
    :ok
  end

  describe "init/1" do
    test "owns every registry table; a manager crash leaves them in place" do
      owner = Process.whereis(TableOwner)

      for {name, _opts} <- Registry.tables() do
        assert :ets.info(name, :owner) == owner, "#{name}"
        assert :ets.info(name, :protection) == :public
      end

      {:ok, id} = SM.allocate_region(10)
      manager = Process.whereis(Manager)
      Process.exit(manager, :kill)
      assert ShmHelpers.wait_until(fn -> Process.whereis(Manager) not in [nil, manager] end)
      assert Process.whereis(TableOwner) == owner
      assert Registry.lookup(id) != nil
    end
  end
end
