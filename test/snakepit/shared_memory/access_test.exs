Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.AccessTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Access, Error, Registry, TestSupport}

  setup do
    on_exit(fn -> TestSupport.free_everything() end)
    :ok
  end

  describe "lookup/1" do
    test "records, not_found, and non-string ids" do
      {:ok, id} = SM.allocate_region(10)
      assert {:ok, record} = Access.lookup(id)
      assert record == Registry.lookup(id)
      assert {:error, %Error{reason: :not_found}} = Access.lookup("spshm_missingxxxxxxxxxxxxx")
      assert {:error, %Error{reason: :invalid_argument}} = Access.lookup(nil)
    end
  end

  describe "native/2" do
    test "maps NIF results; errno goes into details" do
      assert Access.native(:ok, "x") == :ok
      assert Access.native({:ok, 1}, "x") == {:ok, 1}

      assert {:error, %Error{reason: :busy, details: %{errno: 16, region_id: "x"}}} =
               Access.native({:error, {:busy, "busy", 16}}, "x")
    end
  end

  describe "free_if_unreferenced/1" do
    test "only reference_counted regions, only after a hold, only at zero" do
      {:ok, auto} = SM.allocate_region(10)
      {:ok, counted} = SM.allocate_region(10, cleanup_policy: :reference_counted)
      refute Access.free_if_unreferenced(auto)
      refute Access.free_if_unreferenced(counted)
      {:ok, m} = SM.map_region(counted)
      refute Access.free_if_unreferenced(counted)
      # unmap_region/1 would free it itself; release the hold underneath instead.
      :ok = Snakepit.SharedMemory.Native.unmap(m.ref)
      assert Access.free_if_unreferenced(counted)
      assert Registry.lookup(counted) == nil
    end
  end

  describe "mark_sealed/1" do
    test "read/3 switches to zero-copy once sealed" do
      {:ok, id} = SM.allocate_region(100_000)
      {:ok, m} = SM.map_region(id)
      {:ok, copy} = SM.read(m, 0, 100_000)
      assert :binary.referenced_byte_size(copy) == 100_000
      :ok = SM.seal(id)
      {:ok, view} = SM.read(m, 0, 100_000)
      assert :binary.referenced_byte_size(view) < 100_000
      assert view == copy
    end
  end
end
