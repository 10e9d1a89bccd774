defmodule Snakepit.SharedMemory.Reliability.AttackResourcesTest do
  # Resource limits as a container imposes them, on a VM of its own (attack run 3:
  # arenas, warm pool, huge pages, limits).
  use Snakepit.SharedMemory.ReliabilityCase, async: false

  alias Snakepit.SharedMemory.ReliabilityHelpers

  # RLIMIT_NOFILE exhausted (ulimit -n, LimitNOFILE=, a container's default): in a VM
  # that loads modules on first use (mix run, iex, escripts: interactive mode), the
  # first failed allocation needed Snakepit.SharedMemory.Error, whose .beam file could
  # not be opened any more: allocate_region/2 raised UndefinedFunctionError
  # (Error.from_native/2) instead of returning {:error, %Error{}}. The application now
  # loads its modules when it starts.
  @nofile_exhausted ~S"""
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SM
  # What this script itself uses after the limit is loaded before it (interactive mode).
  _ = inspect({:error, %RuntimeError{}, :x, "s", %{a: [1]}})
  _ = Enum.frequencies_by([{:ok, 1}], &elem(&1, 0))
  _ = Enum.reduce_while([1], 0, fn _, a -> {:halt, a} end)
  IO.puts("LIMITING")
  open = length(File.ls!("/proc/self/fd"))
  {_, 0} = System.cmd("prlimit", ["--pid", System.pid(), "--nofile=#{open + 40}"])

  {ids, error} =
    Enum.reduce_while(1..1000, {[], nil}, fn _, {acc, _} ->
      try do
        case SM.allocate_region(100_000, backend: :memfd, cleanup_policy: :manual) do
          {:ok, id} -> {:cont, {[id | acc], nil}}
          {:error, e} -> {:halt, {acc, {:error, e.__struct__, e.reason, e.message}}}
        end
      rescue
        e -> {:halt, {acc, {:raised, e}}}
      end
    end)

  IO.puts("ERROR #{inspect(error)}")
  small = for _ <- 1..50, do: SM.allocate_region(1000, cleanup_policy: :manual)
  IO.puts("SMALL #{inspect(Enum.frequencies_by(small, &elem(&1, 0)))}")
  for id <- ids, do: :ok = SM.deallocate_region(id)
  for {:ok, id} <- small, do: :ok = SM.deallocate_region(id)
  {:ok, id} = SM.allocate_region(100_000, backend: :memfd)
  :ok = SM.deallocate_region(id)
  IO.puts("ALIVE OK #{length(ids)}")
  """

  test "RLIMIT_NOFILE exhausted: allocations return errors, the VM lives and recovers" do
    {out, status} = ReliabilityHelpers.elixir_vm(@nofile_exhausted)
    assert status == 0, "the VM died (exit #{status}):\n#{out}"

    assert out =~
             ~r/ERROR \{:error, Snakepit.SharedMemory.Error, :(no_space|io_error), "[^"]*[Tt]oo many open files/,
           out

    assert out =~ "ALIVE OK", out
  end
end
