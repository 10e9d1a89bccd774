defmodule SnakepitShm.Bench.Targets do
  @moduledoc """
  The numbers of issue 6 / PRODUCT.md, checked against a run's results. A target that
  is missed says so with the measured value and the reason the run's own breakdowns
  show; nothing here is tuned away.
  """

  alias SnakepitShm.Bench.{Format, Stats}

  @doc "Returns `[%{part, what, target, measured, met, reason}]` for the parts present."
  def evaluate(results) do
    Enum.flat_map(
      [
        &handoff/1,
        &channel_handoff/1,
        &lifecycle/1,
        &refcount/1,
        &zero_copy/1,
        &crypto/1,
        &scale/1,
        &SnakepitShm.Bench.Health.targets/1,
        &SnakepitShm.Bench.Board.targets/1,
        &SnakepitShm.Bench.Channel.targets/1,
        &SnakepitShm.Bench.PerRequest.targets/1
      ],
      & &1.(results)
    )
  end

  @doc "The paired ratios of the handoff at one size: `%{name => summary}`."
  def handoff_ratios(%{samples: s}) do
    %{
      warm_vs_port: Stats.paired_ratio(s.port, s.warm),
      warm_vs_port_1m: Stats.paired_ratio(s.port_1m, s.warm),
      warm_vs_socket: Stats.paired_ratio(s.socket, s.warm),
      warm_vs_reference: Stats.paired_ratio(s.reference, s.warm),
      fresh_vs_port: Stats.paired_ratio(s.port, s.fresh),
      fresh_vs_warm: Stats.paired_ratio(s.warm, s.fresh),
      channel_vs_port: channel_ratio(s, :port),
      channel_vs_port_1m: channel_ratio(s, :port_1m),
      channel_vs_socket: channel_ratio(s, :socket),
      channel_vs_warm: channel_ratio(s, :warm),
      fresh_pooled_vs_port: optional_ratio(s, :fresh_pooled),
      fresh_huge_vs_port: optional_ratio(s, :fresh_huge)
    }
  end

  # nil where the path was not measured (an older run, a host without huge pages)
  defp optional_ratio(s, path) do
    case s[path] do
      [_ | _] = samples -> Stats.paired_ratio(s.port, samples)
      _ -> nil
    end
  end

  # nil for a run made before the channel path existed
  defp channel_ratio(%{channel: [_ | _] = c} = s, other), do: Stats.paired_ratio(s[other], c)
  defp channel_ratio(_s, _other), do: nil

  @doc "The handoff row of the headline size (256 MiB), if measured."
  def headline(results) do
    rows = Map.get(results, :handoff, [])
    Enum.find(rows, &(&1.breakdown != nil))
  end

  defp handoff(results) do
    case headline(results) do
      nil ->
        []

      row ->
        r = handoff_ratios(row)
        size = Format.bytes(row.size)
        ms = fn path -> Stats.summary(row.samples[path]).median end

        [
          check(
            "1",
            "warm region vs Erlang Port (default 64 KiB pipe), #{size}",
            ">= 10×",
            r.warm_vs_port,
            10,
            reason_copy_bound(row, :port, ms, 10)
          ),
          check(
            "1",
            "warm region vs Unix socket, #{size}",
            ">= 3×",
            r.warm_vs_socket,
            3,
            reason_copy_bound(row, :socket, ms, 3)
          ),
          check(
            "1",
            "warm region vs C++ memcpy + read pass, #{size}",
            ">= 0.7×",
            r.warm_vs_reference,
            0.7,
            reason_warm(row)
          ),
          check(
            "1",
            "fresh region vs Erlang Port (default 64 KiB pipe), #{size}",
            ">= 2×",
            r.fresh_vs_port,
            2,
            reason_fresh(row, results)
          )
        ] ++
          for {key, what} <- [
                fresh_pooled_vs_port: "fresh region with the warm pool vs Erlang Port, #{size}",
                fresh_huge_vs_port: "fresh region on huge pages vs Erlang Port, #{size}"
              ],
              r[key] != nil do
            check(
              "1",
              what,
              ">= 3×",
              r[key],
              3,
              "pool: a memset of the reused object plus the write and the worker's read " <>
                "faults on its new mapping; huge pages: one fault per 2 MiB, but fallocate " <>
                "still zeroes every page"
            )
          end
    end
  end

  # Issue 15: the end-to-end handoff by channel message + warm region beats the Port at
  # every payload size measured (4 KiB up to the profile's largest, 1 GiB in full).
  defp channel_handoff(results) do
    ratios =
      results
      |> Map.get(:handoff, [])
      |> Enum.map(&{&1.size, handoff_ratios(&1).channel_vs_port})
      |> Enum.reject(&(elem(&1, 1) == nil))

    case ratios do
      [] ->
        []

      _ ->
        {min_size, worst} = Enum.min_by(ratios, fn {_, r} -> r.median end)
        {lo, _} = Enum.min_by(ratios, &elem(&1, 0))
        {hi, _} = Enum.max_by(ratios, &elem(&1, 0))
        losing = for {size, r} <- ratios, r.median <= 1, do: Format.bytes(size)

        [
          %{
            part: "1",
            what:
              "channel message + warm region vs Erlang Port, every size " <>
                "#{Format.bytes(lo)} … #{Format.bytes(hi)} (the worst size shown)",
            target: "> 1× at every size",
            measured: "#{Format.ratio(worst)} at #{Format.bytes(min_size)}",
            met: losing == [],
            reason:
              if(losing == [],
                do: "",
                else:
                  "the Port was as fast or faster at #{Enum.join(losing, ", ")}: " <>
                    "see the channel step table of part 1 (write, reduce, messaging)"
              )
          }
        ]
    end
  end

  defp check(part, what, target, %{median: m} = summary, min, reason) do
    met = m >= min

    %{
      part: part,
      what: what,
      target: target,
      measured: Format.ratio(summary),
      met: met,
      reason: if(met, do: "", else: reason)
    }
  end

  defp step(row, path, name) do
    row.breakdown[path]
    |> Enum.find_value(fn {n, v} -> if n == name, do: Stats.summary(v).median end)
  end

  # The warm path cannot beat one memcpy plus one read pass (the reference); the
  # baselines' own time bounds the ratio from above.
  defp reason_copy_bound(row, baseline, ms, target) do
    bound = ms.(baseline) / ms.(:reference)
    gbs = row.size / ms.(baseline)
    floor_pct = ms.(:reference) / ms.(:warm) * 100

    why =
      if bound < target,
        do:
          "so even a handoff at the physical floor would be only #{Format.num(bound)}× " <>
            "faster: the target cannot be met on this machine by a path that copies the " <>
            "binary once.",
        else:
          "so a handoff at the floor would be #{Format.num(bound)}× faster; the warm path " <>
            "runs at #{round(floor_pct)} % of the floor's speed, and the spread of the " <>
            "rounds shows how much other work on the machine moved each path."

    "The warm path takes #{Format.time(ms.(:warm))} and the physical floor (one memcpy + " <>
      "one read pass, C++) #{Format.time(ms.(:reference))}; the #{baseline} path moves " <>
      "#{Format.num(gbs)} GB/s here, " <>
      why <>
      " Warm breakdown: write (memcpy into the region) " <>
      "#{Format.time(step(row, :warm, "write"))}, worker xor-reduce " <>
      "#{Format.time(step(row, :warm, "worker: xor-reduce"))}, messaging " <>
      "#{Format.time(step(row, :warm, "messaging (round trip less worker time)"))}."
  end

  defp reason_warm(row) do
    "Warm breakdown: write #{Format.time(step(row, :warm, "write"))}, worker xor-reduce " <>
      "#{Format.time(step(row, :warm, "worker: xor-reduce"))}, messaging " <>
      "#{Format.time(step(row, :warm, "messaging (round trip less worker time)"))}."
  end

  defp reason_fresh(row, results) do
    names = [
      "allocate_region",
      "write",
      "worker: attach",
      "worker: xor-reduce",
      "worker: close",
      "deallocate_region"
    ]

    parts = Enum.map_join(names, ", ", fn n -> "#{n} #{Format.time(step(row, :fresh, n))}" end)

    pages =
      case fresh_page_cost(results) do
        nil ->
          ""

        per_gib ->
          pages_ns = per_gib * row.size / (1024 * 1024 * 1024)
          port_ns = Stats.summary(row.samples.port).median

          " New shared pages cost #{Format.time(per_gib)} per GiB here (part 7): " <>
            "#{Format.time(pages_ns)} for #{Format.bytes(row.size)}, while the Port moves " <>
            "#{Format.bytes(row.size)} in #{Format.time(port_ns)}; 2× the Port needs the " <>
            "whole fresh handoff in #{Format.time(port_ns / 2)}" <>
            if(pages_ns > port_ns / 2,
              do:
                ", less than its pages alone cost: only reusing regions (a warm pool) can get there.",
              else: "."
            )
      end

    "Fresh pages dominate: #{parts}, total #{Format.time(step(row, :fresh, "total (as the caller sees it)"))}." <>
      pages
  end

  @doc "ns per GiB of fallocate + first touch of a new memfd (part 7), if measured."
  def fresh_page_cost(results) do
    with [_ | _] = modes <- Map.get(results, :fresh_pages),
         %{ns: ns, bytes: bytes} <- Enum.find(modes, &(&1.mode == "memfd_fallocate_then_touch")) do
      Stats.summary(ns).median * (1024 * 1024 * 1024) / bytes
    else
      _ -> nil
    end
  end

  defp lifecycle(%{lifecycle: l}) do
    ratio = Stats.paired_ratio(Enum.map(l.python, &median/1), Enum.map(l.elixir, &median/1))
    elixir = median(List.flatten(l.elixir))

    steps =
      Enum.map_join(SnakepitShm.Bench.Lifecycle.steps(), ", ", fn name ->
        samples = Enum.flat_map(l.elixir_steps, &(&1 |> List.keyfind(name, 0) |> elem(1)))
        "#{name} #{Format.time(median(samples))}"
      end)

    [
      check(
        "2",
        "lifecycle p50 vs Python multiprocessing.shared_memory",
        ">= 4×",
        ratio,
        4,
        "The product's cycle has a median of #{Format.time(elixir)}: #{steps} " <>
          "(medians per step). " <> dirty_hops(l) <> "See bench/FINDINGS.md for the profile."
      )
    ]
  end

  defp lifecycle(_), do: []

  # Below the facade: the raw cycle on plain and on dirty NIFs, and one dirty hop.
  defp dirty_hops(%{breakdown: b} = l) do
    get = fn name -> if samples = Map.get(b, name), do: median(samples) end
    elixir = median(List.flatten(l.elixir))
    plain = get.(SnakepitShm.Bench.Lifecycle.plain_cycle_name())
    arena = get.(SnakepitShm.Bench.Lifecycle.arena_cycle_name())
    dirty = get.(SnakepitShm.Bench.Lifecycle.dirty_cycle_name())
    hop = get.("dirty-IO NIF call that returns at once")

    parts = [
      arena &&
        "the same cycle on the raw plain NIFs with an arena chunk (what the facade uses " <>
          "for 4 KiB) takes #{Format.time(arena)}, so the facade adds " <>
          "#{Format.time(elixir - arena)}",
      plain &&
        "on raw plain NIFs with dedicated memfds it takes #{Format.time(plain)}",
      dirty && "with the dirty-IO create/deallocate it takes #{Format.time(dirty)}",
      hop && "a dirty-IO call that does nothing costs #{Format.time(hop)}"
    ]

    case Enum.filter(parts, & &1) do
      [] -> ""
      found -> "Below the facade: " <> Enum.join(found, "; ") <> ". "
    end
  end

  defp dirty_hops(_), do: ""

  defp refcount(%{concurrency: %{refcount: rc}}) do
    {{kind, procs}, best} = best_summary(rc)

    met = best.median >= 5.0e6

    facade_target(rc) ++
      [
        %{
          part: "3",
          what:
            "reference count changes/s without a GenServer (best: #{kind}, #{procs} process(es))",
          target: ">= 5 M/s",
          measured: Format.count_summary([best.median, best.min, best.max], "/s"),
          met: met,
          reason:
            if(met,
              do: "",
              else:
                "Each change is a NIF call that makes or releases a mapping resource and " <>
                  "updates the header's holder slot and refcount with compare-and-swap. " <>
                  scaling(rc) <> "See bench/FINDINGS.md."
            )
        }
      ]
  end

  defp refcount(_), do: []

  # The {key, summary} of the rate series with the highest median.
  defp best_summary(series) do
    series
    |> Enum.map(fn {key, samples} -> {key, Stats.summary(samples)} end)
    |> Enum.max_by(fn {_, s} -> s.median end)
  end

  # Issue 14: reference count changes through the facade (map_region/unmap_region).
  defp facade_target(rc) do
    case rc |> Enum.filter(fn {{kind, _}, _} -> kind == :facade end) do
      [] ->
        []

      facade ->
        {{_, procs}, best} = best_summary(facade)

        met = best.median >= 3.0e6

        [
          %{
            part: "14",
            what: "reference count changes/s through the facade (best: #{procs} process(es))",
            target: ">= 3 M/s",
            measured: Format.count_summary([best.median, best.min, best.max], "/s"),
            met: met,
            reason:
              if(met,
                do: "",
                else:
                  "A map_region/unmap_region pair looks the region up in the registry " <>
                    "(ETS), checks the caller's rights, makes the NIF mapping (the hold) " <>
                    "and records it in the mappings table so that a free or the caller's " <>
                    "death ends it, then takes the row back and releases the hold: four " <>
                    "ETS operations and two NIF calls per pair. See bench/FINDINGS.md."
              )
          }
        ]
    end
  end

  defp scaling(rc) do
    per = fn procs ->
      case Map.get(rc, {:nif, procs}) do
        nil -> nil
        samples -> median(samples)
      end
    end

    procs = rc |> Map.keys() |> Enum.map(&elem(&1, 1)) |> Enum.max()

    case {per.(1), per.(procs)} do
      {one, many} when is_number(one) and is_number(many) and procs > 1 ->
        "With #{procs} processes the NIF path does #{Format.big(many)}/s against " <>
          "#{Format.big(one)}/s with one: all of them update the same holder slot (one OS " <>
          "process) and the same refcount word, so the cache line bounces between cores. "

      _ ->
        ""
    end
  end

  defp zero_copy(%{zero_copy: [_ | _] = rows}) do
    worst = Enum.max_by(rows, fn r -> median(r.zero_copy) end)
    m = median(worst.zero_copy)

    [
      %{
        part: "4",
        what: "zero-copy read of a sealed region (worst size: #{Format.bytes(worst.size)})",
        target: "< 50 µs, constant",
        measured: Format.time(m),
        met: m < 50_000,
        reason: if(m < 50_000, do: "", else: "see the zero-copy table")
      }
    ]
  end

  defp zero_copy(_), do: []

  defp crypto(%{crypto: c}) do
    gbs = fn samples -> c.size / median(samples) end
    worst_probe = c.probe |> Map.values() |> List.flatten() |> Enum.max()

    [
      rate_check(
        "5",
        "encryption (write to a :high region)",
        c.size,
        c.product.encrypt,
        0.6,
        "libsodium called directly does #{Format.num(gbs.(c.direct.encrypt))} GB/s here"
      ),
      rate_check(
        "5",
        "secure zeroing (deallocate a :high region)",
        c.size,
        c.product.zero,
        5,
        "sodium_memzero called directly does #{Format.num(gbs.(c.direct.memzero))} GB/s here"
      ),
      %{
        part: "5",
        what: "worst normal-scheduler delay while they run (1 ms sleep probe)",
        target: "< 2 ms",
        measured: Format.time(worst_probe),
        met: worst_probe < 2_000_000,
        reason:
          if(worst_probe < 2_000_000,
            do: "",
            else: probe_reason(worst_probe, c)
          )
      }
    ]
  end

  defp crypto(_), do: []

  defp probe_reason(worst, c) do
    controls = Map.get(c, :idle, %{})
    control = fn key -> controls |> Map.get(key, [0]) |> Enum.max() end
    idle = control.(:same_length_sleep)
    otp = control.(:otp_dirty_hash)
    floor = max(idle, otp)
    calm = undisturbed_worst(c)

    controls_text =
      "The same probe over an idle sleep of the same length was late by up to " <>
        "#{Format.time(idle)} and over OTP's own crypto:hash/2 of the same bytes (run by " <>
        "OTP on the normal schedulers, in slices) by up to #{Format.time(otp)}, in the " <>
        "same rounds."

    verdict =
      cond do
        floor >= worst / 2 ->
          " The product's operations delay the probe no more than those controls: the " <>
            "delay comes from the machine (other work, see the load average)."

        calm != nil and calm < 2 * max(floor, 2_000_000) ->
          " In the rounds where the operation itself ran at its usual speed, the worst " <>
            "delay was #{Format.time(calm)}; the larger ones fell in rounds where the whole " <>
            "VM lost the CPU (below)."

        true ->
          " Even in rounds where the operation ran at its usual speed the probe was late " <>
            "by up to #{Format.time(calm || worst)}: an idle normal scheduler yields its " <>
            "core (sched_yield in its busy wait) to a thread of this VM that keeps it busy " <>
            "(a dirty slice of the operation), and gets it back when that thread blocks or " <>
            "at the next scheduler tick; +sbwt none removes that wait (see the scheduler " <>
            "part and bench/FINDINGS.md section 7)."
      end

    controls_text <> verdict <> worst_round(c)
  end

  # The worst probe delay over the rounds where the operation took less than twice its
  # median time (the VM was not itself starved of CPU then); nil if there is none.
  defp undisturbed_worst(c) do
    delays =
      for {op, per_round} <- c.probe,
          times = Map.fetch!(c.product, op),
          med = median(times),
          {delay, i} <- Enum.with_index(per_round),
          Enum.at(times, i) < 2 * med,
          do: delay

    if delays == [], do: nil, else: Enum.max(delays)
  end

  # The round and operation of the worst delay, and whether that operation itself ran
  # slow in that round (then the whole VM was off the CPU, not only the probe).
  defp worst_round(c) do
    {op, round, delay} =
      for({op, delays} <- c.probe, {d, i} <- Enum.with_index(delays), do: {op, i, d})
      |> Enum.max_by(&elem(&1, 2))

    times = Map.fetch!(c.product, op)
    slowdown = Enum.at(times, round) / median(times)

    " Worst: #{Format.time(delay)} during #{op} in round #{round + 1}, where #{op} itself " <>
      "took #{Format.num(slowdown)}× its median time" <>
      if(slowdown >= 2,
        do:
          ": the VM as a whole lost the CPU then (other work on this machine), which " <>
            "delays every thread of the VM, the probe's included.",
        else: "."
      )
  end

  defp rate_check(part, what, bytes, samples, min_gbs, reason) do
    s = Stats.summary(Enum.map(samples, &(bytes / &1)))
    met = s.median >= min_gbs

    %{
      part: part,
      what: what,
      target: ">= #{min_gbs} GB/s",
      measured: "#{Format.num(s.median)} GB/s (#{Format.num(s.min)}–#{Format.num(s.max)})",
      met: met,
      reason: if(met, do: "", else: reason)
    }
  end

  defp scale(%{scale: s}) do
    list = median(s.list_ns)
    sweep = median(s.orphan_sweep_ns)

    [
      %{
        part: "6",
        what: "list_regions with #{s.regions} live regions",
        target: "< 20 ms",
        measured: Format.time_summary(s.list_ns),
        met: list < 20.0e6,
        reason: if(list < 20.0e6, do: "", else: "see the scale table")
      },
      %{
        part: "6",
        what: "orphan sweep (#{s.regions} live + #{s.orphans} orphans)",
        target: "< 100 ms",
        measured: Format.time_summary(s.orphan_sweep_ns),
        met: sweep < 100.0e6,
        reason: if(sweep < 100.0e6, do: "", else: "see the scale table")
      }
    ] ++ default_backend_fds(s)
  end

  defp scale(_), do: []

  defp default_backend_fds(%{default_backend: d}) do
    met = d.regions == d.asked and d.fds < 200

    [
      %{
        part: "6",
        what: "file descriptors for #{d.asked} live 4 KiB regions, default options",
        target: "< 200",
        measured: "#{d.fds} (#{d.regions} regions, #{d.in_arena} in #{d.arenas} arenas)",
        met: met,
        reason:
          cond do
            met -> ""
            d.regions < d.asked -> "only #{d.regions} could be allocated (descriptors ran out)"
            true -> "#{d.in_arena} of #{d.regions} regions in arenas (is :arena on?)"
          end
      }
    ]
  end

  defp default_backend_fds(_), do: []

  defp median(samples), do: Stats.summary(samples).median
end
