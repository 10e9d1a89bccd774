defmodule Snakepit.SharedMemory.CLIHelpersTest do
  use ExUnit.Case, async: true

  import Bitwise

  alias Snakepit.SharedMemory.CLI.{DemoData, Entry, Human, Table}

  describe "Human.parse_duration/1" do
    test "accepts ms, s, m, h, d" do
      assert Human.parse_duration("250ms") == {:ok, 250}
      assert Human.parse_duration("30s") == {:ok, 30_000}
      assert Human.parse_duration("5m") == {:ok, 300_000}
      assert Human.parse_duration("2h") == {:ok, 7_200_000}
      assert Human.parse_duration("1d") == {:ok, 86_400_000}
    end

    test "refuses anything else" do
      for bad <- ["", "30", "5 minutes", "-5m", "m", "1.5h", "2w"] do
        assert Human.parse_duration(bad) == :error, "accepted #{inspect(bad)}"
      end
    end
  end

  test "Human.bytes/1 and duration_ms/1 read like a person writes them" do
    assert Human.bytes(512) == "512 B"
    assert Human.bytes(1536) == "1.5 KiB"
    assert Human.bytes(64 * 1024 * 1024) == "64.0 MiB"
    assert Human.bytes(3 * 1024 * 1024 * 1024) == "3.0 GiB"
    assert Human.duration_ms(999) == "999ms"
    assert Human.duration_ms(45_000) == "45s"
    assert Human.duration_ms(125_000) == "2m 5s"
    assert Human.duration_ms(3 * 3_600_000) == "3h"
    assert Human.duration_ms(2 * 86_400_000 + 4 * 3_600_000) == "2d 4h"
  end

  test "Table.render/3 aligns columns, right-aligns the ones asked" do
    text = Table.render(["NAME", "SIZE"], [["a", "1 B"], ["longer", "10 KiB"]], right: [1])

    assert text ==
             """
             NAME      SIZE
             ------  ------
             a          1 B
             longer  10 KiB\
             """
  end

  test "Entry.region_id?/1 accepts only well-formed ids" do
    assert Entry.region_id?("spshm_abcdefghijklmnopqrst")
    assert Entry.region_id?("spshm_n_weights-v2")
    refute Entry.region_id?("spshm_abc")
    refute Entry.region_id?("spshm_ABCDEFGHIJKLMNOPQRST")
    refute Entry.region_id?("spshm_abcdefghijklmnopqrs1")
    refute Entry.region_id?("spshm_n_" <> String.duplicate("x", 22))
    refute Entry.region_id?("../spshm_abcdefghijklmnopqrst")
  end

  describe "DemoData" do
    test "floats/1 equals float32(i band 0xFFFFFF), element by element" do
      for n <- [1, 2, 3, 7, 4096, 70_001] do
        expected = for i <- 0..(n - 1), into: <<>>, do: <<band(i, 0xFFFFFF)::float-32-little>>
        assert DemoData.floats(n) == expected, "n = #{n}"
      end
    end

    test "the top of the exact range and the wrap past 2^24" do
      payload = DemoData.payload(65)
      assert byte_size(payload) == 65 * 1_048_576

      <<_::binary-size(4 * 16_777_215), top::float-32-little, wrap::float-32-little,
        next::float-32-little, _::binary>> = payload

      assert {top, wrap, next} == {16_777_215.0, 0.0, 1.0}
    end

    test "sum/1 and row_sums/1 agree with the payload" do
      payload = DemoData.payload(1)
      values = for <<x::float-32-little <- payload>>, do: trunc(x)
      assert Enum.sum(values) == DemoData.sum(1)
      [rows, cols] = DemoData.shape(1)
      assert rows * cols == length(values)

      sums = values |> Enum.chunk_every(cols) |> Enum.map(&(Enum.sum(&1) * 1.0))
      assert sums == DemoData.row_sums(1)
    end

    test "xor64/1 folds every 64-bit word, odd counts too" do
      words = [1, 2, 4, 0xFFFF_0000_0000_0000, 77]
      binary = for w <- words, into: <<>>, do: <<w::unsigned-little-64>>
      assert DemoData.xor64(binary) == Enum.reduce(words, 0, &bxor/2)
      assert DemoData.xor64(binary_part(binary, 0, 24)) == bxor(bxor(1, 2), 4)
    end
  end
end
