defmodule Snakepit.SharedMemory.Registry do
  @moduledoc """
  The region registry: public ETS tables read and written by any process, without a
  GenServer call. The tables belong to `Snakepit.SharedMemory.TableOwner`, a process
  that does nothing else, so a crash of the manager loses nothing.

  ## ETS layout

    * `#{:snakepit_shm_regions}` (`set`, key position 2): one `region` record per live
      region (see `region/1`): id, the region resource (which keeps the segment mapped
      and, for memfd, alive), size, backend, owner pid, permissions, security level,
      cleanup policy, idle timeout, access mode, allowed processes, metadata, name,
      role (`:created` or `:opened`), creation time (and a monotonic sequence number that
      orders regions created in the same millisecond), a `:counters` ref (slot 1: accesses
      through this VM) and whether it was re-adopted after a table loss.
    * `#{:snakepit_shm_mappings}` (`ordered_set`): `{{region_id, mapping_id}, pid, mode,
      mapping_resource}` for every live `map_region/2`; ordered so that all mappings of
      one region are one partially bound key range. The row keeps the mapping resource
      alive: a mapping lives until `unmap_region/1`, its region is freed, or its process
      dies (the manager then unmaps it, releasing its hold in the header).
    * `#{:snakepit_shm_callers}` (`set`): `{pid}` for every process that has used the
      API; the manager monitors each once (first use casts to it).
    * `#{:snakepit_shm_owners}` (`set`): `{owner_pid, counter}` for
      `:max_regions_per_process`: the owner's counter of live regions, a NIF resource
      (see `Snakepit.SharedMemory.Quota`).
    * `#{:snakepit_shm_meta}` (`set`): `{:initialized, true}` once a manager started on
      these tables (absent in fresh tables: the manager then rebuilds from the segments).

  ## The quota charge of a record

  Each record holds its region's quota charge (`quota`, a NIF resource, see
  `Snakepit.SharedMemory.Quota`): what the region counts in the quota counters, given
  back when the last reference to it dies unless released before. So the charge must
  live only in the registry and in the one process that inserts or takes the record:
  `lookup/1`, `all/0` and `owned_by/1` return records whose `quota` is nil (the match
  specification leaves it out, so a reader's heap never holds a charge that would
  outlive a killed deallocator's). Only `take/1` returns it.
  """

  require Record

  @regions :snakepit_shm_regions
  @mappings :snakepit_shm_mappings
  @callers :snakepit_shm_callers
  @owners :snakepit_shm_owners
  @meta :snakepit_shm_meta

  @region_fields [
    id: nil,
    ref: nil,
    size: 0,
    backend: nil,
    role: :created,
    name: nil,
    owner: nil,
    created_at: 0,
    seq: 0,
    permissions: %{},
    security_level: :standard,
    cleanup_policy: :automatic,
    timeout: :infinity,
    access_mode: :read_write,
    allowed: [],
    metadata: %{},
    counters: nil,
    adopted: false,
    quota: nil,
    # The header's holder generation when the region was registered: only a change of
    # the holder table after it means "held at least once" for :reference_counted (0
    # for a region created here; an adopted worker output was held by its worker).
    # nil: holds taken before registration (the worker's own) are still there; the
    # baseline is the generation once they are gone (set_held_after/2).
    held_after: 0
  ]

  Record.defrecord(:region, @region_fields)

  # Match specification pieces that copy a record without its quota charge.
  @vars for i <- 1..length(@region_fields), do: :"$#{i}"
  @pattern List.to_tuple([:region | @vars])
  @public List.to_tuple([
            :region
            | for(
                {{name, _}, var} <- Enum.zip(@region_fields, @vars),
                do: if(name == :quota, do: nil, else: var)
              )
          ])
  @owner_position Enum.find_index(@region_fields, &(elem(&1, 0) == :owner)) + 1

  @type region_record ::
          record(:region,
            id: String.t(),
            ref: reference(),
            size: pos_integer(),
            backend: atom(),
            role: :created | :opened,
            name: String.t() | nil,
            owner: pid() | nil,
            created_at: integer(),
            seq: integer(),
            permissions: map(),
            security_level: atom(),
            cleanup_policy: atom(),
            timeout: pos_integer() | :infinity,
            access_mode: :read_write | :read_only,
            allowed: [pid()],
            metadata: map(),
            counters: :counters.counters_ref(),
            adopted: boolean(),
            quota: Snakepit.SharedMemory.Native.quota_charge() | nil
          )

  @doc false
  def tables do
    [
      {@regions, [:set, :public, :named_table, {:keypos, 2}] ++ concurrency()},
      {@mappings, [:ordered_set, :public, :named_table] ++ concurrency()},
      {@callers, [:set, :public, :named_table] ++ concurrency()},
      {@owners, [:set, :public, :named_table, {:write_concurrency, true}]},
      {@meta, [:set, :public, :named_table, {:read_concurrency, true}]}
    ]
  end

  defp concurrency, do: [{:read_concurrency, true}, {:write_concurrency, true}]

  @doc false
  def regions_table, do: @regions
  @doc false
  def mappings_table, do: @mappings
  @doc false
  def callers_table, do: @callers
  @doc false
  def owners_table, do: @owners
  @doc false
  def meta_table, do: @meta

  @doc "True while the registry tables exist."
  @spec available?() :: boolean()
  def available?, do: :ets.whereis(@regions) != :undefined

  # ---- regions ----

  @doc "Inserts a new record; false if the id is taken."
  @spec insert_new(region_record()) :: boolean()
  def insert_new(record), do: :ets.insert_new(@regions, record)

  @doc "The record of a region (without its quota charge), or nil."
  @spec lookup(String.t()) :: region_record() | nil
  def lookup(id) do
    # The key bound in the pattern: one hash lookup, not a scan.
    spec = [{put_elem(@pattern, 1, id), [], [{put_elem(@public, 1, id)}]}]

    case :ets.select(@regions, spec) do
      [record] -> record
      [] -> nil
    end
  rescue
    ArgumentError -> nil
  end

  @doc "True if the region is registered (no copy of its record)."
  @spec member?(String.t()) :: boolean()
  def member?(id), do: :ets.member(@regions, id)

  @doc """
  `{cleanup_policy, ref, held_after}` of a region, or nil: the holder generation above
  which a `:reference_counted` region counts as held at least once.
  """
  @spec policy_ref_and_baseline(String.t()) ::
          {atom(), reference(), non_neg_integer() | nil} | nil
  def policy_ref_and_baseline(id) do
    # Element reads, as policy_and_ref/1 (held_after changes once, from nil).
    {:ets.lookup_element(@regions, id, region(:cleanup_policy) + 1),
     :ets.lookup_element(@regions, id, region(:ref) + 1),
     :ets.lookup_element(@regions, id, region(:held_after) + 1)}
  rescue
    ArgumentError -> nil
  end

  @doc "Sets the baseline of `held_after` (see the field); false if the region is gone."
  @spec set_held_after(String.t(), non_neg_integer()) :: boolean()
  def set_held_after(id, generation),
    do: :ets.update_element(@regions, id, {region(:held_after) + 1, generation})

  @doc "`{cleanup_policy, region_resource}` of a region without copying its record, or nil."
  @spec policy_and_ref(String.t()) :: {atom(), reference()} | nil
  def policy_and_ref(id) do
    # Two element reads (no match specification to run over the table): neither field of
    # a record ever changes, so reading them apart is consistent.
    {:ets.lookup_element(@regions, id, region(:cleanup_policy) + 1),
     :ets.lookup_element(@regions, id, region(:ref) + 1)}
  rescue
    ArgumentError -> nil
  end

  @doc """
  Removes and returns a record, with its quota charge. Of several processes freeing the
  same region at once, exactly one gets the record: that one frees it (and releases the
  charge; if it is killed first, the charge dies with its heap and gives itself back).
  """
  @spec take(String.t()) :: region_record() | nil
  def take(id) do
    case :ets.take(@regions, id) do
      [record] -> record
      [] -> nil
    end
  rescue
    ArgumentError -> nil
  end

  @doc "Every record (without quota charges)."
  @spec all() :: [region_record()]
  def all do
    :ets.select(@regions, [{@pattern, [], [{@public}]}])
  rescue
    ArgumentError -> []
  end

  @doc """
  Every record with only `fields` filled (the others nil): a sweep over thousands of
  regions copies a few words of each instead of its maps and lists. Never the quota
  charge.
  """
  @spec all_with([atom()]) :: [region_record()]
  def all_with(fields) do
    names = Keyword.keys(region(region()))
    vars = for i <- 1..length(names), do: :"$#{i}"
    pattern = List.to_tuple([:region | vars])

    body =
      List.to_tuple([
        :region
        | for(
            {name, var} <- Enum.zip(names, vars),
            do: if(name in fields and name != :quota, do: var)
          )
      ])

    :ets.select(@regions, [{pattern, [], [{body}]}])
  rescue
    ArgumentError -> []
  end

  @doc "The ids of every live region."
  @spec ids() :: [String.t()]
  def ids, do: :ets.select(@regions, [{region(id: :"$1", _: :_), [], [:"$1"]}])

  @doc "Records owned by `pid` (without quota charges)."
  @spec owned_by(pid()) :: [region_record()]
  def owned_by(pid) do
    :ets.select(@regions, [
      {put_elem(@pattern, @owner_position, pid), [], [{put_elem(@public, @owner_position, pid)}]}
    ])
  end

  @doc "Live region count (O(1))."
  @spec count() :: non_neg_integer()
  def count, do: :ets.info(@regions, :size)

  # ---- mappings ----

  @doc "Records a live mapping."
  @spec put_mapping(String.t(), reference(), pid(), atom(), reference()) :: true
  def put_mapping(region_id, mapping_id, pid, mode, mapping_ref),
    do: :ets.insert(@mappings, {{region_id, mapping_id}, pid, mode, mapping_ref})

  @doc "Removes and returns one mapping row (exactly one caller gets it)."
  @spec take_mapping(String.t(), reference()) :: tuple() | nil
  def take_mapping(region_id, mapping_id) do
    case :ets.take(@mappings, {region_id, mapping_id}) do
      [row] -> row
      [] -> nil
    end
  rescue
    ArgumentError -> nil
  end

  @doc "Mapping rows of one region, in key order."
  @spec mappings_of(String.t()) :: [tuple()]
  # The table is an ordered_set keyed {region_id, mapping_ref}: the region's rows follow
  # {region_id, 0} (an integer sorts before every reference). Walking them with next/2
  # costs one call for a region without mappings (every deallocation), where a
  # match_object compiled its pattern each time (~0.4 us).
  def mappings_of(region_id),
    do: mappings_from(region_id, :ets.next(@mappings, {region_id, 0}), [])

  defp mappings_from(id, {id, _} = key, acc) do
    acc =
      case :ets.lookup(@mappings, key) do
        [row] -> [row | acc]
        [] -> acc
      end

    mappings_from(id, :ets.next(@mappings, key), acc)
  end

  defp mappings_from(_id, _other, acc), do: :lists.reverse(acc)

  @doc "Mapping rows of one process."
  @spec mappings_of_pid(pid()) :: [tuple()]
  def mappings_of_pid(pid), do: :ets.match_object(@mappings, {:_, pid, :_, :_})

  @doc "Pids with a live mapping of the region, without duplicates."
  @spec mapped_by(String.t()) :: [pid()]
  def mapped_by(region_id) do
    @mappings
    |> :ets.select([{{{region_id, :_}, :"$1", :_, :_}, [], [:"$1"]}])
    |> Enum.uniq()
  end

  # ---- callers ----

  @doc """
  Makes sure the manager monitors the calling process (once per process and per
  incarnation of the tables): the first call inserts the caller's row and casts to the
  manager; later calls read one process-dictionary entry (the tables' incarnation it
  registered under, compared with the current one: a restart of the table owner makes
  every process register again).
  """
  @spec register_caller() :: :ok
  def register_caller do
    incarnation = :persistent_term.get({__MODULE__, :incarnation}, nil)

    if incarnation == nil or Process.get({__MODULE__, :caller}) !== incarnation do
      pid = self()

      if :ets.insert_new(@callers, {pid}),
        do: GenServer.cast(Snakepit.SharedMemory.Manager, {:monitor_caller, pid})

      if incarnation != nil, do: Process.put({__MODULE__, :caller}, incarnation)
    end

    :ok
  end

  @doc false
  # Called by the table owner once it created the tables (see register_caller/0).
  @spec new_incarnation() :: :ok
  def new_incarnation, do: :persistent_term.put({__MODULE__, :incarnation}, make_ref())

  @doc "Every registered caller."
  @spec callers() :: [pid()]
  def callers, do: :ets.select(@callers, [{{:"$1"}, [], [:"$1"]}])

  @doc "Forgets a caller (it died)."
  @spec delete_caller(pid()) :: true
  def delete_caller(pid), do: :ets.delete(@callers, pid)

  # ---- meta ----

  @doc "A flag of the meta table (false if absent)."
  @spec flag(atom()) :: boolean()
  def flag(name) do
    case :ets.lookup(@meta, name) do
      [{^name, value}] -> value
      [] -> false
    end
  end

  @doc "Sets a flag of the meta table."
  @spec set_flag(atom(), boolean()) :: true
  def set_flag(name, value), do: :ets.insert(@meta, {name, value})
end
