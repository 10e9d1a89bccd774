defmodule Snakepit.SharedMemory.ValidationTest do
  # Issue 13, Seen 5: mistakes are reported where they are made.
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.{Dtype, Error}

  test "a misspelt dtype is refused at allocation" do
    assert {:error, %Error{reason: :invalid_metadata, message: message}} =
             SHM.allocate_region(16, metadata: %{dtype: "float33"})

    assert message =~ ~s("float33" is not a numpy dtype name)
    assert message =~ "float32"
  end

  test "a shape that does not fit the size is refused at allocation" do
    assert {:error, %Error{reason: :invalid_metadata, message: message}} =
             SHM.allocate_region(16, metadata: %{"dtype" => "float32", "shape" => [100]})

    assert message =~ "needs 400 bytes, the region has 16"

    assert {:error, %Error{reason: :invalid_metadata}} =
             SHM.allocate_region(10, metadata: %{dtype: "float64"})

    assert {:error, %Error{reason: :invalid_metadata}} =
             SHM.allocate_region(10, metadata: %{shape: [-1]})

    assert {:ok, id} = SHM.allocate_region(16, metadata: %{dtype: "<f4", shape: [2, 2]})
    :ok = SHM.deallocate_region(id)
  end

  test "export_ref/2 checks its dtype and shape against the region" do
    {:ok, id} = SHM.allocate_region(16)

    assert {:error, %Error{reason: :invalid_option, message: m}} =
             SHM.export_ref(id, shape: [100])

    assert m =~ "export_ref/2: shape [100] of uint8 needs 100 bytes, the region has 16"
    assert {:error, %Error{reason: :invalid_option}} = SHM.export_ref(id, dtype: "float33")
    assert {:error, %Error{}} = SHM.export_ref(id, dtype: "float64", shape: [3])

    assert {:ok, %{"dtype" => "float32", "shape" => [4]}} =
             SHM.export_ref(id, dtype: "float32", shape: [4])

    :ok = SHM.deallocate_region(id)
  end

  test "a dimension numpy cannot hold (2**63 or more) is refused even when the product fits" do
    huge = Bitwise.bsl(1, 64)

    assert {:error, %Error{reason: :invalid_metadata, message: m}} =
             SHM.allocate_region(16, metadata: %{"dtype" => "uint8", "shape" => [huge, 0]})

    assert m =~ "2**63"

    {:ok, id} = SHM.allocate_region(16)

    assert {:error, %Error{reason: :invalid_option}} =
             SHM.export_ref(id, dtype: "uint8", shape: [0, Bitwise.bsl(1, 63)])

    assert {:ok, %{"shape" => [0, 9_223_372_036_854_775_807]}} =
             SHM.export_ref(id, dtype: "uint8", shape: [0, Bitwise.bsl(1, 63) - 1])

    :ok = SHM.deallocate_region(id)
  end

  test "a shape of more than 64 dimensions is refused before its product is computed" do
    # Found by an attack run: export_ref(id, shape: 30_000 dims of 2**62) spent 20 s
    # multiplying and printing a 2-million-bit "needed" size.
    {:ok, id} = SHM.allocate_region(16)

    assert {:error, %Error{reason: :invalid_option, message: m}} =
             SHM.export_ref(id, dtype: "uint8", shape: List.duplicate(Bitwise.bsl(1, 62), 30_000))

    assert m =~ "64 dimensions"

    assert {:error, %Error{reason: :invalid_metadata}} =
             SHM.allocate_region(16, metadata: %{"shape" => List.duplicate(1, 65)})

    assert {:ok, _} = SHM.export_ref(id, dtype: "uint8", shape: List.duplicate(1, 64))
    :ok = SHM.deallocate_region(id)
  end

  test "open_only with a conflicting size is an error unless size: :any" do
    name = "i13val#{System.unique_integer([:positive])}"
    {:ok, id} = SHM.allocate_region(4096, name: name)

    assert {:error, %Error{reason: :size_mismatch, message: message}} =
             SHM.allocate_region(8192, name: name, open_mode: :open_only)

    assert message =~ "has 4096 bytes, not the 8192"
    assert {:ok, ^id} = SHM.allocate_region(:any, name: name, open_mode: :open_only)
    assert {:ok, ^id} = SHM.allocate_region(4096, name: name, open_mode: :open_only)
    assert {:error, %Error{reason: :invalid_size}} = SHM.allocate_region(:any)
    assert {:error, %Error{reason: :invalid_size}} = SHM.allocate_region(:any, name: name)
    :ok = SHM.deallocate_region(id)
  end

  test "open_only with a conflicting size of a region another VM made (opened, not registered)" do
    name = "i13vx#{System.unique_integer([:positive])}"

    opts = %{
      backend: :posix,
      name: name,
      open_mode: :create,
      mode: 0o600,
      security_level: 0,
      encrypted: false,
      lock_memory: false,
      metadata: "{}",
      idle_timeout_ms: 0
    }

    {:ok, foreign, _info} = Snakepit.SharedMemory.Native.create(4096, opts)

    assert {:error, %Error{reason: :size_mismatch}} =
             SHM.allocate_region(100, name: name, open_mode: :open_only)

    assert {:ok, id} = SHM.allocate_region(:any, name: name, open_mode: :open_only)
    assert {:ok, %{size: 4096}} = SHM.get_region_info(id)
    :ok = SHM.deallocate_region(id)
    :ok = Snakepit.SharedMemory.Native.deallocate(foreign, false)
  end

  test "Nx type names both ways" do
    assert Dtype.from_nx({:f, 32}) == {:ok, "float32"}
    assert Dtype.to_nx("float32") == {:ok, {:f, 32}}
    assert Dtype.to_nx("<i8") == {:ok, {:s, 64}}
    assert {:error, _} = Dtype.from_nx({:bf, 16})
    assert {:error, _} = Dtype.to_nx(">f4")

    for name <- Dtype.names(), name != "bool" do
      {:ok, nx} = Dtype.to_nx(name)
      assert Dtype.from_nx(nx) == {:ok, name}
    end
  end

  @tag :python
  test "the dtype table agrees with numpy" do
    python = System.find_executable("python3") || "/usr/bin/python3"
    names = Dtype.names() ++ ["f4", "<f8", "i1", "u2", "c8", "double", "half", "float"]

    script = """
    import json, sys, numpy
    out = {}
    for n in json.loads(sys.argv[1]):
        d = numpy.dtype(n)
        out[n] = [d.name, d.itemsize]
    for bad in ("float33", "int128", "f3"):
        try:
            numpy.dtype(bad)
            out[bad] = "accepted"
        except TypeError:
            out[bad] = None
    print(json.dumps(out))
    """

    {:ok, json} = Snakepit.SharedMemory.JSON.encode(names)
    {out, 0} = System.cmd("/usr/bin/python3", ["-c", script, json])
    {:ok, numpy} = Snakepit.SharedMemory.JSON.decode(out)
    _ = python

    for name <- names do
      {:ok, canonical} = Dtype.canonical(name)
      {:ok, size} = Dtype.itemsize(name)
      assert numpy[name] == [canonical, size], "#{name}: numpy says #{inspect(numpy[name])}"
    end

    for bad <- ["float33", "int128", "f3"] do
      assert numpy[bad] == nil
      assert {:error, _} = Dtype.canonical(bad)
    end
  end
end
