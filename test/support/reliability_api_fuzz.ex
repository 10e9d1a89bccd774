defmodule Snakepit.SharedMemory.ReliabilityApiFuzz do
  @moduledoc false
  # The fuzz driver of the public API, Snakepit.SharedMemory
  # (test/reliability/fuzz_api_test.exs; also run under ASan by scripts/test-asan-nif.sh).
  #
  # Like Snakepit.SharedMemory.ReliabilityNativeFuzz, one batch per process: calls every
  # public function with valid ids and mappings (its own and a shared base pool), forged
  # mappings and random terms. Allowed outcomes: `:ok`, `{:ok, value}` of the right
  # shape, `{:error, %Snakepit.SharedMemory.Error{}}`, or ArgumentError /
  # FunctionClauseError. Everything the batch allocated is freed before it returns.

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Error, Mapping}
  alias Snakepit.SharedMemory.TermGenerator, as: G

  @functions [
    allocate_region: 10,
    map_region: 9,
    unmap_region: 6,
    deallocate_region: 3,
    write: 10,
    read: 10,
    seal: 3,
    get_region_info: 4,
    list_regions: 2,
    cleanup_regions: 1,
    stats: 1,
    health: 1,
    export_ref: 5,
    adopt_region: 2,
    to_zero_copy_ref: 2,
    from_zero_copy_ref: 2,
    python_env: 1,
    to_nx: 1,
    locate: 2,
    fetch: 2
  ]
  @total_weight @functions |> Keyword.values() |> Enum.sum()

  @doc "The public functions this driver fuzzes (the test checks that it is every one)."
  def functions, do: Keyword.keys(@functions)
  @pool_ids 12
  @pool_mappings 16
  @max_failures 10

  @doc "A shared base pool: a few regions of every kind, allocated by the calling process."
  def base_pool do
    specs = [
      [],
      [backend: :posix],
      [security_level: :high],
      [security_level: :maximum, cleanup_policy: :manual],
      [cleanup_policy: :reference_counted],
      [name: "fzapi#{:rand.uniform(1_000_000)}", permissions: %{group: :read_only}]
    ]

    for opts <- specs do
      {:ok, id} = SharedMemory.allocate_region(Enum.random([4096, 70_000, 200_000]), opts)
      id
    end
  end

  @doc "Frees the base pool (whatever the fuzzed calls left of it)."
  def free_base_pool(ids) do
    {:ok, _} = SharedMemory.cleanup_regions(ids: ids, orphans: false)
    :ok
  end

  @doc "Runs `calls` fuzzed calls in the calling process; returns the figures."
  def run_batch(seed, calls, base_ids) do
    G.seed(seed)
    dead = spawn(fn -> :ok end)
    ref = Process.monitor(dead)

    receive do
      {:DOWN, ^ref, _, _, _} -> :ok
    end

    state = %{
      ids: base_ids,
      own: [],
      mappings: [],
      pids: [self(), dead, G.external_pid()],
      figures: %{calls: 0, raised: 0, errors: 0, ok: 0, reasons: %{}, failures: []}
    }

    state = Enum.reduce(1..calls, state, fn _, acc -> step(acc) end)

    {:ok, _} = SharedMemory.cleanup_regions(ids: Enum.uniq(state.own), orphans: false)
    state.figures
  end

  defp step(state) do
    fun = pick_function()
    pool = pool(state)

    args =
      if :rand.uniform(6) == 1,
        do: random_args(fun, pool),
        else: args(fun, state, pool)

    outcome =
      try do
        {:returned, apply(SharedMemory, fun, args)}
      rescue
        e in [ArgumentError, FunctionClauseError] -> {:raised, e}
        e -> {:bad_raise, e}
      catch
        kind, value -> {:bad_raise, {kind, value}}
      end

    state |> classify(fun, args, outcome) |> keep(fun, args, outcome)
  end

  defp pick_function do
    n = :rand.uniform(@total_weight)

    Enum.reduce_while(@functions, n, fn {fun, weight}, left ->
      if left <= weight, do: {:halt, fun}, else: {:cont, left - weight}
    end)
  end

  # Any arity the module exports for `fun`, with random arguments.
  defp random_args(fun, pool) do
    arities = for {^fun, a} <- SharedMemory.__info__(:functions), do: a
    for _ <- 1..G.one_of(arities)//1, do: G.any(pool)
  end

  defp pool(state) do
    %{
      id: state.ids,
      mapping: Enum.map(state.mappings, &elem(&1, 0)),
      pid: state.pids,
      region: [],
      path: []
    }
  end

  # ---- arguments ----

  defp args(:allocate_region, _state, pool) do
    size = G.pick(0.9, pool, &G.size/0)

    if :rand.uniform(8) == 1,
      do: [size],
      else: [size, G.pick(0.9, pool, fn -> alloc_opts(pool) end)]
  end

  defp args(:map_region, _state, pool) do
    id = G.pick(0.85, pool, fn -> G.region_id(pool) end)

    opts =
      G.pick(0.85, pool, fn ->
        G.one_of([[], [access_mode: :read_only], [access_mode: :read_write], %{access_mode: :rw}])
      end)

    if :rand.uniform(5) == 1, do: [id], else: [id, opts]
  end

  defp args(:unmap_region, state, pool), do: [mapping(state, pool)]

  defp args(:write, state, pool) do
    m = mapping(state, pool)
    [m, G.offset(size_of(m)), G.payload(pool)]
  end

  defp args(:read, state, pool) do
    m = mapping(state, pool)
    [m, G.offset(size_of(m)), G.length_for(size_of(m))]
  end

  defp args(fun, _state, pool) when fun in [:deallocate_region, :seal, :get_region_info],
    do: [G.pick(0.85, pool, fn -> G.region_id(pool) end)]

  defp args(:list_regions, _state, pool) do
    filter =
      G.one_of([
        [],
        [owner: self()],
        [backend: :posix],
        [security_level: :high],
        [sealed: true],
        [older_than: 0],
        [name: "x"],
        %{cleanup_policy: :manual},
        [owner: :me]
      ])

    [G.pick(0.8, pool, fn -> filter end)]
  end

  defp args(:cleanup_regions, state, pool) do
    opts =
      G.one_of([
        [dry_run: true],
        [expired_only: true],
        [ids: Enum.take(state.own, 3), orphans: false],
        [owner: self(), dry_run: true],
        [older_than: 10 ** 12],
        [ids: :all],
        [dry_run: :yes]
      ])

    [G.pick(0.85, pool, fn -> opts end)]
  end

  defp args(:stats, _state, _pool), do: []
  defp args(:health, _state, _pool), do: []
  defp args(:python_env, _state, _pool), do: []
  defp args(:to_nx, _state, pool), do: [G.pick(0.85, pool, fn -> G.region_id(pool) end)]

  defp args(f, _state, pool) when f in [:to_zero_copy_ref, :adopt_region, :from_zero_copy_ref] do
    ref =
      G.one_of([
        G.region_id(pool),
        %{"v" => 1, "region_id" => G.region_id(pool), "backend" => "memfd"},
        %{"v" => 1, "region_id" => "spshm_aaaaaaaaaaaaaaaaaaaa", "backend" => "posix"},
        %{
          "__snakepit_zero_copy__" => true,
          "kind" => G.one_of(["shm", "dlpack"]),
          "ref" => G.any(pool)
        },
        G.any(pool)
      ])

    if f == :from_zero_copy_ref, do: [ref], else: [ref, G.one_of([[], [owner: self()], %{}])]
  end

  defp args(:export_ref, _state, pool) do
    opts =
      G.one_of([
        [],
        [include_key: true],
        [dtype: "float32", shape: [2, 2]],
        [shape: [-1]],
        [dtype: 1]
      ])

    [G.pick(0.85, pool, fn -> G.region_id(pool) end), G.pick(0.85, pool, fn -> opts end)]
  end

  defp args(:locate, _state, pool), do: [G.pick(0.85, pool, fn -> G.region_id(pool) end)]

  defp args(:fetch, _state, pool) do
    opts =
      G.one_of([
        [],
        [chunk_size: 4096, window: 1],
        [into: G.region_id(pool)],
        [encrypt: true, checksum: :sha256],
        [region: [cleanup_policy: :manual]],
        [security_level: :standard],
        [window: 0],
        [chunk_size: -1],
        [node: :nowhere@nohost],
        [bogus: 1]
      ])

    [G.pick(0.85, pool, fn -> G.region_id(pool) end), G.pick(0.85, pool, fn -> opts end)]
  end

  defp alloc_opts(pool) do
    valid = %{
      permissions:
        G.one_of([
          %{owner: :read_write},
          %{group: :read_only},
          [owner: :read_only, other: :read_write],
          %{owner: :none},
          %{bogus: 1}
        ]),
      timeout: G.one_of([:infinity, :infinity, 1, 50, 60_000, 0, -1, 1.5]),
      security_level: G.one_of([:standard, :standard, :high, :maximum, :low]),
      access_mode: G.one_of([:read_write, :read_only, :write]),
      cleanup_policy: G.one_of([:automatic, :manual, :reference_counted, :never]),
      allowed_processes: G.one_of([[], [self()], [G.pid(pool)], :all, [1]]),
      metadata:
        G.one_of([
          %{},
          %{dtype: "uint8", shape: [4]},
          %{"a" => <<255>>},
          %{a: {1, 2}},
          Map.new(1..300, &{"k#{&1}", &1}),
          [x: 1]
        ]),
      name: G.one_of([nil, nil, nil, G.name()]),
      open_mode: G.one_of([:create, :open_only, :create_or_open, :remove_and_create, :open]),
      backend: G.one_of([:auto, :auto, :memfd, :posix, :windows]),
      owner: G.one_of([self(), self(), G.pid(pool)])
    }

    valid = Map.new(Enum.take_random(Map.to_list(valid), :rand.uniform(5)))
    opts = G.mutate_map(valid, pool, 0.9)
    if :rand.uniform(2) == 1, do: Map.to_list(opts), else: opts
  end

  defp mapping(state, pool) do
    case :rand.uniform(10) do
      n when n <= 7 and state.mappings != [] -> state.mappings |> G.one_of() |> elem(0)
      8 -> forged_mapping(state, pool)
      _ -> G.any(pool)
    end
  end

  # A Mapping struct the API never handed out: garbage in its internal fields, or the
  # fields of one mapping with the region id of another.
  defp forged_mapping(state, pool) do
    base =
      case state.mappings do
        [] ->
          %Mapping{
            region_id: G.region_id(pool),
            id: make_ref(),
            mode: :read_write,
            size: 1,
            ref: make_ref()
          }

        mappings ->
          mappings |> G.one_of() |> elem(0)
      end

    field = G.one_of([:region_id, :id, :mode, :size, :ref, :region, :counters, :encrypted])
    Map.put(base, field, G.any(pool, 1))
  end

  defp size_of(%Mapping{size: size}) when is_integer(size) and size > 0, do: size
  defp size_of(_), do: G.size()

  # ---- outcomes ----

  defp classify(state, fun, args, outcome) do
    f = state.figures
    f = %{f | calls: f.calls + 1}

    f =
      case outcome do
        {:raised, _} ->
          %{f | raised: f.raised + 1}

        {:returned, {:error, %Error{reason: reason, message: message}}}
        when is_atom(reason) and is_binary(message) and message != "" ->
          %{f | errors: f.errors + 1, reasons: Map.update(f.reasons, reason, 1, &(&1 + 1))}

        {:returned, value} ->
          if well_shaped?(fun, args, value),
            do: %{f | ok: f.ok + 1},
            else: failure(f, fun, args, {:unexpected_return, value})

        {:bad_raise, e} ->
          failure(f, fun, args, {:unexpected_exception, e})
      end

    %{state | figures: f}
  end

  defp failure(f, fun, args, what) do
    entry =
      "SharedMemory.#{fun}(#{Enum.map_join(args, ", ", &inspect(&1, limit: 6, printable_limit: 80, structs: false))})" <>
        " -> #{inspect(what, limit: 12, printable_limit: 300, structs: false)}"

    if length(f.failures) < @max_failures, do: %{f | failures: f.failures ++ [entry]}, else: f
  end

  defp well_shaped?(:allocate_region, _, {:ok, id}),
    do: is_binary(id) and String.starts_with?(id, "spshm_")

  defp well_shaped?(:map_region, _, {:ok, %Mapping{}}), do: true

  defp well_shaped?(:read, [_m, _o, len], {:ok, bin}),
    do: is_binary(bin) and byte_size(bin) == len

  defp well_shaped?(:get_region_info, _, {:ok, info}), do: is_map(info)
  defp well_shaped?(:list_regions, _, {:ok, list}), do: is_list(list)
  defp well_shaped?(:cleanup_regions, _, {:ok, list}), do: is_list(list)
  defp well_shaped?(:stats, _, {:ok, stats}), do: is_map(stats)

  defp well_shaped?(:health, _, %{status: s, checks: checks}),
    do: s in [:ok, :degraded, :critical] and is_list(checks)

  defp well_shaped?(:export_ref, _, {:ok, %{"region_id" => id}}), do: is_binary(id)
  defp well_shaped?(:adopt_region, _, {:ok, id}), do: is_binary(id)

  defp well_shaped?(:to_zero_copy_ref, _, {:ok, marker}),
    do: marker["__snakepit_zero_copy__"] == true

  defp well_shaped?(:from_zero_copy_ref, _, {:ok, ref}), do: is_binary(ref["region_id"])
  defp well_shaped?(:python_env, _, {:ok, env}), do: is_map(env)
  defp well_shaped?(:to_nx, _, {:ok, _tensor}), do: true
  defp well_shaped?(:locate, _, {:ok, node}), do: is_atom(node)
  defp well_shaped?(:fetch, _, {:ok, id}), do: is_binary(id)

  defp well_shaped?(f, _, :ok) when f in [:unmap_region, :deallocate_region, :write, :seal],
    do: true

  defp well_shaped?(_f, _args, _value), do: false

  # ---- keeping what calls created ----

  defp keep(state, :allocate_region, _args, {:returned, {:ok, id}}) do
    %{state | own: [id | state.own], ids: Enum.take([id | state.ids], @pool_ids)}
  end

  # A copy made by fetch (not one written into an existing region) is the batch's own.
  defp keep(state, :fetch, _args, {:returned, {:ok, id}}) do
    if id in state.ids,
      do: state,
      else: %{state | own: [id | state.own], ids: Enum.take([id | state.ids], @pool_ids)}
  end

  defp keep(state, :map_region, _args, {:returned, {:ok, mapping}}) do
    %{state | mappings: Enum.take([{mapping} | state.mappings], @pool_mappings)}
  end

  defp keep(state, _fun, _args, _outcome), do: state
end
