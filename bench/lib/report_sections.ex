defmodule SnakepitShm.Bench.ReportSections do
  @moduledoc "The per-part sections of RESULTS.md, each a markdown string."

  import SnakepitShm.Bench.Format

  alias SnakepitShm.Bench.{Handoff, Lifecycle, Stats, Targets}

  @zero_copy_batch 100

  @path_names %{
    fresh: "(a) fresh region",
    warm: "(b) warm region",
    port: "(c) Erlang Port",
    port_1m: "(c') Port, 1 MiB pipe",
    socket: "(d) Unix socket",
    reference: "(e) C++ memcpy + read",
    channel: "(b') warm region + channel message",
    fresh_pooled: "(a') fresh region, warm pool",
    fresh_huge: "(a'') fresh region, huge pages"
  }

  def handoff(rows) do
    # Paths measured at some size (runs before a path existed, or a host without huge
    # pages, lack some): "–" where a size lacks one.
    paths =
      Enum.filter(Handoff.paths(), fn p -> Enum.any?(rows, &Map.has_key?(&1.samples, p)) end)

    header = ["payload" | Enum.map(paths, &@path_names[&1])]

    rates =
      for row <- rows do
        [
          bytes(row.size)
          | Enum.map(paths, fn p ->
              if row.samples[p], do: rate_summary(row.size, row.samples[p]), else: "–"
            end)
        ]
      end

    ratio_rows =
      for row <- rows do
        r = Targets.handoff_ratios(row)

        [
          bytes(row.size),
          ratio(r.warm_vs_port),
          ratio(r.warm_vs_port_1m),
          ratio(r.warm_vs_socket),
          ratio(r.warm_vs_reference),
          ratio(r.fresh_vs_port),
          ratio(r.channel_vs_port),
          ratio(r.channel_vs_port_1m),
          ratio(r.channel_vs_socket),
          ratio(r.fresh_pooled_vs_port),
          ratio(r.fresh_huge_vs_port),
          length(row.samples.warm),
          row.iterations
        ]
      end

    """
    ## 1. Handoff of an Elixir binary to a persistent Python worker

    Every path ends with the worker computing the xor of the payload as numpy uint64
    words (every byte read once) and replying; all paths must agree on that xor or the
    bench fails. Throughput in GB/s (10^9 bytes/s), median of the rounds (range):

    #{table(header, rates)}
    Speed-ups from paired rounds (in each round every path ran once, order rotated):

    #{table(["payload", "warm ÷ port", "warm ÷ port (1 MiB pipe)", "warm ÷ socket", "warm ÷ reference", "fresh ÷ port", "channel ÷ port", "channel ÷ port (1 MiB pipe)", "channel ÷ socket", "fresh (warm pool) ÷ port", "fresh (huge pages) ÷ port", "rounds", "handoffs per sample"], ratio_rows)}
    ![handoff throughput](handoff.png)

    #{breakdown(Enum.find(rows, &(&1.breakdown != nil)))}
    Notes: (a) times allocate, map, write, export_ref, the worker's attach + reduce +
    close, unmap and deallocate; (b) times write + message + reduce + reply on a region
    allocated once, which the worker keeps attached. (c) is an Erlang Port as Erlang
    makes it (a 64 KiB pipe); (c') is the same Port with its pipe enlarged to 1 MiB
    (F_SETPIPE_SZ, the most this machine allows), the fastest Port we could make: the
    targets are stated against (c), and (c') is shown so that nobody mistakes the
    default for the best a Port can do. The Unix socket's buffers are enlarged to 4 MiB
    (the most allowed here). Both Python receivers read straight into a preallocated
    buffer (one copy out of the kernel). (b') is (b) with the message (region id +
    length) and the answer over a `Snakepit.SharedMemory.Channel` (shared-memory rings,
    eventfd doorbells) instead of the Port: the product's best path. Target (issue 15):
    (b') faster than the Port (c) at every size, from 4 KiB to the largest measured.
    """
  end

  defp breakdown(nil), do: ""

  defp breakdown(row) do
    rows = fn path ->
      for {name, samples} <- row.breakdown[path], do: [name, time_summary(samples)]
    end

    """
    Where the time goes at #{bytes(row.size)} (separate timed runs, median (range)):

    #{table(["fresh region step", "time"], rows.(:fresh))}
    #{table(["warm region step", "time"], rows.(:warm))}
    #{if row.breakdown[:channel], do: table(["warm region + channel message step", "time"], rows.(:channel)), else: ""}
    """
  end

  def lifecycle(l) do
    elixir = List.flatten(l.elixir)
    python = List.flatten(l.python)
    ratio = Stats.paired_ratio(Enum.map(l.python, &median/1), Enum.map(l.elixir, &median/1))

    pct = fn samples ->
      sorted = Enum.sort(samples)

      Enum.map([50, 90, 99], &time(Stats.percentile_sorted(sorted, &1))) ++
        [time(List.last(sorted))]
    end

    steps =
      for name <- Lifecycle.steps() do
        samples = Enum.flat_map(l.elixir_steps, &(&1 |> List.keyfind(name, 0) |> elem(1)))
        [name | pct.(samples)]
      end

    """
    ## 2. Region lifecycle latency

    One cycle = allocate 4 KiB, map read-write, write 4 KiB, unmap, deallocate through
    `Snakepit.SharedMemory`, against Python's `multiprocessing.shared_memory`
    (`SharedMemory(create=True, size=4096)`, write, `close()`, `unlink()`, run by
    /usr/bin/python3), #{l.cycles} timed cycles per side per round, #{length(l.elixir)} rounds.

    #{table(["cycle", "p50", "p90", "p99", "max"], [["snakepit_shm" | pct.(elixir)], ["Python multiprocessing.shared_memory" | pct.(python)]])}
    Python median ÷ snakepit_shm median, paired by round: #{ratio(ratio)}.

    Per step of the snakepit_shm cycle:

    #{table(["step", "p50", "p90", "p99", "max"], steps)}
    Below the facade (same run):

    #{table(["measure", "p50", "p90", "p99", "max"], for({name, samples} <- Enum.sort(Map.get(l, :breakdown, %{})), do: [name | pct.(samples)]))}
    The facade uses the plain create/deallocate NIFs for regions of at most 64 KiB (when
    the NIF has them); a dirty-IO NIF pays the dirty-scheduler round trip shown above.
    ![lifecycle latency](lifecycle.png)
    """
  end

  def concurrency(%{cycles: cycles, refcount: rc}) do
    cycle_rows =
      for {level, samples} <- Enum.sort(cycles),
          do: [level, count_summary(samples, "/s")]

    rc_rows =
      for {{kind, procs}, samples} <- Enum.sort(rc) do
        what =
          case kind do
            :facade -> "map_region + unmap_region of one region (facade, ETS, no GenServer)"
            :nif -> "Native.map + Native.unmap (the NIF hold path)"
          end

        [what, procs, count_summary(samples, "/s")]
      end

    """
    ## 3. Concurrency

    Aggregate lifecycle cycles per second (each cycle is five operations) with N
    processes running cycles at once, median of the rounds (range):

    #{table(["processes", "cycles/s"], cycle_rows)}
    Reference count changes per second without a GenServer (a map/unmap pair is two
    changes):

    #{table(["path", "processes", "changes/s"], rc_rows)}
    ![concurrency](concurrency.png)
    """
  end

  def zero_copy(rows) do
    table_rows =
      for row <- rows do
        [
          bytes(row.size),
          time_summary(row.zero_copy),
          time_summary(row.copy),
          ratio(Stats.paired_ratio(row.copy, row.zero_copy))
        ]
      end

    """
    ## 4. Zero-copy read of sealed regions

    `read(mapping, 0, size)` of a sealed region (a binary over the mapping, no copy)
    against the same read of an unsealed region (a copy, on a dirty scheduler):

    #{table(["size", "zero-copy read", "copying read", "copy ÷ zero-copy"], table_rows)}
    ![zero-copy read](zero_copy.png)

    The reads above run in a process with a small heap. A zero-copy binary counts its
    whole size against the reader's binary virtual heap, so the first reads of big
    regions in a process trigger garbage collections whose cost grows with the reader's
    *live heap*, until ERTS raises that process's limit. First #{@zero_copy_batch} reads of a new
    process (per read, median of the rounds (range)):

    #{table(["size", "reader holding #{big_heap_terms(rows)} live terms", "same, min_bin_vheap_size raised"], big_heap_rows(rows))}
    A process with a big heap that starts taking zero-copy reads of big regions can set
    a large `min_bin_vheap_size` (spawn option or `Process.flag/2`) to skip those
    collections.
    """
  end

  defp big_heap_terms(rows) do
    case Enum.find(rows, &Map.has_key?(&1, :big_heap)) do
      nil -> "many"
      row -> row.big_heap.live_terms
    end
  end

  defp big_heap_rows(rows) do
    for %{big_heap: b} = row <- rows,
        do: [bytes(row.size), time_summary(b.default), time_summary(b.raised)]
  end

  def crypto(c) do
    gbs = fn samples -> rate_summary(c.size, samples) end
    probe = fn op -> time(Enum.max(c.probe[op])) end

    rows = [
      [
        "encrypt (write to a :high region)",
        gbs.(c.product.encrypt),
        "crypto_aead_xchacha20poly1305_ietf, 64 KiB chunks",
        gbs.(c.direct.encrypt),
        probe.(:encrypt)
      ],
      [
        "decrypt + verify (read of a :high region)",
        gbs.(c.product.decrypt),
        "same, decrypt",
        gbs.(c.direct.decrypt),
        probe.(:decrypt)
      ],
      [
        "secure zeroing (deallocate a :high region)",
        gbs.(c.product.zero),
        "sodium_memzero",
        gbs.(c.direct.memzero),
        probe.(:zero)
      ],
      ["", "", "memset", gbs.(c.direct.memset), ""]
    ]

    """
    ## 5. Encryption and zeroing

    #{bytes(c.size)} per operation, GB/s, median of the rounds (range). The direct column is
    a C++ program calling libsodium / libc on the same number of bytes in the same
    rounds. The probe column is the worst lateness of a process sleeping 1 ms in a loop on
    a normal scheduler while the product's operation ran. The same probe over an idle
    sleep as long as the encryption, in the same rounds, was late by up to
    #{time(c |> Map.get(:idle, %{}) |> Map.get(:same_length_sleep, [0]) |> Enum.max())}, and
    while OTP's own `crypto:hash(sha256)` of the same bytes ran (OTP runs it on the normal
    schedulers, in slices; not ours) by up to
    #{time(c |> Map.get(:idle, %{}) |> Map.get(:otp_dirty_hash, [0]) |> Enum.max())};
    over 300 ms of idle VM before the rounds: #{time(Enum.max(c.idle_probe))} worst,
    #{time(median(c.idle_probe))} median (ERTS rounds a 1 ms timeout up, so about 1 ms of
    lateness is the timer itself).

    #{table(["product operation", "GB/s", "direct call", "GB/s", "worst probe delay"], rows)}
    The product's zeroing time is that of the whole `deallocate_region/1` call.
    """
  end

  def scale(s) do
    rows = [
      [
        "live regions",
        "#{s.regions} (backend #{s.backend}; RLIMIT_NOFILE here: #{s.nofile_limit})"
      ],
      ["allocate them all", time(s.allocate_ns)],
      ["list_regions()", time_summary(s.list_ns)],
      ["regions it returned", Enum.join(Enum.uniq(Map.get(s, :listed, [s.regions])), ", ")],
      [
        "regions freed as :vanished during the part (their segment removed by another process)",
        Map.get(s, :vanished, 0)
      ],
      ["cleanup_regions(orphans: true), no orphans", time_summary(s.sweep_ns)],
      [
        "cleanup_regions(orphans: true), #{s.orphans} orphans of a dead process",
        time_summary(s.orphan_sweep_ns)
      ],
      ["orphans freed by that sweep", Enum.join(s.orphans_freed, ", ")],
      [
        "BEAM memory per region (erlang:memory(total))",
        "#{round(s.beam_bytes_per_region)} bytes"
      ],
      ["of which ETS", "#{round(s.ets_bytes_per_region)} bytes"],
      ["deallocate them all", time(s.deallocate_ns)]
    ]

    """
    ## 6. Scale

    #{table(["measure", "value"], rows)}
    Floors on the same regions, same run (see the findings):

    #{table(["measure", "time"], for({name, ns} <- Enum.sort(Map.get(s, :floors, %{})), do: [name, time_summary(ns)]))}
    memfd regions hold two descriptors each: #{s.regions} of them need RLIMIT_NOFILE above
    #{2 * s.regions} plus the VM's own; the POSIX backend is used here.
    #{scale_default_backend(s)}
    """
  end

  defp scale_default_backend(%{default_backend: d}) do
    rows = [
      ["regions allocated (asked)", "#{d.regions} (#{d.asked})"],
      ["of which in arenas", "#{d.in_arena} in #{d.arenas} arenas (#{d.arena_bytes} bytes)"],
      ["file descriptors they hold", d.fds],
      ["allocate them all", time(d.allocate_ns)]
    ]

    """

    The same number of 4 KiB regions with the default options (issue 14: small regions
    come from arenas when `:arena` is on, one descriptor per arena):

    #{table(["measure", "value"], rows)}
    """
  end

  defp scale_default_backend(_), do: ""

  def fresh_pages(modes) do
    rows =
      for m <- modes do
        case m do
          %{unavailable: why} ->
            [m.mode, "unavailable: #{why}", ""]

          %{ns: ns, bytes: b} ->
            per_gib = Enum.map(ns, &(&1 * 1024 * 1024 * 1024 / b))
            per_page = median(ns) / (b / 4096)
            [m.mode, time_summary(per_gib), time(per_page)]
        end
      end

    """
    ## 7. Fresh-page cost

    Cost per GiB of getting the pages of a new memfd region, C++ (`bench/cpp/fresh_pages.cpp`),
    median of the rounds (range):

    #{table(["mode", "per GiB", "per 4 KiB page"], rows)}
    ![fresh pages](fresh_pages.png)

    #{fresh_pages_reading(modes)}
    """
  end

  defp fresh_pages_reading(modes) do
    get = fn name ->
      case Enum.find(modes, &(&1.mode == name)) do
        %{ns: ns, bytes: b} -> median(ns) * 1024 * 1024 * 1024 / b
        _ -> nil
      end
    end

    today = get.("memfd_fallocate_then_touch")
    populate = get.("memfd_populate_write")
    warm = get.("warm_reused_mapping_touch")
    second = get.("warm_new_mapping_populate_read")

    if today && populate && warm do
      "Reading: the product today (fallocate, then first touch) pays #{time(today)} per GiB; " <>
        "MADV_POPULATE_WRITE alone on a new mapping (which also fails early when memory is " <>
        "short) pays #{time(populate)}; a warm region reused through the same mapping pays " <>
        "#{time(warm)}" <>
        if(second,
          do:
            ", and a second process mapping warm pages pays #{time(second)} with MADV_POPULATE_READ",
          else: ""
        ) <>
        ". Every fresh GiB costs about #{num(today / max(warm, 1))}× a warm one: a pool of " <>
        "warm regions is what makes repeated handoffs fast."
    else
      ""
    end
  end

  defp median(samples), do: Stats.summary(samples).median

  @doc "Issue 12: normal-scheduler lateness during each heavy operation."
  def scheduler(s) do
    ops =
      ~w(idle_sleep otp_crypto_hash create write deallocate create_encrypted encrypt decrypt zero gc_last_reference sweep_big_orphans)a

    phases = Map.get(s, :phases, %{})

    rows =
      for op <- ops, Map.has_key?(s.ops, op) do
        late = Enum.map(s.ops[op], &(&1 / 1_000_000))
        took = Enum.map(s.durations[op], &(&1 / 1_000_000))
        phase = Map.get(phases, op, Enum.map(late, fn _ -> nil end))

        shown =
          Enum.zip(late, phase)
          |> Enum.map_join(" / ", fn {ms, step} -> late_with_phase(ms, step) end)

        "| `#{op}` | #{shown} | " <>
          "#{Enum.map_join(took, " / ", &:erlang.float_to_binary(&1, decimals: 0))} |"
      end

    """
    ## Normal-scheduler lateness (issue 12)

    A process on a normal scheduler sleeps 1 ms in a loop while each operation runs on
    #{div(s.size, 1024 * 1024)} MiB (garbage collection of the last reference and the orphan
    sweep: #{div(s.gc_size, 1024 * 1024)} MiB); worst lateness per round. `idle_sleep` and
    `otp_crypto_hash` are the controls (OTP's `crypto:hash/2` runs on normal schedulers,
    in slices). Beside a lateness of 2 ms or more, in brackets, the step of the operation
    the late sleep overlapped most (`outside`: the probe's own start or end). The garbage
    collection of the last reference includes 20 ms after the owner's exit (the reaper
    thread's unmapping). Target: < 2 ms on a quiet machine.

    | operation | worst lateness per round (ms) | operation took (ms) |
    |---|---|---|
    #{Enum.join(rows, "\n")}
    #{scheduler_without_busy_wait(Map.get(s, :sbwt_none))}\
    """
  end

  # The same rounds in a peer VM started with `+sbwt none` (SchedulerProbe), when run.
  defp scheduler_without_busy_wait(nil), do: ""

  defp scheduler_without_busy_wait(%{error: reason}),
    do: "\nThe same rounds in a VM started with `+sbwt none` could not run: #{reason}\n"

  defp scheduler_without_busy_wait(s) do
    """

    The same rounds, in the same run, in a peer VM started with `+sbwt none` (its normal
    schedulers sleep at once when they run out of work instead of busy-waiting, which
    yields their core to whatever else runs there: docs/OPERATIONS.md, bench/FINDINGS.md
    section 7). The target above is judged on the default flags. The peer is a process of
    its own (another session and scheduling autogroup): on a machine with other work the
    two tables are less comparable than rounds of one VM.

    #{scheduler(Map.delete(s, :sbwt_none)) |> String.split("\n") |> Enum.filter(&String.starts_with?(&1, "|")) |> Enum.join("\n")}
    """
  end

  defp late_with_phase(ms, step) when ms >= 2.0 and is_atom(step) and step not in [nil, :whole],
    do: "#{:erlang.float_to_binary(ms, decimals: 1)} (#{step})"

  defp late_with_phase(ms, _step), do: :erlang.float_to_binary(ms, decimals: 1)

  # Rows of the variants (issue 17): sync: true releases (two round trips per pair) and
  # the Python caller that never spins, when the run measured them.
  defp quota_variant_rows(%{elixir_sync_rt_ns: e, python_sync_rt_ns: p, python_nospin_rt_ns: n}) do
    [
      ["host quota server, Elixir client, `release(res, sync: true)`", time_summary(e)],
      ["host quota server, Python client, `release(sync=True)`", time_summary(p)],
      ["host quota server, Python client, `connect(spin=0)`", time_summary(n)]
    ]
  end

  defp quota_variant_rows(_), do: []

  # How often the default Python caller spun and found its answer while spinning.
  defp quota_spin_note(%{python_spin: spins, python_rt_ns: _}) do
    {hits, misses} =
      Enum.reduce(spins, {0, 0}, fn {h, m}, {ah, am} -> {ah + (h || 0), am + (m || 0)} end)

    calls = hits + misses

    if calls == 0 do
      "The default Python caller did not spin in this run (the load average less one " <>
        "was at or above the CPU count, or one CPU): its row is the spin-free path."
    else
      "The default Python caller spun in #{calls} of its answered calls and found the " <>
        "answer while spinning in #{hits} of them (#{round(hits * 100 / calls)} %)."
    end
  end

  defp quota_spin_note(_), do: ""

  def host_quota(q) do
    kill_row = fn label, %{ns: ns, timeouts: t, reps: reps} ->
      shown = if ns == [], do: "never", else: time_summary(ns)
      [label, shown, "#{t} of #{reps}"]
    end

    rt =
      [
        [
          "host quota server, Elixir client (over its Unix socket), defaults",
          time_summary(q.elixir_rt_ns)
        ],
        ["host quota server, Python client, defaults", time_summary(q.python_rt_ns)]
      ] ++
        quota_variant_rows(q) ++
        [
          ["seed: robust-mutex table in shared memory (C++, no IPC)", time_summary(q.seed_rt_ns)]
        ]

    kills = [
      ["host quota server: session EOF (Python client)", time_summary(q.kill_ours_ns), "0"],
      kill_row.(
        "seed: died holding the mutex (EOWNERDEAD, then kill(pid, 0) scan)",
        q.kill_seed.holding
      ),
      kill_row.(
        "seed: died outside the mutex (the seed reclaims only on EOWNERDEAD)",
        q.kill_seed.idle
      ),
      kill_row.("seed + a dead-PID scan on every failed reserve (busy polling)", q.kill_seed.scan)
    ]

    """
    ## Host quotas (issue 17)

    Reserve + release round trip, #{q.pairs} pairs per round (per pair; median and range
    over the rounds; the variants alternate with the defaults in each round). Goal:
    below 50 µs by default. Defaults: the release is pipelined (one round trip per
    pair); the Python caller re-reads its socket for up to 50 µs before it sleeps,
    while the load average less one is below the CPU count and that measures faster
    (windows of 256 calls). #{quota_spin_note(q)}

    #{table(["client", "reserve + release"], rt)}
    Release latency after a client's SIGKILL, from the client's clock reading just before
    the signal to the moment a waiting reservation of the freed amount is granted
    (timeouts: not released within 2 s).

    #{table(["approach", "latency", "timeouts"], kills)}
    The seed's robust mutex only learns of a death when the dead process held the mutex,
    and then asks `kill(pid, 0)`, which still sees a process that is exiting (or a
    zombie): the usage it held can stay counted for good. The server learns of every
    death from the socket, whether or not the client was inside a call.
    """
  end
end
