defmodule Snakepit.SharedMemory.HostQuota.ProtocolTest do
  # The wire format, byte by byte: the same vectors are checked on the Python side
  # (priv/python/tests/test_quota.py) and written out in docs/QUOTA.md.
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.HostQuota.Protocol

  @vectors [
    {{:hello, 7, 4242, :python, "w"}, "01 01 0000000000000007 00001092 02 0001 77"},
    {{:define, 1, :set, "gpu0", 100}, "01 02 00000001 00 0000000000000064 04 67707530"},
    {{:define, 0, :if_absent, "gpu0", 100}, "01 02 00000000 01 0000000000000064 04 67707530"},
    {{:reserve, 2, 9, "q", 5, :infinity},
     "01 03 00000002 0000000000000009 0000000000000005 ffffffff 01 71"},
    {{:release, 3, 9}, "01 04 00000003 0000000000000009"},
    {{:declare, 0, 9, "q", 5, 10},
     "01 05 00000000 0000000000000009 0000000000000005 000000000000000a 01 71"},
    {{:usage, 4, nil}, "01 06 00000004 00"}
  ]

  describe "valid_name?/1" do
    test "1-64 characters of [A-Za-z0-9_.:-], every other byte refused" do
      for name <- ["a", "shm_total", "gpu0", "A.b:c-d_9", String.duplicate("z", 64)],
          do: assert(Protocol.valid_name?(name))

      for name <- ["", String.duplicate("z", 65), "a b", "a/b", "é", "a\n", "a\0", :a, nil, 1],
          do: refute(Protocol.valid_name?(name))

      # Every single byte, alone and inside a valid name: exactly the 65 allowed ones.
      allowed = Enum.concat([?a..?z, ?A..?Z, ?0..?9, [?_, ?., ?:, ?-]])

      for b <- 0..255 do
        expected = b in allowed
        assert Protocol.valid_name?(<<b>>) == expected
        assert Protocol.valid_name?(<<"ab", b, "cd">>) == expected
      end
    end
  end

  describe "encode_request/1 and decode_request/1" do
    test "the documented byte layout, both ways" do
      for {request, hex} <- @vectors do
        bytes = Base.decode16!(String.replace(hex, " ", ""), case: :lower)
        assert IO.iodata_to_binary(Protocol.encode_request(request)) == bytes
        assert Protocol.decode_request(bytes) == {:ok, request}
      end
    end

    test "never raises: anything else is {:error, why}" do
      :rand.seed(:exsss, {1, 2, 3})

      valid =
        for {request, _} <- @vectors, do: IO.iodata_to_binary(Protocol.encode_request(request))

      for _ <- 1..20_000 do
        bin =
          case :rand.uniform(3) do
            1 -> :crypto.strong_rand_bytes(:rand.uniform(40) - 1)
            2 -> valid |> Enum.random() |> truncate()
            3 -> Enum.random(valid) <> :crypto.strong_rand_bytes(:rand.uniform(4))
          end

        assert match?({:ok, _}, Protocol.decode_request(bin)) or
                 match?({:error, why} when is_binary(why), Protocol.decode_request(bin))
      end

      assert {:error, "unsupported protocol version 2" <> _} = Protocol.decode_request(<<2, 1>>)
      assert {:error, "unknown message type 0x7F"} = Protocol.decode_request(<<1, 0x7F>>)

      assert {:error, "invalid quota name" <> _} =
               Protocol.decode_request(<<1, 6, 0::32, 1, "*">>)
    end
  end

  test "a long label is cut on a character boundary, never into bytes the server refuses" do
    label = String.duplicate("é", 200)
    bin = IO.iodata_to_binary(Protocol.encode_request({:hello, 1, 2, :beam, label}))
    assert {:ok, {:hello, 1, 2, :beam, cut}} = Protocol.decode_request(bin)
    assert byte_size(cut) == 254 and String.valid?(cut)
    assert Protocol.cut(<<"ab", 255, "c">>, 255) == "ab?c"
  end

  defp truncate(v), do: binary_part(v, 0, :rand.uniform(byte_size(v)) - 1)

  describe "replies" do
    test "a usage reply never exceeds one frame, however many holders" do
      who = fn i -> %{os_pid: i, kind: :python, label: String.duplicate("x", 64), amount: 1} end

      quotas =
        for q <- 1..64 do
          %{
            name: String.duplicate("q", 60) <> "#{q}",
            limit: 1000,
            used: 150,
            holders: for(i <- 1..150, do: Map.put(who.(i), :count, 1)),
            waiters: for(i <- 1..150, do: Map.put(who.(i), :waited_ms, 5))
          }
        end

      bin = IO.iodata_to_binary(Protocol.usage_reply(9, quotas))
      assert byte_size(bin) <= Protocol.max_frame()
      assert {:ok, {:usage, 9, [first | _] = decoded}} = Protocol.decode_reply(bin)
      assert length(decoded) >= 3 and length(first.holders) == 100
    end

    test "totals past 2^64 - 1 are reported as 2^64 - 1, never wrapped" do
      max = 0xFFFF_FFFF_FFFF_FFFF
      h = %{os_pid: 1, kind: :other, label: "x", amount: 2 * max, count: 2}
      q = %{name: "q", limit: 10, used: 2 * max, holders: [h], waiters: []}
      bin = IO.iodata_to_binary(Protocol.usage_reply(1, [q]))

      assert {:ok, {:usage, 1, [%{used: ^max, holders: [%{amount: ^max}]}]}} =
               Protocol.decode_reply(bin)
    end

    test "round trip through decode_reply/1" do
      usage = [
        %{
          name: "q",
          limit: 10,
          used: 3,
          holders: [%{os_pid: 42, kind: :python, label: "p", amount: 3, count: 1}],
          waiters: [%{os_pid: 43, kind: :beam, label: "n@h", amount: 9, waited_ms: 12}]
        }
      ]

      assert Protocol.decode_reply(IO.iodata_to_binary(Protocol.usage_reply(4, usage))) ==
               {:ok, {:usage, 4, usage}}

      assert Protocol.decode_reply(Protocol.granted(2, 10)) == {:ok, {:granted, 2, 10}}
      assert Protocol.decode_reply(Protocol.ok(5)) == {:ok, {:ok, 5}}

      assert Protocol.decode_reply(IO.iodata_to_binary(Protocol.error(2, :quota_exceeded, "no"))) ==
               {:ok, {:error, 2, :quota_exceeded, "no"}}

      assert {:error, _} = Protocol.decode_reply(<<1, 0x84, 0::32, 1::16>>)
    end
  end
end
