defmodule Snakepit.SharedMemory.Dtype do
  @moduledoc """
  Element types of regions: numpy's names, their sizes, and Nx's type tuples.

  A region's `dtype` (in `:metadata` or given to `export_ref/2`) is read by the Python
  worker with `numpy.dtype(name)`, so a misspelt name would only fail there. This module
  keeps numpy's names in a table (no numpy needed in Elixir), so the mistake is reported
  where it is made: at `allocate_region/2` and `export_ref/2`. It also maps the names to
  and from Nx's types (`{:f, 32}` <-> `"float32"`) without depending on Nx.
  """

  alias Snakepit.SharedMemory.Error

  # Canonical numpy names -> {itemsize, Nx type or nil}.
  @canonical %{
    "bool" => {1, {:u, 8}},
    "int8" => {1, {:s, 8}},
    "int16" => {2, {:s, 16}},
    "int32" => {4, {:s, 32}},
    "int64" => {8, {:s, 64}},
    "uint8" => {1, {:u, 8}},
    "uint16" => {2, {:u, 16}},
    "uint32" => {4, {:u, 32}},
    "uint64" => {8, {:u, 64}},
    "float16" => {2, {:f, 16}},
    "float32" => {4, {:f, 32}},
    "float64" => {8, {:f, 64}},
    "complex64" => {8, {:c, 64}},
    "complex128" => {16, {:c, 128}}
  }

  # Other spellings numpy accepts for the same types (numpy.dtype(alias).name).
  @aliases %{
    "b1" => "bool",
    "?" => "bool",
    "bool_" => "bool",
    "i1" => "int8",
    "byte" => "int8",
    "i2" => "int16",
    "short" => "int16",
    "i4" => "int32",
    "intc" => "int32",
    "i8" => "int64",
    "int" => "int64",
    "int_" => "int64",
    "long" => "int64",
    "longlong" => "int64",
    "intp" => "int64",
    "u1" => "uint8",
    "ubyte" => "uint8",
    "u2" => "uint16",
    "ushort" => "uint16",
    "u4" => "uint32",
    "uintc" => "uint32",
    "u8" => "uint64",
    "uint" => "uint64",
    "ulonglong" => "uint64",
    "uintp" => "uint64",
    "f2" => "float16",
    "e" => "float16",
    "half" => "float16",
    "f4" => "float32",
    "f" => "float32",
    "single" => "float32",
    "f8" => "float64",
    "d" => "float64",
    "double" => "float64",
    "float" => "float64",
    "float_" => "float64",
    "c8" => "complex64",
    "F" => "complex64",
    "csingle" => "complex64",
    "c16" => "complex128",
    "D" => "complex128",
    "cdouble" => "complex128",
    "complex" => "complex128",
    "complex_" => "complex128"
  }

  @nx_to_name %{
    {:u, 8} => "uint8",
    {:u, 16} => "uint16",
    {:u, 32} => "uint32",
    {:u, 64} => "uint64",
    {:s, 8} => "int8",
    {:s, 16} => "int16",
    {:s, 32} => "int32",
    {:s, 64} => "int64",
    {:f, 16} => "float16",
    {:f, 32} => "float32",
    {:f, 64} => "float64",
    {:bf, 16} => "bfloat16",
    {:c, 64} => "complex64",
    {:c, 128} => "complex128"
  }

  @typedoc "An Nx type tuple, such as `{:f, 32}`."
  @type nx_type :: {:u | :s | :f | :bf | :c, pos_integer()}

  @doc "numpy's canonical names this table knows (`\"float32\"`, ...)."
  @spec names() :: [String.t()]
  def names, do: @canonical |> Map.keys() |> Enum.sort()

  @doc """
  The canonical numpy name of `dtype` (a numpy name or alias, with an optional `<`,
  `|` or `=` byte-order prefix, an atom, or an Nx type tuple). `:invalid_option` for
  a name numpy would not accept and for big-endian types.
  """
  @spec canonical(String.t() | atom() | nx_type()) :: {:ok, String.t()} | {:error, Error.t()}
  def canonical({_, _} = nx) do
    case Map.fetch(@nx_to_name, nx) do
      {:ok, "bfloat16"} ->
        Error.error(:invalid_option, "numpy has no bfloat16: convert to {:f, 32} first")

      {:ok, name} ->
        {:ok, name}

      :error ->
        Error.error(:invalid_option, "#{inspect(nx)} is not an Nx type with a numpy dtype")
    end
  end

  def canonical(dtype) when is_atom(dtype) and dtype not in [nil, true, false],
    do: canonical(Atom.to_string(dtype))

  def canonical(dtype) when is_binary(dtype) do
    bare = String.replace_prefix(dtype, "<", "") |> String.replace_prefix("|", "")
    bare = String.replace_prefix(bare, "=", "")

    cond do
      Map.has_key?(@canonical, bare) -> {:ok, bare}
      Map.has_key?(@aliases, bare) -> {:ok, Map.fetch!(@aliases, bare)}
      true -> unknown(dtype)
    end
  end

  def canonical(other), do: unknown(other)

  @doc "Bytes per item of `dtype` (see `canonical/1`)."
  @spec itemsize(String.t() | atom() | nx_type()) ::
          {:ok, pos_integer()} | {:error, Error.t()}
  def itemsize(dtype) do
    with {:ok, name} <- canonical(dtype), do: {:ok, elem(Map.fetch!(@canonical, name), 0)}
  end

  @doc "The numpy name of an Nx type: `{:f, 32}` -> `\"float32\"`."
  @spec from_nx(nx_type()) :: {:ok, String.t()} | {:error, Error.t()}
  def from_nx(type), do: canonical(type)

  @doc "The Nx type of a numpy name: `\"float32\"` -> `{:f, 32}` (`bool` is `{:u, 8}`)."
  @spec to_nx(String.t()) :: {:ok, nx_type()} | {:error, Error.t()}
  def to_nx(dtype) do
    with {:ok, name} <- canonical(dtype), do: {:ok, elem(Map.fetch!(@canonical, name), 1)}
  end

  @doc """
  Checks that `dtype` and `shape` (either may be nil) describe data that fits in `size`
  bytes, as `Region.ndarray()` will read it: known dtype, shape of non-negative
  integers, `product(shape) * itemsize <= size`, and without a shape a size that is a
  whole number of items. `what` names the source in messages (`":metadata"`, ...).
  """
  @spec check_layout(term(), term(), non_neg_integer() | :any, String.t()) ::
          :ok | {:error, Error.t()}
  def check_layout(dtype, shape, size, what) do
    with {:ok, itemsize} <- layout_itemsize(dtype, what),
         :ok <- check_shape(shape, what) do
      fits(dtype, shape, itemsize, size, what)
    end
  end

  defp layout_itemsize(nil, _what), do: {:ok, 1}

  defp layout_itemsize(dtype, what) do
    case itemsize(dtype) do
      {:ok, n} -> {:ok, n}
      {:error, error} -> Error.error(error.reason, "#{what}: #{error.message}", %{dtype: dtype})
    end
  end

  defp check_shape(nil, _what), do: :ok

  # numpy's dimensions are signed 64-bit (npy_intp): a larger one can never be read, even
  # when the product fits because another dimension is 0.
  @max_dim Bitwise.bsl(1, 63)

  defp check_shape(shape, what) do
    cond do
      not Snakepit.SharedMemory.Options.all?(shape, &(is_integer(&1) and &1 >= 0)) ->
        Error.error(
          :invalid_option,
          "#{what}: shape must be a list of non-negative integers, got: #{inspect(shape)}"
        )

      length(shape) > 64 ->
        Error.error(
          :invalid_option,
          "#{what}: shape has #{length(shape)} dimensions; numpy arrays have at most 64 dimensions"
        )

      Enum.any?(shape, &(&1 >= @max_dim)) ->
        Error.error(
          :invalid_option,
          "#{what}: shape #{inspect(shape)} has a dimension of 2**63 or more, which no " <>
            "numpy array can have"
        )

      true ->
        :ok
    end
  end

  defp fits(_dtype, _shape, _itemsize, :any, _what), do: :ok

  defp fits(dtype, nil, itemsize, size, what) do
    if rem(size, itemsize) == 0,
      do: :ok,
      else:
        Error.error(
          :invalid_option,
          "#{what}: #{size} bytes are not a whole number of #{dtype} items " <>
            "(#{itemsize} bytes each): give a shape, or a size that is a multiple of #{itemsize}",
          %{size: size, dtype: dtype}
        )
  end

  defp fits(dtype, shape, itemsize, size, what) do
    needed = Enum.reduce(shape, 1, &(&1 * &2)) * itemsize

    if needed <= size,
      do: :ok,
      else:
        Error.error(
          :invalid_option,
          "#{what}: shape #{inspect(shape, charlists: :as_lists)} of #{dtype || "uint8"} needs #{needed} bytes, " <>
            "the region has #{size}: fix the shape or allocate at least #{needed} bytes",
          %{size: size, needed: needed, shape: shape, dtype: dtype}
        )
  end

  defp unknown(dtype) do
    Error.error(
      :invalid_option,
      "#{inspect(dtype)} is not a numpy dtype name: use one of " <>
        Enum.join(names(), ", ") <> " (or a numpy alias such as \"f4\", \"<i8\")",
      %{dtype: dtype}
    )
  end
end
