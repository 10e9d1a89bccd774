defmodule Snakepit.SharedMemory.Sweep do
  @moduledoc """
  Sweeps of the shm directory (`/dev/shm` on Linux): what is there that the registry
  does not hold. (Policies for registered regions: `Snakepit.SharedMemory.Cleanup`.)

    * orphans (`sweep_orphans/1`): segments of ours that nobody uses, asked of the
      kernel: every user holds a shared open file description lock on the segment
      (byte 0), so a segment whose lock is free has no user anywhere, whatever PID
      namespace or VM. A VM killed with SIGKILL leaves its POSIX segments; the next
      sweep frees them, header-less ones (a kill inside create) included.
    * re-adoption (`adopt_own_segments/0`): when the registry tables were lost (the table
      owner died), POSIX segments created by this very VM are registered again, as
      `:manual` regions without owner (see `docs/SECURITY.md`). memfd regions cannot be
      re-adopted: nothing names them; they die with their last mapping.
    * channel socket directories (`sweep_channel_dirs/0`, with every orphan sweep): the
      `spshm-ch-XXXXXX` directories and `ctl` sockets of channels whose VM died while
      they still listened, told from live ones by the lock their owner holds.
    * leaks need no sweep: a caller killed inside `Native.create/2` (a dirty NIF that
      keeps running) or before registering its region drops the last reference to a
      POSIX segment nobody registered, and that removes its name (`Native.keep_name/2`).
  """

  require Logger
  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{
    Allocator,
    JSON,
    Native,
    Platform,
    Quota,
    Registry,
    Security,
    Stats
  }

  import Snakepit.SharedMemory.Registry, only: [region: 1]

  @type freed :: Snakepit.SharedMemory.Cleanup.freed()

  @doc """
  Removes the segments of ours in the shm directory that nobody uses: no open file
  description anywhere (this VM, another VM in any PID namespace, a Python worker) holds
  their liveness lock (`Native.sweep_segment/2`: the kernel answers, no PID is trusted).
  That covers the segments of VMs that died, segments whose creation was cut short
  (header-less, their creator's lock gone) and segments created for callers killed
  mid-allocation. A segment being created holds its creator's lock from the instant it
  exists, so it is never taken for an orphan. Returns what was (or, with `dry_run: true`,
  would be) removed.
  """
  @spec sweep_orphans(keyword()) :: [freed()]
  def sweep_orphans(opts \\ []) do
    dry_run = Keyword.get(opts, :dry_run, false)
    {freed, _held} = sweep(segment_ids(), dry_run)

    unless dry_run do
      sweep_runtime_index()
      sweep_channel_dirs()
    end

    freed
  end

  @doc """
  The manager's start-up sweep: `sweep_orphans/0`, plus the ids it had to leave because
  some process holds them although the VM that created them is gone (a worker of a VM
  killed with SIGKILL, still exiting when the next VM started: the usual crash and
  restart). Nothing else would remove those once their holders exit; the manager sweeps
  them again with `sweep_again/1`.
  """
  @spec sweep_orphans_at_start() :: {[freed()], [String.t()]}
  def sweep_orphans_at_start do
    {freed, held} = sweep(segment_ids(), false)
    sweep_runtime_index()
    sweep_channel_dirs()
    {freed, held}
  end

  @doc """
  The sweep after the death of VMs this one was connected to (`Snakepit.SharedMemory.Peers`):
  `sweep_orphans_at_start/0`, where the ids left held also include every segment
  created by one of `peers` (by its header), whatever the creator's PID looks like
  from here (another PID namespace, a process still exiting).
  """
  @spec sweep_orphans_of([Snakepit.SharedMemory.Peers.identity()]) ::
          {[freed()], [String.t()]}
  def sweep_orphans_of(peers) do
    {freed, held} = sweep(segment_ids(), false, peers)
    sweep_runtime_index()
    sweep_channel_dirs()
    {freed, held}
  end

  @doc """
  Sweeps `ids` again (those `sweep_orphans_at_start/0` left held). Returns what it
  removed and the ids still held.
  """
  @spec sweep_again([String.t()]) :: {[freed()], [String.t()]}
  def sweep_again(ids), do: sweep(ids, false)

  # At most this many held orphans are remembered for a later sweep.
  @max_held 1_000

  @doc false
  def max_held, do: @max_held

  defp sweep(ids, dry_run, peers \\ []) do
    dir = Platform.current().shm_dir()

    outcomes =
      for id <- ids, not Registry.member?(id) do
        size = segment_size(dir, id)

        case sweep_one(id, dry_run) do
          {:ok, outcome} when outcome in [:removed, :removed_incomplete] ->
            reason = if outcome == :removed, do: :orphan, else: :incomplete
            {:freed, %{region_id: id, reason: reason, size: size}}

          {:ok, :in_use} ->
            if held_orphan?(dir, id, peers), do: {:held, id}, else: :skip

          _ ->
            :skip
        end
      end

    freed = for {:freed, f} <- outcomes, do: f
    held = for({:held, id} <- outcomes, do: id) |> Enum.take(@max_held)

    if freed != [] and not dry_run do
      Stats.event(:orphans, %{count: length(freed)}, %{
        region_ids: Enum.map(freed, & &1.region_id)
      })

      Logger.info("snakepit_shm: removed #{length(freed)} unused segment(s)")
    end

    {freed, held}
  end

  # In use, but its creator is gone (by its header: a hint of which segments to look at
  # again, never a reason to remove one; the lock decides that).
  # Or created by one of `peers`, VMs known to be dead.
  defp held_orphan?(nil, _id, _peers), do: false

  defp held_orphan?(dir, id, peers) do
    case Native.inspect_path(Path.join(dir, id)) do
      {:ok, %{creator_alive: false}} -> true
      {:ok, header} -> Enum.any?(peers, &created_by?(header, &1))
      _ -> false
    end
  end

  defp created_by?(header, peer) do
    header.creator_pid == peer.os_pid and header.creator_start_time == peer.start_time and
      header.boot_id == peer.boot_id
  end

  @doc """
  Removes the stale entries of the runtime index, the per-user directory where every
  memfd region of a live VM is listed for bare-id lookups by workers: entries of VMs
  that died (kill -9) or of memfds that are gone. Only this PID namespace's
  subdirectory is swept (`directory` in the result): entries of VMs in other PID
  namespaces sharing the base are never judged here. Runs with every orphan sweep (at
  start-up). Returns what `Native.runtime_index_sweep/0` says.
  """
  @spec sweep_runtime_index() :: %{
          directory: String.t() | nil,
          kept: non_neg_integer(),
          removed: non_neg_integer()
        }
  def sweep_runtime_index do
    {:ok, result} = Native.runtime_index_sweep()

    if result.removed > 0,
      do: Logger.info("snakepit_shm: removed #{result.removed} stale runtime index entries")

    result
  end

  @doc """
  Removes the socket directories (`spshm-ch-XXXXXX` holding a `ctl` socket) that channels
  of VMs that died while still listening (a halt without `Channel.close/1`, SIGKILL, a
  crash) left in `$XDG_RUNTIME_DIR`, `$TMPDIR` and `/tmp`: only those whose lock no live
  channel holds, 10 s old or more (`Native.channel_sweep_dirs/0`). Directories under a
  custom `:socket_dir` are not swept. Runs with every orphan sweep. Returns how many it
  removed (0 where there is no channel: not Linux).
  """
  @spec sweep_channel_dirs() :: non_neg_integer()
  def sweep_channel_dirs do
    removed = remove_stale_channel_dirs()

    if removed > 0,
      do: Logger.info("snakepit_shm: removed #{removed} stale channel socket director(ies)")

    removed
  end

  @doc """
  `sweep_channel_dirs/0` without its log line (`mix snakepit.shm.cleanup` reports the
  count itself).
  """
  @spec remove_stale_channel_dirs() :: non_neg_integer()
  def remove_stale_channel_dirs do
    case match?({:unix, :linux}, :os.type()) and Native.channel_sweep_dirs() do
      n when is_integer(n) -> n
      _ -> 0
    end
  end

  @doc "Ids of the segments of ours in the shm directory (`Native.list_segments/0`)."
  @spec segment_ids() :: [String.t()]
  def segment_ids do
    if Platform.current().shm_dir(), do: Native.list_segments(), else: []
  end

  # lstat only: never opens the name (it may be a FIFO).
  # The pages of a removed orphan are freed in slices of about 1 ms, each a dirty call
  # that returns to a normal scheduler: one close of a GiB would keep a core busy for
  # 0.1 s (bench/FINDINGS.md section 7).
  defp sweep_one(id, true), do: Native.sweep_segment(id, true)

  defp sweep_one(id, false) do
    case Native.sweep_segment_begin(id) do
      {:ok, outcome, nil} ->
        {:ok, outcome}

      {:ok, outcome, unlinked} ->
        release_pages(unlinked)
        {:ok, outcome}

      {:error, _} = error ->
        error
    end
  end

  @doc false
  # Frees the pages of an unlinked orphan step by step (public for the tests).
  @spec release_pages(Native.unlinked()) :: :ok
  def release_pages(unlinked) do
    case Native.release_pages_step(unlinked) do
      {:ok, 0} -> :ok
      {:ok, _left} -> release_pages(unlinked)
      # the step closed it: its close freed the rest (or the reaper will)
      {:error, _} -> :ok
    end
  end

  defp segment_size(nil, _id), do: 0

  defp segment_size(dir, id) do
    case File.lstat(Path.join(dir, id)) do
      {:ok, %File.Stat{size: size}} -> max(size - 4096, 0)
      _ -> 0
    end
  end

  @doc """
  Registers again the POSIX segments created by this VM that the registry does not know
  (after a loss of the registry tables). Policy of a re-adopted region: `:manual`, no
  owner, its idle timeout and metadata from its header.
  """
  @spec adopt_own_segments() :: [String.t()]
  def adopt_own_segments do
    me = Native.self_info()

    for {id, header} <- unregistered_segments(), ours?(header, me), adopt(id, header), do: id
  end

  # Created by this VM: pid, start time and boot id all match (mappings of this VM that
  # outlived the tables may still hold it: it is ours, and in use by us).
  defp ours?(header, me), do: created_by?(header, me) and not header.deallocated

  defp adopt(id, header) do
    with {:ok, ref, info} <- Native.open(id, true) do
      timeout_ms = div(header.idle_timeout_ns, 1_000_000)

      record =
        region(
          id: id,
          ref: ref,
          size: info.size,
          backend: info.backend,
          role: :created,
          name:
            if(String.starts_with?(id, "spshm_n_"), do: String.replace_prefix(id, "spshm_n_", "")),
          owner: nil,
          created_at: div(header.created_at_ns, 1_000_000),
          seq: System.unique_integer([:monotonic]),
          permissions: Security.default_permissions(),
          security_level: Security.level_from_int(header.security_level),
          cleanup_policy: :manual,
          timeout: if(timeout_ms == 0, do: :infinity, else: timeout_ms),
          metadata: decode_metadata(header.metadata),
          counters: Allocator.new_counters(info),
          adopted: true,
          # Counted whatever the limits: the region exists already.
          quota: Quota.force(nil, info.size)
        )

      adopted = Registry.insert_new(record)
      if not adopted, do: Quota.release(Registry.region(record, :quota))
      if adopted, do: Stats.count(:adopted)
      adopted
    else
      _ -> false
    end
  end

  defp decode_metadata(json) do
    case JSON.decode(json) do
      {:ok, map} when is_map(map) -> map
      _ -> %{}
    end
  end

  # Segments in the shm directory that the registry does not know, with their headers.
  # Unreadable ones (being created right now, foreign, corrupt) are skipped, never freed.
  defp unregistered_segments, do: scan_unregistered()

  # Segments in the shm directory that the registry does not know, with their headers.
  # Unreadable ones (being created right now, foreign, corrupt) are skipped, never freed.
  defp scan_unregistered do
    case Platform.current().shm_dir() do
      nil ->
        []

      dir ->
        for id <- segment_ids(),
            not Registry.member?(id),
            {:ok, %{id: ^id} = header} <- [Native.inspect_path(Path.join(dir, id))],
            do: {id, header}
    end
  end
end
