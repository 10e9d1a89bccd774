defmodule Snakepit.SharedMemory.Access do
  @moduledoc """
  Mapping, data access, sealing and export, in the calling process.

  Reads and writes touch no ETS table and no process: the `Mapping` struct carries the
  mapping resource, the security level (for the audit) and the region's access counter.
  """

  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{Allocator, Error, JSON, Mapping, Native, Registry, Security, Stats}

  import Snakepit.SharedMemory.Registry, only: [region: 1, region: 2]

  # Payloads above this go to the dirty-scheduler variants (the plain NIFs refuse them).
  @dirty_threshold 65_536

  # Large reads and writes go to the dirty scheduler one slice at a time, and come back
  # to a normal scheduler between slices. One dirty call that runs for tens of
  # milliseconds (a 64 MiB encryption) let normal schedulers sleep through their timers
  # for as long (bench/FINDINGS.md section 7): a slice is about 1 ms of encryption. A
  # multiple of the encryption chunk (64 KiB), so slices never split a chunk. A plain
  # region's slice is a copy at memory speed: 8 MiB is about 1 ms of memcpy, and fewer
  # round trips keep large handoffs at the speed of one copy.
  @slice 1_048_576
  @plain_slice 8 * 1_048_576

  @doc false
  @spec slice_size(Mapping.t()) :: pos_integer()
  def slice_size(%Mapping{encrypted: true}), do: @slice
  def slice_size(%Mapping{}), do: @plain_slice

  @doc "Maps a registered region for the calling process."
  @spec map(String.t(), map()) :: {:ok, Mapping.t()} | {:error, Error.t()}
  def map(id, opts) do
    with {:ok, record} <- lookup(id),
         region(ref: ref, owner: owner, allowed: allowed, security_level: level) = record,
         :ok <- Security.authorize(id, owner, allowed, self(), :map),
         {:ok, mode} <- mode(record, opts.access_mode),
         :ok <- Registry.register_caller(),
         {:ok, mapping_ref} <- native(Native.map(ref, mode), id) do
      mapping_id = make_ref()
      Registry.put_mapping(id, mapping_id, self(), mode, mapping_ref)

      # A deallocation that took the record after our lookup may have swept the
      # mappings before our row existed: check again, and back out if it did.
      if Registry.member?(id) do
        :counters.add(region(record, :counters), 1, 1)
        Security.audit(level, id, :map, %{mode: mode})

        {:ok, mapping(record, mapping_id, mode, mapping_ref, region(record, :cleanup_policy))}
      else
        if Registry.take_mapping(id, mapping_id), do: Native.unmap(mapping_ref)
        not_found(id)
      end
    end
  end

  @doc """
  Runs `fun` with a read-only mapping of `id` that adds no hold (the VM's own passing
  reads, such as `to_nx/1`): it neither counts as a holder of a `:reference_counted`
  region nor frees one when it ends. Authorised as `map/2` is.
  """
  @spec with_unheld(String.t(), (Mapping.t() -> result)) :: result | {:error, Error.t()}
        when result: term()
  def with_unheld(id, fun) do
    with {:ok, record} <- lookup(id),
         region(ref: ref, owner: owner, allowed: allowed, security_level: level) = record,
         :ok <- Security.authorize(id, owner, allowed, self(), :map),
         {:ok, mapping_ref} <- native(Native.map(ref, :read_only_unheld), id) do
      Security.audit(level, id, :map, %{mode: :read_only})

      mapping = mapping(record, make_ref(), :read_only, mapping_ref, :manual)

      try do
        fun.(mapping)
      after
        Native.unmap(mapping_ref)
      end
    end
  end

  @doc false
  # The calling process's Mapping of a registered region (`mapping_ref` from Native.map).
  @spec mapping(
          Registry.region_record(),
          reference(),
          :read_only | :read_write,
          reference(),
          atom()
        ) ::
          Mapping.t()
  def mapping(record, mapping_id, mode, mapping_ref, cleanup_policy) do
    region(id: id, ref: ref, size: size, security_level: level, counters: counters) = record

    %Mapping{
      region_id: id,
      id: mapping_id,
      mode: mode,
      size: size,
      ref: mapping_ref,
      region: ref,
      pid: self(),
      encrypted: Security.level_flags(level).encrypted,
      security_level: level,
      counters: counters,
      cleanup_policy: cleanup_policy
    }
  end

  defp mode(record, requested) do
    region(id: id, owner: owner, access_mode: access, counters: counters) = record
    sealed = sealed?(counters)
    restricted = access == :read_only and self() != owner

    case requested do
      nil when sealed or restricted ->
        {:ok, :read_only}

      nil ->
        {:ok, :read_write}

      :read_write when restricted ->
        Error.error(
          :permission_denied,
          "region #{id} was allocated with access_mode: :read_only: only its owner may " <>
            "map it :read_write; map it with access_mode: :read_only",
          %{region_id: id}
        )

      mode ->
        {:ok, mode}
    end
  end

  # Slot 2 of a region's counters is 1 once seal/1 succeeded (sealing is irreversible and
  # only this VM, the creator, can seal), 2 if the kernel enforces the seal (memfd
  # F_SEAL_WRITE): a read checks it without a NIF call. Only 2 gives zero-copy binaries;
  # a POSIX region's owner could make it writable again, so its reads keep copying.
  @sealed_slot 2
  defp sealed?(counters), do: :counters.get(counters, @sealed_slot) >= 1
  defp zero_copy?(counters), do: :counters.get(counters, @sealed_slot) == 2

  @doc false
  def mark_sealed(counters, zero_copy),
    do: :counters.put(counters, @sealed_slot, if(zero_copy, do: 2, else: 1))

  @doc """
  Unmaps. Removes the mapping's hold; frees a `:reference_counted` region whose count
  reaches zero.
  """
  @spec unmap(Mapping.t()) :: :ok | {:error, Error.t()}
  def unmap(%Mapping{region_id: id, id: mapping_id} = mapping) do
    case Registry.take_mapping(id, mapping_id) do
      nil ->
        Error.error(
          :closed,
          "this mapping of #{id} was already unmapped (or its region was freed)",
          %{region_id: id}
        )

      {_key, _pid, _mode, mapping_ref} ->
        Native.unmap(mapping_ref)
        Security.audit(mapping.security_level, id, :unmap, %{})
        # The policy never changes: only a :reference_counted region (or a mapping made
        # before the struct carried it) needs the look at the registry and the counts.
        if mapping.cleanup_policy in [nil, :reference_counted], do: free_if_unreferenced(id)
        :ok
    end
  end

  @doc """
  Frees `id` if it is `:reference_counted`, was held at least once and nothing holds it
  now. Returns true if it was freed here.
  """
  @spec free_if_unreferenced(String.t()) :: boolean()
  def free_if_unreferenced(id) do
    with {:reference_counted, ref, held_after} <- Registry.policy_ref_and_baseline(id),
         {generation, 0} <- Native.hold_counts(ref),
         true <- held_since?(id, held_after, generation),
         {:ok, _} <- Allocator.free(id, :unreferenced) do
      Stats.event(:unreferenced, %{count: 1}, %{region_id: id})
      true
    else
      _ -> false
    end
  end

  @doc """
  True if a `:reference_counted` region's holder generation moved past its baseline
  (`held_after` of its record). A baseline still `nil` (an adopted worker output whose
  worker held it at adoption) is set now that nothing holds it: the holds before
  adoption never count.
  """
  @spec held_since?(String.t(), non_neg_integer() | nil, non_neg_integer()) :: boolean()
  def held_since?(id, nil, generation) do
    _ = Registry.set_held_after(id, generation)
    false
  end

  def held_since?(_id, held_after, generation), do: generation > held_after

  @doc "Writes `iodata` at `offset`."
  @spec write(Mapping.t(), non_neg_integer(), iodata()) :: :ok | {:error, Error.t()}
  def write(%Mapping{} = mapping, offset, iodata) do
    with {:ok, data} <- to_binary(iodata), do: write_binary(mapping, offset, data)
  rescue
    # Only a forged or corrupted Mapping struct gets here (a NIF refusing a non-mapping).
    ArgumentError -> forged(mapping)
  end

  defp write_binary(mapping, offset, data) do
    result =
      if byte_size(data) > @dirty_threshold,
        do: write_dirty(mapping, offset, data),
        else: Native.write(mapping.ref, offset, data)

    with :ok <- freed(native(result, mapping.region_id), mapping) do
      :counters.add(mapping.counters, 1, 1)
      Stats.count(:bytes_written, byte_size(data))

      Security.audit(mapping.security_level, mapping.region_id, :write, %{
        offset: offset,
        bytes: byte_size(data)
      })
    end
  end

  # Out of bounds (or not an offset at all): one call, which refuses it whole, so that a
  # write is never partly done because of its arguments.
  defp write_dirty(mapping, offset, data) do
    if in_bounds?(mapping, offset, byte_size(data)),
      do: write_slices(mapping.ref, offset, data, 0, slice_size(mapping)),
      else: Native.write_dirty(mapping.ref, offset, data)
  end

  defp in_bounds?(%Mapping{size: size}, offset, length),
    do:
      is_integer(offset) and is_integer(length) and offset >= 0 and is_integer(size) and
        offset + length <= size

  # Slices end on multiples of @slice in the region (so an encrypted region's chunks are
  # never split); the first error ends the write. Sub-binaries: nothing is copied.
  defp write_slices(ref, offset, data, done, slice) when byte_size(data) - done > slice do
    at = offset + done
    length = slice - rem(at, slice)

    case Native.write_dirty(ref, at, binary_part(data, done, length)) do
      :ok -> write_slices(ref, offset, data, done + length, slice)
      error -> error
    end
  end

  defp write_slices(ref, offset, data, done, _slice) do
    Native.write_dirty(ref, offset + done, binary_part(data, done, byte_size(data) - done))
  end

  # A large read in slices (see @slice) into one binary: read_buffer/1 allocates it,
  # read_into/5 fills it slice by slice on a dirty CPU scheduler, read_buffer_take/1 hands
  # it over without a copy.
  defp read_slices(ref, offset, length, slice) when length > slice do
    with {:ok, buffer} <- Native.read_buffer(length),
         :ok <- read_into(ref, offset, buffer, 0, length, slice - rem(offset, slice), slice) do
      Native.read_buffer_take(buffer)
    end
  end

  defp read_slices(ref, offset, length, _slice), do: Native.read_dirty(ref, offset, length)

  defp read_into(ref, offset, buffer, at, length, first, slice) do
    first = min(first, length - at)

    case Native.read_into(ref, offset + at, buffer, at, first) do
      :ok when at + first >= length -> :ok
      :ok -> read_into(ref, offset, buffer, at + first, length, slice, slice)
      error -> error
    end
  end

  defp forged(mapping) do
    Error.error(
      :invalid_argument,
      "not a mapping made by map_region/2: #{inspect(mapping, limit: 5)}"
    )
  end

  defp to_binary(data) when is_binary(data), do: {:ok, data}

  defp to_binary(data) do
    {:ok, IO.iodata_to_binary(data)}
  rescue
    ArgumentError ->
      Error.error(
        :invalid_argument,
        "data must be a binary or iodata, got: #{inspect(data, limit: 5)}"
      )
  end

  @doc """
  Reads `length` bytes at `offset`: a zero-copy binary for an unencrypted region whose
  seal the kernel enforces (memfd), a copy otherwise (POSIX regions, even sealed).
  """
  @spec read(Mapping.t(), non_neg_integer(), non_neg_integer()) ::
          {:ok, binary()} | {:error, Error.t()}
  def read(%Mapping{} = mapping, offset, length) do
    read_checked(mapping, offset, length)
  rescue
    ArgumentError -> forged(mapping)
  end

  defp read_checked(mapping, offset, length) do
    result =
      cond do
        not mapping.encrypted and zero_copy?(mapping.counters) ->
          Native.read_zero_copy(mapping.ref, offset, length)

        length > @dirty_threshold ->
          if in_bounds?(mapping, offset, length),
            do: read_slices(mapping.ref, offset, length, slice_size(mapping)),
            else: Native.read_dirty(mapping.ref, offset, length)

        true ->
          Native.read(mapping.ref, offset, length)
      end

    with {:ok, data} <- freed(native(result, mapping.region_id), mapping) do
      :counters.add(mapping.counters, 1, 1)
      Stats.count(:bytes_read, length)

      Security.audit(mapping.security_level, mapping.region_id, :read, %{
        offset: offset,
        bytes: length
      })

      {:ok, data}
    end
  end

  @doc "Seals a region: its data can no longer change."
  @spec seal(String.t()) :: :ok | {:error, Error.t()}
  def seal(id) do
    with {:ok, record} <- lookup(id),
         region(ref: ref, owner: owner, allowed: allowed, security_level: level) = record,
         :ok <- Security.authorize(id, owner, allowed, self(), :seal),
         :ok <- native(Native.seal(ref), id) do
      mark_sealed(region(record, :counters), Native.info(ref).zero_copy)
      Security.audit(level, id, :seal, %{})
    end
  end

  @doc "The JSON-encodable reference a Python worker attaches with."
  @spec export(String.t(), map()) :: {:ok, map()} | {:error, Error.t()}
  def export(id, opts) do
    with {:ok, record} <- lookup(id),
         region(ref: ref, owner: owner, allowed: allowed, security_level: level) = record,
         :ok <- Security.authorize(id, owner, allowed, self(), :export),
         info = Native.info(ref),
         :ok <- export_allowed(id, level, info),
         {:ok, metadata} <- json_metadata(region(record, :metadata)),
         dtype = opts.dtype || Map.get(metadata, "dtype"),
         shape = opts.shape || Map.get(metadata, "shape"),
         :ok <- Snakepit.SharedMemory.Dtype.check_layout(dtype, shape, info.size, "export_ref/2"),
         {:ok, key} <- key(ref, info, opts.include_key, id) do
      ref_map =
        %{
          "v" => 1,
          "region_id" => id,
          "backend" => Atom.to_string(info.backend),
          "control_path" => info.control_path,
          "data_path" => info.data_path,
          "data_offset" => info.data_offset,
          "size" => info.size,
          "sealed" => info.sealed,
          "encrypted" => info.encrypted,
          "dtype" => dtype,
          "shape" => shape,
          "format" => Map.get(metadata, "format") || if(dtype, do: "numpy", else: "raw"),
          "metadata" => metadata,
          "node" => Atom.to_string(node()),
          "boot_id" => Native.self_info().boot_id
        }
        |> put_key(key)
        |> put_arena(info)

      Security.audit(level, id, :export, %{include_key: opts.include_key})
      {:ok, ref_map}
    end
  end

  # An arena region (docs/FORMAT.md, "Arenas"): its control block sits control_offset
  # bytes into the arena memfd that control_path names (data_offset is absolute there).
  defp put_arena(ref_map, %{arena: true, control_offset: offset}),
    do: Map.put(ref_map, "control_offset", offset)

  defp put_arena(ref_map, _info), do: ref_map

  # :maximum regions are shared with other OS processes only read-only: sealed first.
  defp export_allowed(id, :maximum, %{sealed: false}) do
    Error.error(
      :not_sealed,
      "region #{id} has security_level :maximum, which is shared with other processes " <>
        "only read-only: call seal/1 before export_ref/2",
      %{region_id: id}
    )
  end

  defp export_allowed(_id, _level, _info), do: :ok

  defp json_metadata(metadata) do
    with {:ok, json} <- JSON.encode(metadata), do: JSON.decode(json)
  end

  defp key(_ref, _info, false, _id), do: {:ok, nil}

  defp key(_ref, %{encrypted: false}, true, id) do
    Error.error(
      :invalid_option,
      "include_key: true, but region #{id} is not encrypted (security_level :standard) " <>
        "and has no key",
      %{region_id: id}
    )
  end

  defp key(ref, _info, true, id) do
    with {:ok, key} <- native(Native.export_key(ref), id), do: {:ok, Base.encode64(key)}
  end

  defp put_key(map, nil), do: map
  defp put_key(map, key), do: Map.put(map, "key", key)

  @doc "The record of a registered region, or a `:not_found` error."
  @spec lookup(term()) :: {:ok, Registry.region_record()} | {:error, Error.t()}
  def lookup(id) when is_binary(id) do
    case Registry.lookup(id) do
      nil -> not_found(id)
      record -> {:ok, record}
    end
  end

  def lookup(id),
    do: Error.error(:invalid_argument, "a region id is a string, got: #{inspect(id)}")

  defp not_found(id) do
    Error.error(
      :not_found,
      "no region #{inspect(id)} is registered (never allocated, or already freed)",
      %{region_id: id}
    )
  end

  defp freed({:error, _} = error, mapping),
    do: Snakepit.SharedMemory.Freed.explain(error, mapping.region_id, mapping.counters)

  defp freed(result, _mapping), do: result

  @doc false
  def native(:ok, _id), do: :ok
  def native({:ok, value}, _id), do: {:ok, value}
  def native({:error, native}, id), do: {:error, Error.from_native(native, %{region_id: id})}
end
