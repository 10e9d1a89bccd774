defmodule Snakepit.SharedMemory.AdapterExampleTest do
  # Issue 13: the README's Snakepit adapter example, end to end. Elixir allocates and
  # writes inputs, encodes tool arguments with ZeroCopyRef markers as JSON, a stand-in
  # for Snakepit's gRPC (priv/python/examples/snakepit_stub.py) runs the adapter's
  # tools, and their outputs come back as worker-allocated regions Elixir adopts.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.JSON

  @examples Path.expand("../../../priv/python/examples", __DIR__)

  setup do
    {:ok, env} = SHM.python_env()
    env = for {k, v} <- env, do: {String.to_charlist(k), String.to_charlist(v)}

    port =
      Port.open({:spawn_executable, "/usr/bin/python3"}, [
        :binary,
        :exit_status,
        {:line, 1_000_000},
        args: [
          Path.join(@examples, "snakepit_stub.py"),
          Path.join(@examples, "snakepit_adapter.py"),
          "ShmAdapter"
        ],
        env: [{~c"PYTHONDONTWRITEBYTECODE", ~c"1"} | env]
      ])

    on_exit(fn -> if Port.info(port), do: Port.close(port) end)
    {:ok, port: port}
  end

  test "tools read regions from JSON arguments and return regions Elixir adopts", %{port: port} do
    values = Enum.map(0..999, &(&1 * 1.0))
    x = input(values, "float32")
    w = input(List.duplicate(0.5, 1000), "float32")
    blob = raw_input(<<1, 2, 4, 8>>)

    # normalize: the output is the worker's from_array, returned as a marker.
    %{"result" => marker} = call(port, "normalize", %{"x" => marker!(x)})
    assert %{"__snakepit_zero_copy__" => true, "kind" => "shm", "owner" => "python"} = marker
    {:ok, ref} = SHM.from_zero_copy_ref(marker)
    {:ok, out} = SHM.adopt_region(ref)
    normalized = floats(out, 1000)
    assert_in_delta Enum.sum(normalized), 0.0, 1.0e-2
    assert_in_delta hd(normalized), -1.7303, 1.0e-3

    # select: a result whose size the worker learns while computing.
    %{"count" => 100, "result" => selected} =
      call(port, "select", %{"x" => marker!(x), "threshold" => 899.5})

    {:ok, sel} = SHM.adopt_region(selected)

    {:ok, %{size: 400, metadata: %{"threshold" => 899.5, "shape" => [100]}}} =
      SHM.get_region_info(sel)

    :ok = SHM.seal(sel)
    assert floats(sel, 100) == Enum.map(900..999, &(&1 * 1.0))

    # nested arguments: a list of maps of markers.
    pairs = [%{"x" => marker!(x), "w" => marker!(w)}, %{"x" => marker!(w), "w" => marker!(w)}]
    %{"total" => total} = call(port, "weighted_sum", %{"pairs" => pairs})
    assert_in_delta total, Enum.sum(values) * 0.5 + 250.0, 1.0e-6

    # a raw region arrives as a Region, not an array.
    assert %{"bytes" => 4, "xor" => 15} = call(port, "checksum", %{"blob" => marker!(blob)})

    # errors come back as errors
    assert %{"error" => message} =
             request(port, "select", %{
               "x" => %{
                 "v" => 1,
                 "backend" => "posix",
                 "region_id" => "spshm_aaaaaaaaaaaaaaaaaaaa"
               },
               "threshold" => 1
             })

    assert message =~ "does not exist"

    # Inputs are not held once the tools returned.
    for id <- [x, w, blob] do
      assert {:ok, %{reference_count: 0}} = SHM.get_region_info(id)
      :ok = SHM.deallocate_region(id)
    end

    :ok = SHM.deallocate_region(out)
    :ok = SHM.deallocate_region(sel)
  end

  defp input(values, "float32") do
    bytes = for v <- values, into: <<>>, do: <<v::float-32-little>>

    {:ok, id} =
      SHM.allocate_region(byte_size(bytes),
        metadata: %{dtype: "float32", shape: [length(values)]}
      )

    write(id, bytes)
  end

  defp raw_input(bytes) do
    {:ok, id} = SHM.allocate_region(byte_size(bytes))
    write(id, bytes)
  end

  defp write(id, bytes) do
    {:ok, mapping} = SHM.map_region(id)
    :ok = SHM.write(mapping, 0, bytes)
    :ok = SHM.unmap_region(mapping)
    id
  end

  defp marker!(id) do
    {:ok, marker} = SHM.to_zero_copy_ref(id)
    marker
  end

  defp floats(id, count) do
    {:ok, mapping} = SHM.map_region(id, access_mode: :read_only)
    {:ok, bytes} = SHM.read(mapping, 0, count * 4)
    :ok = SHM.unmap_region(mapping)
    for <<v::float-32-little <- bytes>>, do: v
  end

  defp call(port, tool, args) do
    case request(port, tool, args) do
      %{"result" => result} -> result
      other -> flunk("tool #{tool} failed: #{inspect(other)}")
    end
  end

  defp request(port, tool, args) do
    id = System.unique_integer([:positive])
    {:ok, json} = JSON.encode(%{"id" => id, "tool" => tool, "args" => args})
    Port.command(port, json <> "\n")

    receive do
      {^port, {:data, {:eol, line}}} ->
        {:ok, %{"id" => ^id} = reply} = JSON.decode(line)
        reply

      {^port, {:exit_status, status}} ->
        flunk("the stand-in exited with #{status}")
    after
      60_000 -> flunk("no answer to #{tool}")
    end
  end
end
