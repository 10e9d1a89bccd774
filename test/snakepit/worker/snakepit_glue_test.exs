defmodule Snakepit.SharedMemory.SnakepitGlueTest do
  # Issue 13: Snakepit's ZeroCopyRef marker both ways, python_env/0, to_nx/1.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.{Error, JSON}

  test "to_zero_copy_ref/1 wraps our ref in Snakepit's marker, from_zero_copy_ref/1 unwraps" do
    {:ok, id} = SHM.allocate_region(64, metadata: %{dtype: "float32", shape: [4, 4]})
    {:ok, marker} = SHM.to_zero_copy_ref(id)

    assert %{
             "__snakepit_zero_copy__" => true,
             "kind" => "shm",
             "device" => "cpu",
             "dtype" => "float32",
             "shape" => [4, 4],
             "owner" => "elixir",
             "copy" => false,
             "bytes" => 64,
             "ref" => %{"region_id" => ^id, "format" => "numpy"}
           } = marker

    {:ok, json} = JSON.encode(marker)
    assert {:ok, %{"region_id" => ^id}} = SHM.from_zero_copy_ref(json)
    assert {:ok, %{"region_id" => ^id}} = SHM.from_zero_copy_ref(marker)
    {:ok, ref} = SHM.export_ref(id)
    assert {:ok, ^marker} = SHM.to_zero_copy_ref(ref)

    assert {:error, %Error{reason: :unsupported}} =
             SHM.from_zero_copy_ref(%{"__snakepit_zero_copy__" => true, "kind" => "dlpack"})

    assert {:error, %Error{reason: :invalid_argument}} = SHM.to_zero_copy_ref(%{"x" => 1})
    :ok = SHM.deallocate_region(id)
  end

  test "refs carry a format: numpy with a dtype, else the metadata's, else raw" do
    {:ok, a} = SHM.allocate_region(16, metadata: %{dtype: "uint8"})
    {:ok, b} = SHM.allocate_region(16, metadata: %{format: "arrow"})
    {:ok, c} = SHM.allocate_region(16)
    assert {:ok, %{"format" => "numpy"}} = SHM.export_ref(a)
    assert {:ok, %{"format" => "arrow"}} = SHM.export_ref(b)
    assert {:ok, %{"format" => "raw"}} = SHM.export_ref(c)

    assert {:error, %Error{reason: :invalid_metadata}} =
             SHM.allocate_region(16, metadata: %{format: "pickle"})

    Enum.each([a, b, c], &SHM.deallocate_region/1)
  end

  test "python_env/0 is what a worker needs to import snakepit_shm" do
    {:ok, env} = SHM.python_env()
    [python_path | _] = String.split(env["PYTHONPATH"], ":")
    assert File.exists?(Path.join(python_path, "snakepit_shm/__init__.py"))
    assert File.exists?(env["SNAKEPIT_SHM_LIB"])

    {out, 0} =
      System.cmd(
        "/usr/bin/python3",
        ["-c", "import snakepit_shm, snakepit_shm._native as n; n.library(); print('ok')"],
        env: Map.to_list(env),
        stderr_to_stdout: true
      )

    assert out =~ "ok"
    assert Snakepit.SharedMemory.ZeroCopy.python_env("/x")["PYTHONPATH"] =~ ~r/:\/x$/
  end

  test "to_nx/1 without Nx says so; with Nx it builds a typed, shaped tensor" do
    {:ok, id} = SHM.allocate_region(8, metadata: %{dtype: "float32", shape: [2]})
    {:ok, m} = SHM.map_region(id)
    :ok = SHM.write(m, 0, <<1.5::float-32-little, 2.5::float-32-little>>)
    :ok = SHM.unmap_region(m)

    if Code.ensure_loaded?(Nx) do
      assert {:ok, _tensor} = SHM.to_nx(id)
    else
      assert {:error, %Error{reason: :unsupported, message: message}} = SHM.to_nx(id)
      assert message =~ "Nx is not loaded"

      # A stand-in with Nx's two functions: what to_nx/1 calls, with what.
      Code.compile_string("""
      defmodule Nx do
        def from_binary(binary, type), do: {:tensor, binary, type}
        def reshape({:tensor, binary, type}, shape), do: {:tensor, binary, type, shape}
      end
      """)

      try do
        assert {:ok, {:tensor, <<1.5::float-32-little, 2.5::float-32-little>>, {:f, 32}, {2}}} =
                 SHM.to_nx(id)
      after
        :code.purge(Nx)
        :code.delete(Nx)
      end
    end

    :ok = SHM.deallocate_region(id)
  end

  test "to_nx/1 takes the bytes the shape needs, not the whole region" do
    # Found by an attack run: a shape smaller than the region (allowed: shape x itemsize
    # <= size), or a 0-size array from from_array() (a 1-byte region), made real Nx
    # raise in reshape/from_binary.
    {:ok, id} = SHM.allocate_region(16, metadata: %{dtype: "float32", shape: [2]})
    {:ok, empty} = SHM.allocate_region(1, metadata: %{dtype: "float64", shape: [0, 5]})
    {:ok, m} = SHM.map_region(id)
    :ok = SHM.write(m, 0, <<1.5::float-32-little, 2.5::float-32-little>>)
    :ok = SHM.unmap_region(m)

    unless Code.ensure_loaded?(Nx) do
      # A stand-in that checks what real Nx checks.
      Code.compile_string("""
      defmodule Nx do
        def from_binary(binary, {_, bits} = type) do
          if rem(byte_size(binary) * 8, bits) != 0, do: raise(ArgumentError, "size")
          {:tensor, binary, type}
        end

        def reshape({:tensor, binary, {_, bits} = type}, shape) do
          n = shape |> Tuple.to_list() |> Enum.product()
          if n * bits != byte_size(binary) * 8, do: raise(ArgumentError, "shape")
          {:tensor, binary, type, shape}
        end
      end
      """)

      try do
        assert {:ok, {:tensor, <<1.5::float-32-little, 2.5::float-32-little>>, {:f, 32}, {2}}} =
                 SHM.to_nx(id)

        assert {:ok, {:tensor, "", {:f, 64}, {0, 5}}} = SHM.to_nx(empty)
      after
        :code.purge(Nx)
        :code.delete(Nx)
      end
    end

    for r <- [id, empty], do: :ok = SHM.deallocate_region(r)
  end
end
