Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.KillInstantsTest do
  # Callers killed (Process.exit(pid, :kill)) at every step of an allocation and of a
  # free, between any two of its state changes, parked there by the allocator's test
  # hook. With the manager suspended all along (nothing repairs anything), the quota
  # counters must come back to exactly what the registry holds (regions, bytes and
  # regions per owner) as soon as ERTS has freed the dead heap, and the POSIX segments of
  # this VM must be exactly the registered ones. A process holding copies of every
  # record (as any reader of the registry may) must change nothing to that.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Allocator, Quota, Registry, ShmHelpers, TestSupport}

  require Registry

  setup do: TestSupport.no_leaks()

  @alloc_points [:reserved, :host_reserved, :created, :bound, :registered, :kept]
  @free_points [:unkept, :taken, :destroyed, :host_released]

  defp registry_view do
    records = Registry.all()

    %{
      regions: length(records),
      bytes: records |> Enum.map(&Registry.region(&1, :size)) |> Enum.sum(),
      owners:
        records
        |> Enum.map(&Registry.region(&1, :owner))
        |> Enum.reject(&is_nil/1)
        |> Enum.frequencies()
    }
  end

  defp counted_view(owners) do
    %{regions: regions, bytes: bytes} = Quota.totals()

    counted = for owner <- owners, n = Quota.owned(owner), n != 0, into: %{}, do: {owner, n}

    %{regions: regions, bytes: bytes, owners: counted}
  end

  defp exact?(owners) do
    registry = registry_view()
    registry == counted_view(Enum.uniq(owners ++ Map.keys(registry.owners)))
  end

  # POSIX segments of this VM are exactly the registered POSIX regions it created.
  defp segments_exact? do
    registered =
      for r <- Registry.all(),
          Registry.region(r, :backend) == :posix and Registry.region(r, :role) == :created,
          do: Registry.region(r, :id)

    Enum.sort(TestSupport.vm_segments()) == Enum.sort(registered)
  end

  # A process running `fun` with the allocator parked at `point`; returns once it is there.
  defp parked_caller(point, fun) do
    parent = self()

    caller =
      spawn(fn ->
        Process.put(Allocator.checkpoint_key(), park_at(point, parent))
        fun.()
      end)

    assert_receive {:parked, ^caller, ^point}, 10_000
    caller
  end

  defp park_at(point, parent) do
    fn
      ^point ->
        send(parent, {:parked, self(), point})
        Process.sleep(:infinity)

      _other ->
        :ok
    end
  end

  # A process that copied every record (and the info of every region) and keeps the
  # copies: a charge it held would outlive a killed deallocator's.
  defp spawn_reader(parent) do
    spawn_link(fn ->
      records = Registry.all()
      {:ok, listed} = SM.list_regions()
      lookups = for r <- records, do: Registry.lookup(Registry.region(r, :id))
      send(parent, {:read, length(records)})
      Process.sleep(:infinity)
      {records, listed, lookups}
    end)
  end

  defp kill_and_check(caller, owner) do
    TestSupport.with_manager_suspended(fn ->
      ref = Process.monitor(caller)
      Process.exit(caller, :kill)
      assert_receive {:DOWN, ^ref, :process, ^caller, :killed}

      assert ShmHelpers.wait_until(fn -> exact?([owner, caller]) end, 5_000),
             "counters #{inspect(counted_view([owner, caller]))} != registry " <>
               inspect(registry_view())

      assert ShmHelpers.wait_until(&segments_exact?/0, 5_000),
             "segments #{inspect(TestSupport.vm_segments())}"
    end)
  end

  for backend <- [:memfd, :posix], point <- @alloc_points do
    test "an allocation killed at #{point} (#{backend})" do
      parent = self()
      owner = spawn_link(fn -> Process.sleep(:infinity) end)
      {:ok, _other} = SM.allocate_region(4096, backend: unquote(backend), owner: owner)
      reader = spawn_reader(parent)
      assert_receive {:read, 1}

      caller =
        parked_caller(unquote(point), fn ->
          SM.allocate_region(12_345, backend: unquote(backend), owner: owner)
        end)

      kill_and_check(caller, owner)
      # The region a caller killed once it was registered stays, counted, and is freed
      # like any other.
      Process.exit(reader, :kill)
    end
  end

  for backend <- [:memfd, :posix], point <- @free_points do
    test "a free killed at #{point} (#{backend})" do
      parent = self()
      owner = spawn_link(fn -> Process.sleep(:infinity) end)
      {:ok, _other} = SM.allocate_region(4096, backend: unquote(backend), owner: owner)
      {:ok, id} = SM.allocate_region(12_345, backend: unquote(backend), owner: owner)
      reader = spawn_reader(parent)
      assert_receive {:read, 2}

      caller = parked_caller(unquote(point), fn -> SM.deallocate_region(id) end)
      kill_and_check(caller, owner)
      Process.exit(reader, :kill)
    end
  end

  test "a caller parked mid-allocation holds nobody up, and counts as in flight" do
    parked = parked_caller(:created, fn -> SM.allocate_region(5_000, backend: :posix) end)

    # Another caller killed mid-allocation: once, the manager raised its barrier here and
    # waited for every live caller in flight (the parked one: never) before recounting.
    killed = parked_caller(:reserved, fn -> SM.allocate_region(7_000) end)
    Process.exit(killed, :kill)
    assert :ok = Snakepit.SharedMemory.Manager.sync()

    for _ <- 1..20 do
      {:ok, id} = SM.allocate_region(1_000)
      :ok = SM.deallocate_region(id)
    end

    # The counters are the registry plus the one allocation in flight.
    registry = registry_view()

    assert ShmHelpers.wait_until(fn ->
             Quota.totals() == %{regions: registry.regions + 1, bytes: registry.bytes + 5_000}
           end)

    Process.exit(parked, :kill)
    assert ShmHelpers.wait_until(fn -> exact?([parked]) end)
    assert ShmHelpers.wait_until(&segments_exact?/0, 5_000)
  end

  test "without the hook set, every step is passed through" do
    {:ok, id} = SM.allocate_region(100)
    assert :ok = SM.deallocate_region(id)
  end
end
