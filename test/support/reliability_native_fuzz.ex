defmodule Snakepit.SharedMemory.ReliabilityNativeFuzz do
  @moduledoc false
  # The fuzz driver of Snakepit.SharedMemory.Native (test/reliability/fuzz_native_test.exs,
  # also run under AddressSanitizer by scripts/test-asan-nif.sh).
  #
  # A batch runs in its own process: it generates calls to every NIF with arguments that
  # are valid handles (a shared base pool of regions, mappings, paths, pids, plus what
  # its own calls create) or random terms (Snakepit.SharedMemory.TermGenerator), and
  # classifies each outcome. Allowed: a well-shaped result of that function (an error
  # tuple `{:error, {errc, message, errno}}` included) or ArgumentError /
  # FunctionClauseError. Anything else is recorded as a failure with the call. Everything
  # a batch creates is deallocated before it returns; its watches and memfds die with it.

  import Bitwise

  alias Snakepit.SharedMemory.{Native, ShmHelpers}
  alias Snakepit.SharedMemory.TermGenerator, as: G

  # Every name of spshm::Errc (c_src/core/error.hpp).
  @errc [
    :invalid_argument,
    :not_found,
    :already_exists,
    :permission_denied,
    :no_space,
    :too_large,
    :corrupt,
    :unsupported_version,
    :not_ours,
    :sealed,
    :busy,
    :expired,
    :deallocated,
    :closed,
    :out_of_bounds,
    :tampered,
    :holder_table_full,
    :mlock_failed,
    :unsupported,
    :io_error
  ]

  # {function, weight}: deallocation and unlinking are rarer, so that the pool stays alive.
  @functions [
    header_layout: 1,
    arena_configure: 1,
    arena_maintain: 1,
    arena_stats: 1,
    inspect_arena: 2,
    create: 8,
    create_plain: 6,
    create_cpu: 2,
    open: 6,
    info: 3,
    header: 4,
    hold_counts: 3,
    map: 8,
    unmap: 5,
    write: 9,
    write_dirty: 4,
    read: 9,
    read_dirty: 4,
    read_zero_copy: 5,
    # large reads and encrypted creation in slices (issue 12)
    init_chunks: 2,
    publish: 2,
    read_buffer: 2,
    read_into: 4,
    read_buffer_take: 2,
    seal: 3,
    deallocate: 2,
    deallocate_plain: 2,
    last_access: 2,
    set_idle_timeout: 2,
    mark_adopted: 1,
    export_key: 2,
    release_holder: 3,
    monitor_owner: 3,
    watch_os_process: 3,
    cancel_watch: 2,
    inspect_path: 5,
    unlink_segment: 2,
    sweep_segment: 2,
    allocate_step: 3,
    # zeroing at deallocation in slices (issue 12)
    deallocate_begin: 2,
    zero_step: 3,
    deallocate_finish: 2,
    await_seal_commit: 1,
    # an orphan's pages freed in slices, the reaper's counts (issue 12)
    sweep_segment_begin: 1,
    release_pages_step: 2,
    reaper_stats: 1,
    list_segments: 1,
    runtime_index_sweep: 1,
    runtime_index_flush: 1,
    reap_holders: 2,
    reaped_holds: 1,
    list_counts: 2,
    process_start_time: 2,
    process_alive: 2,
    self_info: 1,
    read_small_files: 2,
    set_shm_dir: 1,
    shm_dir: 1,
    fs_stat: 2,
    # status board (nif_board.cpp)
    board_layout: 1,
    board_init: 3,
    board_open: 4,
    board_info: 2,
    board_join: 4,
    board_update: 5,
    board_leave: 3,
    board_entries: 3,
    board_entries_dirty: 1,
    board_least_loaded: 5,
    board_reclaim: 2,
    board_watch_info: 2,
    board_monotonic_ns: 1,
    # the message channel (nif_channel.cpp) and the ring probe (nif_ring_probe.cpp)
    channel_layout: 1,
    channel_open: 1,
    channel_info: 1,
    channel_select: 1,
    channel_events: 1,
    channel_send: 2,
    channel_prepare_region: 1,
    channel_send_region: 1,
    channel_recv: 2,
    channel_pump: 2,
    channel_doorbell: 1,
    channel_doorbell_close: 1,
    channel_pump_bell: 2,
    channel_guard: 1,
    channel_prepare_wait: 1,
    channel_flush: 1,
    channel_close: 1,
    channel_monitor: 1,
    channel_stats: 1,
    channel_sweep_dirs: 1,
    ring_probe_new: 1,
    ring_probe_write: 2,
    ring_probe_read: 2,
    ring_probe_flush: 1,
    ring_probe_indices: 1,
    # the warm pool and huge pages (nif_pool.cpp)
    pool_configure: 1,
    pool_drain: 1,
    pool_stats: 1,
    huge_page_info: 1,
    pooled_object: 2,
    # quota charges and keep_name (nif_quota.cpp)
    quota_owner_new: 1,
    quota_reserve: 3,
    quota_release: 2,
    quota_resize: 1,
    quota_host: 1,
    quota_attach: 1,
    quota_held: 1,
    quota_totals: 1,
    quota_owned: 1,
    keep_name: 2,
    names_dropped: 1
  ]
  @total_weight @functions |> Keyword.values() |> Enum.sum()

  @doc "The NIFs this driver fuzzes (the test checks that it is every one of them)."
  def functions, do: Keyword.keys(@functions)

  @pool_regions 12
  @pool_mappings 16
  @max_failures 10

  # ---- base pool (built by the test process, shared by concurrent batches) ----

  @doc "Creates the shared base pool: a few regions of every kind, mapped, with data."
  def base_pool do
    specs = [
      %{backend: :memfd},
      %{backend: :posix},
      %{backend: :memfd, encrypted: true, security_level: 1},
      %{backend: :posix, encrypted: true, security_level: 2},
      %{backend: :memfd, sealed: true},
      %{backend: :posix, name: "fzbase#{:rand.uniform(1_000_000)}"}
    ]

    regions =
      for spec <- specs do
        size = Enum.random([4096, 70_000, 300_000])
        opts = ShmHelpers.create_opts(Map.drop(spec, [:sealed]))
        {:ok, region, info} = Native.create(size, opts)
        {:ok, m} = Native.map(region, :read_write)
        :ok = Native.write(m, 0, :binary.copy(<<7>>, min(size, 4096)))
        if spec[:sealed], do: :ok = Native.seal(region)
        {region, info, m}
      end

    dead = spawn(fn -> :ok end)
    ref = Process.monitor(dead)

    receive do
      {:DOWN, ^ref, _, _, _} -> :ok
    end

    %{regions: regions, dead_pid: dead}
  end

  @doc "Deallocates the base pool."
  def free_base_pool(%{regions: regions}) do
    for {region, _info, _m} <- regions, do: release(region)
    :ok
  end

  # Deallocates a region the fuzzer made. A fuzzed deallocate_begin/1 may have left it
  # half-way (a second deallocate answers busy): end it the documented way, as its
  # reaper would once the handle goes.
  defp release(region) do
    case Native.deallocate(region, false) do
      {:error, {:busy, _, _}} -> finish_deallocation(region, 0)
      other -> other
    end
  end

  defp finish_deallocation(region, offset) do
    case Native.zero_step(region, offset) do
      {:ok, next} when next > offset -> finish_deallocation(region, next)
      _ -> Native.deallocate_finish(region)
    end
  end

  # ---- a batch ----

  @doc """
  Runs `calls` fuzzed calls in the calling process (seeded with `seed`). Returns the
  figures and failures: %{calls, raised, errors, ok, reasons, failures}.
  """
  def run_batch(seed, calls, base) do
    G.seed(seed)
    sleeper = Port.open({:spawn_executable, "/bin/sleep"}, [:stderr_to_stdout, args: ["600"]])
    {:os_pid, sleeper_pid} = Port.info(sleeper, :os_pid)
    {:ok, sleeper_start} = Native.process_start_time(sleeper_pid)
    me = Native.self_info()

    state = %{
      regions: for({r, info, _} <- base.regions, do: {r, info}),
      mappings: for({r, info, m} <- base.regions, do: {m, info.size, r}),
      watches: [],
      boards: [],
      slots: [],
      own: [],
      os_pids: [{me.os_pid, me.start_time}, {sleeper_pid, sleeper_start}, {1, 0}],
      pids: [base.dead_pid, self(), G.external_pid()],
      port: sleeper,
      figures: %{calls: 0, raised: 0, errors: 0, ok: 0, reasons: %{}, failures: []}
    }

    try do
      state = Enum.reduce(1..calls, state, fn _, acc -> step(acc) end)
      teardown(state)
      state.figures
    after
      Port.close(sleeper)
      System.cmd("kill", ["-9", Integer.to_string(sleeper_pid)])
    end
  end

  defp teardown(state) do
    for {watch, _} <- state.watches, do: Native.cancel_watch(watch)
    for {region, _info} <- state.own, do: release(region)
    :ok
  end

  defp step(state) do
    fun = pick_function()
    pool = pool(state)

    # set_shm_dir is global to the VM (where every suite's POSIX segments live): it
    # only ever gets the chosen arguments of args/3, never arbitrary paths.
    args =
      if :rand.uniform(5) == 1 and fun not in [:set_shm_dir, :arena_configure],
        do: for(_ <- 1..arity(fun)//1, do: G.any(pool)),
        else: args(fun, state, pool)

    outcome =
      try do
        {:returned, apply(Native, fun, args)}
      rescue
        e in [ArgumentError, FunctionClauseError] -> {:raised, e}
        e -> {:bad_raise, e}
      catch
        kind, value -> {:bad_raise, {kind, value}}
      end

    state
    |> classify(fun, args, outcome)
    |> keep(fun, args, outcome)
  end

  defp pick_function do
    n = :rand.uniform(@total_weight)

    Enum.reduce_while(@functions, n, fn {fun, weight}, left ->
      if left <= weight, do: {:halt, fun}, else: {:cont, left - weight}
    end)
  end

  defp arity(fun) do
    {^fun, arity} = Enum.find(Native.__info__(:functions), fn {f, _} -> f == fun end)
    arity
  end

  # The pool the generators draw valid handles from.
  defp pool(state) do
    %{
      region: Enum.map(state.regions, &elem(&1, 0)),
      mapping: Enum.map(state.mappings, &elem(&1, 0)),
      id: for({_r, info} <- state.regions, do: info.id),
      path:
        for({_r, info} <- state.regions, path <- [info.control_path, info.data_path], do: path),
      pid: state.pids,
      watch: Enum.map(state.watches, &elem(&1, 0)),
      board: state.boards,
      slot: state.slots,
      port: [state.port]
    }
  end

  # ---- argument generators, per function ----

  defp args(f, _state, pool) when f in [:create, :create_plain, :create_cpu],
    do: [G.pick(0.85, pool, &G.size/0), G.pick(0.9, pool, fn -> create_opts(pool) end)]

  defp args(:open, state, pool) do
    target =
      case :rand.uniform(4) do
        1 -> G.handle(pool, :id)
        2 -> region_paths(state, pool)
        3 -> G.path(pool)
        4 -> G.region_id(pool)
      end

    [target, G.pick(0.9, pool, fn -> G.one_of([true, false]) end)]
  end

  defp args(fun, _state, pool)
       when fun in [
              :info,
              :header,
              :hold_counts,
              :seal,
              :export_key,
              :last_access,
              :reap_holders,
              :mark_adopted
            ],
       do: [G.pick(0.85, pool, fn -> G.handle(pool, :region) end)]

  defp args(:map, _state, pool),
    do: [
      G.pick(0.85, pool, fn -> G.handle(pool, :region) end),
      G.pick(0.85, pool, fn -> G.one_of([:read_only, :read_write]) end)
    ]

  defp args(:unmap, _state, pool), do: [G.pick(0.85, pool, fn -> G.handle(pool, :mapping) end)]

  defp args(fun, state, pool) when fun in [:write, :write_dirty] do
    {mapping, size} = mapping_and_size(state, pool)
    [mapping, G.offset(size), G.payload(pool)]
  end

  defp args(fun, state, pool) when fun in [:read, :read_dirty, :read_zero_copy] do
    {mapping, size} = mapping_and_size(state, pool)
    [mapping, G.offset(size), G.length_for(size)]
  end

  defp args(:read_buffer, _state, pool),
    do: [G.pick(0.85, pool, fn -> G.one_of([0, 1, 1000, 1 <<< 20, 1 <<< 62, -1]) end)]

  defp args(:read_into, state, pool) do
    {mapping, size} = mapping_and_size(state, pool)

    [
      mapping,
      G.offset(size),
      read_buffer(pool),
      G.pick(0.85, pool, fn -> G.one_of([0, 1, 999, 1000, 1 <<< 64]) end),
      G.length_for(size)
    ]
  end

  defp args(:read_buffer_take, _state, pool), do: [read_buffer(pool)]

  defp args(:init_chunks, _state, pool),
    do: [
      G.pick(0.85, pool, fn -> G.handle(pool, :region) end),
      G.pick(0.85, pool, fn -> G.one_of([0, 1, 16, 1 <<< 64]) end),
      G.pick(0.85, pool, fn -> G.one_of([0, 1, 16, 1 <<< 40]) end)
    ]

  defp args(:publish, _state, pool), do: [G.pick(0.85, pool, fn -> G.handle(pool, :region) end)]

  defp args(f, _state, pool) when f in [:deallocate, :deallocate_plain],
    do: [
      G.pick(0.85, pool, fn -> G.handle(pool, :region) end),
      G.pick(0.85, pool, fn -> G.one_of([true, false]) end)
    ]

  defp args(:set_idle_timeout, _state, pool),
    do: [
      G.pick(0.85, pool, fn -> G.handle(pool, :region) end),
      G.pick(0.85, pool, fn -> G.one_of([0, 0, 60_000, 1 <<< 44, (1 <<< 64) - 1, 1 <<< 64]) end)
    ]

  defp args(:release_holder, state, pool) do
    {os_pid, start} = os_pid_and_start(state)
    [G.pick(0.85, pool, fn -> G.handle(pool, :region) end), os_pid, start]
  end

  defp args(:monitor_owner, _state, pool),
    do: [G.pick(0.85, pool, fn -> G.handle(pool, :region) end), G.pid(pool)]

  defp args(:watch_os_process, state, pool) do
    {os_pid, start} = os_pid_and_start(state)
    [os_pid, start, G.pick(0.9, pool, &make_ref/0)]
  end

  defp args(:cancel_watch, _state, pool),
    do: [G.pick(0.8, pool, fn -> G.handle(pool, :watch) end)]

  defp args(:inspect_path, _state, pool), do: [G.pick(0.85, pool, fn -> path_string(pool) end)]

  # Only ids of this suite's own regions, strange ids and random ones: never a segment of
  # another suite.
  defp args(:unlink_segment, _state, pool), do: [G.region_id(pool)]

  defp args(:read_small_files, _state, pool),
    do: [G.pick(0.85, pool, fn -> for _ <- 1..:rand.uniform(4), do: path_string(pool) end)]

  defp args(:process_start_time, state, _pool), do: [elem(os_pid_and_start(state), 0)]

  defp args(:process_alive, state, _pool), do: Tuple.to_list(os_pid_and_start(state))

  defp args(fun, _state, _pool)
       when fun in [
              :header_layout,
              :self_info,
              :shm_dir,
              :board_layout,
              :board_monotonic_ns,
              :channel_layout,
              :channel_sweep_dirs,
              :list_segments,
              :reaped_holds,
              :reaper_stats,
              :runtime_index_sweep,
              :arena_maintain,
              :arena_stats,
              :pool_drain,
              :pool_stats,
              :huge_page_info,
              :quota_owner_new,
              :quota_totals,
              :names_dropped
            ],
       do: []

  # Limits -1 (none) or small; sizes small (the counters are the VM's: a fuzzed charge
  # lives until its batch ends) or out of range.
  defp args(:quota_reserve, _state, pool),
    do: [
      G.pick(0.85, pool, fn -> G.one_of([nil, quota_owner()]) end),
      G.pick(0.9, pool, fn -> G.one_of([0, 1, 4096, -1, 1 <<< 64]) end),
      G.pick(0.9, pool, fn -> G.one_of([-1, 0, 3, -2]) end),
      G.pick(0.9, pool, fn -> G.one_of([-1, 0, 10_000, -2]) end),
      G.pick(0.9, pool, fn -> G.one_of([-1, 0, 1, -2]) end)
    ]

  defp args(f, _state, pool) when f in [:quota_release, :quota_held], do: [charge(pool)]

  defp args(:quota_resize, _state, pool),
    do: [charge(pool), G.pick(0.85, pool, fn -> G.one_of([0, 100, -1, 1 <<< 64]) end)]

  defp args(:quota_host, _state, pool),
    do: [charge(pool), G.pid(pool), G.pick(0.85, pool, fn -> G.one_of([1, 0, -1]) end)]

  defp args(:quota_attach, _state, pool),
    do: [charge(pool), G.pick(0.85, pool, fn -> G.handle(pool, :region) end)]

  defp args(:quota_owned, _state, pool), do: [G.pick(0.85, pool, &quota_owner/0)]

  defp args(:keep_name, _state, pool),
    do: [
      G.pick(0.85, pool, fn -> G.handle(pool, :region) end),
      G.pick(0.9, pool, fn -> G.one_of([true, false]) end)
    ]

  # Mostly lists of region handles, sometimes with anything else in them, or not a list.
  defp args(:list_counts, _state, pool),
    do: [
      G.pick(0.85, pool, fn ->
        for _ <- 1..:rand.uniform(5), do: G.pick(0.9, pool, fn -> G.handle(pool, :region) end)
      end)
    ]

  # Global to the VM (the size of its next arenas): only the configured values, or
  # refusals, never a size another suite would notice.
  defp args(:arena_configure, _state, _pool) do
    config = Snakepit.SharedMemory.Config.get()

    G.one_of([
      [config.arena_size, config.arena_grace],
      [1 <<< 64, 0],
      [-1, 0],
      [:big, 1],
      [config.arena_size, 1 <<< 41]
    ])
  end

  defp args(:inspect_arena, _state, pool), do: [G.pick(0.85, pool, fn -> path_string(pool) end)]

  defp args(:pooled_object, _state, pool), do: [G.pick(0.85, pool, fn -> path_string(pool) end)]

  # Budgets a test VM can afford (0 disables the pool), or garbage.
  defp args(:pool_configure, _state, pool),
    do: [G.pick(0.85, pool, fn -> Enum.random([0, 8 * 1024 * 1024, 64 * 1024 * 1024]) end)]

  # Short waits only (the writer drains within milliseconds), and refusals.
  defp args(:runtime_index_flush, _state, _pool),
    do: [G.one_of([0, 1, 50, 1000, -1, 1 <<< 32, :soon, "1", 1.5])]

  # Always a dry run: a fuzzer on a shared host removes nothing, even an unused segment.
  defp args(:sweep_segment, _state, pool),
    do: [G.region_id(pool), true]

  # Never an id that may name a segment of somebody else: malformed ids, or well-formed
  # random ones that name nothing (this one removes what it finds unused).
  defp args(:sweep_segment_begin, _state, pool),
    do: [
      G.pick(0.5, pool, fn ->
        "spshm_" <> Base.encode32(:crypto.strong_rand_bytes(12), case: :lower, padding: false)
      end)
    ]

  defp args(:release_pages_step, _state, pool), do: [unlinked(pool)]

  defp args(fun, _state, pool) when fun in [:deallocate_begin, :deallocate_finish],
    do: [G.handle(pool, :region)]

  defp args(:allocate_step, _state, pool),
    do: [
      G.handle(pool, :region),
      G.pick(0.85, pool, fn -> G.one_of([0, 0, 8 <<< 20, 4096, 1 <<< 63, -1]) end)
    ]

  # At most 1000 ms: larger waits are refused (badarg), so a call never holds a dirty
  # scheduler longer; the fuzzer keeps to short waits.
  defp args(:await_seal_commit, _state, pool),
    do: [
      G.handle(pool, :region),
      G.pick(0.85, pool, fn -> G.one_of([0, 1, 5, 1001, 1 <<< 63, -1]) end)
    ]

  defp args(:zero_step, _state, pool),
    do: [
      G.handle(pool, :region),
      G.pick(0.85, pool, fn -> G.one_of([0, 0, 16 <<< 20, 4096, 1 <<< 63, -1]) end)
    ]

  # Never another directory than /dev/shm: the directory is global to the VM, and the
  # other suites' segments live there. Only refusals (and /dev/shm itself) otherwise.
  defp args(:set_shm_dir, _state, _pool),
    do: [
      G.one_of([
        "/dev/shm",
        "/dev/shm/",
        "relative/dir",
        "",
        "/nonexistent/spshm",
        "/etc/hostname",
        "/dev/shm\0/x",
        :dev_shm,
        42,
        ~c"/dev/shm"
      ])
    ]

  defp args(:fs_stat, _state, pool), do: [G.pick(0.85, pool, fn -> path_string(pool) end)]

  defp args(:board_init, _state, pool),
    do: [
      G.pick(0.85, pool, fn -> G.handle(pool, :region) end),
      G.pick(0.9, pool, fn -> G.one_of([0, 1, 4, 20, 1000, 65_536, 65_537, 1 <<< 64]) end),
      G.pick(0.9, pool, fn -> G.one_of([0, 1, 30_000, (1 <<< 64) - 1]) end),
      G.pick(0.9, pool, fn ->
        G.one_of(
          [[], ["a"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"], [<<0, 1>>]] ++
            [[String.duplicate("x", 31)], [String.duplicate("x", 32)], [:a]]
        )
      end)
    ]

  defp args(f, _state, pool) when f in [:board_open, :board_watch_info, :board_reclaim] do
    region = G.pick(0.85, pool, fn -> G.handle(pool, :region) end)

    case f do
      :board_open ->
        [region]

      :board_watch_info ->
        [region, G.pick(0.9, pool, fn -> G.one_of([0, 1, (1 <<< 64) - 1, 1 <<< 64]) end)]

      :board_reclaim ->
        [region, G.pick(0.9, pool, &G.integer/0), G.pick(0.9, pool, &G.integer/0)]
    end
  end

  defp args(f, _state, pool) when f in [:board_info, :board_entries, :board_entries_dirty],
    do: [G.pick(0.85, pool, fn -> G.handle(pool, :board) end)]

  defp args(:board_join, state, pool) do
    {os_pid, start} = os_pid_and_start(state)

    id = G.one_of(["w", "", String.duplicate("y", 64), String.duplicate("y", 65), <<255, 0>>])

    [G.pick(0.85, pool, fn -> G.handle(pool, :board) end), G.pick(0.9, pool, fn -> id end)] ++
      [os_pid, start]
  end

  defp args(:board_update, _state, pool) do
    value = fn -> G.one_of([nil, nil, 0, 1, 4, -1, 1 <<< 63, 1 <<< 64, -(1 <<< 63), :x]) end
    values = List.to_tuple(for(_ <- 1..G.one_of([10, 10, 10, 9, 11]), do: value.()))
    [G.pick(0.85, pool, fn -> G.handle(pool, :slot) end), G.pick(0.9, pool, fn -> values end)]
  end

  defp args(:board_leave, _state, pool),
    do: [G.pick(0.85, pool, fn -> G.handle(pool, :slot) end)]

  defp args(:board_least_loaded, _state, pool),
    do: [
      G.pick(0.85, pool, fn -> G.handle(pool, :board) end),
      G.pick(0.9, pool, fn -> G.one_of([[], ["w"], ["w", "", <<255>>], [1], :x]) end)
    ]

  defp args(:channel_open, _state, pool),
    do: [
      G.pick(0.9, pool, fn ->
        %{
          ring_size: G.one_of([4096, 65_536, 5000, 0, 1 <<< 30, 1 <<< 64]),
          inline_threshold: G.one_of([0, 100, 1024, 1 <<< 33]),
          transport: G.one_of([:auto, :shm, :socket, :bogus]),
          socket_dir: G.one_of(["", "/nonexistent", "/tmp", <<0>>]),
          ack_mode: G.one_of([:immediate, :batch, :deferred, :other]),
          max_batch_size: G.one_of([0, 1, 32, 1 <<< 40]),
          flush_interval_us: G.one_of([0, 5000, 1 <<< 62]),
          max_message_size: G.one_of([0, 1 <<< 40])
        }
      end)
    ]

  defp args(fun, _state, pool)
       when fun in [
              :channel_info,
              :channel_select,
              :channel_events,
              :channel_flush,
              :channel_close,
              :channel_stats,
              :channel_doorbell,
              :channel_doorbell_close,
              :channel_guard
            ],
       do: [channel(pool)]

  defp args(:channel_send, _state, pool), do: [channel(pool), G.payload(pool)]

  defp args(:channel_prepare_region, _state, pool), do: [G.payload(pool)]

  defp args(:channel_send_region, _state, pool) do
    prepared =
      case Native.channel_prepare_region(:binary.copy("p", 5000)) do
        {:ok, p} -> p
        _ -> make_ref()
      end

    [channel(pool), G.pick(0.9, pool, fn -> prepared end)]
  end

  defp args(:channel_recv, _state, pool),
    do: [channel(pool), G.one_of([0, 1, 64, 1 <<< 64]), G.one_of([0, 1024, 1 <<< 20])]

  defp args(:channel_pump, _state, pool),
    do: [channel(pool), G.one_of([0, 1, 64, 1 <<< 64, :x]), G.one_of([0, 1024, 1 <<< 20, -1])]

  defp args(:channel_pump_bell, _state, pool),
    do: [
      channel(pool),
      G.one_of([0, 1, 64, 1 <<< 64, :x]),
      G.one_of([0, 1024, 1 <<< 20, -1]),
      G.one_of([true, false, :x]),
      G.one_of([0, 50_000, 1 <<< 64, -1])
    ]

  defp args(:channel_prepare_wait, _state, pool),
    do: [
      channel(pool),
      G.one_of([true, false, :x]),
      G.one_of([true, false]),
      G.one_of([0, 16, 1 <<< 64])
    ]

  defp args(:channel_monitor, _state, pool), do: [channel(pool), G.pid(pool)]

  defp args(:ring_probe_new, _state, _pool),
    do: [G.one_of([4096, 8192, 5000, 1 <<< 21]), G.one_of([0, 1, 2, 3]), G.one_of([0, 1, 32])]

  defp args(:ring_probe_write, _state, pool),
    do: [probe(pool), G.one_of([0, 1, 100, 1024, 1025, 1 <<< 64]), G.one_of([0, 255, 1 <<< 64])]

  defp args(fun, _state, pool)
       when fun in [:ring_probe_read, :ring_probe_flush, :ring_probe_indices],
       do: [probe(pool)]

  # A quota charge of this batch (made on first use). It takes 0 bytes: the VM's totals are
  # shared by every batch, and a fuzzed charge elsewhere may hold up to INT64_MAX bytes, which
  # refuses any further byte (the overflow check) but not an empty charge.
  defp charge(pool) do
    G.pick(0.85, pool, fn ->
      case Process.get(:fuzz_charge) do
        nil ->
          {:ok, charge} = Native.quota_reserve(nil, 0, -1, -1, -1)
          Process.put(:fuzz_charge, charge)
          charge

        charge ->
          charge
      end
    end)
  end

  defp quota_owner do
    case Process.get(:fuzz_quota_owner) do
      nil ->
        owner = Native.quota_owner_new()
        Process.put(:fuzz_quota_owner, owner)
        owner

      owner ->
        owner
    end
  end

  # A channel or probe of this batch (made on first use), or something else.
  defp channel(pool) do
    G.pick(0.85, pool, fn ->
      case Process.get(:fuzz_channel) do
        nil ->
          {:ok, ch} =
            Native.channel_open(%{
              ring_size: 4096,
              inline_threshold: 0,
              transport: G.one_of([:shm, :socket]),
              socket_dir: "",
              ack_mode: :batch,
              max_batch_size: 32,
              flush_interval_us: 5000,
              max_message_size: 1 <<< 30
            })

          Process.put(:fuzz_channel, ch)
          ch

        ch ->
          ch
      end
    end)
  end

  # An unlinked segment of this batch: a 2 MiB POSIX segment of the fuzzer's own, made
  # by a process that exits (so nobody uses it) and removed by sweep_segment_begin/1.
  defp unlinked(pool) do
    G.pick(0.85, pool, fn ->
      Process.get(:fuzz_unlinked) ||
        case own_unlinked() do
          nil -> make_ref()
          u -> tap(u, &Process.put(:fuzz_unlinked, &1))
        end
    end)
  end

  defp own_unlinked do
    opts = %{
      backend: :posix,
      name: nil,
      open_mode: :create,
      mode: 0o600,
      security_level: 0,
      encrypted: false,
      lock_memory: false,
      metadata: "{}",
      idle_timeout_ms: 0
    }

    parent = self()

    {pid, ref} =
      spawn_monitor(fn ->
        case Native.create(2 * 1024 * 1024, opts) do
          {:ok, _region, %{id: id}} -> send(parent, {:fuzz_orphan, self(), id})
          _ -> send(parent, {:fuzz_orphan, self(), nil})
        end
      end)

    # its creator gone (and its region with it), nobody uses the segment any more
    id = receive do: ({:fuzz_orphan, ^pid, id} -> id)
    receive do: ({:DOWN, ^ref, _, _, _} -> :ok)
    # Its lock goes when the reaper thread closes it, after what is queued before it
    # (a fuzzed 4 GiB region written through takes it ~1 s of work): up to 30 s.
    if is_binary(id), do: remove_own(id, System.monotonic_time(:millisecond) + 30_000)
  end

  defp remove_own(id, deadline) do
    case Native.sweep_segment_begin(id) do
      {:ok, :removed, u} when u != nil ->
        u

      {:ok, :in_use, nil} ->
        if System.monotonic_time(:millisecond) < deadline do
          Process.sleep(10)
          remove_own(id, deadline)
        else
          # still held after 30 s: left for the suite's leak check to report
          nil
        end

      _ ->
        nil
    end
  end

  # A read buffer of 1000 bytes of this batch (made on first use, again once taken).
  defp read_buffer(pool) do
    G.pick(0.85, pool, fn ->
      Process.get(:fuzz_read_buffer) ||
        tap(elem(Native.read_buffer(1000), 1), &Process.put(:fuzz_read_buffer, &1))
    end)
  end

  defp probe(pool) do
    G.pick(0.85, pool, fn ->
      Process.get(:fuzz_probe) ||
        tap(Native.ring_probe_new(4096, :rand.uniform(3) - 1, 4), &Process.put(:fuzz_probe, &1))
    end)
  end

  defp create_opts(pool) do
    %{
      backend: G.one_of([:memfd, :memfd, :posix]),
      name: if(:rand.uniform(4) == 1, do: G.name(), else: nil),
      open_mode: G.one_of([:create, :open_only, :create_or_open, :remove_and_create]),
      mode: G.one_of([0o600, 0o600, 0o640, 0o644, 0o400, 0o000, 0o777, 0o1000, 0o4777]),
      security_level: G.one_of([0, 0, 1, 2, 3]),
      encrypted: G.one_of([false, false, true]),
      lock_memory: :rand.uniform(10) == 1,
      metadata: G.one_of(["{}", ~s({"dtype":"uint8","shape":[4]}), "", "not json", "\0"]),
      idle_timeout_ms: G.one_of([0, 0, 1, 60_000, (1 <<< 64) - 1])
    }
    |> then(&if(:rand.uniform(4) == 1, do: Map.put(&1, :defer_chunks, true), else: &1))
    |> G.mutate_map(pool)
  end

  defp region_paths(state, pool) do
    case state.regions do
      [] -> G.path(pool)
      regions -> regions |> G.one_of() |> elem(1) |> then(&{&1.control_path, &1.data_path})
    end
  end

  defp path_string(pool) do
    case G.path(pool) do
      {path, _} -> path
      path -> path
    end
  end

  defp mapping_and_size(state, pool) do
    if state.mappings != [] and :rand.uniform(10) <= 8 do
      {m, size, _r} = G.one_of(state.mappings)
      {m, size}
    else
      {G.any(pool), G.size()}
    end
  end

  defp os_pid_and_start(state) do
    case :rand.uniform(4) do
      n when n <= 2 -> G.one_of(state.os_pids)
      3 -> {elem(G.one_of(state.os_pids), 0), G.integer()}
      4 -> {G.integer(), G.integer()}
    end
  end

  # ---- outcomes ----

  defp classify(state, fun, args, outcome) do
    figures = state.figures
    figures = %{figures | calls: figures.calls + 1}

    figures =
      case outcome do
        {:raised, _} ->
          %{figures | raised: figures.raised + 1}

        {:returned, {:error, {reason, message, errno}} = value} ->
          if reason in @errc and is_binary(message) and byte_size(message) > 0 and
               is_integer(errno) do
            %{
              figures
              | errors: figures.errors + 1,
                reasons: Map.update(figures.reasons, reason, 1, &(&1 + 1))
            }
          else
            failure(figures, fun, args, {:malformed_error, value})
          end

        {:returned, value} ->
          if well_shaped?(fun, args, value),
            do: %{figures | ok: figures.ok + 1},
            else: failure(figures, fun, args, {:unexpected_return, value})

        {:bad_raise, e} ->
          failure(figures, fun, args, {:unexpected_exception, e})
      end

    %{state | figures: figures}
  end

  defp failure(figures, fun, args, what) do
    entry =
      "Native.#{fun}(#{Enum.map_join(args, ", ", &inspect(&1, limit: 6, printable_limit: 80))})" <>
        " -> #{inspect(what, limit: 10, printable_limit: 200)}"

    failures =
      if length(figures.failures) < @max_failures,
        do: figures.failures ++ [entry],
        else: figures.failures

    %{figures | failures: failures}
  end

  defp well_shaped?(:header_layout, _, v), do: is_binary(v)

  defp well_shaped?(f, _, {:ok, r, %{id: id}})
       when f in [:create, :create_plain, :create_cpu, :open],
       do: ref_id?(r, id)

  defp well_shaped?(:last_access, _, ns), do: non_neg?(ns)
  defp well_shaped?(:info, _, v), do: is_map(v) and is_binary(v[:id])
  defp well_shaped?(:header, _, {:ok, h}), do: is_map(h) and is_list(h[:holders])
  defp well_shaped?(:inspect_path, _, {:ok, h}), do: is_map(h) and is_binary(h[:id])
  defp well_shaped?(:hold_counts, _, {g, c}), do: non_neg?(g) and non_neg?(c)
  defp well_shaped?(:map, _, {:ok, m}), do: is_reference(m)
  defp well_shaped?(:watch_os_process, _, {:ok, w}), do: is_reference(w)
  defp well_shaped?(:export_key, _, {:ok, key}), do: is_binary(key) and byte_size(key) == 32
  defp well_shaped?(:release_holder, _, {:ok, n}), do: non_neg?(n)
  defp well_shaped?(:reap_holders, _, {:ok, n}), do: non_neg?(n)
  defp well_shaped?(:list_segments, _, v), do: is_list(v) and Enum.all?(v, &is_binary/1)

  defp well_shaped?(:runtime_index_flush, _, :ok), do: true
  defp well_shaped?(:runtime_index_flush, _, {:error, {:busy, m, _}}), do: is_binary(m)

  defp well_shaped?(:runtime_index_sweep, _, {:ok, %{kept: k, removed: r, directory: d}}),
    do: non_neg?(k) and non_neg?(r) and (d == nil or is_binary(d))

  defp well_shaped?(:sweep_segment, _, {:ok, o}),
    do: o in [:removed, :removed_incomplete, :in_use, :young]

  defp well_shaped?(:process_start_time, _, {:ok, t}), do: non_neg?(t)
  defp well_shaped?(:process_alive, _, v), do: is_boolean(v)
  defp well_shaped?(:self_info, _, %{os_pid: p}), do: is_integer(p)
  defp well_shaped?(:pool_configure, _, :ok), do: true
  defp well_shaped?(:pool_drain, _, {:ok, n}), do: non_neg?(n)
  defp well_shaped?(:pool_stats, _, %{hits: h, bytes_held: b}), do: non_neg?(h) and non_neg?(b)
  defp well_shaped?(:huge_page_info, _, %{page_size: p, free: f}), do: non_neg?(p) and non_neg?(f)
  defp well_shaped?(:pooled_object, _, value), do: is_boolean(value)
  defp well_shaped?(:quota_owner_new, _, v), do: is_reference(v)
  defp well_shaped?(:quota_reserve, _, {:ok, c}), do: is_reference(c)

  defp well_shaped?(:quota_reserve, _, {:error, why, n}),
    do: why in [:regions, :bytes, :owner] and is_integer(n)

  defp well_shaped?(f, _, v) when f in [:quota_release, :quota_held], do: is_boolean(v)

  defp well_shaped?(f, _, :ok) when f in [:quota_resize, :quota_host, :quota_attach, :keep_name],
    do: true

  defp well_shaped?(:quota_totals, _, {r, b}), do: is_integer(r) and is_integer(b)
  defp well_shaped?(:quota_owned, _, n), do: is_integer(n)
  defp well_shaped?(:names_dropped, _, n), do: non_neg?(n)

  defp well_shaped?(:read_small_files, _, v),
    do: is_list(v) and Enum.all?(v, &(is_binary(&1) or &1 == :error))

  defp well_shaped?(:shm_dir, _, dir), do: dir == "/dev/shm"
  defp well_shaped?(:reaped_holds, _, n), do: non_neg?(n)

  defp well_shaped?(:reaper_stats, _, %{pieces_unmapped: u, pieces_released: r, pauses: p}),
    do: non_neg?(u) and non_neg?(r) and non_neg?(p)

  defp well_shaped?(:release_pages_step, _, {:ok, n}), do: non_neg?(n)

  defp well_shaped?(fun, _, :ok)
       when fun in [:deallocate_begin, :deallocate_finish, :await_seal_commit],
       do: true

  defp well_shaped?(:zero_step, _, {:ok, n}), do: non_neg?(n)
  defp well_shaped?(:allocate_step, _, {:ok, n}), do: non_neg?(n)

  defp well_shaped?(:sweep_segment_begin, _, {:ok, o, u}),
    do: o in [:removed, :removed_incomplete, :in_use, :young] and (u == nil or is_reference(u))

  defp well_shaped?(:list_counts, [regions], counts) when is_list(counts),
    do:
      length(counts) == length(regions) and
        Enum.all?(counts, &match?({h, t} when is_integer(h) and h >= 0 and is_integer(t), &1))

  defp well_shaped?(:fs_stat, _, {:ok, %{total: t, available: a}}), do: non_neg?(t) and a <= t
  defp well_shaped?(:board_layout, _, v), do: is_binary(v)
  defp well_shaped?(:board_monotonic_ns, _, v), do: non_neg?(v)
  defp well_shaped?(:board_open, _, {:ok, b}), do: is_reference(b)
  defp well_shaped?(:board_info, _, %{capacity: c, gauge_names: g}), do: c > 0 and length(g) == 4
  defp well_shaped?(:board_join, _, {:ok, s, i}), do: is_reference(s) and non_neg?(i)
  defp well_shaped?(:board_join, _, {:full, c}), do: c > 0
  defp well_shaped?(:board_reclaim, _, n), do: non_neg?(n)
  defp well_shaped?(:arena_configure, _, :ok), do: true
  defp well_shaped?(:arena_maintain, _, n), do: non_neg?(n)

  defp well_shaped?(:arena_stats, _, %{arenas: n, live_chunks: l}),
    do: non_neg?(n) and non_neg?(l)

  defp well_shaped?(:inspect_arena, _, {:ok, list}), do: is_list(list)
  defp well_shaped?(:board_watch_info, _, nil), do: true
  defp well_shaped?(:board_watch_info, _, {g, o}), do: non_neg?(g) and (o == nil or is_list(o))
  defp well_shaped?(:board_least_loaded, _, {:ok, id}), do: is_binary(id) and byte_size(id) <= 64
  defp well_shaped?(:board_least_loaded, _, {:none, c, u}), do: non_neg?(c) and non_neg?(u)

  defp well_shaped?(f, _, {now, unreadable, entries})
       when f in [:board_entries, :board_entries_dirty],
       do: non_neg?(now) and is_list(unreadable) and is_list(entries)

  defp well_shaped?(f, [_m, _off, len], {:ok, bin})
       when f in [:read, :read_dirty, :read_zero_copy],
       do: is_binary(bin) and byte_size(bin) == len

  defp well_shaped?(:read_buffer, _, {:ok, b}), do: is_reference(b)
  defp well_shaped?(:init_chunks, _, {:ok, left}), do: non_neg?(left)

  defp well_shaped?(:read_buffer_take, _, {:ok, bin}) do
    Process.delete(:fuzz_read_buffer)
    is_binary(bin) and byte_size(bin) == 1000
  end

  defp well_shaped?(f, _, :ok)
       when f in [
              :unmap,
              :write,
              :write_dirty,
              :read_into,
              :publish,
              :seal,
              :deallocate,
              :deallocate_plain,
              :set_idle_timeout,
              :mark_adopted,
              :monitor_owner,
              :cancel_watch,
              :unlink_segment,
              :set_shm_dir,
              :board_init,
              :board_update,
              :board_leave
            ],
       do: true

  defp well_shaped?(:channel_layout, _, v), do: is_binary(v)
  defp well_shaped?(:channel_sweep_dirs, _, n), do: non_neg?(n)
  defp well_shaped?(:channel_open, _, {:ok, ch}), do: is_reference(ch)
  defp well_shaped?(:channel_info, _, %{path: p}), do: is_binary(p)
  defp well_shaped?(:channel_stats, _, %{state: s}), do: is_atom(s)

  defp well_shaped?(:channel_events, _, v),
    do: v in [:listening, :accept_paused, :connected] or closed?(v)

  defp well_shaped?(:channel_prepare_region, _, {:ok, p}), do: is_reference(p)
  defp well_shaped?(:channel_recv, _, {:ok, l}), do: is_list(l)
  defp well_shaped?(:channel_recv, _, {:closed, r, l}), do: is_atom(r) and is_list(l)
  defp well_shaped?(:channel_pump, _, {:ok, l, armed}), do: is_list(l) and is_boolean(armed)
  defp well_shaped?(:channel_pump, _, {:closed, r, l}), do: is_atom(r) and is_list(l)

  defp well_shaped?(:channel_pump_bell, _, {:ok, l, next}),
    do: is_list(l) and next in [true, false, :spin]

  defp well_shaped?(:channel_pump_bell, _, {:closed, r, l}), do: is_atom(r) and is_list(l)
  defp well_shaped?(:channel_doorbell, _, {:ok, fd}), do: is_integer(fd) and fd >= 0
  defp well_shaped?(:channel_prepare_wait, _, v), do: is_boolean(v)
  defp well_shaped?(:ring_probe_new, _, v), do: is_reference(v)
  defp well_shaped?(:ring_probe_write, _, v), do: v in [:ok, :full]

  defp well_shaped?(:ring_probe_read, _, v),
    do: v in [:empty, :protocol_error] or match?({:ok, b} when is_binary(b), v)

  defp well_shaped?(:ring_probe_indices, _, {h, t, p}),
    do: non_neg?(h) and non_neg?(t) and non_neg?(p)

  defp well_shaped?(f, _, v)
       when f in [
              :channel_select,
              :channel_send,
              :channel_send_region,
              :channel_flush,
              :channel_close,
              :channel_monitor,
              :channel_doorbell_close,
              :channel_guard,
              :ring_probe_flush
            ],
       do: v in [:ok, :would_block] or closed?(v)

  defp well_shaped?(_f, _args, _value), do: false

  defp closed?({:closed, r}), do: is_atom(r)
  defp closed?(_), do: false

  defp ref_id?(r, id), do: is_reference(r) and is_binary(id) and String.starts_with?(id, "spshm_")
  defp non_neg?(n), do: is_integer(n) and n >= 0

  # ---- keeping what calls created ----

  defp keep(state, f, _args, {:returned, {:ok, region, info}})
       when f in [:create, :create_plain, :create_cpu, :open] do
    state = %{state | own: [{region, info} | state.own]}
    regions = [{region, info} | state.regions]

    if length(regions) > @pool_regions do
      {kept, [{old, _} | _]} = Enum.split(regions, @pool_regions)
      own? = Enum.any?(state.own, fn {r, _} -> r == old end)
      if own?, do: release(old)

      %{
        state
        | regions: kept,
          own: Enum.reject(state.own, fn {r, _} -> r == old end),
          mappings: Enum.reject(state.mappings, fn {_m, _s, r} -> r == old end)
      }
    else
      %{state | regions: regions}
    end
  end

  defp keep(state, :map, [region, _mode], {:returned, {:ok, mapping}}) do
    size =
      case Enum.find(state.regions, fn {r, _} -> r == region end) do
        {_, info} -> info.size
        nil -> G.size()
      end

    %{state | mappings: Enum.take([{mapping, size, region} | state.mappings], @pool_mappings)}
  end

  defp keep(state, :watch_os_process, [_os_pid, _start, ref], {:returned, {:ok, watch}}) do
    {keep, drop} = Enum.split([{watch, ref} | state.watches], 4)
    for {w, _} <- drop, do: Native.cancel_watch(w)
    %{state | watches: keep}
  end

  defp keep(state, :board_open, _args, {:returned, {:ok, board}}),
    do: %{state | boards: Enum.take([board | state.boards], 6)}

  defp keep(state, :board_join, _args, {:returned, {:ok, slot, _index}}),
    do: %{state | slots: Enum.take([slot | state.slots], 16)}

  defp keep(state, _fun, _args, _outcome), do: state
end
