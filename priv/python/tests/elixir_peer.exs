# Test peer of the Python client tests: creates real regions through the NIF
# (Snakepit.SharedMemory.Native) in a real VM and answers one command per line:
#
#   create SIZE posix|memfd ENCRYPTED(0|1)  -> ok <ref as JSON>   (data: byte i = (7i+3) rem 251)
#   create SIZE arena 0                     -> the same, a region carved from an arena
#   flush                                   -> ok   (runtime index entries are written)
#   header ID                               -> ok <refcount> <pid:count:writable,...>
#   read ID OFFSET LENGTH                   -> ok <hex>
#   seal ID | deallocate ID                 -> ok | error <reason>
#   drop ID                                 -> ok   (deallocate, forget the resource)
#   gc                                      -> ok   (closes the descriptors of dropped ones)
#
# Regions live until the peer's stdin closes; then every one is deallocated.
defmodule SnakepitShm.PythonTestPeer do
  alias Snakepit.SharedMemory.Native

  def main, do: loop(%{})

  defp loop(regions) do
    case IO.gets("") do
      line when is_binary(line) ->
        {reply, regions} =
          try do
            handle(String.split(String.trim(line)), regions)
          rescue
            e -> {"error #{inspect(e)}", regions}
          end

        IO.puts(reply)
        loop(regions)

      _eof ->
        Enum.each(regions, fn {_id, region} -> Native.deallocate(region, false) end)
    end
  end

  defp handle(["create", size, backend, encrypted], regions) do
    size = String.to_integer(size)
    encrypted = encrypted == "1"

    opts = %{
      backend: %{"posix" => :posix, "memfd" => :memfd, "arena" => :memfd}[backend],
      arena: backend == "arena",
      name: nil,
      open_mode: :create,
      mode: 0o600,
      security_level: if(encrypted, do: 1, else: 0),
      encrypted: encrypted,
      lock_memory: false,
      metadata: ~s({"dtype":"uint8","shape":[#{size}],"from":"elixir"}),
      idle_timeout_ms: 0
    }

    {:ok, region, info} = Native.create(size, opts)
    {:ok, mapping} = Native.map(region, :read_write)
    :ok = Native.write_dirty(mapping, 0, pattern(size))
    :ok = Native.unmap(mapping)
    {"ok " <> ref_json(region, info, encrypted), Map.put(regions, info.id, region)}
  end

  defp handle(["header", id], regions) do
    {:ok, header} = Native.header(Map.fetch!(regions, id))

    holders = Enum.map_join(header.holders, ",", fn h -> "#{h.pid}:#{h.count}:#{h.writable}" end)

    {"ok #{header.refcount} #{holders}", regions}
  end

  defp handle(["read", id, offset, length], regions) do
    {:ok, mapping} = Native.map(Map.fetch!(regions, id), :read_only)
    {:ok, data} = Native.read_dirty(mapping, String.to_integer(offset), String.to_integer(length))
    :ok = Native.unmap(mapping)
    {"ok " <> Base.encode16(data, case: :lower), regions}
  end

  defp handle([verb, id], regions) when verb in ["seal", "deallocate"] do
    region = Map.fetch!(regions, id)
    result = if verb == "seal", do: Native.seal(region), else: Native.deallocate(region, true)

    case result do
      :ok -> {"ok", regions}
      {:error, {reason, message, _errno}} -> {"error #{reason} #{message}", regions}
    end
  end

  defp handle(["drop", id], regions) do
    {region, regions} = Map.pop!(regions, id)
    :ok = Native.deallocate(region, false)
    # The region resource (and with it the memfd descriptors) goes with the last term:
    # see the "gc" command.
    {"ok", regions}
  end

  defp handle(["flush"], regions) do
    case Native.runtime_index_flush(5000) do
      :ok -> {"ok", regions}
      {:error, {reason, message, _errno}} -> {"error #{reason} #{message}", regions}
    end
  end

  defp handle(["gc"], regions) do
    :erlang.garbage_collect()
    {"ok", regions}
  end

  defp handle(other, regions), do: {"error unknown command #{inspect(other)}", regions}

  defp pattern(size), do: for(i <- 0..(size - 1), into: <<>>, do: <<rem(i * 7 + 3, 251)>>)

  defp control_offset(%{arena: true, control_offset: offset}), do: ~s("control_offset":#{offset},)
  defp control_offset(_info), do: ""

  defp ref_json(region, info, encrypted) do
    key =
      if encrypted do
        {:ok, key} = Native.export_key(region)
        ~s(,"key":"#{Base.encode64(key)}")
      else
        ""
      end

    ~s({"v":1,"region_id":"#{info.id}","backend":"#{info.backend}",) <>
      ~s("control_path":"#{info.control_path}","data_path":"#{info.data_path}",) <>
      ~s("data_offset":#{info.data_offset},"size":#{info.size},"sealed":false,) <>
      control_offset(info) <>
      ~s("encrypted":#{encrypted},"metadata":{}#{key}})
  end
end

SnakepitShm.PythonTestPeer.main()
