defmodule Snakepit.SharedMemory.CLI.ProcessIdentity do
  @moduledoc false
  # Who a header's (pid, start time) names, as far as the kernel lets this PID namespace
  # see. A header records its writer's pid in the writer's own PID namespace: from
  # another namespace that number names nobody, or somebody else. So a pid is looked up
  # two ways, both in /proc:
  #
  #   * here: the process of that pid in this namespace, with the same start time
  #     (Native.process_alive/2);
  #   * in a PID namespace nested in this one (a container seen from its host): a
  #     process whose `NSpid` (/proc/<pid>/status) ends with that pid, i.e. its pid in its
  #     own namespace, with the same start time. `nested/0` indexes those by that pid
  #     once per scan; the start time is checked as for the first way, by its pid here.
  #
  # Found: that process lives. Not found: nothing is said (it may run in a namespace
  # this one cannot see, a parent or a sibling); callers ask the kernel's locks instead.
  # Linux only: elsewhere (no /proc) the index is empty.

  alias Snakepit.SharedMemory.Native

  @type index :: %{pos_integer() => [pos_integer()]}

  @doc """
  `pid in its own namespace => [pids here]` for the processes of our uid that run in a
  PID namespace nested in this one (one pid may be taken in several such namespaces).
  """
  @spec nested() :: index()
  def nested do
    uid = own_uid()

    case File.read_link("/proc/self/ns/pid") do
      {:ok, ours} when uid != nil -> nested(ours, uid)
      _ -> %{}
    end
  end

  # Only processes in another PID namespace than ours have their status read (the link
  # is cheap; /proc/<pid>/status is not, and readable links are of our uid or root's).
  defp nested(ours, uid) do
    for pid <- proc_pids(),
        {:ok, ns} <- [File.read_link("/proc/#{pid}/ns/pid")],
        ns != ours,
        {:ok, status} <- [File.read("/proc/#{pid}/status")],
        status_uid(status) == uid,
        [_ | [_ | _] = inner] <- [nspids(status)],
        reduce: %{} do
      index -> Map.update(index, List.last(inner), [pid], &[pid | &1])
    end
  end

  @doc """
  `{:here, pid}` if the process of the header's `pid` and `start_time` runs in this PID
  namespace, `{:nested, pid_here}` if it runs in one nested in it, else `:not_seen`.
  """
  @spec find(non_neg_integer(), non_neg_integer(), index()) ::
          {:here, pos_integer()} | {:nested, pos_integer()} | :not_seen
  def find(pid, start_time, index) do
    alive? = &Native.process_alive(&1, start_time)

    cond do
      pid > 0 and alive?.(pid) -> {:here, pid}
      here = index |> Map.get(pid, []) |> Enum.find(alive?) -> {:nested, here}
      true -> :not_seen
    end
  end

  @doc "The pids /proc lists (this PID namespace's processes; [] without /proc)."
  @spec proc_pids() :: [pos_integer()]
  def proc_pids do
    case File.ls("/proc") do
      {:ok, names} -> for name <- names, {pid, ""} <- [Integer.parse(name)], do: pid
      {:error, _} -> []
    end
  end

  defp own_uid do
    case File.read("/proc/self/status") do
      {:ok, status} -> status_uid(status)
      {:error, _} -> nil
    end
  end

  # The effective uid ("Uid:\treal\teffective\t..."): what owns the files a process makes.
  defp status_uid(status) do
    case Regex.run(~r/^Uid:\s+\d+\s+(\d+)/m, status) do
      [_, uid] -> String.to_integer(uid)
      nil -> nil
    end
  end

  # "NSpid:\t4242\t1": the pid in this namespace, then in each nested one, innermost last.
  defp nspids(status) do
    case Regex.run(~r/^NSpid:\s+([\d\s]+?)\s*$/m, status) do
      [_, pids] -> pids |> String.split() |> Enum.map(&String.to_integer/1)
      nil -> []
    end
  end
end
