defmodule Snakepit.SharedMemory.CLI.Remote do
  @moduledoc false
  # `--node NAME --cookie COOKIE`: asks a running node through distributed Erlang.
  #
  # The task becomes a hidden node with a random name (short or long names, like the
  # target), sets the cookie, and calls the public Snakepit.SharedMemory functions with
  # :erpc. Every failure ends the task with status 1 and a message that says what to try.

  alias Snakepit.SharedMemory.CLI.{Command, Entry, Human, Table}

  @timeout 15_000

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

    case Node.connect(node) do
      true ->
        node

      _ ->
        Command.fail!(
          "cannot connect to node #{node}: check that it runs (epmd -names), that the name " <>
            "is complete (name@host) and that --cookie matches its cookie"
        )
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
        Command.usage_error!("snakepit.shm", "--node must look like name@host, got: #{target}")
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
