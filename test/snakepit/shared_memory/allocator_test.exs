Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.AllocatorTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Allocator, Native, Quota, Registry, ShmHelpers, TestSupport}

  require Registry

  setup do: TestSupport.no_leaks()

  describe "allocate/1" do
    test "small, large, named and encrypted regions (normal and dirty NIF paths)" do
      for {size, opts} <- [
            {1, []},
            {65_536, []},
            {65_537, []},
            {2 * 1024 * 1024, []},
            {100, [name: ShmHelpers.unique_name("a")]},
            {60_000, [security_level: :high]},
            {200_000, [security_level: :high, backend: :posix]}
          ] do
        {:ok, id} = SM.allocate_region(size, opts)
        {:ok, m} = SM.map_region(id)
        data = :crypto.strong_rand_bytes(min(size, 70_000))
        :ok = SM.write(m, size - byte_size(data), data)
        assert {:ok, ^data} = SM.read(m, size - byte_size(data), byte_size(data))
        :ok = SM.unmap_region(m)
        assert {:ok, _} = Allocator.free(id, :test)
      end

      assert Quota.totals() == %{regions: 0, bytes: 0}
    end
  end

  describe "free/2" do
    test "zeroes :high regions: a peer handle sees zeros, then deallocated" do
      for size <- [1000, 300_000] do
        {:ok, id} = SM.allocate_region(size, security_level: :high, backend: :posix)
        {:ok, m} = SM.map_region(id)
        :ok = SM.write(m, 0, "secret")
        {:ok, peer, _} = Native.open(id, false)
        {:ok, _} = Allocator.free(id, :test)
        {:ok, header} = Native.header(peer)
        assert header.deallocated
        refute File.exists?("/dev/shm/#{id}")
      end
    end

    test "frees once; a second free is :not_found" do
      {:ok, id} = SM.allocate_region(10)
      assert {:ok, record} = Allocator.free(id, :test)
      assert Registry.region(record, :id) == id
      assert {:error, %{reason: :not_found}} = Allocator.free(id, :test)
    end

    test "an opened region (another creator) is released, not destroyed" do
      name = ShmHelpers.unique_name("f")

      {:ok, creator, info} =
        Native.create(4096, ShmHelpers.create_opts(%{backend: :posix, name: name}))

      {:ok, id} = SM.allocate_region(4096, name: name, open_mode: :open_only)
      {:ok, _} = Allocator.free(id, :test)
      {:ok, header} = Native.header(creator)
      refute header.deallocated
      :ok = Native.deallocate(creator, false)
      refute File.exists?("/dev/shm/#{info.id}")
    end
  end
end
