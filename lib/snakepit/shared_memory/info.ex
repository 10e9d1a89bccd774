defmodule Snakepit.SharedMemory.Info do
  @moduledoc """
  Describing regions: `get_region_info/1` and `list_regions/1`, read straight from the
  registry (ETS) and the region headers, without a process.
  """

  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{Native, Registry, Security}

  import Snakepit.SharedMemory.Registry, only: [region: 1, region: 2]

  @type t :: %{
          id: String.t(),
          node: node(),
          size: pos_integer(),
          backend: atom(),
          name: String.t() | nil,
          role: :created | :opened,
          created_at: DateTime.t() | non_neg_integer(),
          last_accessed: DateTime.t() | non_neg_integer() | nil,
          access_count: non_neg_integer(),
          reference_count: non_neg_integer(),
          owner: pid() | nil,
          permissions: map(),
          security_level: atom(),
          cleanup_policy: atom(),
          timeout: pos_integer() | :infinity,
          access_mode: atom(),
          allowed_processes: [pid()],
          metadata: map(),
          sealed: boolean(),
          encrypted: boolean(),
          adopted: boolean(),
          mapped_by: [pid() | %{os_pid: pos_integer(), holds: pos_integer(), writable: boolean()}]
        }

  @typedoc """
  A description whose times are integers (`list_regions/1`): `:created_at` and
  `:last_accessed` in microseconds since the Unix epoch (`nil`: never accessed).
  `to_datetimes/1` turns them into `DateTime`s.
  """
  @type listed :: %{
          required(:created_at) => non_neg_integer(),
          required(:last_accessed) => non_neg_integer() | nil,
          optional(atom()) => term()
        }

  @doc """
  Everything known about one region record, times as `DateTime`s (`get_region_info/1`,
  read by people). Cheap: registry fields, two atomic loads of the header, and the
  header's holder table only when OS processes hold the region.
  """
  @spec describe(Registry.region_record()) :: t()
  def describe(record) do
    id = region(record, :id)

    ref = region(record, :ref)
    # hold_counts/1 reaps dead holders' slots first: a worker killed a moment ago no
    # longer counts, whether or not the manager has seen its death yet.
    {_generation, refcount} = Native.hold_counts(ref)
    counts = {refcount, Native.last_access(ref)}

    record
    |> describe(beam_holds(Registry.mappings_of(id)) |> Map.get(id, {[], 0}), counts)
    |> to_datetimes()
  end

  @doc """
  Describes many records with one pass over the mappings table (`list_regions/1`),
  times as integers (microseconds since the Unix epoch): converting 10 000 of them to
  `DateTime`s would cost more than the rest of the listing. See `to_datetimes/1`.
  """
  @spec describe_all([Registry.region_record()]) :: [listed()]
  def describe_all(records) do
    holds = beam_holds(:ets.tab2list(Registry.mappings_table()))

    # One NIF call per 4096 regions reads their counts and access times (a header's
    # refcount word); regions held by OS processes are then counted with their dead
    # holders' slots reaped (os_checked/3).
    records
    |> Enum.chunk_every(4096)
    |> Enum.flat_map(fn chunk ->
      counts = Native.list_counts(Enum.map(chunk, &region(&1, :ref)))

      Enum.zip_with(chunk, counts, fn record, counts ->
        beam = Map.get(holds, region(record, :id), {[], 0})
        describe(record, beam, os_checked(record, beam, counts))
      end)
    end)
  end

  # More holds in the word than BEAM mappings: OS processes hold the region, and one of
  # them may have died unannounced (an older client, a lost datagram), so that no
  # periodic check reaps its slot. hold_counts/1 reaps dead slots first (one NIF call,
  # only for regions OS processes hold: those pay for the holder table read anyway).
  defp os_checked(record, {_pids, beam_holds}, {refcount, last_access} = counts) do
    if refcount > beam_holds do
      {_generation, live} = Native.hold_counts(region(record, :ref))
      {live, last_access}
    else
      counts
    end
  end

  @doc """
  A description with `:created_at` and `:last_accessed` as `DateTime`s (UTC): converts
  the integer times of `list_regions/1` (microseconds since the Unix epoch); leaves
  `DateTime`s and `nil` as they are (a description from a node of an older version).
  """
  @spec to_datetimes(map()) :: map()
  def to_datetimes(%{created_at: created, last_accessed: last} = info) do
    %{info | created_at: to_datetime(created, 3), last_accessed: to_datetime(last, 6)}
  end

  def to_datetimes(info), do: info

  @doc """
  A time of a description (`DateTime`, integer microseconds since the Unix epoch, or
  nil) in microseconds since the Unix epoch, or nil.
  """
  @spec to_unix_us(DateTime.t() | integer() | nil) :: integer() | nil
  def to_unix_us(nil), do: nil
  def to_unix_us(us) when is_integer(us), do: us
  def to_unix_us(%DateTime{} = dt), do: DateTime.to_unix(dt, :microsecond)

  defp to_datetime(us, precision) when is_integer(us) and us >= 0, do: utc_from_us(us, precision)
  defp to_datetime(other, _precision), do: other

  # region id => {pids with a mapping (unique), number of mappings (= BEAM holds)}
  defp beam_holds(rows) do
    rows
    |> Enum.group_by(fn {{id, _}, _pid, _mode, _ref} -> id end, fn {_key, pid, _, _} -> pid end)
    |> Map.new(fn {id, pids} -> {id, {Enum.uniq(pids), length(pids)}} end)
  end

  defp describe(record, {pids, beam_holds}, {refcount, last_access_ns}) do
    region(ref: ref, counters: counters, security_level: level) = record

    %{
      id: region(record, :id),
      # The node that holds the region (its manager's node): what locate/1 answers.
      node: node(),
      size: region(record, :size),
      backend: region(record, :backend),
      name: region(record, :name),
      role: region(record, :role),
      created_at: region(record, :created_at) * 1000,
      last_accessed: last_accessed(last_access_ns),
      access_count: :counters.get(counters, 1),
      reference_count: refcount,
      owner: region(record, :owner),
      permissions: region(record, :permissions),
      security_level: level,
      cleanup_policy: region(record, :cleanup_policy),
      timeout: region(record, :timeout),
      access_mode: region(record, :access_mode),
      allowed_processes: region(record, :allowed),
      metadata: region(record, :metadata),
      sealed: :counters.get(counters, 2) >= 1,
      encrypted: Security.level_flags(level).encrypted,
      adopted: region(record, :adopted),
      # More holds than BEAM mappings: other OS processes hold it; read who.
      mapped_by: pids ++ if(refcount > beam_holds, do: os_holders(ref), else: [])
    }
  end

  # Holders other than this VM's own OS process (whose holds are the BEAM mappings).
  defp os_holders(ref) do
    self_os_pid = Native.info(ref).os_pid

    case Native.header(ref) do
      {:ok, %{holders: holders}} ->
        for %{pid: pid, count: count, writable: writable} <- holders, pid != self_os_pid do
          %{os_pid: pid, holds: count, writable: writable}
        end

      _ ->
        []
    end
  end

  defp last_accessed(0), do: nil
  defp last_accessed(ns), do: div(ns, 1000)

  @doc false
  # DateTime.from_unix!/2 for non-negative times, several times cheaper (it matters when
  # listing 10 000 regions): integer arithmetic only.
  @spec utc_from_us(non_neg_integer(), 0..6) :: DateTime.t()
  def utc_from_us(us, precision) when is_integer(us) and us >= 0 do
    seconds = div(us, 1_000_000)
    day_seconds = rem(seconds, 86_400)
    {year, month, day} = date_of(div(seconds, 86_400))

    %DateTime{
      year: year,
      month: month,
      day: day,
      hour: div(day_seconds, 3600),
      minute: div(rem(day_seconds, 3600), 60),
      second: rem(day_seconds, 60),
      microsecond: {rem(us, 1_000_000), precision},
      std_offset: 0,
      utc_offset: 0,
      time_zone: "Etc/UTC",
      zone_abbr: "UTC",
      calendar: Calendar.ISO
    }
  end

  # Regions listed together were mostly created on the same day: remember the last one.
  defp date_of(days) do
    case Process.get(:snakepit_shm_last_day) do
      {^days, date} ->
        date

      _ ->
        date = civil_from_days(days)
        Process.put(:snakepit_shm_last_day, {days, date})
        date
    end
  end

  # Days since 1970-01-01 (>= 0) to a proleptic Gregorian date (H. Hinnant's algorithm).
  defp civil_from_days(days) do
    z = days + 719_468
    era = div(z, 146_097)
    doe = z - era * 146_097
    yoe = div(doe - div(doe, 1460) + div(doe, 36_524) - div(doe, 146_096), 365)
    doy = doe - (365 * yoe + div(yoe, 4) - div(yoe, 100))
    mp = div(5 * doy + 2, 153)
    day = doy - div(153 * mp + 2, 5) + 1
    month = if mp < 10, do: mp + 3, else: mp - 9
    year = yoe + era * 400 + if(month <= 2, do: 1, else: 0)
    {year, month, day}
  end

  @doc "Records matching a validated filter (see `Snakepit.SharedMemory.Options.filter/1`)."
  @spec select(map()) :: [Registry.region_record()]
  def select(filter) do
    now = System.os_time(:millisecond)

    records = Registry.all()

    records =
      if filter == %{}, do: records, else: Enum.filter(records, &matches?(&1, filter, now))

    # seq is a monotonic integer taken at registration: creation order, cheap to sort
    # (keysort on the record's own element: no {key, record} pair per region).
    :lists.keysort(region(:seq) + 1, records)
  end

  # From this many registered regions, list/1 builds the list in a helper process.
  @helper_from 1_000
  # Heap words a listed region takes while its description is built (its record copied
  # out of ETS, ~50 words; the description, ~70; list cells and temporaries).
  @words_per_region 160
  # At most this heap up front (16 M words, 128 MiB: ~100 000 regions); beyond, the
  # helper grows its heap as any process does.
  @max_presized_words 16_777_216

  @doc """
  `list_regions/1`: the descriptions (`describe_all/1`) of the regions matching a
  validated filter, oldest first.

  With many regions the list is built in a short-lived helper process whose heap is
  sized for it from the start, then sent to the caller (one copy): built in the
  caller's heap, 10 000 descriptions (~9 MB of terms, all live) went through a dozen
  garbage collections of an ever larger heap, each copying everything built so far,
  which cost more than the rest of the listing (bench/FINDINGS.md, section 5). A helper
  that fails makes the caller list the regions itself (raising the same way).
  """
  @spec list(map()) :: [listed()]
  def list(filter) do
    size = :ets.info(Registry.regions_table(), :size)

    if is_integer(size) and size >= @helper_from,
      do: list_in_helper(filter, size),
      else: filter |> select() |> describe_all()
  end

  defp list_in_helper(filter, size) do
    caller = self()
    tag = make_ref()

    {pid, monitor} =
      :erlang.spawn_opt(
        fn -> send(caller, {tag, filter |> select() |> describe_all()}) end,
        [:monitor, min_heap_size: min(@words_per_region * size + 4096, @max_presized_words)]
      )

    receive do
      {^tag, listed} ->
        Process.demonitor(monitor, [:flush])
        listed

      {:DOWN, ^monitor, :process, ^pid, _reason} ->
        filter |> select() |> describe_all()
    end
  end

  defp matches?(record, filter, now) do
    Enum.all?(filter, fn
      {:owner, pid} -> region(record, :owner) == pid
      {:backend, backend} -> region(record, :backend) == backend
      {:security_level, level} -> region(record, :security_level) == level
      {:cleanup_policy, policy} -> region(record, :cleanup_policy) == policy
      {:older_than, ms} -> now - region(record, :created_at) > ms
      {:name, name} -> region(record, :name) == name
      {:sealed, sealed} -> :counters.get(region(record, :counters), 2) >= 1 == sealed
    end)
  end
end
