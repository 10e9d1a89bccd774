defmodule Snakepit.SharedMemory.Cluster.Wire do
  @moduledoc """
  What a chunk of a fetch looks like on the wire, and the transfer's encryption.

  Every chunk travels as `{:chunk, tag, index, payload, crc32(payload)}`; the receiver
  recomputes the CRC-32 (`:erlang.crc32/1`) before anything else. The whole transfer is
  verified by a running digest of the plaintext (CRC-32 by default, SHA-256 with
  `checksum: :sha256`) that the sender computes over what it read and the receiver over
  what it wrote, compared when the sender says it is done.

  ## Encryption in transit

  Distributed Erlang carries messages in clear unless the cluster runs it over TLS.
  Chunks of an encrypted (`:high`, `:maximum`) region, or of any region fetched with
  `encrypt: true`, are sealed for the transfer:

    * the receiver and the sender each make an ephemeral X25519 key pair and swap the
      public halves (the receiver's goes with the request, the sender's with its reply);
    * the transfer key is `SHA-256("snakepit_shm fetch v1" || shared secret ||
      transfer tag)`, used for this one transfer only and never stored;
    * each chunk is ChaCha20-Poly1305 with a 96-bit nonce equal to the chunk index (a
      key is never reused across transfers, so an index is a unique nonce) and additional
      data `region id || index || plaintext length`, so a reordered, replayed or
      truncated chunk fails authentication (`:tampered`).

  The source region's own key never leaves its VM: the sender decrypts with it (as
  `read/3` does) and the receiver writes into a region encrypted at rest with a key of
  its own VM. A passive observer of the distribution link sees only ciphertext; an
  active one that can already impersonate cluster nodes (it knows the cookie) is out of
  scope, as it is for distributed Erlang itself: run distribution over TLS for that.
  """

  @aead :chacha20_poly1305
  @tag_len 16

  @type session :: %{key: binary() | nil, region_id: String.t()}

  @doc "A fresh X25519 key pair `{public, private}`."
  @spec keypair() :: {binary(), binary()}
  def keypair, do: :crypto.generate_key(:ecdh, :x25519)

  @doc "The transfer key from our private key, the peer's public key and the transfer tag."
  @spec transfer_key(binary(), binary(), binary()) :: binary()
  def transfer_key(private, peer_public, tag) do
    secret = :crypto.compute_key(:ecdh, peer_public, private, :x25519)
    :crypto.hash(:sha256, ["snakepit_shm fetch v1", secret, tag])
  end

  @doc "The wire payload of chunk `index` (encrypted if the session has a key)."
  @spec seal(session(), non_neg_integer(), binary()) :: binary()
  def seal(%{key: nil}, _index, plain), do: plain

  def seal(%{key: key, region_id: id}, index, plain) do
    {cipher, tag} =
      :crypto.crypto_one_time_aead(@aead, key, nonce(index), plain, aad(id, index, plain), true)

    [cipher, tag] |> IO.iodata_to_binary()
  end

  @doc "The plaintext of a wire payload, or `:error` if it fails authentication."
  @spec open(session(), non_neg_integer(), binary()) :: {:ok, binary()} | :error
  def open(%{key: nil}, _index, payload), do: {:ok, payload}

  def open(%{key: key, region_id: id}, index, payload) when byte_size(payload) >= @tag_len do
    size = byte_size(payload) - @tag_len
    <<cipher::binary-size(size), tag::binary-size(@tag_len)>> = payload

    case :crypto.crypto_one_time_aead(
           @aead,
           key,
           nonce(index),
           cipher,
           aad(id, index, size),
           tag,
           false
         ) do
      plain when is_binary(plain) -> {:ok, plain}
      :error -> :error
    end
  end

  def open(_session, _index, _payload), do: :error

  @doc "A new running digest."
  @spec digest_init(:crc32 | :sha256) :: term()
  def digest_init(:crc32), do: {:crc32, 0}
  def digest_init(:sha256), do: {:sha256, :crypto.hash_init(:sha256)}

  @doc "The digest with `data` added."
  @spec digest_update(term(), binary()) :: term()
  def digest_update({:crc32, crc}, data), do: {:crc32, :erlang.crc32(crc, data)}
  def digest_update({:sha256, ctx}, data), do: {:sha256, :crypto.hash_update(ctx, data)}

  @doc "The final value of a digest."
  @spec digest_final(term()) :: integer() | binary()
  def digest_final({:crc32, crc}), do: crc
  def digest_final({:sha256, ctx}), do: :crypto.hash_final(ctx)

  defp nonce(index), do: <<index::96>>

  defp aad(id, index, plain) when is_binary(plain), do: aad(id, index, byte_size(plain))
  defp aad(id, index, size), do: [id, <<index::64, size::64>>]
end
