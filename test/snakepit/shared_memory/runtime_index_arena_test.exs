Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.RuntimeIndexArenaTest do
  # Arena regions in the runtime index (issue 14): the index's background writer lists
  # each small region as an `arena` entry so that a worker attaches it by bare id
  # without a /proc scan or an arena walk; the entry goes with the region (or is never
  # written when the region dies first), and the orphan sweep removes the entries of a
  # VM killed with SIGKILL and those whose chunk no longer holds their region.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Native, ReliabilityHelpers, Sweep}

  defp dir do
    {:ok, %{directory: dir}} = Native.runtime_index_sweep()
    dir
  end

  defp entry(dir, id), do: File.read_link(Path.join(dir, id))

  defp small_region(size \\ 4096) do
    {:ok, id} = SM.allocate_region(size)
    {:ok, ref} = SM.export_ref(id)
    assert is_integer(ref["control_offset"]), "#{id} is not an arena region"
    {id, ref}
  end

  test "an arena region gets an arena entry; deallocate removes it" do
    dir = dir()
    {id, ref} = small_region(5000)
    :ok = Native.runtime_index_flush(5000)

    assert entry(dir, id) ==
             {:ok,
              "spshm1 arena #{ref["control_path"]} #{ref["control_path"]} " <>
                "#{ref["control_offset"]} 5000"}

    :ok = SM.deallocate_region(id)
    :ok = Native.runtime_index_flush(5000)
    assert entry(dir, id) == {:error, :enoent}
  end

  test "a region freed before its entry was written never gets one" do
    dir = dir()
    ids = for _ <- 1..50, do: elem(small_region(), 0)
    Enum.each(ids, &(:ok = SM.deallocate_region(&1)))
    :ok = Native.runtime_index_flush(5000)
    for id <- ids, do: assert(entry(dir, id) == {:error, :enoent})
  end

  test "a Python worker attaches an arena region by bare id without scanning" do
    {id, _ref} = small_region()
    {:ok, mapping} = SM.map_region(id)
    :ok = SM.write(mapping, 0, "in arena")
    :ok = Native.runtime_index_flush(5000)

    assert ReliabilityHelpers.python_read_by_index(id, 8, arena_walk: false) == {0, "in arena"}
    :ok = SM.unmap_region(mapping)
    :ok = SM.deallocate_region(id)
  end

  test "the sweep removes an entry whose chunk no longer holds its region, keeps live ones" do
    dir = dir()
    {live, live_ref} = small_region()
    {gone, gone_ref} = small_region()
    :ok = Native.runtime_index_flush(5000)
    :ok = SM.deallocate_region(gone)
    :ok = Native.runtime_index_flush(5000)
    # As if the removal had been lost: the entry of the freed region, and a forged one
    # naming the live region's chunk under another id.
    File.ln_s!(
      "spshm1 arena #{gone_ref["control_path"]} #{gone_ref["control_path"]} " <>
        "#{gone_ref["control_offset"]} 4096",
      Path.join(dir, gone)
    )

    forged = "spshm_" <> String.duplicate("a", 20)

    File.ln_s!(
      "spshm1 arena #{live_ref["control_path"]} #{live_ref["control_path"]} " <>
        "#{live_ref["control_offset"]} 4096",
      Path.join(dir, forged)
    )

    assert %{removed: removed} = Sweep.sweep_runtime_index()
    assert removed >= 2
    assert entry(dir, gone) == {:error, :enoent}
    assert entry(dir, forged) == {:error, :enoent}
    assert {:ok, "spshm1 arena " <> _} = entry(dir, live)
    :ok = SM.deallocate_region(live)
  end

  test "the sweep removes the arena entries of a VM killed with SIGKILL" do
    dir = dir()

    code = """
    Application.ensure_all_started(:snakepit_shm)
    ids = for _ <- 1..3 do
      {:ok, id} = Snakepit.SharedMemory.allocate_region(4096)
      id
    end
    :ok = Snakepit.SharedMemory.Native.runtime_index_flush(5000)
    IO.puts("IDS " <> Enum.join(ids, " "))
    System.cmd("kill", ["-9", System.pid()])
    """

    {out, _status} = ReliabilityHelpers.elixir_vm(code)
    [_, ids] = Regex.run(~r/IDS ((?:spshm_[a-z2-7]{20} ?)+)/, out)
    dead = String.split(ids)
    for id <- dead, do: assert({:ok, "spshm1 arena " <> _} = entry(dir, id))

    assert %{removed: removed} = Sweep.sweep_runtime_index()
    assert removed >= 3
    for id <- dead, do: assert(entry(dir, id) == {:error, :enoent})
  end

  test "a VM that halts with entries still queued exits cleanly (the writer is joined)" do
    code = """
    Application.ensure_all_started(:snakepit_shm)
    for _ <- 1..200, do: {:ok, _} = Snakepit.SharedMemory.allocate_region(4096)
    IO.puts("HALTING")
    System.halt(0)
    """

    {out, status} = ReliabilityHelpers.elixir_vm(code)
    assert out =~ "HALTING"
    assert status == 0, out
  end

  test "runtime_index_flush validates its argument" do
    assert_raise ArgumentError, fn -> Native.runtime_index_flush(-1) end
    assert_raise ArgumentError, fn -> Native.runtime_index_flush(:soon) end
  end
end
