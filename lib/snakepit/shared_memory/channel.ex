defmodule Snakepit.SharedMemory.Channel do
  @moduledoc """
  A bidirectional, ordered, message-oriented channel between one Elixir process (the
  owner) and one OS process (the worker), over shared memory, in the shape of `:gen_tcp`.

      {:ok, ch} = Channel.open(active: true)
      ref = Channel.export_ref(ch)             # a small JSON-encodable map for the worker
      # ... start the worker with the ref; in Python:
      #     with snakepit_shm.Channel.connect(ref) as ch: ch.send(ch.recv())
      :ok = Channel.send(ch, "hello")
      receive do
        {:snakepit_shm_channel, ^ch, reply} -> reply
        {:snakepit_shm_channel_closed, ^ch, reason} -> {:closed, reason}
      end

  ## How it works (docs/CHANNEL.md)

  Two single-producer/single-consumer rings (owner → worker, worker → owner) live in one
  memfd whose size is sealed. A message is a frame (length + type) copied into the ring;
  a message larger than `:inline_threshold` (default a quarter of the ring) travels as a
  *region message*: the channel copies it into a fresh memfd sealed against writes and
  passes the fd, and the receiver maps it read-only above 1 MiB — a zero-copy binary on
  the Elixir side, a `memoryview` in Python — and copies it up to 1 MiB (a mapping kept
  per message would count against `vm.max_map_count`). So `send/2` of 1 GiB works.

  Wake-ups need no polling and no thread: a consumer about to sleep sets a waiting flag
  in the ring, and the producer rings the consumer's eventfd doorbell only then. On the
  Elixir side `enif_select` turns the doorbell into a message for the channel's process,
  which delivers `{:snakepit_shm_channel, ch, binary}` to the owner (active mode) or
  answers `recv/2` (passive mode). A busy stream makes no system call per message.

  The control connection is a Unix socket (mode 0600 in a private 0700 directory): the
  worker connects with the ref's token and receives the memfd and eventfds by
  `SCM_RIGHTS`; the socket file is removed once the worker is in. The peer's death is EOF
  on it, seen within milliseconds. With `transport: :socket` — or automatically when a
  memfd cannot be created — messages travel over that socket with the same framing and
  the same API; `stats/1` says which transport is active and counts fallbacks.

  ## Semantics

    * `send/2` blocks while the ring is full, up to `:send_timeout` (default
      `:infinity`); with `send_timeout: 0` it returns `{:error, %Error{reason:
      :would_block}}` at once. Nothing is dropped silently.
    * A closed or dead peer gives `{:error, %Error{reason: :peer_closed}}` (after every
      message it sent before has been received) and, in active mode, the message
      `{:snakepit_shm_channel_closed, ch, :peer_closed}`.
    * A peer that breaks the protocol (a malformed frame, an index out of bounds, an
      unsealed region fd) closes the channel with `:protocol_error`; nothing outside the
      ring is ever read.
    * The owner's death closes the channel and frees its memory; the worker sees EOF.
    * `active: true | :once | n | false` as in `:inet.setopts/2`; with an integer, the
      owner gets `{:snakepit_shm_channel_passive, ch}` when the count reaches zero.

  Telemetry: `[:snakepit_shm, :channel, :open | :connected | :closed]` (metadata `%{id:,
  transport:, reason:}`), emitted if `:telemetry` is loaded.
  """

  import Bitwise, only: [<<<: 2]

  alias Snakepit.SharedMemory.{Error, MemoryLimits, Native}
  alias Snakepit.SharedMemory.Channel.Server

  @enforce_keys [:id, :resource, :server, :inline_max, :send_timeout]
  defstruct [:id, :resource, :server, :inline_max, :send_timeout]

  @typedoc "An open channel (the same value arrives in every message about it)."
  @type t :: %__MODULE__{
          id: String.t(),
          resource: reference(),
          server: pid(),
          inline_max: non_neg_integer(),
          send_timeout: :atomics.atomics_ref()
        }

  @type active :: boolean() | :once | integer()

  @type option ::
          {:active, active()}
          | {:ring_size, pos_integer()}
          | {:inline_threshold, pos_integer()}
          | {:transport, :auto | :shm | :socket}
          | {:ack_mode, :immediate | :batch | :deferred}
          | {:max_batch_size, pos_integer()}
          | {:flush_interval, non_neg_integer()}
          | {:send_timeout, timeout()}
          | {:max_message_size, pos_integer()}
          | {:socket_dir, Path.t()}
          | {:owner, pid()}
          | {:spin, non_neg_integer()}

  # The largest :send_timeout (it is kept in a signed 64-bit atomic): 292 million years.
  @max_timeout (1 <<< 63) - 1

  @defaults [
    active: false,
    ring_size: 65_536,
    inline_threshold: nil,
    transport: :auto,
    ack_mode: :batch,
    max_batch_size: 32,
    flush_interval: 5,
    send_timeout: :infinity,
    max_message_size: 1 <<< 40,
    socket_dir: nil,
    owner: nil,
    spin: 0,
    # tests only: behave as if memfd_create were refused (a seccomp filter, an old kernel)
    simulate_memfd_failure: false
  ]

  @doc """
  Opens a channel owned by the calling process (or `:owner`).

  Options:

    * `:active` - `false` (default, use `recv/2`), `true`, `:once` or an integer.
    * `:ring_size` - bytes of each ring: a multiple of 4096 from 4 KiB to 16 MiB; default
      64 KiB. See docs/CHANNEL.md for sizes by message rate.
    * `:inline_threshold` - messages above it travel as region messages; at least 1,
      default and maximum a quarter of the ring.
    * `:transport` - `:auto` (default: shared memory, the socket if a memfd cannot be
      created), `:shm` (fail instead of falling back) or `:socket`.
    * `:ack_mode` - `:batch` (default: the read index is published every
      `:max_batch_size` messages (32) or `:flush_interval` ms (5)), `:immediate` (after
      every message) or `:deferred` (when half the ring is consumed). The read index is
      always published before sleeping and whenever the producer waits for space.
    * `:send_timeout` - how long `send/2` waits for ring space, in ms; `0` never waits;
      default `:infinity`.
    * `:max_message_size` - largest region message accepted from the worker; default 1 TiB.
    * `:socket_dir` - where the private socket directory is made (a relative path is
      taken from the VM's working directory); default
      `$XDG_RUNTIME_DIR`, `$TMPDIR` or `/tmp`.
    * `:spin` - in active mode, after the last message taken, the channel's process
      looks at the ring again for up to this many microseconds (between the other
      processes' turns) before it announces that it sleeps, so that a quick answer costs
      the worker no doorbell and the BEAM no wake-up; only while the machine has a CPU to
      spare (as the Python worker's `spin`). Default 0 (never spins): see docs/CHANNEL.md.
  """
  @spec open([option()] | map()) :: {:ok, t()} | {:error, Error.t()}
  def open(opts \\ [])

  def open(opts) when is_list(opts) or (is_map(opts) and not is_struct(opts)) do
    with {:ok, opts} <- validate(opts),
         :ok <- ring_headroom(opts) do
      owner = opts[:owner] || self()
      Server.start(owner, opts)
    end
  end

  def open(other) do
    Error.error(
      :invalid_option,
      "channel options must be a keyword list or a map, got: #{inspect(other, limit: 12)}"
    )
  end

  @doc """
  The ref a worker needs to connect (`snakepit_shm.Channel.connect(ref)`): a map of
  strings and integers that encodes as JSON as it is. Holds a secret token: hand it to
  the worker only (environment, argv of a process of your uid, or a pipe).
  """
  @spec export_ref(t()) :: map()
  def export_ref(%__MODULE__{resource: res, id: id}) do
    info = Native.channel_info(res)

    %{
      "v" => 1,
      "kind" => "snakepit_shm_channel",
      "id" => id,
      "path" => info.path,
      "token" => info.token,
      "transport" => Atom.to_string(info.transport),
      "ring_size" => info.ring_size,
      "inline_max" => info.inline_max
    }
  end

  @doc """
  Sends one message (any iodata). Returns once the message is in the ring (or, for a
  region message, once its memfd is handed over): the worker owns it from then on.
  Blocks while the ring is full up to `:send_timeout`. Any process may send.
  """
  @spec send(t(), iodata()) :: :ok | {:error, Error.t()}
  def send(%__MODULE__{} = ch, data) do
    bin = IO.iodata_to_binary(data)

    if byte_size(bin) <= ch.inline_max do
      send_loop(ch, fn -> Native.channel_send(ch.resource, bin) end, byte_size(bin), deadline(ch))
    else
      # The copy into the message's memfd is charged to this VM's memory cgroup: past
      # its limit the kernel OOM-kills the VM, so it is refused first, as an allocation.
      with :ok <- memory_headroom(ch, byte_size(bin)) do
        send_region(ch, bin)
      end
    end
  end

  # The rings (a header page and two rings, up to 32 MiB) are charged to the memory
  # cgroup too.
  defp ring_headroom(opts) do
    if opts[:transport] == :socket do
      :ok
    else
      size = 4096 + 2 * opts[:ring_size]

      case MemoryLimits.check(size) do
        :ok ->
          :ok

        {:error, message} ->
          Error.error(
            :no_space,
            "cannot open the channel: its rings (#{size} bytes of memory): #{message}; or " <>
              "open it with a smaller :ring_size or transport: :socket",
            %{size: size}
          )
      end
    end
  end

  defp memory_headroom(ch, size) do
    case MemoryLimits.check(size) do
      :ok ->
        :ok

      {:error, message} ->
        Error.error(
          :no_space,
          "cannot send the #{size}-byte message on channel #{ch.id} as a region message " <>
            "(a message above the inline threshold is copied into a memfd, charged to this " <>
            "VM's memory): #{message}; or send smaller messages",
          %{channel: ch.id, size: size}
        )
    end
  end

  defp send_region(ch, bin) do
    case Native.channel_prepare_region(bin) do
      {:ok, prepared} ->
        send_loop(
          ch,
          fn -> Native.channel_send_region(ch.resource, prepared) end,
          16,
          deadline(ch)
        )

      {:error, native} ->
        {:error, native_error(native, %{channel: ch.id})}
    end
  end

  @doc """
  Receives one message in passive mode, waiting up to `timeout` ms (default
  `:infinity`; a timeout above 2^40 ms, 34 years, waits as `:infinity` does).
  `{:error, %Error{reason: :timeout}}` when none came;
  `{:error, %Error{reason: :active_mode}}` in active mode, also for a call still waiting
  when `setopts/2` turns active mode on;
  `{:error, %Error{reason: :peer_closed | :closed | :protocol_error}}` once the channel is
  closed and every message before the close has been received.
  """
  @spec recv(t(), timeout()) :: {:ok, binary()} | {:error, Error.t()}
  def recv(%__MODULE__{} = ch, timeout \\ :infinity)
      when timeout == :infinity or (is_integer(timeout) and timeout >= 0) do
    call(ch, {:recv, timeout})
  end

  @doc """
  Sets `:active` (`true | false | :once | integer`) or `:send_timeout`. With an integer,
  the count is added to the current one (as `:inet.setopts/2` does).
  """
  @spec setopts(t(), keyword()) :: :ok | {:error, Error.t()}
  def setopts(%__MODULE__{} = ch, opts) when is_list(opts) do
    Enum.reduce_while(opts, :ok, fn
      {:active, a}, :ok when is_boolean(a) or a == :once or is_integer(a) ->
        {:cont, call(ch, {:active, a})}

      {:send_timeout, t}, :ok when t == :infinity or (is_integer(t) and t in 0..@max_timeout) ->
        :atomics.put(ch.send_timeout, 1, encode_timeout(t))
        {:cont, :ok}

      other, :ok ->
        {:halt, Error.error(:invalid_option, "unsupported channel option #{inspect(other)}")}
    end)
  end

  @doc "Closes the channel: the worker sees EOF, the memory is freed. Idempotent."
  @spec close(t()) :: :ok
  def close(%__MODULE__{} = ch) do
    case call(ch, :close) do
      {:error, _} -> Native.channel_close(ch.resource)
      :ok -> :ok
    end

    :ok
  end

  @doc """
  Makes `pid` (a local process) the owner: it receives the active-mode messages from now
  on, and its death closes the channel. Only the current owner may call it.

  As `:gen_tcp.controlling_process/2` does, the messages about `ch` already in the
  caller's mailbox (`{:snakepit_shm_channel, ch, _}`, `{:snakepit_shm_channel_passive,
  ch}`, `{:snakepit_shm_channel_closed, ch, _}`) are moved to `pid`, before any later
  one and in their order: the channel is switched to `active: false` meanwhile and its
  active mode restored after.
  """
  @spec controlling_process(t(), pid()) :: :ok | {:error, Error.t()}
  def controlling_process(%__MODULE__{} = ch, pid) when is_pid(pid) do
    if node(pid) == node() do
      hand_over(ch, pid)
    else
      Error.error(:invalid_argument, "the new owner #{inspect(pid)} must be a local process")
    end
  end

  # Messages delivered to the old owner used to stay in its mailbox: a worker's first
  # message, sent while the process that opened the channel handed it over, was lost.
  defp hand_over(ch, pid) when pid == self(), do: call(ch, {:controlling_process, pid, pid})

  defp hand_over(ch, pid) do
    with {:ok, active} <- call(ch, {:hand_over_begin, self(), pid}) do
      case call(ch, {:controlling_process, self(), pid}) do
        :ok ->
          move_messages(ch, pid)
          restore_active(ch, active)

        {:error, _} = error ->
          restore_active(ch, active)
          error
      end
    end
  end

  defp move_messages(ch, pid) do
    receive do
      {:snakepit_shm_channel, ^ch, _} = m -> forward(m, ch, pid)
      {:snakepit_shm_channel_passive, ^ch} = m -> forward(m, ch, pid)
      {:snakepit_shm_channel_closed, ^ch, _} = m -> forward(m, ch, pid)
    after
      0 -> :ok
    end
  end

  defp forward(message, ch, pid) do
    Kernel.send(pid, message)
    move_messages(ch, pid)
  end

  defp restore_active(_ch, false), do: :ok

  defp restore_active(ch, active) do
    case call(ch, {:active, active}) do
      :ok -> :ok
      # closed meanwhile: the hand-over itself was done
      {:error, _} -> :ok
    end
  end

  @doc """
  Counters and state of the channel: `transport` (`:shm | :socket`), `state`
  (`:listening | :connected | :closed`), `close_reason`, messages and bytes each way,
  region messages, `doorbells_rung`, `wakeups`, `flushes` (acks published),
  `pending_acks`, `would_blocks`, `fallbacks` and `fallback_reason`, ring occupancy
  (`out_occupancy`, `in_occupancy`), `ring_size`, `inline_max`, `peer_pid`, `active`,
  `owner`.
  """
  @spec stats(t()) :: map()
  def stats(%__MODULE__{} = ch) do
    base = Native.channel_stats(ch.resource) |> Map.put(:id, ch.id)

    case call(ch, :owner_info) do
      {:ok, extra} -> Map.merge(base, extra)
      {:error, _} -> base
    end
  end

  @doc "Every open channel of this VM as `{channel, stats}` (for the mix tasks)."
  @spec list() :: [{t(), map()}]
  def list do
    Server.all() |> Enum.map(fn ch -> {ch, stats(ch)} end)
  end

  @doc "The ring layout as the C++ core computes it (JSON): the test oracle of docs/CHANNEL.md."
  @spec layout() :: map()
  def layout do
    {:ok, map} = Snakepit.SharedMemory.JSON.decode(Native.channel_layout())
    map
  end

  # ---- internals ----

  defp call(%__MODULE__{server: server, id: id}, msg) do
    GenServer.call(server, msg, :infinity)
  catch
    :exit, _ -> Error.error(:closed, "channel #{id} is closed", %{channel: id})
  end

  defp deadline(ch) do
    case :atomics.get(ch.send_timeout, 1) do
      -1 -> :infinity
      ms -> System.monotonic_time(:millisecond) + ms
    end
  end

  @doc false
  def encode_timeout(:infinity), do: -1
  def encode_timeout(ms), do: ms

  defp send_loop(ch, attempt, need, deadline) do
    case attempt.() do
      :ok ->
        :ok

      :would_block ->
        remaining =
          case deadline do
            :infinity -> :infinity
            d -> max(d - System.monotonic_time(:millisecond), 0)
          end

        if remaining == 0 do
          Error.error(
            :would_block,
            "the channel's ring is full (the worker does not read fast enough): retry, " <>
              "raise :send_timeout or :ring_size",
            %{channel: ch.id}
          )
        else
          case call(ch, {:await_space, need, remaining}) do
            :retry -> send_loop(ch, attempt, need, deadline)
            {:error, _} = error -> error
          end
        end

      {:closed, :io_error} ->
        closed_error(ch.id, :io_error, Native.channel_stats(ch.resource).close_detail)

      {:closed, reason} ->
        closed_error(ch.id, reason)

      {:error, native} ->
        {:error, native_error(native, %{channel: ch.id})}
    end
  end

  @doc false
  # A channel's native error: the core words it for the channel (what failed, why, what
  # to do). Error.from_native/2 would append the advice of a region's reason (free
  # regions, /dev/shm, backend: :memfd), which does not apply to a channel's memfds.
  def native_error({reason, message, errno}, details)
      when is_atom(reason) and is_binary(message) and is_integer(errno),
      do: Error.new(reason, message, Map.put(details, :errno, errno))

  def native_error(other, details), do: Error.from_native(other, details)

  @doc false
  # `detail`: what failed on this side (an :io_error: out of descriptors, a mapping
  # refused...), as the core or the NIF worded it; the message used to say only
  # "failed: io_error" and the cause was left in stats/1's close_detail.
  def closed_error(id, reason, detail \\ nil) do
    message =
      case reason do
        :peer_closed -> "the worker closed channel #{id} or died"
        :protocol_error -> "channel #{id} was closed: the worker broke the protocol"
        :closed -> "channel #{id} is closed"
        other when detail in [nil, ""] -> "channel #{id} failed: #{other}"
        other -> "channel #{id} failed on this side (#{other}): #{detail}"
      end

    details = if detail in [nil, ""], do: %{channel: id}, else: %{channel: id, detail: detail}
    Error.error(reason, message, details)
  end

  defp validate(opts) do
    # An option given twice is refused (as by every other function of the API): the
    # first value would win here, the last one in a Map.new/1 of the same list.
    with {:ok, map} <- to_map(opts) do
      unknown = Map.keys(map) -- Keyword.keys(@defaults)

      if unknown != [] do
        Error.error(:invalid_option, "unknown channel option(s) #{inspect(unknown)}")
      else
        opts = Keyword.merge(@defaults, Map.to_list(map))
        Enum.reduce_while(opts, {:ok, opts}, fn {k, v}, acc -> check(k, v, acc) end)
      end
    end
  end

  defp to_map(opts) when is_map(opts), do: {:ok, opts}

  defp to_map(opts) do
    if Keyword.keyword?(opts) do
      Snakepit.SharedMemory.Options.keyword_to_map(opts)
    else
      Error.error(
        :invalid_option,
        "channel options must be a keyword list, got: #{inspect(opts)}"
      )
    end
  end

  defp check(:active, v, acc) when is_boolean(v) or v == :once or is_integer(v), do: {:cont, acc}

  defp check(:ring_size, v, acc)
       when is_integer(v) and v >= 4096 and v <= 16_777_216 and rem(v, 4096) == 0,
       do: {:cont, acc}

  defp check(:inline_threshold, v, acc) when is_nil(v) or (is_integer(v) and v >= 1),
    do: {:cont, acc}

  # 0 went to the core as "no threshold given" and meant the default (a quarter of the
  # ring): the opposite of what it says. Every message as a region message cannot be
  # had either (an empty message has no region).
  defp check(:inline_threshold, 0, _acc) do
    {:halt,
     Error.error(
       :invalid_option,
       ":inline_threshold must be at least 1 (bytes sent inline; larger messages travel " <>
         "as region messages), got 0; leave it out for the default, a quarter of the ring"
     )}
  end

  defp check(:transport, v, acc) when v in [:auto, :shm, :socket], do: {:cont, acc}
  defp check(:ack_mode, v, acc) when v in [:immediate, :batch, :deferred], do: {:cont, acc}

  defp check(:max_batch_size, v, acc) when is_integer(v) and v >= 1 and v <= 1_000_000,
    do: {:cont, acc}

  defp check(:flush_interval, v, acc) when is_integer(v) and v >= 0 and v <= 3_600_000,
    do: {:cont, acc}

  defp check(:send_timeout, v, acc)
       when v == :infinity or (is_integer(v) and v in 0..@max_timeout),
       do: {:cont, acc}

  defp check(:max_message_size, v, acc) when is_integer(v) and v > 0, do: {:cont, acc}
  defp check(:socket_dir, v, acc) when is_nil(v) or is_binary(v), do: {:cont, acc}
  # Local only: the channel's resource monitors its owner (enif_monitor_process).
  defp check(:owner, v, acc) when is_nil(v) or (is_pid(v) and node(v) == node()),
    do: {:cont, acc}

  defp check(:spin, v, acc) when is_integer(v) and v >= 0 and v <= 1_000_000, do: {:cont, acc}
  defp check(:simulate_memfd_failure, v, acc) when is_boolean(v), do: {:cont, acc}

  defp check(:ring_size, v, _acc) do
    {:halt,
     Error.error(
       :invalid_option,
       ":ring_size must be a multiple of 4096 between 4 KiB and 16 MiB, got #{inspect(v)}"
     )}
  end

  defp check(k, v, _acc) do
    {:halt,
     Error.error(:invalid_option, "invalid value #{inspect(v)} for channel option #{inspect(k)}")}
  end
end
