defmodule Snakepit.SharedMemory.Journal do
  @moduledoc """
  In-flight markers that make caller-side bookkeeping exact even when callers are killed.

  An allocation or deallocation updates two things that no single operation can update
  together: the registry (ETS) and the quota counters (`:atomics`). A process killed
  with `Process.exit(pid, :kill)` between the two leaves them disagreeing. So each such
  operation runs inside `run/2`, which writes `{pid, operation}` to the journal table
  first and deletes it last. When a process dies with a journal row, the manager knows
  it died mid-operation and recomputes the counters from the registry inside
  `barrier/2`.

  `barrier/2` is Dekker's mutual exclusion over two ETS tables (each ETS operation is
  atomic, so the pair of tables is linearizable): a caller writes its journal row and
  then reads the barrier flag (a `{holder_pid}` row of the barriers table; several
  holders compose); the manager sets the flag and then waits until no
  *live* process has a journal row. Either the caller sees the flag (and steps back,
  removing its row, until the barrier is lifted) or the manager sees the caller's row
  (and waits for it to finish). Rows of dead processes are ignored and then deleted.
  """

  alias Snakepit.SharedMemory.{Config, Error, Registry}

  @retry_ms 1

  @doc """
  Runs `fun` marked as in flight. Waits (up to `:barrier_timeout`) while the manager
  holds a barrier.
  """
  @spec run(term(), (() -> result)) :: result | {:error, Error.t()} when result: term()
  def run(operation, fun) do
    deadline = System.monotonic_time(:millisecond) + Config.get(:barrier_timeout)

    case enter(operation, deadline) do
      :ok ->
        try do
          fun.()
        after
          :ets.delete(Registry.journal_table(), self())
        end

      {:error, _} = error ->
        error
    end
  end

  defp enter(operation, deadline) do
    journal = Registry.journal_table()
    :ets.insert(journal, {self(), operation})

    if barrier_up?() do
      :ets.delete(journal, self())

      if System.monotonic_time(:millisecond) >= deadline do
        Error.error(
          :unavailable,
          "the snakepit_shm manager held its consistency barrier longer than " <>
            "barrier_timeout; retry, or raise config :snakepit_shm, barrier_timeout: ..."
        )
      else
        Process.sleep(@retry_ms)
        enter(operation, deadline)
      end
    else
      :ok
    end
  end

  @doc """
  Replaces the calling process's journal row with `operation` (inside `run/2`): a later
  stage of the same operation, with what the manager needs to repair it.
  """
  @spec note(term()) :: true
  def note(operation), do: :ets.insert(Registry.journal_table(), {self(), operation})

  @doc "The journal row of `pid`, or nil."
  @spec lookup(pid()) :: term() | nil
  def lookup(pid) do
    case :ets.lookup(Registry.journal_table(), pid) do
      [{^pid, operation}] -> operation
      [] -> nil
    end
  end

  @doc "Deletes the journal row of a dead process once the manager has repaired it."
  @spec forget(pid()) :: true
  def forget(pid), do: :ets.delete(Registry.journal_table(), pid)

  @doc """
  Journal rows of processes that are no longer alive. Each row is read again after its
  process was seen dead: a row read before could be stale (the process may have
  finished that operation, started another and only then died).
  """
  @spec dead_rows() :: [{pid(), term()}]
  def dead_rows do
    journal = Registry.journal_table()

    for pid <- :ets.select(journal, [{{:"$1", :_}, [], [:"$1"]}]),
        not Process.alive?(pid),
        row <- :ets.lookup(journal, pid),
        do: row
  end

  @doc """
  Manager side: raises the barrier, waits until no live process other than the caller
  is in flight (at most `timeout_ms`), runs `fun` and lowers the barrier. Returns `{:ok, fun_result}` or `{:error, :timeout}`.
  """
  @spec barrier(non_neg_integer(), (() -> result)) :: {:ok, result} | {:error, :timeout}
        when result: term()
  def barrier(timeout_ms, fun) do
    barriers = Registry.barriers_table()
    :ets.insert(barriers, {self()})
    deadline = System.monotonic_time(:millisecond) + timeout_ms

    try do
      case drain(deadline) do
        :ok ->
          {:ok, fun.()}

        :timeout ->
          {:error, :timeout}
      end
    after
      :ets.delete(barriers, self())
    end
  end

  # Raised by any live holder. A holder that died holding it (a manager killed
  # mid-barrier) no longer counts, and its row is removed. The common case (no barrier)
  # is one O(1) size lookup.
  defp barrier_up? do
    barriers = Registry.barriers_table()

    case :ets.info(barriers, :size) do
      0 ->
        false

      _ ->
        Enum.any?(:ets.tab2list(barriers), fn {pid} ->
          if Process.alive?(pid) do
            true
          else
            :ets.delete_object(barriers, {pid})
            false
          end
        end)
    end
  end

  defp drain(deadline) do
    me = self()

    live =
      Registry.journal_table()
      |> :ets.select([{{:"$1", :_}, [], [:"$1"]}])
      |> Enum.any?(fn pid -> pid != me and Process.alive?(pid) end)

    cond do
      not live ->
        :ok

      System.monotonic_time(:millisecond) >= deadline ->
        :timeout

      true ->
        Process.sleep(@retry_ms)
        drain(deadline)
    end
  end
end
