defmodule Snakepit.SharedMemory.StatusBoardAttackTest do
  # Attacks on the status board's public API: every function returns an error tuple
  # for bad input (never raises), whatever the caller passes or its :score does.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory.{Error, StatusBoard}

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    :ok
  end

  setup do
    name = "atkb#{System.unique_integer([:positive])}"
    {:ok, board} = StatusBoard.create(name, capacity: 4)
    on_exit(fn -> _ = StatusBoard.delete(board) end)
    {:ok, slot} = StatusBoard.join(board, "w1", state: :idle)
    %{board: board, slot: slot}
  end

  defp error?(result, reason), do: match?({:error, %Error{reason: ^reason}}, result)

  test "functions given something that is not a board or slot return :invalid_argument" do
    for bad <- [:foo, nil, %{}, "board", 42] do
      assert error?(StatusBoard.entries(bad), :invalid_argument)
      assert error?(StatusBoard.least_loaded(bad), :invalid_argument)
      assert error?(StatusBoard.least_loaded(bad, exclude: []), :invalid_argument)
      assert error?(StatusBoard.delete(bad), :invalid_argument)
      assert error?(StatusBoard.export_ref(bad), :invalid_argument)
      assert error?(StatusBoard.join(bad, "x"), :invalid_argument)
      assert error?(StatusBoard.update(bad, queue: 1), :invalid_argument)
      assert error?(StatusBoard.leave(bad), :invalid_argument)
    end
  end

  test "forged handles (a reference that is no NIF resource) give errors", ctx do
    forged = %{ctx.board | board: make_ref()}
    assert error?(StatusBoard.entries(forged), :invalid_argument)
    assert error?(StatusBoard.least_loaded(forged), :invalid_argument)
    assert error?(StatusBoard.least_loaded(forged, exclude: ["x"]), :invalid_argument)
    assert error?(StatusBoard.join(forged, "zz"), :invalid_argument)
    forged_slot = %{ctx.slot | ref: make_ref()}
    assert error?(StatusBoard.update(forged_slot, queue: 1), :invalid_argument)
    assert error?(StatusBoard.leave(forged_slot), :invalid_argument)
    # the real ones still work
    assert {:ok, "w1"} = StatusBoard.least_loaded(ctx.board)
  end

  test "malformed fields and options are :invalid_option errors", ctx do
    for fields <- ["x", :x, [:queue], [{:queue, 1} | :tail], [{:queue, 1, 2}], 5] do
      assert error?(StatusBoard.update(ctx.slot, fields), :invalid_option), inspect(fields)
      assert error?(StatusBoard.join(ctx.board, "w9", fields), :invalid_option), inspect(fields)
    end

    assert error?(StatusBoard.least_loaded(ctx.board, foo: 1), :invalid_option)
    assert error?(StatusBoard.create("atkbx", foo: 1), :invalid_option)
    assert {:ok, [%{worker_id: "w1"}]} = StatusBoard.entries(ctx.board)
  end

  test "gauge names that are no UTF-8 are :invalid_option, and make no atoms" do
    name = "atkg#{System.unique_integer([:positive])}"

    for gauges <- [[<<0xFF, 0xFE>>], ["ok", <<0xC3>>], [<<"a", 0x80>>]] do
      assert error?(StatusBoard.create(name, gauges: gauges), :invalid_option), inspect(gauges)
    end

    atoms = :erlang.system_info(:atom_count)
    fresh = "g#{System.unique_integer([:positive])}"
    assert {:ok, board} = StatusBoard.create(name, gauges: [fresh])
    assert :erlang.system_info(:atom_count) == atoms
    assert :ok = StatusBoard.delete(board)
    refute File.exists?("/dev/shm/spshm_n_" <> name)
  end

  test "a :score that raises, throws, exits or returns no number gives an error", ctx do
    for score <- [
          fn _ -> raise "boom" end,
          fn _ -> throw(:ball) end,
          fn _ -> exit(:gone) end,
          fn _ -> :not_a_number end,
          fn _ -> nil end
        ] do
      assert {:error, %Error{reason: :invalid_option} = e} =
               StatusBoard.least_loaded(ctx.board, score: score)

      assert e.message =~ ":score"
    end

    assert {:ok, "w1"} = StatusBoard.least_loaded(ctx.board, score: fn e -> e.queue end)
  end

  test "a large :exclude list with garbage excludes exactly the ids it names" do
    name = "atkx#{System.unique_integer([:positive])}"
    {:ok, board} = StatusBoard.create(name, capacity: 300)

    try do
      ids = for i <- 1..300, do: "worker-#{i}"
      for id <- ids, do: {:ok, _} = StatusBoard.join(board, id, state: :idle)
      keep = "worker-137"
      garbage = ["", String.duplicate("z", 65), <<0, 255, 1>>, "worker-1" <> <<0>>]
      filler = for i <- 1..3_000, do: "absent-#{i}"
      exclude = Enum.shuffle((ids -- [keep]) ++ garbage ++ filler ++ (ids -- [keep]))
      assert length(exclude) <= 4096

      for _ <- 1..5, do: assert({:ok, ^keep} = StatusBoard.least_loaded(board, exclude: exclude))

      assert {:error, %Error{reason: :no_worker}} =
               StatusBoard.least_loaded(board, exclude: [keep | exclude])
    after
      StatusBoard.delete(board)
    end
  end

  # A peer (any process of the user: the board is a POSIX segment) truncates the board.
  # The VM lived (the SIGBUS handler repairs the page) but the board then read as empty
  # and join/update wrote into private zero pages, all answering :ok.
  test "a board truncated by a peer answers :truncated, not an empty board", ctx do
    path = Path.join("/dev/shm", ctx.board.region_id)
    {:ok, f} = :file.open(String.to_charlist(path), [:read, :write, :raw, :binary])
    {:ok, _} = :file.position(f, 0)
    :ok = :file.truncate(f)
    :ok = :file.close(f)

    assert error?(StatusBoard.least_loaded(ctx.board), :truncated)
    assert error?(StatusBoard.entries(ctx.board), :truncated)
    assert error?(StatusBoard.least_loaded(ctx.board, exclude: ["x"]), :truncated)
    assert error?(StatusBoard.update(ctx.slot, queue: 1), :truncated)
    assert error?(StatusBoard.join(ctx.board, "w2"), :truncated)
    assert :ok = StatusBoard.delete(ctx.board)
  end

  # update/2 and join/3 on a deleted board said :permission_denied ("sealed or
  # deleted") while entries/1 and least_loaded/2 said :deallocated.
  test "every function of a deleted board says :deallocated", ctx do
    assert :ok = StatusBoard.delete(ctx.board)
    assert error?(StatusBoard.entries(ctx.board), :deallocated)
    assert error?(StatusBoard.least_loaded(ctx.board), :deallocated)
    assert error?(StatusBoard.update(ctx.slot, queue: 1), :deallocated)
    assert error?(StatusBoard.join(ctx.board, "w2"), :deallocated)
  end

  # A worker id is any UTF-8 its (possibly hostile) worker chose; snapshot/1 (what
  # `mix snakepit.shm.board` prints) passed escape sequences through to the terminal.
  test "snapshot/1 and the board table never carry control characters", ctx do
    evil = "evil\e]0;pwned\a\e[2J\u009b31m"
    {:ok, _} = StatusBoard.join(ctx.board, evil, state: :idle)
    {:ok, snapshot} = StatusBoard.snapshot(ctx.board)
    ids = Enum.map(snapshot.entries, & &1.worker_id)
    assert "w1" in ids
    assert Enum.any?(ids, &String.contains?(&1, "evil"))
    table = Mix.Tasks.Snakepit.Shm.Board.render(snapshot)
    refute String.match?(table, ~r/[\x00-\x09\x0b-\x1f\x7f\x{80}-\x{9f}]/u), inspect(table)
  end
end
