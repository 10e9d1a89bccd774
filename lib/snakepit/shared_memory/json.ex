defmodule Snakepit.SharedMemory.JSON do
  @moduledoc """
  A small, strict JSON encoder and decoder (RFC 8259).

  Elixir 1.14 and OTP 25 ship no JSON module and hex.pm is out of reach, so region
  metadata (stored JSON-encoded in the region header), `export_ref/2` and the mix tasks
  use this one.

  Encoding: maps (atom or string keys), lists, UTF-8 strings, atoms (`nil`, `true`,
  `false`, others as strings), integers, finite floats and `DateTime` (ISO 8601).
  Anything else (tuples, pids, invalid UTF-8, ...) is an error, never a silent guess.

  Decoding: objects become maps with string keys, arrays lists, numbers integers or
  floats, `null` `nil`. Nesting deeper than #{512} levels, numbers of more than 1024
  characters and numbers beyond a double are refused.
  """

  import Bitwise, only: [<<<: 2]

  alias Snakepit.SharedMemory.Error

  @max_depth 512

  @doc """
  Encodes `term` as a JSON binary.

  ## Examples

      iex> Snakepit.SharedMemory.JSON.encode(%{"shape" => [2, 3], "dtype" => "float32"})
      {:ok, ~s({"dtype":"float32","shape":[2,3]})}
  """
  @spec encode(term()) :: {:ok, binary()} | {:error, Error.t()}
  def encode(term) do
    {:ok, IO.iodata_to_binary(do_encode(term))}
  catch
    {:json_encode, message} -> Error.error(:invalid_json, message)
  end

  @doc """
  Decodes a JSON binary.

  ## Examples

      iex> Snakepit.SharedMemory.JSON.decode(~s({"a": [1, 2.5, null, true]}))
      {:ok, %{"a" => [1, 2.5, nil, true]}}
  """
  @spec decode(binary()) :: {:ok, term()} | {:error, Error.t()}
  def decode(binary) when is_binary(binary) do
    {value, rest} = value(skip_ws(binary), binary, 0)

    case skip_ws(rest) do
      "" -> {:ok, value}
      trailing -> syntax_error(binary, trailing, "unexpected trailing data")
    end
  catch
    {:json_decode, message} -> Error.error(:invalid_json, message)
  end

  def decode(other), do: Error.error(:invalid_json, "expected a binary, got: #{inspect(other)}")

  # ---- encoder ----

  defp do_encode(nil), do: "null"
  defp do_encode(true), do: "true"
  defp do_encode(false), do: "false"
  defp do_encode(atom) when is_atom(atom), do: string(Atom.to_string(atom))
  defp do_encode(binary) when is_binary(binary), do: string(binary)
  defp do_encode(int) when is_integer(int), do: Integer.to_string(int)
  defp do_encode(float) when is_float(float), do: :erlang.float_to_binary(float, [:short])
  defp do_encode(%DateTime{} = dt), do: string(DateTime.to_iso8601(dt))
  defp do_encode(list) when is_list(list), do: [?[, join(encode_list(list, list)), ?]]

  defp do_encode(%_{} = struct),
    do: throw({:json_encode, "cannot encode struct #{inspect(struct.__struct__)}"})

  defp do_encode(map) when is_map(map) do
    pairs =
      map
      |> Enum.map(fn {key, value} -> {key_string(key), value} end)
      |> Enum.sort_by(&elem(&1, 0))
      |> Enum.map(fn {key, value} -> [string(key), ?:, do_encode(value)] end)

    [?{, join(pairs), ?}]
  end

  defp do_encode(other), do: throw({:json_encode, "cannot encode #{inspect(other)} as JSON"})

  # Element by element: an improper list ([1 | 2]) is an error, not a FunctionClauseError.
  defp encode_list([], _list), do: []
  defp encode_list([head | tail], list), do: [do_encode(head) | encode_list(tail, list)]

  defp encode_list(_tail, list),
    do: throw({:json_encode, "cannot encode the improper list #{inspect(list)} as JSON"})

  defp key_string(key) when is_binary(key), do: key

  defp key_string(key) when is_atom(key) and key not in [nil, true, false],
    do: Atom.to_string(key)

  defp key_string(key),
    do: throw({:json_encode, "object keys must be strings or atoms, got: #{inspect(key)}"})

  defp join([]), do: []
  defp join([first | rest]), do: [first | Enum.map(rest, &[?, | &1])]

  defp string(binary) do
    if String.valid?(binary) do
      [?", escape(binary, binary, 0, 0, []), ?"]
    else
      throw({:json_encode, "strings must be valid UTF-8, got: #{inspect(binary)}"})
    end
  end

  # Copies runs of plain bytes as sub-binaries and escapes only what JSON requires.
  defp escape(<<char, rest::binary>>, original, start, len, acc)
       when char < 0x20 or char == ?" or char == ?\\ do
    acc = [escape_char(char), binary_part(original, start, len) | acc]
    escape(rest, original, start + len + 1, 0, acc)
  end

  defp escape(<<_, rest::binary>>, original, start, len, acc),
    do: escape(rest, original, start, len + 1, acc)

  defp escape(<<>>, original, start, len, acc),
    do: Enum.reverse([binary_part(original, start, len) | acc])

  defp escape_char(?"), do: "\\\""
  defp escape_char(?\\), do: "\\\\"
  defp escape_char(?\n), do: "\\n"
  defp escape_char(?\r), do: "\\r"
  defp escape_char(?\t), do: "\\t"
  defp escape_char(?\b), do: "\\b"
  defp escape_char(?\f), do: "\\f"

  defp escape_char(char),
    do: "\\u" <> String.pad_leading(Integer.to_string(char, 16), 4, "0")

  # ---- decoder ----

  defp value(_input, original, depth) when depth > @max_depth,
    do:
      throw(
        {:json_decode,
         "nesting deeper than #{@max_depth} levels (in #{byte_size(original)} bytes)"}
      )

  defp value(<<?{, rest::binary>>, original, depth),
    do: object(skip_ws(rest), original, depth + 1, [])

  defp value(<<?[, rest::binary>>, original, depth),
    do: array(skip_ws(rest), original, depth + 1, [])

  defp value(<<?", rest::binary>>, original, _depth), do: string_value(rest, original, [])
  defp value(<<"true", rest::binary>>, _original, _depth), do: {true, rest}
  defp value(<<"false", rest::binary>>, _original, _depth), do: {false, rest}
  defp value(<<"null", rest::binary>>, _original, _depth), do: {nil, rest}

  defp value(<<char, _::binary>> = input, original, _depth) when char == ?- or char in ?0..?9,
    do: number(input, original)

  defp value(input, original, _depth), do: syntax_error(original, input, "expected a value")

  defp object(<<?}, rest::binary>>, _original, _depth, []), do: {%{}, rest}

  defp object(<<?", rest::binary>>, original, depth, acc) do
    {key, rest} = string_value(rest, original, [])

    case skip_ws(rest) do
      <<?:, rest::binary>> ->
        {value, rest} = value(skip_ws(rest), original, depth)
        acc = [{key, value} | acc]

        case skip_ws(rest) do
          <<?,, rest::binary>> -> object(skip_ws(rest), original, depth, acc)
          <<?}, rest::binary>> -> {Map.new(acc), rest}
          other -> syntax_error(original, other, "expected ',' or '}' in an object")
        end

      other ->
        syntax_error(original, other, "expected ':' after an object key")
    end
  end

  defp object(input, original, _depth, _acc),
    do: syntax_error(original, input, "expected a string key in an object")

  defp array(<<?], rest::binary>>, _original, _depth, []), do: {[], rest}

  defp array(input, original, depth, acc) do
    {value, rest} = value(input, original, depth)

    case skip_ws(rest) do
      <<?,, rest::binary>> -> array(skip_ws(rest), original, depth, [value | acc])
      <<?], rest::binary>> -> {Enum.reverse([value | acc]), rest}
      other -> syntax_error(original, other, "expected ',' or ']' in an array")
    end
  end

  defp string_value(<<?", rest::binary>>, _original, acc) do
    string = IO.iodata_to_binary(Enum.reverse(acc))

    if String.valid?(string),
      do: {string, rest},
      else: throw({:json_decode, "string is not valid UTF-8: #{inspect(string)}"})
  end

  defp string_value(<<?\\, escape, rest::binary>>, original, acc) when escape != ?u do
    char =
      case escape do
        ?" -> ?"
        ?\\ -> ?\\
        ?/ -> ?/
        ?b -> ?\b
        ?f -> ?\f
        ?n -> ?\n
        ?r -> ?\r
        ?t -> ?\t
        _ -> syntax_error(original, rest, "invalid escape \\#{<<escape>>}")
      end

    string_value(rest, original, [char | acc])
  end

  defp string_value(<<"\\u", hex::binary-size(4), rest::binary>>, original, acc) do
    code = hex_code(hex, original, rest)

    cond do
      code in 0xD800..0xDBFF ->
        case rest do
          <<"\\u", low_hex::binary-size(4), rest2::binary>> ->
            low = hex_code(low_hex, original, rest2)

            if low in 0xDC00..0xDFFF do
              combined = 0x10000 + ((code - 0xD800) <<< 10) + (low - 0xDC00)
              string_value(rest2, original, [<<combined::utf8>> | acc])
            else
              syntax_error(original, rest, "unpaired UTF-16 surrogate")
            end

          _ ->
            syntax_error(original, rest, "unpaired UTF-16 surrogate")
        end

      code in 0xDC00..0xDFFF ->
        syntax_error(original, rest, "unpaired UTF-16 surrogate")

      true ->
        string_value(rest, original, [<<code::utf8>> | acc])
    end
  end

  defp string_value(<<char, _::binary>> = input, original, _acc) when char < 0x20,
    do: syntax_error(original, input, "control character in a string")

  defp string_value(<<char, rest::binary>>, original, acc),
    do: string_value(rest, original, [char | acc])

  defp string_value(<<>>, original, _acc), do: syntax_error(original, "", "unterminated string")

  defp hex_code(hex, original, rest) do
    case Integer.parse(hex, 16) do
      {code, ""} -> code
      _ -> syntax_error(original, rest, "invalid \\u escape #{inspect(hex)}")
    end
  end

  @number ~r/\A-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/

  # :erlang.binary_to_integer/1 takes time quadratic in the digits without yielding:
  # longer numbers are refused before they can stall a scheduler.
  @max_number_chars 1024

  defp number(input, original) do
    case Regex.run(@number, input, capture: :all) do
      [text | _parts] when byte_size(text) > @max_number_chars ->
        syntax_error(original, input, "number of more than #{@max_number_chars} digits")

      [text | parts] ->
        rest = binary_part(input, byte_size(text), byte_size(input) - byte_size(text))
        {parse_number(text, parts), rest}

      nil ->
        syntax_error(original, input, "invalid number")
    end
  end

  defp parse_number(text, parts) do
    if Enum.all?(parts, &(&1 == "")) do
      String.to_integer(text)
    else
      # "1e5" is valid JSON but not a valid Erlang float literal: insert the ".0".
      normalized =
        if Enum.at(parts, 0, "") == "",
          do: String.replace(text, ~r/[eE]/, ".0e", global: false),
          else: text

      try do
        String.to_float(normalized)
      rescue
        ArgumentError ->
          throw(
            {:json_decode,
             "invalid JSON: number #{String.slice(text, 0, 40)} is out of range (beyond a double)"}
          )
      end
    end
  end

  defp skip_ws(<<char, rest::binary>>) when char in [?\s, ?\t, ?\n, ?\r], do: skip_ws(rest)
  defp skip_ws(rest), do: rest

  defp syntax_error(original, rest, what) do
    position = byte_size(original) - byte_size(rest)
    throw({:json_decode, "invalid JSON at byte #{position}: #{what}"})
  end
end
