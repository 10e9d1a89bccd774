defmodule Snakepit.SharedMemory.JSONTest do
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.{Error, JSON}

  doctest JSON

  describe "encode/1" do
    test "scalars, lists and maps with sorted keys" do
      assert JSON.encode(nil) == {:ok, "null"}
      assert JSON.encode(true) == {:ok, "true"}
      assert JSON.encode(-12) == {:ok, "-12"}
      assert JSON.encode(1.5) == {:ok, "1.5"}
      assert JSON.encode(:float32) == {:ok, ~s("float32")}
      assert JSON.encode([1, [2, []], %{}]) == {:ok, "[1,[2,[]],{}]"}
      assert JSON.encode(%{b: 1, a: %{"c" => nil}}) == {:ok, ~s({"a":{"c":null},"b":1})}
    end

    test "escapes what JSON requires and keeps UTF-8" do
      assert JSON.encode("a\"b\\c\n\t\u0001é😀") == {:ok, ~s("a\\"b\\\\c\\n\\t\\u0001é😀")}
    end

    test "DateTime as ISO 8601" do
      assert JSON.encode(~U[2024-01-02 03:04:05Z]) == {:ok, ~s("2024-01-02T03:04:05Z")}
    end

    test "refuses what it cannot represent" do
      for bad <- [{1, 2}, self(), make_ref(), <<255>>, %{{1} => 2}, %{nil => 1}, %URI{}] do
        assert {:error, %Error{reason: :invalid_json}} = JSON.encode(bad), inspect(bad)
      end
    end

    test "an improper list is an error naming it, not a raise" do
      for bad <- [[1 | 2], %{"shape" => [2, 3 | 4]}, [[] | :x]] do
        assert {:error, %Error{reason: :invalid_json, message: message}} = JSON.encode(bad)
        assert message =~ "improper list", inspect(bad)
      end
    end
  end

  describe "decode/1" do
    test "every JSON type" do
      json = ~s( {"a": [1, -2.5e3, 1E2, 0.25, true, false, null], "b": {"c": "d"}, "": ""} )

      assert JSON.decode(json) ==
               {:ok,
                %{
                  "a" => [1, -2500.0, 100.0, 0.25, true, false, nil],
                  "b" => %{"c" => "d"},
                  "" => ""
                }}
    end

    test "escapes and surrogate pairs" do
      assert JSON.decode(~s("\\u00e9\\ud83d\\ude00\\n\\/")) == {:ok, "é😀\n/"}
    end

    test "round trips what encode produces" do
      term = %{"k" => [1, 2.5, "x\ny", %{"n" => nil}], "u" => "ü"}
      {:ok, json} = JSON.encode(term)
      assert JSON.decode(json) == {:ok, term}
    end

    test "errors say where" do
      for bad <- [
            "",
            "{",
            "[1,]",
            ~s({"a" 1}),
            ~s("abc),
            "01",
            "tru",
            "1 2",
            ~s("\\ud800"),
            ~s("\\x")
          ] do
        assert {:error, %Error{reason: :invalid_json, message: message}} = JSON.decode(bad),
               inspect(bad)

        assert message =~ "invalid JSON" or message =~ "UTF"
      end

      assert {:error, %Error{}} = JSON.decode(:not_binary)
    end

    test "refuses deep nesting" do
      deep = String.duplicate("[", 600) <> String.duplicate("]", 600)
      assert {:error, %Error{message: message}} = JSON.decode(deep)
      assert message =~ "nesting"
    end

    test "a number of thousands of digits is refused before it stalls a scheduler" do
      # Found by an attack run: :erlang.binary_to_integer/1 does not yield, and a
      # 600 000-digit number in a ref's JSON blocked a scheduler for seconds.
      long = String.duplicate("7", 600_000)
      assert {:error, %Error{reason: :invalid_json, message: m}} = JSON.decode(long)
      assert m =~ "digits"
      assert {:error, %Error{}} = JSON.decode(~s({"size": #{long}}))
      # Anything a region could need still decodes.
      big = Integer.pow(10, 300)
      assert {:ok, ^big} = JSON.decode(Integer.to_string(big))
    end

    test "a number beyond a double is an error, not a raise" do
      # Found by an attack run: String.to_float/1 raised ArgumentError, so
      # adopt_region/2 and from_zero_copy_ref/1 of such JSON raised too.
      for text <- ["1e999999", "1E400", "-1.5e400", ~s({"size": 1e309})] do
        assert {:error, %Error{reason: :invalid_json, message: m}} = JSON.decode(text)
        assert m =~ "out of range"
      end

      assert {:ok, 0.0} = JSON.decode("1e-400")

      assert {:error, %Error{}} =
               Snakepit.SharedMemory.adopt_region(~s({"v": 1, "region_id": "x", "size": 1e400}))
    end
  end
end
