defmodule Snakepit.SharedMemory.CLI.Remote do
  @moduledoc false
  # `--node NAME --cookie COOKIE`: asks a running node through distributed Erlang.
  #
  # The task becomes a hidden node with a random name (short or long names, like the
  # target), sets the cookie, and calls the public Snakepit.SharedMemory functions with
  # :erpc. Every failure ends the task with status 1 and a message that says what to try.

  alias Snakepit.SharedMemory.CLI.{Command, Entry, Human, Table}

  @timeout 15_000
  @cluster_timeout 20_000

  @doc "Calls `module.fun(args...)` (default `Snakepit.SharedMemory`) on the node of `opts[:node]`."
  @spec call!(keyword(), atom(), [term()], module()) :: term()
  def call!(opts, fun, args, module \\ Snakepit.SharedMemory) do
    node = connect!(opts)

    try do
      :erpc.call(node, module, fun, args, @timeout)
    catch
      :error, {:erpc, :noconnection} ->
        Command.fail!("lost the connection to #{node} while calling #{fun}")

      :error, {:exception, :undef, _} ->
        Command.fail!(
          "#{node} has no Snakepit.SharedMemory.#{fun}: is :snakepit_shm loaded and started there?"
        )

      :error, {:exception, reason, _stack} ->
        Command.fail!(
          "Snakepit.SharedMemory.#{fun} failed on #{node}: #{Exception.format_banner(:error, reason)}"
        )

      :exit, {:exception, reason, _} ->
        Command.fail!("Snakepit.SharedMemory.#{fun} exited on #{node}: #{inspect(reason)}")

      :error, {:erpc, :timeout} ->
        Command.fail!("#{node} did not answer #{fun} within #{div(@timeout, 1000)} s")

      kind, reason ->
        Command.fail!("calling #{fun} on #{node} failed: #{inspect({kind, reason})}")
    end
  end

  @doc "Entries of every region the node's manager knows."
  @spec entries!(keyword()) :: [Entry.t()]
  def entries!(opts) do
    os_pid = os_pid!(opts)

    case call!(opts, :list_regions, [%{}]) do
      {:ok, infos} -> infos |> Enum.map(&Entry.from_info(&1, os_pid)) |> Entry.sort()
      {:error, error} -> Command.fail!("list_regions failed on #{opts[:node]}: #{error.message}")
    end
  end

  @doc """
  Entries of every region of every node connected to `opts[:node]` (its
  `Snakepit.SharedMemory.Cluster.list_regions/1`), each with a `:node` (a string), and
  `{node, message}` for the nodes that could not list theirs.
  """
  @spec cluster_entries!(keyword()) :: {[Entry.t()], [{String.t(), String.t()}]}
  def cluster_entries!(opts) do
    node = connect!(opts)

    # Longer than the node's own wait for the slowest of its peers (10 s): a frozen peer
    # is then one failed row, not a failed listing.
    listing =
      try do
        :erpc.call(node, Snakepit.SharedMemory.Cluster, :list_regions, [%{}], @cluster_timeout)
      catch
        :error, {:erpc, :timeout} ->
          Command.fail!(
            "#{node} did not list the cluster within #{div(@cluster_timeout, 1000)} s " <>
              "(is it frozen or overloaded?)"
          )

        kind, reason ->
          Command.fail!(
            "cannot list the cluster through #{node}: #{inspect({kind, reason}, limit: 5)} " <>
              "(does it run :snakepit_shm with cluster support?)"
          )
      end

    {:ok, per_node} = listing

    Enum.reduce(per_node, {[], []}, fn
      %{node: n, regions: infos, os_pid: os_pid}, {entries, failed} ->
        mine =
          infos
          |> Enum.map(&(Entry.from_info(&1, os_pid) |> Map.put(:node, Atom.to_string(n))))
          |> Entry.sort()

        {entries ++ mine, failed}

      %{node: n, error: message}, {entries, failed} ->
        {entries, failed ++ [{Atom.to_string(n), message}]}
    end)
  end

  @doc "The entry of one region on the node, or nil if the node does not know it."
  @spec entry!(keyword(), String.t()) :: Entry.t() | nil
  def entry!(opts, id) do
    os_pid = os_pid!(opts)

    case call!(opts, :get_region_info, [id]) do
      {:ok, info} ->
        Entry.from_info(info, os_pid)

      {:error, %{reason: :not_found}} ->
        nil

      {:error, error} ->
        Command.fail!("get_region_info failed on #{opts[:node]}: #{error.message}")
    end
  end

  @doc "Runs the node's cleanup_regions/1 with `selectors` (a map of its options)."
  @spec cleanup!(keyword(), map()) :: map()
  def cleanup!(opts, selectors) do
    case call!(opts, :cleanup_regions, [selectors]) do
      {:ok, result} ->
        %{node: opts[:node], dry_run: selectors.dry_run, result: result}

      {:error, error} ->
        Command.fail!("cleanup_regions failed on #{opts[:node]}: #{error.message}")
    end
  end

  @doc "Text of a cleanup!/2 result."
  @spec render_cleanup(map()) :: String.t()
  def render_cleanup(%{node: node, dry_run: dry_run, result: result}) do
    freed = freed_list(result)
    verb = if dry_run, do: "would free", else: "freed"

    rows =
      Enum.map(freed, fn f ->
        [f[:region_id] || f[:id], verb, Human.bytes(f[:size]), to_string(f[:reason])]
      end)

    if rows == [],
      do: "Nothing to clean up on #{node}.",
      else:
        Table.render(["ID", "ACTION", "SIZE", "REASON"], rows, right: [2]) <>
          "\n\n#{node}: #{verb} #{length(rows)} region(s)."
  end

  defp freed_list(list) when is_list(list), do: list
  defp freed_list(%{freed: list}) when is_list(list), do: list
  defp freed_list(_), do: []

  @doc "The OS pid of the node's VM."
  @spec os_pid!(keyword()) :: pos_integer()
  def os_pid!(opts) do
    node = connect!(opts)
    :erpc.call(node, :os, :getpid, [], @timeout) |> List.to_integer()
  end

  @doc "Starts distribution (once) and connects to the node; returns its atom."
  @spec connect!(keyword()) :: node()
  def connect!(opts) do
    node = String.to_atom(opts[:node])
    start_distribution!(node)
    if cookie = opts[:cookie], do: Node.set_cookie(node, String.to_atom(cookie))

    started = System.monotonic_time(:millisecond)

    case Node.connect(node) do
      true ->
        node

      _ ->
        elapsed = System.monotonic_time(:millisecond) - started

        Command.fail!(
          "cannot connect to node #{node}: " <>
            connect_failure(node, why_not_connected(registered(node), elapsed))
        )
    end
  end

  # A node with another cookie refuses the handshake at once; one that is registered
  # with epmd but lets the handshake time out (net_setuptime, 7 s) is not answering:
  # telling its user to fix the cookie sent them the wrong way.
  @handshake_timeout_ms 5_000
  defp why_not_connected(:registered, elapsed) when elapsed >= @handshake_timeout_ms,
    do: {:no_handshake, elapsed}

  defp why_not_connected(registered, _elapsed), do: registered

  @doc false
  # Why Node.connect/1 failed, from what epmd on the node's host says: a node that is
  # registered but refused us has another cookie; one that is not registered is not
  # running (or has another name).
  @spec connect_failure(
          node(),
          :registered | :not_registered | :no_epmd | {:no_handshake, non_neg_integer()}
        ) :: String.t()
  def connect_failure(node, {:no_handshake, elapsed}) do
    "node #{node} is registered with epmd but did not answer the connection within " <>
      "#{Float.round(elapsed / 1000, 1)} s: it is frozen (stopped with SIGSTOP or a " <>
      "debugger, swapped out), overloaded, or a firewall passes epmd (port 4369) but not " <>
      "its distribution port. Check that its OS process runs (ps, top) and try again"
  end

  def connect_failure(node, :registered) do
    "node #{node} is running but refused the connection: the cookie does not match. " <>
      "Pass its cookie with --cookie (see its ~/.erlang.cookie or its --cookie/RELEASE_COOKIE)"
  end

  def connect_failure(node, :not_registered) do
    [name, host] = String.split(Atom.to_string(node), "@", parts: 2)

    "no node named #{name} runs on #{host} (epmd there does not know it): start it, or " <>
      "check the name with `epmd -names` on #{host}"
  end

  def connect_failure(node, :no_epmd) do
    host = node |> Atom.to_string() |> String.split("@") |> List.last()

    "cannot reach epmd on #{host}: no Erlang node runs there, or the host name is wrong or " <>
      "unreachable (node #{node})"
  end

  defp registered(node) do
    [name, host] = String.split(Atom.to_string(node), "@", parts: 2)

    case :erl_epmd.names(String.to_charlist(host)) do
      {:ok, names} ->
        if Enum.any?(names, fn {n, _port} -> List.to_string(n) == name end),
          do: :registered,
          else: :not_registered

      _ ->
        :no_epmd
    end
  end

  defp start_distribution!(target) do
    if Node.alive?() do
      :ok
    else
      {mode, host} = name_mode!(target)

      name =
        :"snakepit_shm_cli_#{System.unique_integer([:positive])}_#{:rand.uniform(1_000_000)}@#{host}"

      ensure_epmd()

      # A hidden node: the operator's task does not join the target's cluster.
      case :net_kernel.start(name, %{name_domain: mode, hidden: true}) do
        {:ok, _pid} ->
          :ok

        {:error, reason} ->
          Command.fail!(
            "cannot start distributed Erlang to reach #{target}: #{inspect(reason)} " <>
              "(is epmd runnable? try `epmd -daemon`)"
          )
      end
    end
  end

  defp name_mode!(target) do
    case String.split(Atom.to_string(target), "@") do
      [_name, host] when host != "" ->
        {if(String.contains?(host, "."), do: :longnames, else: :shortnames), host}

      _ ->
        # Command.parse!/5 checks --node first (naming the task); this is a safety net.
        Mix.shell().error("--node must look like name@host, got: #{target}")
        exit({:shutdown, 2})
    end
  end

  defp ensure_epmd do
    case System.find_executable("epmd") do
      nil -> :ok
      epmd -> System.cmd(epmd, ["-daemon"], stderr_to_stdout: true)
    end

    :ok
  end
end
