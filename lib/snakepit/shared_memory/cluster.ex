defmodule Snakepit.SharedMemory.Cluster do
  @moduledoc """
  Regions across a BEAM cluster: finding the node that holds a region, copying it
  from there, and listing the regions of every connected node.

  Shared memory is local to one host. A region lives on the node that allocated it
  (`export_ref/2` says which, in `"node"`, and on which host, in `"boot_id"`); another
  node reaches it in two steps:

      {:ok, node} = Snakepit.SharedMemory.locate(region_id)
      {:ok, local_id} = Snakepit.SharedMemory.fetch(region_id)   # a local copy

  Built on what OTP already has: the managers of all nodes form a `:pg` group (see
  `Snakepit.SharedMemory.Cluster.Directory`, which also explains the sharded directory
  behind `locate/1`), transfers are plain messages between two processes with a window
  of acknowledged chunks (`Snakepit.SharedMemory.Cluster.Fetch`), and encrypted regions
  travel sealed with a per-transfer key (`Snakepit.SharedMemory.Cluster.Wire`).
  Nodes must be connected (`Node.connect/1`, or libcluster and the like) and run
  `:snakepit_shm`.
  """

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Error, Registry}
  alias Snakepit.SharedMemory.Cluster.{Directory, Fetch}

  @rpc_timeout 15_000
  @list_timeout 10_000
  @default_chunk 4 * 1024 * 1024
  @min_chunk 4096
  @max_chunk 64 * 1024 * 1024

  @type fetch_option ::
          {:node, node()}
          | {:into, String.t() | map()}
          | {:chunk_size, pos_integer()}
          | {:window, pos_integer()}
          | {:chunk_timeout, pos_integer()}
          | {:encrypt, boolean()}
          | {:checksum, :crc32 | :sha256}
          | {:security_level, :standard | :high | :maximum}
          | {:region, keyword() | map()}
          | {:progress, pid() | nil}

  @doc "See `Snakepit.SharedMemory.locate/1`."
  @spec locate(String.t()) :: {:ok, node()} | {:error, Error.t()}
  def locate(id) when is_binary(id) do
    if Registry.member?(id) do
      {:ok, node()}
    else
      case Directory.shard(id, Directory.members()) do
        me when me == node() -> answer(id, Directory.shard_lookup(id))
        shard -> remote_lookup(id, shard)
      end
    end
  end

  def locate(other),
    do: Error.error(:invalid_argument, "a region id is a string, got: #{inspect(other)}")

  defp remote_lookup(id, shard) do
    answer(id, :erpc.call(shard, Directory, :shard_lookup, [id], @rpc_timeout))
  catch
    :error, {:erpc, reason} when reason in [:noconnection, :timeout] ->
      Error.error(
        :nodedown,
        "node #{shard}, which holds the directory entry of #{id}, did not answer " <>
          "(#{reason}); try again once the cluster has settled",
        %{region_id: id, node: shard}
      )

    kind, reason ->
      Error.error(
        :unavailable,
        "the directory of #{shard} failed to look up #{id}: #{inspect({kind, reason}, limit: 5)}",
        %{region_id: id, node: shard}
      )
  end

  defp answer(_id, {:ok, node}), do: {:ok, node}

  defp answer(id, :error) do
    Error.error(
      :not_found,
      "no node of the cluster (#{Enum.join(Directory.members(), ", ")}) holds region " <>
        "#{inspect(id)}: it was never allocated, was freed, or its node is gone",
      %{region_id: id}
    )
  end

  @doc "See `Snakepit.SharedMemory.fetch/2`."
  @spec fetch(String.t() | map(), [fetch_option()] | map()) ::
          {:ok, String.t()} | {:error, Error.t()}
  def fetch(source, opts) do
    with {:ok, opts} <- options(opts),
         {:ok, id, hint} <- source(source),
         {:ok, node} <- source_node(id, opts.node || hint) do
      Fetch.run(id, node, opts)
    end
  end

  defp source(id) when is_binary(id), do: {:ok, id, nil}

  defp source(%{"region_id" => id} = ref) when is_binary(id) do
    with {:ok, hint} <- ref_node(ref), do: {:ok, id, hint}
  end

  defp source(other) do
    Error.error(
      :invalid_argument,
      "fetch/2 takes a region id or a ref from export_ref/2, got: #{inspect(other, limit: 5)}"
    )
  end

  # A ref names its node: use it when that node is connected (no lookup at all).
  defp ref_node(%{"node" => name}) when is_binary(name) do
    {:ok, Enum.find([node() | Node.list()], &(Atom.to_string(&1) == name))}
  end

  defp ref_node(_ref), do: {:ok, nil}

  defp source_node(id, nil), do: locate(id)

  defp source_node(id, node) do
    if node in [node() | Node.list()] do
      {:ok, node}
    else
      Error.error(
        :nodedown,
        "node #{node} is not connected to #{node()}, so #{id} cannot be fetched from it: " <>
          "connect it first (Node.connect/1) or leave out :node to locate the region",
        %{region_id: id, node: node}
      )
    end
  end

  defp options(opts) when is_list(opts) do
    if Keyword.keyword?(opts) do
      with {:ok, map} <- Snakepit.SharedMemory.Options.keyword_to_map(opts), do: options(map)
    else
      bad_options(opts)
    end
  end

  defp options(opts) when is_map(opts) and not is_struct(opts) do
    defaults = %{
      node: nil,
      into: nil,
      chunk_size: @default_chunk,
      window: 4,
      chunk_timeout: 30_000,
      encrypt: false,
      checksum: :crc32,
      security_level: nil,
      region: %{},
      progress: nil
    }

    case Map.keys(opts) -- Map.keys(defaults) do
      [] ->
        validate(Map.merge(defaults, opts))

      unknown ->
        invalid("unknown option(s) #{inspect(unknown)}; accepted: #{inspect(Map.keys(defaults))}")
    end
  end

  defp options(opts), do: bad_options(opts)

  defp bad_options(opts),
    do: invalid("options must be a keyword list or a map, got: #{inspect(opts, limit: 5)}")

  defp validate(opts) do
    checks = [
      {:node, &(&1 == nil or is_atom(&1)), "a node name (atom)"},
      {:chunk_size, &(is_integer(&1) and &1 >= @min_chunk and &1 <= @max_chunk),
       "an integer from #{@min_chunk} to #{@max_chunk} (bytes)"},
      {:window, &(is_integer(&1) and &1 >= 1 and &1 <= 64), "an integer from 1 to 64"},
      # 4_294_967_295: the largest timeout receive/after takes.
      {:chunk_timeout, &(is_integer(&1) and &1 > 0 and &1 <= 4_294_967_295),
       "milliseconds (integer from 1 to 4294967295)"},
      {:encrypt, &is_boolean/1, "true or false"},
      {:checksum, &(&1 in [:crc32, :sha256]), ":crc32 or :sha256"},
      {:security_level, &(&1 in [nil, :standard, :high, :maximum]),
       ":standard, :high or :maximum"},
      {:progress, &(&1 == nil or is_pid(&1)), "a pid"}
    ]

    with :ok <-
           Enum.find_value(checks, :ok, fn {key, ok?, what} -> check(opts, key, ok?, what) end),
         {:ok, region} <- region_options(opts),
         {:ok, into} <- into(opts.into) do
      if into != nil and region != %{},
        do: invalid(":region options cannot be given with :into (the region exists already)"),
        else: {:ok, %{opts | region: region, into: into}}
    end
  end

  defp check(opts, key, ok?, what) do
    value = Map.fetch!(opts, key)

    if ok?.(value),
      do: nil,
      else: invalid("#{inspect(key)} must be #{what}, got: #{inspect(value)}")
  end

  defp region_options(%{region: region}) when is_map(region) and not is_struct(region),
    do: new_region_only(region)

  defp region_options(%{region: region}) when is_list(region) do
    if Keyword.keyword?(region) do
      with {:ok, map} <- Snakepit.SharedMemory.Options.keyword_to_map(region),
           do: new_region_only(map)
    else
      invalid(":region must be allocate_region/2 options, got: #{inspect(region)}")
    end
  end

  defp region_options(%{region: region}),
    do: invalid(":region must be allocate_region/2 options, got: #{inspect(region)}")

  # The copy is a new region, freed if the fetch fails: opening (or replacing) an
  # existing named region would overwrite, then free, somebody else's region.
  defp new_region_only(region) do
    case Map.get(region, :open_mode, :create) do
      :create ->
        {:ok, region}

      mode ->
        invalid(
          ":region open_mode #{inspect(mode)}: the copy is always a new region (open_mode " <>
            ":create); to write into an existing region, pass it as :into"
        )
    end
  end

  defp into(nil), do: {:ok, nil}
  defp into(id) when is_binary(id), do: local_into(id)
  defp into(%{"region_id" => id}) when is_binary(id), do: local_into(id)

  defp into(other),
    do:
      invalid(
        ":into must be a local region id or its ref from export_ref/2, got: #{inspect(other, limit: 5)}"
      )

  defp local_into(id) do
    if Registry.member?(id),
      do: {:ok, id},
      else:
        Error.error(
          :not_found,
          ":into names region #{id}, which this node does not hold: allocate it here " <>
            "(and attach the worker to it) first",
          %{region_id: id}
        )
  end

  defp invalid(message), do: Error.error(:invalid_option, message)

  @doc """
  Lists the regions of every connected node (this one included), asking them all at
  once: `{:ok, [%{node: node, regions: [Info.t()], os_pid: integer | nil} | %{node: node,
  error: String.t()}]}`, sorted by node. A node that does not answer within 10 s (a
  frozen, overloaded or partitioned VM), or does not run `:snakepit_shm`, is listed with
  an error rather than failing the whole call; the call never takes much more than 10 s,
  however many nodes there are.
  """
  @spec list_regions(keyword() | map()) ::
          {:ok, [%{required(:node) => node(), optional(atom()) => term()}]}
  def list_regions(filter \\ []) do
    nodes = Enum.sort([node() | Node.list()])
    deadline = System.monotonic_time(:millisecond) + @list_timeout

    # Both questions to every node at once, answers awaited against one deadline: a
    # node's OS pid asked only after the slowest listing (one call per node, each with
    # its own timeout) made the whole call outlast every caller's own timeout.
    requests =
      for node <- nodes,
          do:
            {node, :erpc.send_request(node, SharedMemory, :list_regions, [filter]),
             :erpc.send_request(node, System, :pid, [])}

    {:ok,
     Enum.map(requests, fn {node, list, pid} ->
       listing(node, response(list, deadline), response(pid, deadline))
     end)}
  end

  @doc false
  # How long list_regions/1 waits for the slowest node (callers on another node, such as
  # `mix snakepit.shm.list --cluster`, wait longer than this).
  def list_timeout, do: @list_timeout

  # Every request is answered or abandoned (no reply is left in the caller's mailbox).
  defp response(request, deadline) do
    remaining = max(deadline - System.monotonic_time(:millisecond), 0)
    {:ok, :erpc.receive_response(request, remaining)}
  catch
    kind, reason -> {kind, reason}
  end

  defp listing(node, {:ok, {:ok, infos}}, pid),
    do: %{node: node, regions: infos, os_pid: os_pid(pid)}

  defp listing(node, {:ok, {:error, %Error{message: message}}}, _pid),
    do: %{node: node, error: message}

  defp listing(node, {:error, {:erpc, :timeout}}, _pid),
    do: %{
      node: node,
      error:
        "did not answer within #{div(@list_timeout, 1000)} s (a frozen, overloaded or " <>
          "partitioned node?); its regions are not listed"
    }

  defp listing(node, {:error, {:erpc, :noconnection}}, _pid),
    do: %{node: node, error: "disconnected while its regions were being listed"}

  defp listing(node, {:error, {:exception, :undef, _}}, _pid),
    do: %{
      node: node,
      error: "has no Snakepit.SharedMemory.list_regions/1: :snakepit_shm is not loaded there"
    }

  defp listing(node, {kind, reason}, _pid),
    do: %{node: node, error: "#{kind}: #{inspect(reason, limit: 5)}"}

  defp os_pid({:ok, pid}) when is_binary(pid), do: String.to_integer(pid)
  defp os_pid(_), do: nil
end
