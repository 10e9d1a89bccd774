defmodule Snakepit.SharedMemory.StatusBoard do
  @moduledoc """
  A status board: workers publish their load in shared memory, and any process of the
  VM picks the least loaded one by reading every slot in place, with no message and no
  GenServer call.

      {:ok, board} = StatusBoard.create("pool1", capacity: 256, gauges: [:gpu_mem])
      ref = StatusBoard.export_ref(board)
      # each Python worker: b = snakepit_shm.StatusBoard.join(ref, "worker-7")
      #                     b.update(state="idle", queue=0)
      {:ok, worker_id} = StatusBoard.least_loaded(board, exclude: ["worker-3"])

  A board is a named region of the manager (`spshm_n_<name>`, POSIX backend): it shows
  in `list_regions/1`, `get_region_info/1` and `mix snakepit.shm.doctor`, and
  `mix snakepit.shm.board NAME` prints it. Its layout is in `docs/FORMAT.md` § status
  board.

  ## Slots

  Each worker owns one slot: worker id (1 to 64 bytes), state (`:starting | :idle |
  :busy | :draining | :shutdown`), queue length, requests in flight, memory bytes,
  requests processed, errors, 4 integer gauges named at creation, the time of its last
  update (`CLOCK_MONOTONIC`, comparable between processes of one host), its OS pid and
  start time. A slot is a seqlock: the worker writes without a lock or a system call,
  and readers never see a half-written entry; a reader that cannot get a consistent
  copy of a slot after a bounded number of retries reports it as `:unreadable`.

  ## Dead workers

  The manager watches every OS process that holds a slot of a board of this VM (a
  pidfd registered with `enif_select`, as for region holders; it learns of new joiners
  from the board's join counter on its holder scan). When the process dies, even by
  SIGKILL, its slot is freed at once; a worker that stops publishing without dying
  keeps its slot, and its entry becomes stale after `:stale_after`. An Elixir process that joins with `join/3`
  holds its slot until `leave/1` or its death (a monitor in the NIF).
  """

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Access, Error, Native, Registry}

  require Registry

  @enforce_keys [:name, :region_id, :board, :capacity, :stale_after, :gauges, :rotation]
  defstruct [:name, :region_id, :board, :capacity, :stale_after, :gauges, :rotation]

  @max_capacity 65_536
  @gauge_count 4
  @header_size 512
  @slot_size 192
  @default_capacity 64
  @default_stale_after 30_000
  @dirty_entries_above 2048
  @states [:starting, :idle, :busy, :draining, :shutdown]
  @fields [:state, :queue, :in_flight, :memory, :processed, :errors]
  @field_names Enum.map(@fields, &Atom.to_string/1)
  @unknown_generation 0xFFFF_FFFF_FFFF_FFFF

  @typedoc "A board handle: usable from any process of the VM."
  @type t :: %__MODULE__{
          name: String.t(),
          region_id: String.t(),
          board: reference(),
          capacity: pos_integer(),
          stale_after: pos_integer(),
          gauges: [String.t()],
          rotation: :atomics.atomics_ref()
        }

  @type state :: :starting | :idle | :busy | :draining | :shutdown
  @type entry :: %{
          slot: non_neg_integer(),
          worker_id: String.t() | nil,
          state: state() | :unknown | :unreadable,
          queue: non_neg_integer(),
          in_flight: non_neg_integer(),
          memory: non_neg_integer(),
          processed: non_neg_integer(),
          errors: non_neg_integer(),
          gauges: %{String.t() => integer()},
          age_ms: non_neg_integer(),
          os_pid: non_neg_integer(),
          start_time: non_neg_integer(),
          stale: boolean(),
          alive: boolean()
        }

  defmodule Slot do
    @moduledoc """
    A slot joined by an Elixir process (`Snakepit.SharedMemory.StatusBoard.join/3`).
    It is freed by `StatusBoard.leave/1` or the death of the process that joined.
    """
    @enforce_keys [:ref, :index, :worker_id, :gauges, :board_name]
    defstruct [:ref, :index, :worker_id, :gauges, :board_name]

    @type t :: %__MODULE__{
            ref: reference(),
            index: non_neg_integer(),
            worker_id: String.t(),
            gauges: [String.t()],
            board_name: String.t()
          }
  end

  # ---- lifecycle ----

  @doc """
  Creates a board named `name` (1-21 characters of `[a-z0-9_-]`, the region is
  `spshm_n_<name>`).

  Options:

    * `:capacity` - number of slots, 1 to 65 536, fixed at creation. Defaults to 64.
    * `:stale_after` - milliseconds after which an entry that was not updated is stale
      (ignored by `least_loaded/2`). Defaults to 30 000.
    * `:gauges` - up to 4 names (atoms or strings of 1-31 bytes) of user integer gauges.
      Defaults to `[]`; unnamed gauges are called `"gauge<i>"`.
    * `:owner` - the pid whose death frees the board (`:automatic` policy). Defaults
      to `self()`.
    * `:cleanup_policy` - `:automatic` or `:manual`. Defaults to `:automatic`.

  Errors: `:invalid_option`, `:already_exists` (a board or region of that name exists),
  and those of `Snakepit.SharedMemory.allocate_region/2`.
  """
  @spec create(String.t(), keyword()) :: {:ok, t()} | {:error, Error.t()}
  def create(name, opts \\ [])

  def create(name, opts) when is_map(opts) and not is_struct(opts),
    do: create(name, Map.to_list(opts))

  def create(name, opts) do
    with :ok <- check_keyword(opts),
         :ok <- known_options(opts, [:capacity, :stale_after, :gauges, :owner, :cleanup_policy]),
         {:ok, capacity} <- capacity(Keyword.get(opts, :capacity, @default_capacity)),
         {:ok, stale_after} <-
           positive(:stale_after, Keyword.get(opts, :stale_after, @default_stale_after)),
         {:ok, gauges} <- gauges(Keyword.get(opts, :gauges, [])),
         {:ok, policy} <- policy(Keyword.get(opts, :cleanup_policy, :automatic)),
         {:ok, region_id} <-
           SharedMemory.allocate_region(@header_size + @slot_size * capacity,
             name: name,
             backend: :posix,
             security_level: :standard,
             cleanup_policy: policy,
             owner: Keyword.get(opts, :owner, self()),
             metadata: %{"kind" => "status_board", "capacity" => capacity, "gauges" => gauges}
           ) do
      with {:ok, ref} <- region_ref(region_id),
           :ok <- native(Native.board_init(ref, capacity, stale_after, gauges), region_id),
           {:ok, board} <- wrap(ref, name, region_id) do
        {:ok, board}
      else
        error ->
          _ = SharedMemory.deallocate_region(region_id)
          error
      end
    end
  end

  @doc """
  A handle on an existing board: by name or region id, of this VM (read-write, may
  `join/3`) or, when this VM does not manage it, opened read-only from its segment
  (for tools: `entries/1` and `least_loaded/2` work, `join/3` does not).
  """
  @spec open(String.t()) :: {:ok, t()} | {:error, Error.t()}
  def open(name_or_id) when is_binary(name_or_id) do
    region_id =
      if String.starts_with?(name_or_id, "spshm_"), do: name_or_id, else: "spshm_n_" <> name_or_id

    name = String.replace_prefix(region_id, "spshm_n_", "")

    ref =
      if Registry.available?() do
        case region_ref(region_id) do
          {:ok, ref} -> {:ok, ref}
          _ -> open_segment(region_id)
        end
      else
        open_segment(region_id)
      end

    with {:ok, ref} <- ref, do: wrap(ref, name, region_id)
  end

  def open(other),
    do: Error.error(:invalid_argument, "a board name is a string, got: #{inspect(other)}")

  defp open_segment(region_id) do
    case Native.open(region_id, false) do
      {:ok, ref, _info} -> {:ok, ref}
      {:error, native} -> {:error, Error.from_native(native, %{region_id: region_id})}
    end
  end

  @doc """
  The reference a Python worker joins with (`snakepit_shm.StatusBoard.join(ref,
  worker_id)`): the region's `export_ref` plus `"board"` (`"name"`, `"capacity"`,
  `"gauges"`). A map with string keys, encodable as JSON.
  """
  @spec export_ref(t()) :: {:ok, map()} | {:error, Error.t()}
  def export_ref(%__MODULE__{} = board) do
    with {:ok, ref} <- SharedMemory.export_ref(board.region_id) do
      {:ok,
       Map.put(ref, "board", %{
         "name" => board.name,
         "capacity" => board.capacity,
         "gauges" => board.gauges,
         "stale_after" => board.stale_after
       })}
    end
  end

  def export_ref(other), do: not_a_board(other)

  @doc """
  A plain-data picture of a board (no references: it can cross nodes), for tools:
  `%{name, region_id, capacity, stale_after, gauges, entries}` with the entries of
  `entries/1`. Takes a handle, or a name or region id (see `open/1`).
  """
  @spec snapshot(t() | String.t()) :: {:ok, map()} | {:error, Error.t()}
  def snapshot(%__MODULE__{} = board) do
    with {:ok, entries} <- entries(board) do
      {:ok,
       %{
         name: board.name,
         region_id: board.region_id,
         capacity: board.capacity,
         stale_after: board.stale_after,
         gauges: Enum.map(board.gauges, &printable/1),
         entries: Enum.map(entries, &%{&1 | worker_id: printable(&1.worker_id)})
       }}
    end
  end

  def snapshot(name) do
    with {:ok, board} <- open(name), do: snapshot(board)
  end

  @doc "Frees the board (its region). Workers still attached see it deallocated."
  @spec delete(t()) :: :ok | {:error, Error.t()}
  def delete(%__MODULE__{region_id: id}) when is_binary(id),
    do: SharedMemory.deallocate_region(id)

  def delete(other), do: not_a_board(other)

  # ---- reading ----

  @doc """
  Every live slot, decoded (see `t:entry/0`), in slot order. `:stale` is true for an
  entry older than the board's `:stale_after`, and for one whose OS process no longer
  exists (`:alive` false: it died and the manager has not freed its slot yet, or the
  board is not managed by this VM). A slot whose writer keeps
  it changing beyond the bounded retries (or whose sequence a peer left odd) is
  returned as `%{slot: i, state: :unreadable}` with every other field zero or nil.
  """
  @spec entries(t()) :: {:ok, [entry()]} | {:error, Error.t()}
  def entries(%__MODULE__{} = board) do
    result =
      nif(board, fn ->
        if board.capacity > @dirty_entries_above,
          do: Native.board_entries_dirty(board.board),
          else: Native.board_entries(board.board)
      end)

    case result do
      {now, unreadable, rows} ->
        decoded = Enum.map(rows, &decode(&1, now, board.gauges))
        {:ok, merge_unreadable(decoded, unreadable)}

      {:error, %Error{}} = error ->
        error

      {:error, native} ->
        {:error, Error.from_native(native, %{board: board.name})}
    end
  end

  def entries(other), do: not_a_board(other)

  @doc """
  The id of the worker to route the next request to, chosen in the calling process in
  one pass over the slots (O(capacity), no GenServer call):

    1. drop free slots, unreadable slots, entries older than `:stale_after`, excluded
       workers, and workers that are not `:idle` or `:busy`;
    2. prefer `:idle` over `:busy`, then the lowest `queue + in_flight`;
    3. break ties round-robin (a counter per board handle, shared by every process
       that uses it), so equal workers share the load evenly.

  Options:

    * `:exclude` - worker ids never to pick (e.g. the one that just failed). Defaults
      to `[]`.
    * `:score` - a function of the decoded entry (`t:entry/0`) returning a number,
      lower is better; replaces step 2 (step 1 and the tie-breaking stay). Decodes
      every entry, so it is slower (and skips dead owners by their slot locks, as
      `entries/1` does). Defaults to `nil`.
    * `:verify` - when `true`, the kernel confirms that the pick's owner is alive
      before it is returned: every worker holds an open file description lock on its
      slot, which the kernel drops the instant the worker dies (SIGKILL included). A
      dead owner's slot is freed on the spot and the pick made again, so a worker that
      died before the call is never returned, even before the manager hears of its
      death. Costs one system call (`F_OFD_GETLK`) per call. Defaults to `false`:
      no system call; a worker that just died is then skipped once the manager has
      freed its slot (its pidfd fires: milliseconds).

  Whatever is picked may still die right after the call: a router must handle a
  failed dispatch either way.

  `{:error, %Error{reason: :no_worker}}` when no entry qualifies.
  """
  @spec least_loaded(t(), keyword()) :: {:ok, String.t()} | {:error, Error.t()}
  def least_loaded(board, opts \\ [])

  # The router's hot path: the NIF is called directly (no closure), a forged handle's
  # badarg is rescued here.
  def least_loaded(%__MODULE__{board: ref} = board, []) do
    case Native.board_least_loaded(ref, []) do
      {:ok, id} -> {:ok, id}
      other -> picked(board, other)
    end
  rescue
    ArgumentError -> nif(board, fn -> raise ArgumentError end)
  end

  def least_loaded(%__MODULE__{} = board, opts) when is_map(opts) and not is_struct(opts),
    do: least_loaded(board, Map.to_list(opts))

  def least_loaded(%__MODULE__{} = board, opts) when is_list(opts) do
    with :ok <- check_keyword(opts),
         :ok <- known_options(opts, [:exclude, :score, :verify]),
         {:ok, exclude} <- exclude(Keyword.get(opts, :exclude, [])),
         {:ok, score} <- score(Keyword.get(opts, :score)),
         {:ok, verify} <- verify(Keyword.get(opts, :verify, false)) do
      cond do
        score == nil and verify ->
          picked(
            board,
            nif(board, fn -> Native.board_least_loaded(board.board, exclude, true) end)
          )

        score == nil ->
          picked(board, nif(board, fn -> Native.board_least_loaded(board.board, exclude) end))

        true ->
          scored_pick(board, :atomics.add_get(board.rotation, 1, 1), exclude, score)
      end
    end
  end

  def least_loaded(%__MODULE__{}, opts),
    do:
      Error.error(
        :invalid_option,
        "options must be a keyword list or a map, got: #{inspect(opts)}"
      )

  def least_loaded(other, _opts), do: not_a_board(other)

  defp picked(_board, {:ok, id}), do: {:ok, id}

  defp picked(board, {:none, candidates, unreadable}),
    do: no_worker(board, candidates, unreadable)

  defp picked(_board, {:error, %Error{}} = error), do: error

  defp picked(board, {:error, native}),
    do: {:error, Error.from_native(native, %{board: board.name})}

  defp scored_pick(board, rotation, exclude, score) do
    with {:ok, entries} <- entries(board),
         do: scored_pick(board, rotation, exclude, score, entries)
  end

  defp scored_pick(board, rotation, exclude, score, entries) do
    excluded = MapSet.new(exclude)

    scored =
      for %{state: state, stale: false, worker_id: id} = entry <- entries,
          state in [:idle, :busy],
          not MapSet.member?(excluded, id),
          do: {apply_score(score, entry), entry}

    case Enum.find(scored, &match?({{:error, _}, _}, &1)) do
      {error, _entry} -> error
      nil -> scored_candidates(board, rotation, entries, scored)
    end
  end

  # The user's :score function runs in the caller: whatever it raises, throws or
  # returns that is not a number becomes an :invalid_option error, never a crash.
  defp apply_score(score, entry) do
    case score.(entry) do
      n when is_number(n) ->
        n

      other ->
        Error.error(
          :invalid_option,
          "the :score function must return a number, got: #{inspect(other)} for worker " <>
            inspect(entry.worker_id)
        )
    end
  catch
    kind, reason ->
      Error.error(
        :invalid_option,
        "the :score function failed on worker #{inspect(entry.worker_id)}: " <>
          Exception.format_banner(kind, reason, __STACKTRACE__)
      )
  end

  defp scored_candidates(board, rotation, entries, candidates) do
    case candidates do
      [] ->
        no_worker(board, 0, Enum.count(entries, &(&1.state == :unreadable)))

      _ ->
        best = candidates |> Enum.map(&elem(&1, 0)) |> Enum.min()
        ties = for {s, entry} <- candidates, s == best, do: entry
        {:ok, Enum.at(ties, rem(rotation, length(ties))).worker_id}
    end
  end

  # ---- publishing from Elixir ----

  @doc """
  Joins the board as worker `worker_id` (1 to 64 bytes) from the calling process:
  claims a free slot (state `:starting`) that is freed by `leave/1` or the death of the
  calling process. `opts` are initial values, as for `update/2`. The slot stays taken
  even if the returned `Slot` is dropped; only `leave/1` or the death of the process
  frees it.

  `{:error, %Error{reason: :board_full}}` when every slot is taken.
  """
  @spec join(t(), String.t(), keyword()) :: {:ok, Slot.t()} | {:error, Error.t()}
  def join(board, worker_id, opts \\ [])

  def join(%__MODULE__{} = board, worker_id, opts) do
    with :ok <- worker_id(worker_id),
         {:ok, values} <- values(opts, board.gauges),
         %{os_pid: os_pid, start_time: start} = Native.self_info() do
      case nif(board, fn -> Native.board_join(board.board, worker_id, os_pid, start) end) do
        {:ok, ref, index} ->
          slot = %Slot{
            ref: ref,
            index: index,
            worker_id: worker_id,
            gauges: board.gauges,
            board_name: board.name
          }

          if opts == [],
            do: {:ok, slot},
            else: with(:ok <- publish(slot, values), do: {:ok, slot})

        {:full, capacity} ->
          Error.error(
            :board_full,
            "the status board #{inspect(board.name)} is full: all #{capacity} slots are taken; " <>
              "create it with a larger :capacity or let idle workers leave",
            %{capacity: capacity, board: board.name}
          )

        {:error, %Error{}} = error ->
          error

        {:error, native} ->
          {:error, Error.from_native(native, %{board: board.name})}
      end
    end
  end

  def join(other, _worker_id, _opts), do: not_a_board(other)

  @doc """
  Publishes new values for a joined slot; fields not given keep their last value.
  Keys: `:state`, `:queue`, `:in_flight`, `:memory`, `:processed`, `:errors`, and the
  board's gauge names (atoms or strings). A seqlock write: no lock, no system call.
  """
  @spec update(Slot.t(), keyword() | map()) :: :ok | {:error, Error.t()}
  def update(%Slot{} = slot, fields) do
    with {:ok, values} <- values(fields, slot.gauges), do: publish(slot, values)
  end

  def update(other, _fields), do: not_a_slot(other)

  @doc "Frees a slot joined with `join/3`. `:closed` if it was already left."
  @spec leave(Slot.t()) :: :ok | {:error, Error.t()}
  def leave(%Slot{ref: ref, board_name: name}) do
    case nif(%{name: name}, fn -> Native.board_leave(ref) end) do
      :ok -> :ok
      {:error, %Error{}} = error -> error
      {:error, native} -> {:error, Error.from_native(native, %{board: name})}
    end
  end

  def leave(other), do: not_a_slot(other)

  @doc false
  # The layout facts this module relies on (checked against Native.board_layout/0 and
  # docs/FORMAT.md by the tests).
  @spec __layout__() :: map()
  def __layout__ do
    %{
      header_size: @header_size,
      slot_size: @slot_size,
      max_capacity: @max_capacity,
      gauge_count: @gauge_count,
      states: @states |> Enum.with_index() |> Map.new()
    }
  end

  # ---- used by the manager ----

  @doc false
  # Frees the slots of a dead OS process in every board of this VM (called when the
  # pidfd watch of a region holder fires). Returns how many slots were freed.
  @spec reclaim_os_process(pos_integer(), non_neg_integer()) :: non_neg_integer()
  def reclaim_os_process(os_pid, start_time) do
    rows =
      :ets.select(Registry.regions_table(), [
        {Registry.region(ref: :"$1", metadata: :"$2", _: :_), [], [{{:"$1", :"$2"}}]}
      ])

    for {ref, metadata} <- rows, board_metadata?(metadata), reduce: 0 do
      acc -> acc + Native.board_reclaim(ref, os_pid, start_time)
    end
  end

  @doc false
  # For the manager's holder scan (Holders.scan/1): for every board of this VM whose
  # join generation changed since `generations`, arms `watch` (a pidfd watch) on each OS
  # process that holds a slot, other than this VM. Returns the boards' new generations
  # (keys `{:board, region_id}`) and the state.
  @spec watch_joiners(map(), map(), ({pos_integer(), non_neg_integer()}, map() -> map())) ::
          {[{{:board, String.t()}, non_neg_integer()}], map()}
  def watch_joiners(generations, state, watch) do
    rows =
      :ets.select(Registry.regions_table(), [
        {Registry.region(id: :"$1", ref: :"$2", metadata: :"$3", _: :_), [],
         [{{:"$1", :"$2", :"$3"}}]}
      ])

    Enum.flat_map_reduce(rows, state, &watch_board(&1, &2, generations, watch))
  end

  @doc false
  # watch_joiners/3 for the one board `id` (an announcement on the event socket).
  @spec watch_joiners_of(
          String.t(),
          map(),
          map(),
          ({pos_integer(), non_neg_integer()}, map() -> map())
        ) :: {[{{:board, String.t()}, non_neg_integer()}], map()}
  def watch_joiners_of(id, generations, state, watch) do
    case Registry.lookup(id) do
      Registry.region(ref: ref, metadata: metadata) ->
        watch_board({id, ref, metadata}, state, generations, watch)

      nil ->
        {[], state}
    end
  end

  defp watch_board({id, ref, metadata}, acc, generations, watch) do
    key = {:board, id}
    known = Map.get(generations, key, @unknown_generation)

    case board_metadata?(metadata) && Native.board_watch_info(ref, known) do
      {generation, nil} ->
        {[{key, generation}], acc}

      {generation, owners} ->
        acc =
          owners
          |> Enum.reject(fn {pid, _} -> pid == 0 or pid == acc.self_os_pid end)
          |> Enum.reduce(acc, watch)

        {[{key, generation}], acc}

      _ ->
        {[], acc}
    end
  end

  # Ids and names come from shared memory: a peer may have written anything there,
  # including terminal escape sequences for the operator who prints the board.
  defp printable(nil), do: nil

  defp printable(text) do
    if String.valid?(text) and not String.match?(text, ~r/[\x00-\x1f\x7f\x{80}-\x{9f}]/u),
      do: text,
      else: inspect(text, binaries: :as_strings)
  end

  defp board_metadata?(%{"kind" => "status_board"}), do: true
  defp board_metadata?(%{kind: "status_board"}), do: true
  defp board_metadata?(_), do: false

  # ---- helpers ----

  defp wrap(ref, name, region_id) do
    case Native.board_open(ref) do
      {:ok, board} ->
        info = Native.board_info(board)

        {:ok,
         %__MODULE__{
           name: name,
           region_id: region_id,
           board: board,
           capacity: info.capacity,
           stale_after: info.stale_after_ms,
           gauges: info.gauge_names,
           rotation: :atomics.new(1, signed: false)
         }}

      {:error, native} ->
        {:error, Error.from_native(native, %{region_id: region_id})}
    end
  end

  defp region_ref(region_id) do
    with {:ok, record} <- Access.lookup(region_id), do: {:ok, Registry.region(record, :ref)}
  end

  defp native(:ok, _id), do: :ok
  defp native({:error, native}, id), do: {:error, Error.from_native(native, %{region_id: id})}

  defp publish(slot, values) do
    case nif(%{name: slot.board_name}, fn -> Native.board_update(slot.ref, values) end) do
      :ok -> :ok
      {:error, %Error{}} = error -> error
      {:error, native} -> {:error, Error.from_native(native, %{board: slot.board_name})}
    end
  end

  defp decode(
         {index, id, state, queue, in_flight, memory, processed, errors, {g0, g1, g2, g3},
          updated, _joined, os_pid, start_time, stale, alive},
         now,
         gauge_names
       ) do
    %{
      slot: index,
      worker_id: id,
      state: Enum.at(@states, state, :unknown),
      queue: queue,
      in_flight: in_flight,
      memory: memory,
      processed: processed,
      errors: errors,
      gauges: Map.new(Enum.zip(gauge_names, [g0, g1, g2, g3])),
      age_ms: if(now > updated, do: div(now - updated, 1_000_000), else: 0),
      os_pid: os_pid,
      start_time: start_time,
      stale: stale,
      alive: alive
    }
  end

  defp merge_unreadable(entries, []), do: entries

  defp merge_unreadable(entries, unreadable) do
    blanks =
      for i <- unreadable do
        %{
          slot: i,
          worker_id: nil,
          state: :unreadable,
          queue: 0,
          in_flight: 0,
          memory: 0,
          processed: 0,
          errors: 0,
          gauges: %{},
          age_ms: 0,
          os_pid: 0,
          start_time: 0,
          stale: true,
          alive: false
        }
      end

    Enum.sort_by(entries ++ blanks, & &1.slot)
  end

  defp no_worker(board, candidates, unreadable) do
    Error.error(
      :no_worker,
      "no worker to route to on status board #{inspect(board.name)}: no fresh :idle or " <>
        ":busy entry" <>
        if(candidates > 0, do: " left after :exclude", else: "") <>
        if(unreadable > 0, do: " (#{unreadable} slot(s) unreadable)", else: ""),
      %{board: board.name, unreadable: unreadable}
    )
  end

  defp values(fields, gauge_names) do
    if pairs?(fields),
      do: decode_values(fields, gauge_names),
      else:
        Error.error(
          :invalid_option,
          "board fields must be a keyword list or a map of field => value, got: " <>
            inspect(fields)
        )
  end

  defp pairs?(fields) when is_map(fields), do: true
  defp pairs?([]), do: true
  defp pairs?([{_key, _value} | rest]), do: pairs?(rest)
  defp pairs?(_), do: false

  defp decode_values(fields, gauge_names) do
    Enum.reduce_while(fields, {:ok, List.duplicate(nil, 10)}, fn {key, value}, {:ok, acc} ->
      case field_index(key, gauge_names) do
        # A field given twice (`[queue: 1, queue: 2]`, or a gauge both as an atom and
        # as a string in a map) is refused: which value won was an accident of order.
        {:ok, i} ->
          case Enum.at(acc, i) == nil && check_value(i, key, value) do
            {:ok, v} ->
              {:cont, {:ok, List.replace_at(acc, i, v)}}

            false ->
              {:halt,
               Error.error(
                 :invalid_option,
                 "board field #{inspect(key)} given more than once (in " <>
                   "#{inspect(fields, limit: 12)}): give each field once"
               )}

            error ->
              {:halt, error}
          end

        :error ->
          {:halt,
           Error.error(
             :invalid_option,
             "unknown board field #{inspect(key)}: use #{inspect(@fields)} or a gauge of " <>
               "this board (#{inspect(gauge_names)})"
           )}
      end
    end)
    |> case do
      {:ok, list} -> {:ok, List.to_tuple(list)}
      error -> error
    end
  end

  defp field_index(key, gauge_names) do
    case Enum.find_index(@fields, &(&1 == key)) do
      nil ->
        case Enum.find_index(gauge_names, &(&1 == to_string(key))) do
          nil -> :error
          g -> {:ok, 6 + g}
        end

      i ->
        {:ok, i}
    end
  end

  defp check_value(0, _key, state) do
    case Enum.find_index(@states, &(&1 == state)) do
      nil ->
        Error.error(
          :invalid_option,
          ":state must be one of #{inspect(@states)}, got: #{inspect(state)}"
        )

      i ->
        {:ok, i}
    end
  end

  defp check_value(i, _key, v)
       when i < 6 and is_integer(v) and v >= 0 and v < 0x1_0000_0000_0000_0000,
       do: {:ok, v}

  defp check_value(i, _key, v)
       when i >= 6 and is_integer(v) and v >= -0x8000_0000_0000_0000 and
              v < 0x8000_0000_0000_0000,
       do: {:ok, v}

  defp check_value(i, key, v) do
    what = if i < 6, do: "a non-negative 64-bit integer", else: "a signed 64-bit integer"
    Error.error(:invalid_option, "#{inspect(key)} must be #{what}, got: #{inspect(v)}")
  end

  # A handle forged or damaged by the caller makes the NIF raise badarg: an error instead.
  defp nif(board, call) do
    call.()
  rescue
    ArgumentError ->
      Error.error(
        :invalid_argument,
        "not a valid status board handle (board #{inspect(Map.get(board, :name))}): " <>
          "use the one StatusBoard.create/2, open/1 or join/3 returned"
      )
  end

  defp not_a_board(other),
    do:
      Error.error(
        :invalid_argument,
        "not a status board: expected the handle of StatusBoard.create/2 or open/1, got: " <>
          inspect(other)
      )

  defp not_a_slot(other),
    do:
      Error.error(
        :invalid_argument,
        "not a status board slot: expected the slot of StatusBoard.join/3, got: " <>
          inspect(other)
      )

  defp known_options(opts, known) do
    case Keyword.keys(opts) -- known do
      [] ->
        :ok

      unknown ->
        Error.error(
          :invalid_option,
          "unknown option(s) #{inspect(Enum.uniq(unknown))}: use #{inspect(known)}"
        )
    end
  end

  defp check_keyword(opts) do
    if Keyword.keyword?(opts) do
      with {:ok, _map} <- Snakepit.SharedMemory.Options.keyword_to_map(opts), do: :ok
    else
      Error.error(
        :invalid_option,
        "options must be a keyword list or a map, got: #{inspect(opts)}"
      )
    end
  end

  defp capacity(c) when is_integer(c) and c >= 1 and c <= @max_capacity, do: {:ok, c}

  defp capacity(c),
    do:
      Error.error(
        :invalid_option,
        ":capacity must be an integer from 1 to #{@max_capacity}, got: #{inspect(c)}"
      )

  defp positive(_key, v) when is_integer(v) and v > 0, do: {:ok, v}

  defp positive(key, v),
    do:
      Error.error(
        :invalid_option,
        "#{inspect(key)} must be a positive integer (ms), got: #{inspect(v)}"
      )

  defp policy(p) when p in [:automatic, :manual], do: {:ok, p}

  defp policy(p),
    do:
      Error.error(
        :invalid_option,
        ":cleanup_policy must be :automatic or :manual, got: #{inspect(p)}"
      )

  defp gauges(names) when is_list(names) and length(names) <= @gauge_count do
    strings = Enum.map(names, &if(is_atom(&1) and &1 != nil, do: Atom.to_string(&1), else: &1))

    cond do
      not Enum.all?(
        strings,
        &(is_binary(&1) and byte_size(&1) in 1..31 and String.valid?(&1) and
              not String.contains?(&1, <<0>>))
      ) ->
        Error.error(
          :invalid_option,
          ":gauges must be UTF-8 names of 1 to 31 bytes, got: #{inspect(names)}"
        )

      # Compared as strings: String.to_atom/1 would add every new name to the atom table.
      Enum.uniq(strings) != strings or Enum.any?(strings, &(&1 in @field_names)) ->
        Error.error(
          :invalid_option,
          ":gauges must be distinct and not named like a field, got: #{inspect(names)}"
        )

      true ->
        padded = strings ++ for(i <- length(strings)..(@gauge_count - 1)//1, do: "gauge#{i}")

        if Enum.uniq(padded) == padded,
          do: {:ok, padded},
          else:
            Error.error(
              :invalid_option,
              ":gauges clash with the default names gauge<i>: #{inspect(names)}"
            )
    end
  end

  defp gauges(names),
    do:
      Error.error(
        :invalid_option,
        ":gauges must be a list of at most 4 names, got: #{inspect(names)}"
      )

  defp exclude(list) when is_list(list) and length(list) <= 4096 do
    if Enum.all?(list, &is_binary/1),
      do: {:ok, list},
      else:
        Error.error(
          :invalid_option,
          ":exclude must be a list of worker id strings, got: #{inspect(list)}"
        )
  end

  defp exclude(other),
    do:
      Error.error(
        :invalid_option,
        ":exclude must be a list of at most 4096 worker ids, got: #{inspect(other)}"
      )

  defp verify(v) when is_boolean(v), do: {:ok, v}

  defp verify(v),
    do: Error.error(:invalid_option, ":verify must be true or false, got: #{inspect(v)}")

  defp score(nil), do: {:ok, nil}
  defp score(f) when is_function(f, 1), do: {:ok, f}

  defp score(other),
    do:
      Error.error(
        :invalid_option,
        ":score must be a function of one entry, got: #{inspect(other)}"
      )

  defp worker_id(id) when is_binary(id) and byte_size(id) in 1..64 do
    if String.valid?(id), do: :ok, else: bad_worker_id(id)
  end

  defp worker_id(id), do: bad_worker_id(id)

  defp bad_worker_id(id),
    do:
      Error.error(
        :invalid_argument,
        "a worker id is a UTF-8 string of 1 to 64 bytes, got: #{inspect(id)}"
      )
end
