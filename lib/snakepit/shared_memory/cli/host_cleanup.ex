defmodule Snakepit.SharedMemory.CLI.HostCleanup do
  @moduledoc false
  # Offline cleanup of the host, from the entries of HostScan. The rules:
  #
  #   * a region whose owner VM is alive is never touched: its manager frees it (expiry,
  #     owner death, reference counts) and releases the holds of dead workers itself;
  #   * a POSIX segment whose owner VM is gone is removed (Native.unlink_segment/1, which
  #     checks again that it is ours and intact). Processes still mapping it keep their
  #     mapping; the memory is freed when the last one unmaps it. Except a worker's
  #     output adopted by a VM (adopted state bit): its header names the worker, and it
  #     is left alone while a process (the adopting VM) holds it open;
  #   * a memfd region whose owner VM is gone has no name to remove: the kernel frees it
  #     when the last process with an fd or mapping of it exits. Holds of dead processes
  #     in its header are released, and the processes keeping it are named;
  #   * a segment that never got a header (creator died while creating it) is removed by
  #     Native.unlink_segment/1 once it is older than 10 s;
  #   * a corrupt segment, a symlink, an object of another user or a misnamed file is
  #     refused: reported, never deleted. The operator looks at it and decides.

  alias Snakepit.SharedMemory.CLI.Entry
  alias Snakepit.SharedMemory.Native

  @type action :: %{
          id: String.t(),
          action: :remove | :release_holds | :keep | :refuse | :remove_incomplete,
          size: non_neg_integer() | nil,
          detail: String.t(),
          result: :planned | :done | :failed,
          entry: Entry.t()
        }

  @doc "What cleanup would do with `entries` (regions with a live owner are left out)."
  @spec plan([Entry.t()]) :: [action()]
  def plan(entries), do: entries |> drop_adopted_in_use() |> Enum.flat_map(&plan_one/1)

  defp drop_adopted_in_use(entries) do
    adopted =
      for %{status: :ok, backend: "posix", owner: %{alive: false}, path: path} = e <- entries,
          adopted?(path),
          do: e.id

    if adopted == [] do
      entries
    else
      open = Snakepit.SharedMemory.Incomplete.open_paths()
      Enum.reject(entries, &(&1.id in adopted and MapSet.member?(open, &1.path)))
    end
  end

  defp adopted?(path) do
    case Native.inspect_path(path) do
      {:ok, header} -> Snakepit.SharedMemory.Cleanup.adopted?(header)
      _ -> false
    end
  end

  defp plan_one(%{status: :ok, owner: %{alive: true}}), do: []

  defp plan_one(%{status: :ok, backend: "posix"} = e) do
    live = for h <- e.holders, h.alive == true, do: h.os_pid

    detail =
      "owner VM #{e.owner.os_pid} is gone" <>
        if(live == [], do: "", else: "; still mapped by #{pids(live)}, freed when they unmap it")

    [action(e, :remove, detail)]
  end

  defp plan_one(%{status: :ok} = e) do
    dead = for h <- e.holders, h.alive == false, do: h
    keepers = e |> Map.get(:open_by, []) |> Enum.reject(&(&1 == e.owner.os_pid))

    kept =
      "owner VM #{e.owner.os_pid} is gone; the kernel frees this memfd when #{pids(keepers)} close(s) it"

    if dead == [],
      do: [action(e, :keep, kept)],
      else: [
        action(
          e,
          :release_holds,
          "release #{length(dead)} hold(s) of dead #{pids(Enum.map(dead, & &1.os_pid))}; " <> kept
        )
      ]
  end

  defp plan_one(%{status: :corrupt, backend: "posix"} = e) do
    if incomplete?(e.path),
      do: [
        action(e, :remove_incomplete, "never got a header (its creator died while creating it)")
      ],
      else: [action(e, :refuse, refusal(e))]
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

  # A regular file of ours whose magic is still zero (or that is empty): a creator writes
  # the magic last. A short file that has a magic was truncated later: damaged.
  defp incomplete?(path) do
    with {:ok, %File.Stat{type: :regular}} <- File.lstat(path) do
      magic_zero?(path)
    else
      _ -> false
    end
  end

  defp magic_zero?(path) do
    case File.open(path, [:read, :binary, :raw], &IO.binread(&1, 8)) do
      {:ok, :eof} -> true
      {:ok, magic} when is_binary(magic) -> magic == <<0::size(byte_size(magic))-unit(8)>>
      _ -> false
    end
  end

  @doc "Carries out the planned actions; each gets `result: :done | :failed`."
  @spec apply_plan([action()]) :: [action()]
  def apply_plan(actions), do: Enum.map(actions, &apply_one/1)

  defp apply_one(%{action: kind, id: id} = a) when kind in [:remove, :remove_incomplete] do
    case Native.unlink_segment(id) do
      :ok -> %{a | result: :done}
      {:error, {:not_found, _, _}} -> %{a | result: :done, detail: a.detail <> " (already gone)"}
      {:error, {_reason, message, _}} -> %{a | result: :failed, problem: message}
    end
  end

  defp apply_one(%{action: :release_holds, entry: e} = a) do
    case Native.open({e.path, e.data_path || ""}, false) do
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

  @doc "True if an action is a refusal or failed (exit status 1)."
  @spec problem?(action()) :: boolean()
  def problem?(%{action: :refuse}), do: true
  def problem?(%{result: :failed}), do: true
  def problem?(_), do: false
end
