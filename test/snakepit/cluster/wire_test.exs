defmodule Snakepit.SharedMemory.Cluster.WireTest do
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.Cluster.Wire

  setup do
    {pub_a, priv_a} = Wire.keypair()
    {pub_b, priv_b} = Wire.keypair()
    tag = :crypto.strong_rand_bytes(16)
    key = Wire.transfer_key(priv_a, pub_b, tag)
    %{key: key, other: Wire.transfer_key(priv_b, pub_a, tag), priv_a: priv_a, pub_b: pub_b}
  end

  test "both sides derive the same key; another tag gives another key", c do
    assert c.key == c.other and byte_size(c.key) == 32
    refute Wire.transfer_key(c.priv_a, c.pub_b, :crypto.strong_rand_bytes(16)) == c.key
  end

  test "chunks round-trip; any change, another index or region fails", c do
    session = %{key: c.key, region_id: "spshm_aaaaaaaaaaaaaaaaaaaa"}
    plain = :crypto.strong_rand_bytes(1000)
    sealed = Wire.seal(session, 7, plain)
    assert byte_size(sealed) == 1016
    assert {:ok, ^plain} = Wire.open(session, 7, sealed)
    assert :error = Wire.open(session, 8, sealed)
    assert :error = Wire.open(%{session | region_id: "spshm_bbbbbbbbbbbbbbbbbbbb"}, 7, sealed)
    <<head::binary-size(10), byte, rest::binary>> = sealed
    assert :error = Wire.open(session, 7, <<head::binary, Bitwise.bxor(byte, 1), rest::binary>>)
    assert :error = Wire.open(session, 7, binary_part(sealed, 0, 1015))
    assert :error = Wire.open(session, 7, "short")
  end

  test "without a key the payload is the plaintext" do
    session = %{key: nil, region_id: "spshm_aaaaaaaaaaaaaaaaaaaa"}
    assert Wire.seal(session, 0, "abc") == "abc"
    assert {:ok, "abc"} = Wire.open(session, 0, "abc")
  end

  test "digests: running CRC-32 and SHA-256 equal the one-shot values" do
    data = :crypto.strong_rand_bytes(10_000)
    <<a::binary-size(3000), b::binary>> = data
    crc = Wire.digest_init(:crc32) |> Wire.digest_update(a) |> Wire.digest_update(b)
    assert Wire.digest_final(crc) == :erlang.crc32(data)
    sha = Wire.digest_init(:sha256) |> Wire.digest_update(a) |> Wire.digest_update(b)
    assert Wire.digest_final(sha) == :crypto.hash(:sha256, data)
  end
end
