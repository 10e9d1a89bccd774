defmodule Snakepit.SharedMemory.ZeroCopy do
  @moduledoc """
  Glue to Snakepit: its `ZeroCopyRef` wire marker, worker environments, Nx.

  Snakepit passes tool arguments to Python workers as JSON over gRPC and marks
  zero-copy handles with `"__snakepit_zero_copy__": true`. `to_marker/1` wraps one of
  our refs (`export_ref/2`) in that marker with `"kind": "shm"`, so it travels inside
  ordinary tool arguments; on the worker, `snakepit_shm.attach(marker)` and
  `snakepit_shm.resolve(args)` understand it.

      %{
        "__snakepit_zero_copy__" => true,
        "kind" => "shm",
        "device" => "cpu",
        "dtype" => "float32" | nil,
        "shape" => [1024, 256] | nil,
        "owner" => "elixir" | "python",
        "ref" => %{...our ref: "v", "region_id", "backend", paths, "size", "format", ...},
        "copy" => false,
        "bytes" => 1048576,
        "metadata" => %{...}
      }
  """

  alias Snakepit.SharedMemory.{Dtype, Error, JSON}

  @marker "__snakepit_zero_copy__"

  @doc "Wraps our ref (a map from `export_ref/2` or a worker) in Snakepit's marker."
  @spec to_marker(map()) :: {:ok, map()} | {:error, Error.t()}
  def to_marker(%{"v" => 1, "region_id" => id} = ref) when is_binary(id) do
    {:ok,
     %{
       @marker => true,
       "kind" => "shm",
       "device" => "cpu",
       "dtype" => Map.get(ref, "dtype"),
       "shape" => Map.get(ref, "shape"),
       "owner" => Map.get(ref, "owner", "elixir"),
       "ref" => ref,
       "copy" => false,
       "bytes" => Map.get(ref, "size"),
       "metadata" => Map.get(ref, "metadata", %{})
     }}
  end

  def to_marker(other),
    do:
      Error.error(
        :invalid_argument,
        "expected a ref from export_ref/2 (a map with \"v\" => 1 and \"region_id\"), got: " <>
          inspect(other, limit: 8)
      )

  @doc """
  Our ref inside a Snakepit marker (a map or its JSON). Refs that are not markers are
  returned as they are (so both forms are accepted wherever a ref is).
  """
  @spec unwrap(term()) :: {:ok, map()} | {:error, Error.t()}
  def unwrap(json) when is_binary(json) do
    case JSON.decode(json) do
      {:ok, decoded} when is_map(decoded) ->
        unwrap(decoded)

      _ ->
        Error.error(
          :invalid_argument,
          "not a ref or marker (JSON object): #{inspect(json, limit: 8)}"
        )
    end
  end

  def unwrap(%_{} = struct),
    do: Error.error(:invalid_argument, "not a ref or marker: #{inspect(struct, limit: 8)}")

  def unwrap(%{@marker => true, "kind" => "shm", "ref" => ref})
      when is_map(ref) and not is_struct(ref),
      do: {:ok, ref}

  def unwrap(%{@marker => true, "kind" => "shm"} = marker),
    do:
      Error.error(
        :invalid_argument,
        "malformed Snakepit marker of kind \"shm\": its \"ref\" must be the map of " <>
          "export_ref/2, got: #{inspect(Map.get(marker, "ref", :missing), limit: 8)}"
      )

  def unwrap(%{@marker => true, "kind" => kind}),
    do:
      Error.error(
        :unsupported,
        "a Snakepit zero-copy marker of kind #{inspect(kind)}: only kind \"shm\" carries a " <>
          "shared memory region"
      )

  def unwrap(%{@marker => _} = other),
    do: Error.error(:invalid_argument, "malformed Snakepit marker: #{inspect(other, limit: 8)}")

  def unwrap(%{} = ref), do: {:ok, ref}

  def unwrap(other),
    do: Error.error(:invalid_argument, "not a ref or marker: #{inspect(other, limit: 8)}")

  @doc "True for a Snakepit zero-copy marker of kind shm."
  @spec marker?(term()) :: boolean()
  def marker?(%{@marker => true, "kind" => "shm"}), do: true
  def marker?(_), do: false

  @doc """
  The environment a worker needs to `import snakepit_shm`: `PYTHONPATH` (this
  application's `priv/python`, ahead of any `PYTHONPATH` given) and `SNAKEPIT_SHM_LIB`
  (the C library), plus `SNAKEPIT_SHM_PATH` when `:shm_path` is configured (bare-id
  lookups and the worker's POSIX outputs then use that directory), and
  `SNAKEPIT_SHM_RUNTIME_DIR`, the base of the directory where this VM lists its memfd
  regions for bare-id lookups (the entries are in its subdirectory of the PID namespace,
  `pidns-<inode>`, which the worker derives the same way: docs/FORMAT.md, "Runtime
  index"). Use it as a Snakepit pool's
  `adapter_env`.
  """
  @spec python_env(String.t() | nil) :: %{String.t() => String.t()}
  def python_env(existing \\ System.get_env("PYTHONPATH")) do
    priv = to_string(:code.priv_dir(:snakepit_shm))
    python = Path.join(priv, "python")
    path = if existing in [nil, ""], do: python, else: python <> ":" <> existing

    env = %{"PYTHONPATH" => path, "SNAKEPIT_SHM_LIB" => Path.join(priv, "libsnakepit_shm.so")}

    env =
      case Snakepit.SharedMemory.Config.get(:shm_path) do
        nil -> env
        dir -> Map.put(env, "SNAKEPIT_SHM_PATH", dir)
      end

    Map.put(env, "SNAKEPIT_SHM_RUNTIME_DIR", runtime_dir())
  end

  # The base directory of the runtime index as the core computes it (runtime_index.hpp), so
  # that a worker started with another environment (no XDG_RUNTIME_DIR) looks where
  # this VM writes.
  defp runtime_dir do
    case {System.get_env("SNAKEPIT_SHM_RUNTIME_DIR"), System.get_env("XDG_RUNTIME_DIR")} do
      {"/" <> _ = own, _} -> own
      {_, "/" <> _ = xdg} -> xdg <> "/snakepit_shm"
      _ -> "/dev/shm/snakepit_shm-#{euid()}"
    end
  end

  defp euid do
    case File.stat("/proc/self", time: :posix) do
      {:ok, %File.Stat{uid: uid}} -> uid
      _ -> 0
    end
  end

  @doc """
  An Nx tensor of `binary` with the ref's (or metadata's) dtype and shape, when Nx is
  loaded (no compile-time dependency). `:unsupported` without Nx.
  """
  @spec to_nx(binary(), String.t() | nil, [non_neg_integer()] | nil) ::
          {:ok, term()} | {:error, Error.t()}
  def to_nx(binary, dtype, shape) do
    nx = Nx

    cond do
      not Code.ensure_loaded?(nx) ->
        Error.error(
          :unsupported,
          "Nx is not loaded: add {:nx, ...} to your deps to get tensors, or read the bytes " <>
            "with read/3"
        )

      true ->
        dtype = dtype || "uint8"

        with {:ok, type} <- Dtype.to_nx(dtype),
             :ok <- Dtype.check_layout(dtype, shape, byte_size(binary), "to_nx/1"),
             {:ok, itemsize} <- Dtype.itemsize(dtype) do
          # The shape may cover less than the region (shape x itemsize <= size, and a
          # 0-size array lives in a 1-byte region): give Nx exactly the bytes it shapes.
          used =
            if shape,
              do: Enum.product(shape) * itemsize,
              else: div(byte_size(binary), itemsize) * itemsize

          tensor = nx.from_binary(binary_part(binary, 0, used), type)
          {:ok, if(shape, do: nx.reshape(tensor, List.to_tuple(shape)), else: tensor)}
        end
    end
  end
end
