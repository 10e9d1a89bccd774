defmodule Snakepit.SharedMemory.Cluster.Fetch do
  @moduledoc """
  Copying a region of another node into a local one, over distributed Erlang.

  Three processes take part:

    * the **caller** of `Snakepit.SharedMemory.fetch/2` waits for the result;
    * a **receiver** it spawns (and monitors) on its own node: it allocates (or, with
      `:into`, writes into) the local region, receives the chunks, checks and writes
      them, acknowledges each one, and frees the partial region on any failure. It
      monitors the caller: a caller that dies mid-transfer gets its partial region
      freed and the transfer stopped, and one that dies after the transfer but before it
      read the result gets the new copy freed (nobody else knows its id);
    * a **sender** spawned (and monitored) on the region's node with
      `:erlang.spawn_monitor/4`: it checks the requester may read the region, maps it
      read-only, and streams it chunk by chunk with `read/3`, never the whole region.

  ## Back-pressure

  The sender starts with `:window` credits and spends one per chunk sent; each
  acknowledgement (sent by the receiver after the chunk is written) gives one back. So at
  most `window` chunks exist at any time between the two VMs: in the sender's heap, the
  distribution buffers, the receiver's mailbox. Both processes collect their garbage after
  each chunk, so a chunk's binary is released as soon as it is sent or written. A 4 GiB
  fetch with the defaults (4 MiB chunks, a window of 4) holds about 16 MiB in flight.

  ## Failures

  A node that goes down (`:noconnection` from the monitor) ends the transfer with
  `%Error{reason: :nodedown}` on the receiving side, after the partial region is freed;
  a receiving node that goes down makes the sender unmap and stop (it created nothing).
  A chunk that fails its CRC, a length or index that does not follow, or a final digest
  that differs gives `:corrupt`; an encrypted chunk that fails authentication gives
  `:tampered`; silence longer than `:chunk_timeout` gives `:timeout`.
  """

  require Logger
  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Access, Allocator, Error, Mapping, Native, Registry, Security}
  alias Snakepit.SharedMemory.{Stats}
  alias Snakepit.SharedMemory.Cluster.Wire

  import Snakepit.SharedMemory.Registry, only: [region: 1, region: 2]

  @levels %{standard: 0, high: 1, maximum: 2}

  @doc false
  # Runs in the caller. `opts` are validated (Snakepit.SharedMemory.Cluster).
  @spec run(String.t(), node(), map()) :: {:ok, String.t()} | {:error, Error.t()}
  def run(id, node, opts) do
    caller = self()
    tag = :crypto.strong_rand_bytes(16)

    with {:ok, into} <- map_into(opts.into) do
      {pid, mref} = spawn_monitor(fn -> receiver(caller, tag, id, node, opts, into) end)

      try do
        wait(pid, mref, tag, nil)
      after
        if into, do: SharedMemory.unmap_region(into)
      end
    end
  end

  defp map_into(nil), do: {:ok, nil}
  defp map_into(id), do: SharedMemory.map_region(id, access_mode: :read_write)

  defp wait(pid, mref, tag, local_id) do
    receive do
      {^tag, :allocated, new_id} ->
        wait(pid, mref, tag, new_id)

      {^tag, :result, result} ->
        # The copy is ours now: the receiver frees it if we die before this.
        send(pid, {tag, :taken})
        Process.demonitor(mref, [:flush])
        result

      {:DOWN, ^mref, :process, ^pid, reason} ->
        # The receiver frees its partial region itself; if it was killed, we do.
        if local_id, do: Allocator.free(local_id, :fetch_aborted)

        Error.error(
          :io_error,
          "the fetch of this region stopped: its receiving process exited with " <>
            inspect(reason),
          %{reason: reason}
        )
    end
  end

  # ---- receiver (local) ----

  defp receiver(caller, tag, id, node, opts, into) do
    caller_ref = Process.monitor(caller)
    {public, private} = Wire.keypair()

    args = [
      self(),
      caller,
      tag,
      id,
      public,
      Map.take(opts, [:chunk_size, :window, :chunk_timeout, :encrypt, :checksum])
    ]

    {sender, sender_ref} = :erlang.spawn_monitor(node, __MODULE__, :sender, args)

    state = %{
      caller: caller,
      caller_ref: caller_ref,
      sender: sender,
      sender_ref: sender_ref,
      tag: tag,
      id: id,
      node: node,
      opts: opts,
      into: into,
      local_id: nil,
      mapping: into,
      private: private,
      started: System.monotonic_time()
    }

    result =
      receive do
        {^tag, :hello, info} -> transfer(state, info)
        {^tag, :refused, error} -> {:error, error}
        {:DOWN, ^sender_ref, :process, _, reason} -> sender_down(state, reason, 0)
        {:DOWN, ^caller_ref, :process, _, _} -> exit(:normal)
      after
        opts.chunk_timeout -> timeout(state, 0)
      end

    Stats.telemetry(
      [:snakepit_shm, :fetch, :stop],
      %{duration: System.monotonic_time() - state.started},
      %{region_id: id, node: node, result: result_reason(result)}
    )

    send(caller, {tag, :result, result})
    if into == nil, do: hand_over(tag, caller_ref, result)
  end

  # A new copy is the caller's once it has read the result. A caller that dies before
  # (a Task shut down at that instant) never learns its id: with cleanup_policy :manual,
  # or another :owner in :region, the copy would stay allocated for good.
  defp hand_over(tag, caller_ref, {:ok, local_id}) do
    receive do
      {^tag, :taken} -> :ok
      {:DOWN, ^caller_ref, :process, _, _} -> Allocator.free(local_id, :fetch_aborted)
    end
  end

  defp hand_over(_tag, _caller_ref, _error), do: :ok

  defp result_reason({:ok, _}), do: :ok
  defp result_reason({:error, %Error{reason: reason}}), do: reason

  defp transfer(state, info) do
    with {:ok, level} <- destination_level(state, info),
         {:ok, state} <- target(state, info, level) do
      session = %{key: session_key(state, info), region_id: state.id}
      send(state.sender, {state.tag, :go})

      digest = Wire.digest_init(state.opts.checksum)
      chunks = chunk_count(info.size, state.opts.chunk_size)

      case receive_chunks(state, info, session, digest, 0, chunks) do
        :ok -> finish(state, info)
        {:error, _} = error -> abort(state, error)
      end
    end
  end

  defp session_key(_state, %{public: nil}), do: nil

  defp session_key(state, %{public: public}),
    do: Wire.transfer_key(state.private, public, state.tag)

  defp destination_level(state, info) do
    level = state.opts.security_level || info.security_level

    if @levels[level] < @levels[info.security_level] do
      Error.error(
        :permission_denied,
        "region #{state.id} has security_level #{inspect(info.security_level)}: its copy " <>
          "cannot be #{inspect(level)}; fetch it with security_level: " <>
          "#{inspect(info.security_level)} or higher",
        %{region_id: state.id}
      )
    else
      {:ok, level}
    end
  end

  defp target(%{into: %Mapping{} = into} = state, info, _level) do
    cond do
      @levels[into.security_level] < @levels[info.security_level] ->
        Error.error(
          :permission_denied,
          "region #{state.id} has security_level #{inspect(info.security_level)}: it " <>
            "cannot be written into #{into.region_id}, which is " <>
            "#{inspect(into.security_level)}; fetch it into a region of that level or higher",
          %{region_id: state.id, into: into.region_id}
        )

      into.size < info.size ->
        Error.error(
          :invalid_size,
          "region #{into.region_id} (#{Error.format_bytes(into.size)}) is smaller than " <>
            "#{state.id} (#{Error.format_bytes(info.size)}): fetch into a region at least " <>
            "that large",
          %{region_id: into.region_id, size: info.size}
        )

      true ->
        {:ok, state}
    end
  end

  defp target(state, info, level) do
    opts =
      state.opts.region
      |> Map.put_new(:owner, state.caller)
      |> Map.put_new(:metadata, info.metadata)
      |> Map.put(:security_level, level)
      # A restricted region must still be writable by this process.
      |> Map.update(:allowed_processes, [], fn
        [] -> []
        pids -> [self() | pids]
      end)

    with {:ok, local_id} <- SharedMemory.allocate_region(info.size, opts) do
      send(state.caller, {state.tag, :allocated, local_id})
      state = %{state | local_id: local_id}

      case SharedMemory.map_region(local_id, access_mode: :read_write) do
        {:ok, mapping} -> {:ok, %{state | mapping: mapping}}
        {:error, _} = error -> abort(state, error)
      end
    end
  end

  defp receive_chunks(state, info, session, digest, index, chunks) do
    %{tag: tag, sender_ref: sender_ref, caller_ref: caller_ref, opts: opts} = state

    receive do
      {^tag, :chunk, ^index, payload, crc} ->
        offset = index * opts.chunk_size
        expected = min(opts.chunk_size, info.size - offset)

        with :ok <- check_crc(state, index, payload, crc),
             {:ok, plain} <- open(state, session, index, payload),
             :ok <- check_length(state, index, plain, expected),
             :ok <- SharedMemory.write(state.mapping, offset, plain) do
          send(state.sender, {tag, :ack, index})
          digest = Wire.digest_update(digest, plain)
          progress(state, info, offset + expected)
          :erlang.garbage_collect()
          receive_chunks(state, info, session, digest, index + 1, chunks)
        end

      {^tag, :chunk, other, _payload, _crc} ->
        corrupt(state, "chunk #{other} arrived where chunk #{index} was expected")

      {^tag, :done, sent_chunks, sender_digest} ->
        cond do
          sent_chunks != chunks or index != chunks ->
            corrupt(state, "the sender sent #{sent_chunks} chunks, #{index} arrived")

          sender_digest != Wire.digest_final(digest) ->
            corrupt(state, "the #{opts.checksum} digest of the whole region differs")

          true ->
            :ok
        end

      {^tag, :failed, error} ->
        {:error, error}

      {:DOWN, ^sender_ref, :process, _, reason} ->
        sender_down(state, reason, index)

      {:DOWN, ^caller_ref, :process, _, _} ->
        abort(state, :caller_down)
        exit(:normal)
    after
      opts.chunk_timeout -> timeout(state, index)
    end
  end

  defp check_crc(state, index, payload, crc) do
    if :erlang.crc32(payload) == crc,
      do: :ok,
      else: corrupt(state, "chunk #{index} failed its CRC-32 check")
  end

  defp open(state, session, index, payload) do
    case Wire.open(session, index, payload) do
      {:ok, plain} ->
        {:ok, plain}

      :error ->
        Error.error(
          :tampered,
          "chunk #{index} of #{state.id} failed authentication in transit: the data was " <>
            "modified on the way (or by a node that is not the sender)",
          %{region_id: state.id, chunk: index}
        )
    end
  end

  defp check_length(_state, _index, plain, expected) when byte_size(plain) == expected, do: :ok

  defp check_length(state, index, plain, expected),
    do: corrupt(state, "chunk #{index} has #{byte_size(plain)} bytes, expected #{expected}")

  defp progress(state, info, done) do
    measurements = %{bytes: done, total: info.size}
    metadata = %{region_id: state.id, node: state.node, local_region_id: local_id(state)}
    Stats.telemetry([:snakepit_shm, :fetch, :progress], measurements, metadata)

    case state.opts.progress do
      nil -> :ok
      pid -> send(pid, {:snakepit_shm_fetch_progress, state.id, done, info.size})
    end
  end

  defp local_id(%{local_id: nil, into: %Mapping{region_id: id}}), do: id
  defp local_id(%{local_id: id}), do: id

  defp finish(state, info) do
    if state.local_id do
      :ok = SharedMemory.unmap_region(state.mapping)

      # A sealed source gives a sealed copy (a :maximum region is shared read-only).
      with :ok <- if(info.sealed, do: SharedMemory.seal(state.local_id), else: :ok) do
        {:ok, state.local_id}
      else
        {:error, _} = error -> abort(%{state | mapping: nil}, error)
      end
    else
      {:ok, state.into.region_id}
    end
  end

  # Frees the partial region (never a region given with :into: it is the caller's).
  defp abort(state, result) do
    if state.local_id do
      if state.mapping, do: SharedMemory.unmap_region(state.mapping)
      Allocator.free(state.local_id, :fetch_aborted)
    end

    result
  end

  defp sender_down(state, :noconnection, index) do
    Error.error(
      :nodedown,
      "node #{state.node} went down while #{state.id} was being fetched " <>
        "(#{index} chunk(s) received); the partial copy was freed: fetch it again from " <>
        "a node that holds it",
      %{region_id: state.id, node: state.node}
    )
  end

  defp sender_down(state, :noproc, _index) do
    Error.error(
      :nodedown,
      "node #{state.node} cannot be reached to fetch #{state.id}: check that it runs and " <>
        "is connected (Node.list/0)",
      %{region_id: state.id, node: state.node}
    )
  end

  # Spawned on a node that does not have this module (no :snakepit_shm there at all).
  defp sender_down(state, {:undef, [{__MODULE__, :sender, _, _} | _]}, _index) do
    Error.error(
      :unavailable,
      "node #{state.node} does not run :snakepit_shm (its code is not loaded there), so " <>
        "#{state.id} cannot be fetched from it: fetch from a node of the cluster that runs it",
      %{region_id: state.id, node: state.node}
    )
  end

  defp sender_down(state, reason, index) do
    Error.error(
      :io_error,
      "the sender of #{state.id} on #{state.node} stopped after #{index} chunk(s): " <>
        inspect(reason, limit: 5) <> " (is :snakepit_shm of the same version there?)",
      %{region_id: state.id, node: state.node, reason: reason}
    )
  end

  defp timeout(state, index) do
    Error.error(
      :timeout,
      "no chunk of #{state.id} from #{state.node} for #{state.opts.chunk_timeout} ms " <>
        "(#{index} received): the transfer was abandoned; raise :chunk_timeout for a " <>
        "slow link",
      %{region_id: state.id, node: state.node}
    )
  end

  defp corrupt(state, what) do
    Error.error(
      :corrupt,
      "fetch of #{state.id} from #{state.node}: #{what}; the copy was discarded",
      %{region_id: state.id, node: state.node}
    )
  end

  defp chunk_count(size, chunk), do: div(size + chunk - 1, chunk)

  # ---- sender (on the region's node) ----

  @doc false
  # Spawned on the region's node by the receiver with :erlang.spawn_monitor/4.
  def sender(receiver, requester, tag, id, peer_public, opts) do
    receiver_ref = Process.monitor(receiver)

    case open_source(id, requester) do
      {:ok, mapping, info} ->
        {public, key} = sender_key(info.encrypted or opts.encrypt, peer_public, tag)
        send(receiver, {tag, :hello, Map.put(info, :public, public)})
        session = %{key: key, region_id: id}

        state = %{
          receiver: receiver,
          receiver_ref: receiver_ref,
          tag: tag,
          mapping: mapping,
          size: info.size,
          opts: opts,
          session: session
        }

        try do
          receive do
            {^tag, :go} -> stream(state, 0, opts.window, Wire.digest_init(opts.checksum))
            {:DOWN, ^receiver_ref, :process, _, _} -> :ok
          after
            opts.chunk_timeout -> :ok
          end
        after
          Access.unmap(mapping)
        end

      {:error, error} ->
        send(receiver, {tag, :refused, error})
    end
  end

  defp sender_key(false, _peer_public, _tag), do: {nil, nil}

  defp sender_key(true, peer_public, tag) do
    {public, private} = Wire.keypair()
    {public, Wire.transfer_key(private, peer_public, tag)}
  end

  defp stream(%{size: size, opts: %{chunk_size: chunk}} = state, index, _credits, digest)
       when index * chunk >= size do
    send(state.receiver, {state.tag, :done, index, Wire.digest_final(digest)})
  end

  defp stream(state, index, 0, digest) do
    %{tag: tag, receiver_ref: ref} = state

    receive do
      {^tag, :ack, _index} -> stream(state, index, 1, digest)
      {:DOWN, ^ref, :process, _, _} -> :ok
    after
      state.opts.chunk_timeout -> :ok
    end
  end

  defp stream(state, index, credits, digest) do
    %{tag: tag, receiver_ref: ref, opts: %{chunk_size: chunk}} = state

    receive do
      {^tag, :ack, _index} -> stream(state, index, credits + 1, digest)
      {:DOWN, ^ref, :process, _, _} -> :ok
    after
      0 ->
        offset = index * chunk
        length = min(chunk, state.size - offset)

        case Access.read(state.mapping, offset, length) do
          {:ok, plain} ->
            payload = Wire.seal(state.session, index, plain)
            send(state.receiver, {tag, :chunk, index, payload, :erlang.crc32(payload)})
            digest = Wire.digest_update(digest, plain)
            # The chunk's binaries go now, not at some later collection of a small heap.
            :erlang.garbage_collect()
            stream(state, index + 1, credits - 1, digest)

          {:error, error} ->
            send(state.receiver, {tag, :failed, error})
        end
    end
  end

  # Checks that `requester` (the caller of fetch/2 on the other node) may read the
  # region, and maps it read-only for this process.
  defp open_source(id, requester) do
    with :ok <- running(id),
         {:ok, record} <- Access.lookup(id),
         region(owner: owner, allowed: allowed, security_level: level) = record,
         :ok <- Security.authorize(id, owner, allowed, requester, :fetch),
         :ok <- sealed_if_maximum(id, record),
         {:ok, mapping} <- map_read_only(id, record) do
      info = %{
        size: region(record, :size),
        security_level: level,
        encrypted: Security.level_flags(level).encrypted,
        sealed: Native.info(region(record, :ref)).sealed,
        metadata: region(record, :metadata)
      }

      Security.audit(level, id, :fetch, %{requester: requester})
      {:ok, mapping, info}
    end
  end

  # The code is loaded but the application is stopped (or not started yet): its tables
  # are gone, and the lookup would answer :not_found, "never allocated, or already
  # freed", for a region that may well be there once the application runs again.
  defp running(id) do
    if Registry.available?(),
      do: :ok,
      else:
        Error.error(
          :unavailable,
          "node #{node()} does not run :snakepit_shm (the application is not started " <>
            "there), so #{id} cannot be fetched from it: start it there " <>
            "(Application.ensure_all_started(:snakepit_shm)) or fetch from another node",
          %{region_id: id, node: node()}
        )
  end

  # :maximum regions leave their VM only read-only, like export_ref/2.
  defp sealed_if_maximum(id, record) do
    if region(record, :security_level) == :maximum and
         not Native.info(region(record, :ref)).sealed do
      Error.error(
        :not_sealed,
        "region #{id} has security_level :maximum, which leaves its VM only read-only: " <>
          "call seal/1 on it before fetching it",
        %{region_id: id}
      )
    else
      :ok
    end
  end

  # As Access.map/2, but the authorisation was done for the requester above (this
  # process is not in an allow-list), and without a hold: the sender is no holder, and
  # its unmap at the end must not free a :reference_counted region nobody else held.
  defp map_read_only(id, record) do
    Registry.register_caller()

    with {:ok, mapping_ref} <-
           Access.native(Native.map(region(record, :ref), :read_only_unheld), id) do
      mapping_id = make_ref()
      Registry.put_mapping(id, mapping_id, self(), :read_only, mapping_ref)

      if Registry.member?(id) do
        {:ok, Access.mapping(record, mapping_id, :read_only, mapping_ref, :manual)}
      else
        if Registry.take_mapping(id, mapping_id), do: Native.unmap(mapping_ref)

        Error.error(:not_found, "region #{id} was freed while it was being opened", %{
          region_id: id
        })
      end
    end
  end
end
