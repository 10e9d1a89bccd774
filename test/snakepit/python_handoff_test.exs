defmodule Snakepit.SharedMemory.PythonHandoffTest do
  # The end-to-end handoff of issue 4: Elixir writes a 64 MiB float32 tensor, a real
  # Python worker (spawned through a Port) attaches it by bare region id, checks it with
  # numpy without copying, writes its answer into a result region, and Elixir verifies.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.ReliabilityHelpers

  @rows 1024
  @cols 16_384
  @size @rows * @cols * 4

  # Prints one JSON line; exits non-zero on any failed check.
  @worker ~S"""
  import json, struct, sys
  import numpy as np
  import snakepit_shm

  data_id, result_id = sys.argv[1], sys.argv[2]

  def mapping_of(address):
      for line in open("/proc/self/maps"):
          fields = line.split()
          start, end = (int(x, 16) for x in fields[0].split("-"))
          if start <= address < end:
              return start, end, (fields[5] if len(fields) > 5 else "")
      return None

  with snakepit_shm.attach(data_id) as region:
      arr = region.ndarray()
      address = arr.__array_interface__["data"][0]
      start, end, path = mapping_of(address)
      # (a data memfd reused from the warm pool keeps the name it was made with)
      inside = start <= address and address + arr.nbytes <= end and path.endswith(".data")
      expected = np.arange(arr.shape[1], dtype=np.float32)
      values_ok = bool((arr == expected).all())
      total = float(arr.sum(dtype=np.float64))
      report = {"dtype": str(arr.dtype), "shape": list(arr.shape), "owns_data": bool(arr.flags.owndata),
                "inside_mapping": bool(inside), "mapping": path, "values_ok": values_ok}
      del arr

  with snakepit_shm.attach(result_id, mode="rw") as out:
      out.buf[:16] = struct.pack("<dQ", total, 1 if values_ok and inside else 0)

  print(json.dumps(report), flush=True)
  """

  test "a 64 MiB float32 tensor goes to a Python worker and its answer comes back" do
    row = for i <- 0..(@cols - 1), into: <<>>, do: <<i * 1.0::float-32-little>>
    tensor = :binary.copy(row, @rows)

    {:ok, data_id} =
      SM.allocate_region(@size, metadata: %{dtype: "float32", shape: [@rows, @cols]})

    {:ok, result_id} = SM.allocate_region(16)
    {:ok, data_map} = SM.map_region(data_id, access_mode: :read_write)
    {:ok, result_map} = SM.map_region(result_id, access_mode: :read_write)
    :ok = SM.write(data_map, 0, tensor)

    port =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 65_536},
        args: ["-c", @worker, data_id, result_id],
        env: ReliabilityHelpers.python_env()
      ])

    report = collect(port, "")
    assert report["dtype"] == "float32"
    assert report["shape"] == [@rows, @cols]
    assert report["values_ok"]
    # Zero-copy: numpy does not own the data and it lies inside the region's memfd mapping.
    refute report["owns_data"]
    assert report["inside_mapping"], "array not inside the region's mapping: #{inspect(report)}"
    assert report["mapping"] =~ ~r/memfd:spshm_[a-z2-7]{20}\.data/

    {:ok, <<total::float-64-little, ok::unsigned-64-little>>} = SM.read(result_map, 0, 16)
    assert ok == 1
    assert total == @rows * Enum.sum(0..(@cols - 1)) * 1.0

    # The worker's holds are gone once it exited.
    {:ok, info} = SM.get_region_info(data_id)
    assert info.reference_count == 1

    :ok = SM.unmap_region(data_map)
    :ok = SM.unmap_region(result_map)
    :ok = SM.deallocate_region(data_id)
    :ok = SM.deallocate_region(result_id)
  end

  defp collect(port, acc) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        collect(port, acc <> line <> "\n")

      {^port, {:data, {:noeol, part}}} ->
        collect(port, acc <> part)

      {^port, {:exit_status, 0}} ->
        acc |> String.split("\n", trim: true) |> List.last() |> decode()

      {^port, {:exit_status, status}} ->
        flunk("python worker exited #{status}:\n#{acc}")
    after
      60_000 -> flunk("python worker timed out:\n#{acc}")
    end
  end

  defp decode(line) do
    {:ok, map} = Snakepit.SharedMemory.JSON.decode(line)
    map
  end
end
