defmodule Snakepit.SharedMemory.JournalTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.Journal

  describe "run/2" do
    test "marks the caller in flight while fun runs, even if it raises" do
      me = self()
      assert Journal.run(:op, fn -> Journal.lookup(me) end) == :op
      assert Journal.lookup(me) == nil
      assert_raise RuntimeError, fn -> Journal.run(:op, fn -> raise "boom" end) end
      assert Journal.lookup(me) == nil
    end

    test "a killed caller leaves its row, read fresh by dead_rows/0" do
      parent = self()

      pid =
        spawn(fn ->
          Journal.run(:first, fn -> :ok end)
          Journal.run(:second, fn -> send(parent, :inside) && Process.sleep(:infinity) end)
        end)

      assert_receive :inside
      Process.exit(pid, :kill)
      ref = Process.monitor(pid)
      assert_receive {:DOWN, ^ref, _, _, _}
      assert {pid, :second} in Journal.dead_rows()
      Journal.forget(pid)
      refute {pid, :second} in Journal.dead_rows()
    end
  end

  describe "barrier/2" do
    test "waits for live callers in flight, and holds new ones back" do
      parent = self()
      now = fn -> System.monotonic_time(:microsecond) end

      spawn(fn ->
        Journal.run(:slow, fn ->
          send(parent, :slow_in)
          Process.sleep(100)
          send(parent, {:slow_out, now.()})
        end)
      end)

      assert_receive :slow_in

      {:ok, {ran_at, lowered_at}} =
        Journal.barrier(5_000, fn ->
          ran_at = now.()
          spawn(fn -> Journal.run(:late, fn -> send(parent, {:late_in, now.()}) end) end)
          Process.sleep(50)
          {ran_at, now.()}
        end)

      # The barrier ran after the slow caller finished; the late one waited for it.
      assert_receive {:slow_out, slow_out}
      assert ran_at >= slow_out
      assert_receive {:late_in, late_in}, 1_000
      assert late_in >= lowered_at
    end

    test "times out when a live caller stays in flight" do
      parent = self()

      stuck =
        spawn(fn ->
          Journal.run(:stuck, fn -> send(parent, :in) && Process.sleep(:infinity) end)
        end)

      assert_receive :in
      assert Journal.barrier(30, fn -> :never end) == {:error, :timeout}
      Process.exit(stuck, :kill)
    end
  end
end
