defmodule Mix.Tasks.Snakepit.Shm.Info do
  @shortdoc "Shows everything known about one shared memory region"

  @help """
  Shows everything known about one region: backend, size, paths, owner VM, times,
  idle timeout, security level, state, metadata, every holder (OS pid, holds, access,
  what the kernel says of it) and whether its header is intact.

  An owner or holder is `alive` when the kernel shows its process (pid and start time in
  this PID namespace or one nested in it), `dead` only for a header of another boot, and
  otherwise "not seen from this PID namespace", with whether some process holds the
  region's liveness lock (in use) or nobody does: a pid alone never says dead (a VM in
  another PID namespace, a container, has a pid that means nothing here).

      mix snakepit.shm.info REGION_ID [--format table|json] [--node NAME [--cookie COOKIE]]

  Without `--node` it reads the region's own header (no running manager needed): the
  POSIX segment /dev/shm/REGION_ID (or under config :snakepit_shm, shm_path), or the memfd of that id in the open fds of a process
  of your uid. The header is checked (magic, format version, sizes, CRC-32): a damaged
  header is reported as CORRUPT.

  ## Options

    * `--format table|json` - output format. Defaults to `table`.
    * `--node NAME`, `--cookie COOKIE` - ask the manager of a running node instead.

  ## Exit status

  0 when the region was found and its header is intact, 1 when it is not found, its
  header is corrupt or it is not ours, 2 on bad usage.
  """
  @moduledoc @help

  use Mix.Task

  alias Snakepit.SharedMemory.CLI.{Command, HostScan, RegionView, Remote}

  @impl true
  def run(argv) do
    %{opts: opts, args: args, format: format} =
      Command.parse!("snakepit.shm.info", @help, argv, [], max_args: 1)

    id =
      case args do
        [id] -> valid_id!(id)
        [] -> Command.usage_error!("snakepit.shm.info", "give the region id (spshm_...)")
      end

    Command.load_code()

    case lookup(id, opts) do
      nil ->
        not_found(id, opts[:node], format)

      entry ->
        case format do
          :json -> Command.print_json(entry)
          :table -> Mix.shell().info(RegionView.details(entry))
        end

        Command.finish(if entry.status == :ok, do: 0, else: 1)
    end
  end

  # A malformed id is a usage error (status 2), not a missing region (status 1).
  defp valid_id!(id) do
    if Regex.match?(~r/\Aspshm_([a-z2-7]{20}|n_[a-z0-9_-]{1,21})\z/, id),
      do: id,
      else:
        Command.usage_error!(
          "snakepit.shm.info",
          "#{inspect(id)} is not a region id: ids look like spshm_ followed by 20 characters " <>
            "of [a-z2-7], or spshm_n_<name> (see `mix snakepit.shm.list`)"
        )
  end

  defp lookup(id, opts) do
    case opts[:node] do
      nil -> HostScan.find(id)
      _node -> Remote.entry!(opts, id)
    end
  end

  @spec not_found(String.t(), String.t() | nil, :table | :json) :: no_return()
  defp not_found(id, node, format) do
    message =
      if node do
        "no region #{id} on node #{node}: its manager does not know it (deallocated, " <>
          "expired, or never allocated there). `mix snakepit.shm.list --node #{node}` shows what it has."
      else
        "no region #{id} on this host: it was deallocated, its owner exited (memfd regions " <>
          "die with their last process), or the id is wrong. `mix snakepit.shm.list` shows what exists."
      end

    if format == :json, do: Command.print_json(%{id: id, status: :not_found, problem: message})
    Command.fail!(message)
  end
end
