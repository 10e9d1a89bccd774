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

  defp truncate(v), do: binary_part(v, 0, :rand.uniform(byte_size(v)) - 1)

  describe "replies" do
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
