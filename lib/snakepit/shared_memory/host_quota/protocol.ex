defmodule Snakepit.SharedMemory.HostQuota.Protocol do
  @moduledoc """
  The wire format of the host quota server (version 1), written out byte by byte in
  `docs/QUOTA.md` and mirrored in `priv/python/snakepit_shm/quota.py`.

  A frame is a 4-byte big-endian length followed by that many bytes of payload
  (`gen_tcp`'s `packet: 4`), at most `max_frame/0` bytes. A payload is
  `version::8, type::8, fields...`; every integer is unsigned big-endian, every string is
  length-prefixed UTF-8. `decode_request/1` never raises: anything it does not
  understand is `{:error, why}`, and the server closes that client's session.
  """

  @version 1
  @max_frame 65_536
  # wait_ms of "wait forever"
  @forever 0xFFFF_FFFF

  # client -> server
  @hello 0x01
  @define 0x02
  @reserve 0x03
  @release 0x04
  @declare 0x05
  @usage 0x06

  # server -> client
  @welcome 0x81
  @ok 0x82
  @error 0x83
  @usage_reply 0x84
  @granted 0x85

  @error_codes %{
    quota_exceeded: 1,
    unknown_quota: 2,
    invalid_argument: 3,
    conflict: 4
  }
  @error_reasons Map.new(@error_codes, fn {k, v} -> {v, k} end)

  @kinds %{beam: 1, python: 2, other: 3}
  @kind_names Map.new(@kinds, fn {k, v} -> {v, k} end)

  @typedoc "What kind of program a client is."
  @type kind :: :beam | :python | :other

  @typedoc "A decoded client message."
  @type request ::
          {:hello, client_id :: non_neg_integer(), os_pid :: non_neg_integer(), kind(),
           label :: String.t()}
          | {:define, req :: non_neg_integer(), :set | :if_absent, String.t(),
             limit :: non_neg_integer()}
          | {:reserve, req :: non_neg_integer(), res_id :: non_neg_integer(), String.t(),
             amount :: non_neg_integer(), wait :: non_neg_integer() | :infinity}
          | {:release, req :: non_neg_integer(), res_id :: non_neg_integer()}
          | {:declare, req :: non_neg_integer(), res_id :: non_neg_integer(), String.t(),
             amount :: non_neg_integer(), limit :: non_neg_integer()}
          | {:usage, req :: non_neg_integer(), String.t() | nil}

  @typedoc "One quota as `usage/1` reports it."
  @type quota_usage :: %{
          name: String.t(),
          limit: non_neg_integer(),
          used: non_neg_integer(),
          holders: [
            %{
              os_pid: non_neg_integer(),
              kind: kind(),
              label: String.t(),
              amount: non_neg_integer(),
              count: non_neg_integer()
            }
          ],
          waiters: [
            %{
              os_pid: non_neg_integer(),
              kind: kind(),
              label: String.t(),
              amount: non_neg_integer(),
              waited_ms: non_neg_integer()
            }
          ]
        }

  @doc "The protocol version this module speaks."
  @spec version() :: 1
  def version, do: @version

  @doc "Largest payload accepted, in bytes."
  @spec max_frame() :: pos_integer()
  def max_frame, do: @max_frame

  @doc "Whether `name` is a valid quota name: 1-64 characters of `[A-Za-z0-9_.:-]`."
  @spec valid_name?(term()) :: boolean()
  def valid_name?(name) when is_binary(name) and byte_size(name) in 1..64,
    do: name_chars?(name)

  def valid_name?(_), do: false

  # [A-Za-z0-9_.:-]+ without a regex (checked twice per request, on both sides).
  defp name_chars?(<<c, rest::binary>>)
       when c in ?a..?z or c in ?A..?Z or c in ?0..?9 or c in [?_, ?., ?:, ?-],
       do: name_chars?(rest)

  defp name_chars?(<<>>), do: true
  defp name_chars?(_), do: false

  # ---- client side: encoding requests ----

  @doc "Encodes a request (the payload of one frame)."
  @spec encode_request(request()) :: iodata()
  def encode_request({:hello, client_id, os_pid, kind, label}) do
    label = cut(label, 255)

    [
      <<@version, @hello, client_id::64, os_pid::32, Map.fetch!(@kinds, kind),
        byte_size(label)::16>>,
      label
    ]
  end

  def encode_request({:define, req, mode, name, limit}) do
    m = if mode == :if_absent, do: 1, else: 0
    [<<@version, @define, req::32, m, limit::64, byte_size(name)>>, name]
  end

  def encode_request({:reserve, req, res_id, name, amount, wait}) do
    wait = if wait == :infinity, do: @forever, else: min(wait, @forever - 1)

    [
      <<@version, @reserve, req::32, res_id::64, amount::64, wait::32, byte_size(name)>>,
      name
    ]
  end

  def encode_request({:release, req, res_id}), do: <<@version, @release, req::32, res_id::64>>

  def encode_request({:declare, req, res_id, name, amount, limit}) do
    [
      <<@version, @declare, req::32, res_id::64, amount::64, limit::64, byte_size(name)>>,
      name
    ]
  end

  def encode_request({:usage, req, name}) do
    name = name || ""
    [<<@version, @usage, req::32, byte_size(name)>>, name]
  end

  # ---- server side: decoding requests ----

  @doc "Decodes a request payload; `{:error, why}` for anything malformed."
  @spec decode_request(binary()) :: {:ok, request()} | {:error, String.t()}
  def decode_request(<<@version, type, body::binary>>), do: decode_body(type, body)

  def decode_request(<<version, _::binary>>),
    do: {:error, "unsupported protocol version #{version} (this server speaks #{@version})"}

  def decode_request(<<>>), do: {:error, "empty message"}

  defp decode_body(@hello, <<client_id::64, os_pid::32, kind, len::16, label::binary-size(len)>>) do
    with {:ok, kind} <- kind(kind),
         :ok <- utf8(label, "label"),
         do: {:ok, {:hello, client_id, os_pid, kind, label}}
  end

  defp decode_body(@define, <<req::32, mode, limit::64, len, name::binary-size(len)>>)
       when mode in [0, 1] do
    with :ok <- name(name),
         do: {:ok, {:define, req, if(mode == 1, do: :if_absent, else: :set), name, limit}}
  end

  defp decode_body(
         @reserve,
         <<req::32, res_id::64, amount::64, wait::32, len, name::binary-size(len)>>
       ) do
    wait = if wait == @forever, do: :infinity, else: wait
    with :ok <- name(name), do: {:ok, {:reserve, req, res_id, name, amount, wait}}
  end

  defp decode_body(@release, <<req::32, res_id::64>>), do: {:ok, {:release, req, res_id}}

  defp decode_body(
         @declare,
         <<req::32, res_id::64, amount::64, limit::64, len, name::binary-size(len)>>
       ) do
    with :ok <- name(name), do: {:ok, {:declare, req, res_id, name, amount, limit}}
  end

  defp decode_body(@usage, <<req::32, 0>>), do: {:ok, {:usage, req, nil}}

  defp decode_body(@usage, <<req::32, len, name::binary-size(len)>>) do
    with :ok <- name(name), do: {:ok, {:usage, req, name}}
  end

  defp decode_body(type, _body)
       when type in [@hello, @define, @reserve, @release] or
              type in [@declare, @usage],
       do: {:error, "malformed message of type 0x#{hex(type)} (wrong length or field)"}

  defp decode_body(type, _body), do: {:error, "unknown message type 0x#{hex(type)}"}

  defp kind(k) do
    case Map.fetch(@kind_names, k) do
      {:ok, kind} -> {:ok, kind}
      :error -> {:error, "unknown client kind #{k}"}
    end
  end

  defp name(name) do
    if valid_name?(name), do: :ok, else: {:error, "invalid quota name #{inspect(name)}"}
  end

  defp utf8(text, what) do
    if String.valid?(text), do: :ok, else: {:error, "#{what} is not UTF-8"}
  end

  # At most `max` bytes of `text` as UTF-8, never cutting a character in two: the server
  # refuses a label that is not UTF-8, and a client whose HELLO it refuses would
  # reconnect and be refused again, forever. Bytes that are not UTF-8 become "?".
  @doc false
  @spec cut(binary(), non_neg_integer()) :: binary()
  def cut(text, max) do
    {part, trims} =
      if byte_size(text) <= max, do: {text, 0..0}, else: {binary_part(text, 0, max), 0..3}

    Enum.find_value(trims, fn n ->
      p = binary_part(part, 0, max(byte_size(part) - n, 0))
      if String.valid?(p), do: p
    end) || for(<<c <- part>>, into: "", do: if(c < 128, do: <<c>>, else: "?"))
  end

  defp hex(n), do: n |> Integer.to_string(16) |> String.pad_leading(2, "0")

  # ---- server side: encoding replies ----

  @doc "WELCOME: the server's OS pid and label (its node name)."
  @spec welcome(non_neg_integer(), String.t()) :: iodata()
  def welcome(os_pid, label) do
    label = cut(label, 255)
    [<<@version, @welcome, os_pid::32, byte_size(label)::16>>, label]
  end

  @doc "OK to request `req`."
  @spec ok(non_neg_integer()) :: binary()
  def ok(req), do: <<@version, @ok, req::32>>

  @doc "GRANTED to reserve request `req`, with the quota's limit."
  @spec granted(non_neg_integer(), non_neg_integer()) :: binary()
  def granted(req, limit), do: <<@version, @granted, req::32, limit::64>>

  @doc "ERROR to request `req`."
  @spec error(non_neg_integer(), atom(), String.t()) :: iodata()
  def error(req, reason, message) do
    message = binary_part(message, 0, min(byte_size(message), 60_000))

    [
      <<@version, @error, req::32, Map.fetch!(@error_codes, reason), byte_size(message)::16>>,
      message
    ]
  end

  @doc "USAGE_REPLY to request `req`."
  @spec usage_reply(non_neg_integer(), [quota_usage()]) :: iodata()
  def usage_reply(req, quotas) do
    # Keeps the reply within one frame: a huge usage list is cut, never a bad frame
    # (a frame above max_frame/0 would make every client drop the connection, reconnect
    # and ask again, forever). At most 100 holders and 100 waiters per quota, and as
    # many whole quotas as fit.
    header = 8

    {encoded, _size} =
      quotas
      |> Enum.take(64)
      |> Enum.reduce_while({[], header}, fn q, {acc, size} ->
        bin = IO.iodata_to_binary(encode_quota(q))

        if size + byte_size(bin) <= @max_frame,
          do: {:cont, {[bin | acc], size + byte_size(bin)}},
          else: {:halt, {acc, size}}
      end)

    [<<@version, @usage_reply, req::32, length(encoded)::16>> | Enum.reverse(encoded)]
  end

  defp encode_quota(q) do
    holders = Enum.take(q.holders, 100)
    waiters = Enum.take(q.waiters, 100)

    [
      <<byte_size(q.name), q.name::binary, q.limit::64, u64(q.used)::64, length(holders)::16>>,
      Enum.map(holders, fn h ->
        [client(h), <<u64(h.amount)::64, min(h.count, 0xFFFF_FFFF)::32>>]
      end),
      <<length(waiters)::16>>,
      Enum.map(waiters, fn w ->
        [client(w), <<w.amount::64, min(w.waited_ms, 0xFFFF_FFFF)::32>>]
      end)
    ]
  end

  # Sums of re-declared amounts (DECLARE counts whatever the limit says) can pass
  # 2^64 - 1: reported as that, never wrapped around to a small number.
  defp u64(n), do: min(n, 0xFFFF_FFFF_FFFF_FFFF)

  defp client(c) do
    label = cut(c.label, 64)
    <<c.os_pid::32, Map.fetch!(@kinds, c.kind), byte_size(label)::16, label::binary>>
  end

  # ---- client side: decoding replies ----

  @typedoc "A decoded server message."
  @type reply ::
          {:welcome, non_neg_integer(), String.t()}
          | {:ok, non_neg_integer()}
          | {:granted, non_neg_integer(), non_neg_integer()}
          | {:error, non_neg_integer(), atom(), String.t()}
          | {:usage, non_neg_integer(), [quota_usage()]}

  @doc "Decodes a server payload; `{:error, why}` for anything malformed."
  @spec decode_reply(binary()) :: {:ok, reply()} | {:error, String.t()}
  def decode_reply(<<@version, @welcome, os_pid::32, len::16, label::binary-size(len)>>),
    do: {:ok, {:welcome, os_pid, label}}

  def decode_reply(<<@version, @ok, req::32>>), do: {:ok, {:ok, req}}
  def decode_reply(<<@version, @granted, req::32, limit::64>>), do: {:ok, {:granted, req, limit}}

  def decode_reply(<<@version, @error, req::32, code, len::16, message::binary-size(len)>>),
    do: {:ok, {:error, req, Map.get(@error_reasons, code, :unknown), message}}

  def decode_reply(<<@version, @usage_reply, req::32, n::16, rest::binary>>) do
    case decode_quotas(rest, n, []) do
      {:ok, quotas} -> {:ok, {:usage, req, quotas}}
      :error -> {:error, "malformed usage reply"}
    end
  end

  def decode_reply(_), do: {:error, "malformed or unknown reply"}

  defp decode_quotas(<<>>, 0, acc), do: {:ok, Enum.reverse(acc)}

  defp decode_quotas(
         <<len, name::binary-size(len), limit::64, used::64, nh::16, rest::binary>>,
         n,
         acc
       )
       when n > 0 do
    with {:ok, holders, <<nw::16, rest::binary>>} <- decode_clients(rest, nh, :count, []),
         {:ok, waiters, rest} <- decode_clients(rest, nw, :waited_ms, []) do
      quota = %{name: name, limit: limit, used: used, holders: holders, waiters: waiters}
      decode_quotas(rest, n - 1, [quota | acc])
    else
      _ -> :error
    end
  end

  defp decode_quotas(_, _, _), do: :error

  defp decode_clients(rest, 0, _key, acc), do: {:ok, Enum.reverse(acc), rest}

  defp decode_clients(
         <<os_pid::32, kind, len::16, label::binary-size(len), amount::64, extra::32,
           rest::binary>>,
         n,
         key,
         acc
       ) do
    entry =
      Map.put(
        %{os_pid: os_pid, kind: Map.get(@kind_names, kind, :other), label: label, amount: amount},
        key,
        extra
      )

    decode_clients(rest, n - 1, key, [entry | acc])
  end

  defp decode_clients(_, _, _, _), do: :error
end
