# A peer VM of the host quota tests (started by test/snakepit/shared_memory/
# host_quota_processes_test.exs). Env: SNAKEPIT_SHM_QUOTA_DIR (the test's private quota
# directory), HQ_CONFIG (an Elixir keyword list of :snakepit_shm settings, optional).
# Answers one command per line on stdout:
#
#   define NAME LIMIT              -> ok | error REASON
#   reserve NAME AMOUNT WAIT_MS    -> ok ID | error REASON
#   release ID                     -> ok | error REASON
#   used NAME                      -> used N
#   stress NAME LIMIT N            -> done   (N reserve(wait: infinity)/release of 1..LIMIT/2)
#   allocate SIZE                  -> ok REGION_ID | error REASON   (allocate_region/2)
#   deallocate REGION_ID           -> ok | error REASON
#   serving                        -> serving true|false
require Logger

defmodule SnakepitShm.HostQuotaPeer do
  alias Snakepit.SharedMemory.HostQuota

  def main do
    Logger.configure(level: :error)
    for {k, v} <- config(), do: Application.put_env(:snakepit_shm, k, v)
    Application.put_env(:snakepit_shm, :orphan_sweep, false)
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    {:ok, _} = HostQuota.info()
    IO.puts("READY #{System.pid()}")
    loop(%{})
  end

  defp config do
    case System.get_env("HQ_CONFIG") do
      nil -> []
      text -> text |> Code.eval_string() |> elem(0)
    end
  end

  defp loop(held) do
    case IO.gets("") do
      line when is_binary(line) ->
        {reply, held} = handle(String.split(line), held)
        IO.puts(reply)
        loop(held)

      _eof ->
        System.halt(0)
    end
  end

  defp handle(["define", name, limit], held),
    do: {result(HostQuota.define(name, String.to_integer(limit))), held}

  defp handle(["reserve", name, amount, wait], held) do
    case HostQuota.reserve(name, String.to_integer(amount), wait: String.to_integer(wait)) do
      {:ok, res} -> {"ok #{res.id}", Map.put(held, Integer.to_string(res.id), res)}
      other -> {result(other), held}
    end
  end

  defp handle(["release", id], held) do
    {res, held} = Map.pop(held, id)
    {result(HostQuota.release(res)), held}
  end

  defp handle(["used", name], held) do
    {:ok, quotas} = HostQuota.usage(name)
    {"used #{Enum.sum(Enum.map(quotas, & &1.used))}", held}
  end

  defp handle(["stress", name, limit, n], held) do
    limit = String.to_integer(limit)

    for i <- 1..String.to_integer(n) do
      amount = rem(i, max(div(limit, 2), 1)) + 1
      {:ok, res} = HostQuota.reserve(name, amount, wait: :infinity)
      if rem(i, 7) == 0, do: Process.sleep(1)
      :ok = HostQuota.release(res)
    end

    {"done", held}
  end

  defp handle(["allocate", size], held) do
    case Snakepit.SharedMemory.allocate_region(String.to_integer(size), owner: nil_owner()) do
      {:ok, id} -> {"ok #{id}", held}
      other -> {result(other), held}
    end
  end

  defp handle(["deallocate", id], held),
    do: {result(Snakepit.SharedMemory.deallocate_region(id)), held}

  defp handle(["serving"], held) do
    {:ok, info} = HostQuota.info()
    {"serving #{info.serving}", held}
  end

  defp handle(other, held), do: {"error unknown command #{inspect(other)}", held}

  # Regions outlive the command: owned by a process that lives as long as the peer.
  defp nil_owner do
    case Process.whereis(:hq_peer_owner) do
      nil ->
        pid = spawn(fn -> Process.sleep(:infinity) end)
        Process.register(pid, :hq_peer_owner)
        pid

      pid ->
        pid
    end
  end

  defp result(:ok), do: "ok"
  defp result({:ok, _}), do: "ok"
  defp result({:error, %{reason: reason}}), do: "error #{reason}"
end

SnakepitShm.HostQuotaPeer.main()
