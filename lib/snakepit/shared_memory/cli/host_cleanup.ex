defmodule Snakepit.SharedMemory.CLI.HostCleanup do
  @moduledoc false
  # Offline cleanup of the host, from the entries of HostScan. The rules:
  #
  #   * a region some process uses is never touched. "Uses" is asked of the kernel: every
  #     user (the creating VM, VMs that opened it, Python workers, a creator still inside
  #     fallocate) holds a shared open file description lock on byte 0 of the segment.
  #     PIDs in the header are labels, never evidence (PID namespaces, reuse);
  #   * a POSIX segment nobody uses is removed by Native.sweep_segment/2, which checks
  #     again, under its own exclusive lock, that it is ours, intact and unused;
  #     A worker's output adopted by a VM (adopted state bit) names the worker, long
  #     gone, as its creator, but the adopting VM holds its liveness lock: in use;
  #   * a memfd region nobody uses has no name to remove: the kernel frees it when the
  #     last process with an fd or mapping of it exits. Holds in its header are stale
  #     (their processes hold no liveness lock) and released, and the processes keeping
  #     it are named;
  #   * the owner VM is "alive" only when the kernel shows its process (pid and start
  #     time, in this PID namespace or a nested one: CLI.ProcessIdentity), "dead" only for
  #     a header of another boot; otherwise nothing is said of it (CLI.Entry);
  #   * a segment that never got a header and that nobody uses (its creator died while
  #     creating it) is removed the same way;
  #   * a corrupt segment, a symlink, an object of another user or a misnamed file is
  #     refused: reported, never deleted. The operator looks at it and decides.

  alias Snakepit.SharedMemory.CLI.Entry
  alias Snakepit.SharedMemory.Native

  @type action :: %{
          id: String.t(),
          action: :remove | :release_holds | :keep | :refuse | :remove_incomplete,
          size: non_neg_integer() | nil,
          detail: String.t(),
          result: :planned | :done | :skipped | :failed,
          entry: Entry.t()
        }

  @doc "What cleanup would do with `entries` (regions with a live owner are left out)."
  @spec plan([Entry.t()]) :: [action()]
  def plan(entries), do: Enum.flat_map(entries, &plan_one/1)

  defp plan_one(%{status: :ok, in_use: true}), do: []
  # Freed by its VM, which is alive and lets go of it by itself (a freed arena chunk, a
  # memfd not garbage-collected yet): nothing to do, and its owner is not gone.
  defp plan_one(%{status: :ok, deallocated: true, owner: %{alive: true}}), do: []

  defp plan_one(%{status: :ok, backend: "posix"} = e) do
    detail =
      "nobody uses it (no process holds its liveness lock); created by VM #{e.owner.os_pid}"

    [action(e, :remove, detail)]
  end

  defp plan_one(%{status: :ok} = e) do
    # Holds of processes that no longer have the region: nobody holds its liveness lock.
    stale = for h <- e.holders, h.alive == false, do: h
    owner_here = Map.get(e.owner, :seen_as, e.owner.os_pid)
    keepers = e |> Map.get(:open_by, []) |> Enum.reject(&(&1 == owner_here))

    kept =
      "nobody uses it (no process holds its liveness lock; owner VM #{e.owner.os_pid}); " <>
        "the kernel frees this memfd when #{pids(keepers)} close(s) it"

    if stale == [],
      do: [action(e, :keep, kept)],
      else: [
        action(
          e,
          :release_holds,
          "release #{length(stale)} stale hold(s) of #{pids(Enum.map(stale, & &1.os_pid))}; " <>
            kept
        )
      ]
  end

  defp plan_one(%{status: :corrupt, backend: "posix"} = e) do
    case Native.sweep_segment(e.id, true) do
      {:ok, :removed_incomplete} ->
        [
          action(
            e,
            :remove_incomplete,
            "never got a header and nobody uses it (its creator died while creating it)"
          )
        ]

      # Being created right now (its creator holds the liveness lock): not ours to judge.
      {:ok, kept} when kept in [:in_use, :young] ->
        []

      _ ->
        [action(e, :refuse, refusal(e))]
    end
  end

  defp plan_one(e), do: [action(e, :refuse, refusal(e))]

  defp refusal(%{status: :corrupt}), do: "damaged header: left in place"
  defp refusal(%{status: :not_ours}), do: "not ours: left in place"
  defp refusal(_e), do: "unreadable: left in place"

  defp action(e, kind, detail) do
    %{
      id: e.id,
      action: kind,
      size: e[:size],
      detail: detail,
      problem: if(kind == :refuse, do: e.problem),
      result: :planned,
      entry: e
    }
  end

  defp pids([]), do: "nobody"
  defp pids([pid]), do: "pid #{pid}"
  defp pids(list), do: "pids " <> Enum.join(list, ", ")

  @doc "Carries out the planned actions; each gets `result: :done | :failed`."
  @spec apply_plan([action()]) :: [action()]
  def apply_plan(actions), do: Enum.map(actions, &apply_one/1)

  # Only what this call really removed counts as removed.
  defp apply_one(%{action: kind, id: id} = a) when kind in [:remove, :remove_incomplete] do
    case Native.sweep_segment(id, false) do
      {:ok, removed} when removed in [:removed, :removed_incomplete] ->
        %{a | result: :done}

      {:ok, _in_use_or_young} ->
        %{a | result: :skipped, detail: "in use again (a process opened it): kept"}

      {:error, {:not_found, _, _}} ->
        %{a | result: :skipped, detail: "already gone (removed by someone else)"}

      {:error, {_reason, message, _}} ->
        %{a | result: :failed, problem: message}
    end
  end

  defp apply_one(%{action: :release_holds, entry: e} = a) do
    case Native.open(open_target(e), false) do
      {:ok, region, _info} ->
        released =
          for h <- e.holders, h.alive == false, reduce: 0 do
            acc ->
              {:ok, n} = Native.release_holder(region, h.os_pid, h.start_time)
              acc + n
          end

        %{a | result: :done, detail: "released #{released} hold(s); " <> a.detail}

      {:error, {_reason, message, _}} ->
        %{a | result: :failed, problem: "cannot open it to release holds: #{message}"}
    end
  end

  defp apply_one(a), do: %{a | result: :done}

  # A region in an arena is opened at its control block's offset (docs/FORMAT.md).
  defp open_target(%{control_offset: offset} = e), do: {e.path, e.path, offset}
  defp open_target(e), do: {e.path, e.data_path || ""}

  @doc "True if an action is a refusal or failed (exit status 1)."
  @spec problem?(action()) :: boolean()
  def problem?(%{action: :refuse}), do: true
  def problem?(%{result: :failed}), do: true
  def problem?(_), do: false
end
