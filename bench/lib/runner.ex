defmodule SnakepitShm.Bench.Runner do
  @moduledoc """
  Runs every part of the bench in one VM, one after the other, and writes
  `bench/RESULTS.md` and the plots. Parts (issue 6): `handoff`, `lifecycle`,
  `concurrency`, `zero_copy`, `crypto`, `scale`, `fresh_pages`; `health` (issue 19),
  `cluster` (issue 18), `board` (issue 16), `host_quota` (issue 17), `channel` (issue
  15), `scheduler` (issue 12), `per_request` (issue 14).
  """

  alias SnakepitShm.Bench.{
    Cluster,
    Crypto,
    FreshPages,
    Handoff,
    Health,
    HostQuota,
    Lifecycle,
    Meta,
    Plots,
    Profile,
    Programs,
    Report,
    Scale,
    SchedulerProbe,
    ZeroCopy
  }

  @parts ~w(handoff lifecycle concurrency zero_copy crypto scale fresh_pages health cluster board host_quota channel scheduler per_request)a
  @last_results "_build/bench/last_results.etf"

  def parts, do: @parts

  @quick_out "_build/bench-quick"

  @doc """
  Where a run writes RESULTS.md and the plots unless `--out` says otherwise: the
  committed `bench/` only for a full run of every part; quick or partial runs go under
  `_build/bench-quick`, so they never overwrite the report.
  """
  def default_out(profile, parts) do
    if profile == :full and Enum.sort(parts) == Enum.sort(@parts), do: "bench", else: @quick_out
  end

  @doc """
  Options: `:profile` (`:quick` | `:full`), `:only` (list of parts), `:out` (directory
  of RESULTS.md and the PNGs; default `default_out/2`).
  """
  def run(opts) do
    profile_name = Keyword.fetch!(opts, :profile)
    profile = Profile.get(profile_name)
    parts = Keyword.get(opts, :only, @parts)
    full = default_out(profile_name, parts) == "bench"
    out = Keyword.get(opts, :out) || default_out(profile_name, parts)
    started = System.monotonic_time(:millisecond)
    load_at_start = Meta.load_average()

    log("building the C++ programs into _build/bench")
    programs = Programs.build_all()
    payload = payload(profile, parts)
    segments_before = segments()

    results =
      Enum.reduce(parts, %{}, fn part, acc ->
        log("#{part} ...")
        # Each part in a process of its own: a fresh heap, as a real caller has, so that
        # what earlier parts left (and their garbage) cannot slow the next one.
        {ms, result} =
          timed_ms(fn ->
            fn -> run_part(part, profile, payload, programs) end
            |> Task.async()
            |> Task.await(:infinity)
          end)

        log("#{part} done in #{Float.round(ms / 1000, 1)} s")
        Map.put(acc, part, result)
      end)

    check_no_leak(segments_before)

    meta =
      profile
      |> Meta.collect(System.monotonic_time(:millisecond) - started)
      |> Map.put(:load_at_start, load_at_start)

    results = Map.put(results, :meta, meta)
    # Only a full run is what --report-only rewrites the report from.
    last = if full, do: @last_results, else: Path.join(@quick_out, "last_results.etf")
    File.mkdir_p!(Path.dirname(last))
    File.write!(last, :erlang.term_to_binary(results))
    results = write_report(results, out)
    # The README quotes the committed report: only a full run into bench/ updates it.
    if full and out == "bench", do: Report.update_readme(results)
    results
  end

  @doc """
  Writes RESULTS.md and the plots again from the results of the last run (kept in
  #{"_build/bench/last_results.etf"}), without measuring anything.
  """
  def report_only(out) do
    case File.read(@last_results) do
      {:ok, bytes} ->
        write_report(:erlang.binary_to_term(bytes), out)

      {:error, _} ->
        Mix.raise("#{@last_results} not found: run the bench once first (make bench)")
    end
  end

  defp write_report(results, out) do
    File.mkdir_p!(out)
    plots = Plots.render(results, out)
    path = Report.write(results, plots, out)
    meta = results.meta
    log("wrote #{path} and #{length(plots)} plot(s); the run took #{round(meta.duration_s)} s")
    results
  end

  defp run_part(:handoff, profile, payload, programs), do: Handoff.run(profile, payload, programs)
  defp run_part(:lifecycle, profile, _, _), do: Lifecycle.latency(profile)

  defp run_part(:concurrency, profile, _, _),
    do: %{cycles: Lifecycle.concurrency(profile), refcount: Lifecycle.refcount(profile)}

  defp run_part(:zero_copy, profile, payload, _), do: ZeroCopy.run(profile, payload)
  defp run_part(:crypto, profile, payload, programs), do: Crypto.run(profile, payload, programs)
  defp run_part(:scale, profile, _, programs), do: Scale.run(profile, programs)
  defp run_part(:fresh_pages, profile, _, programs), do: FreshPages.run(profile, programs)
  defp run_part(:health, profile, _, _), do: Health.run(profile)
  defp run_part(:cluster, profile, _, _), do: Cluster.run(profile)
  defp run_part(:board, profile, _, programs), do: SnakepitShm.Bench.Board.run(profile, programs)
  defp run_part(:host_quota, profile, _, programs), do: HostQuota.run(profile, programs)

  defp run_part(:channel, profile, payload, _),
    do: SnakepitShm.Bench.Channel.run(profile, payload)

  defp run_part(:scheduler, profile, payload, programs),
    do: SchedulerProbe.run(profile, payload, programs)

  defp run_part(:per_request, profile, payload, programs),
    do: SnakepitShm.Bench.PerRequest.run(profile, payload, programs)

  # One random payload for the whole run; smaller payloads are sub-binaries of it (no
  # copy), so every path of a size hands off exactly the same bytes.
  defp payload(profile, parts) do
    sizes = [
      if(:handoff in parts, do: Enum.max(profile.handoff_sizes), else: 0),
      if(:zero_copy in parts, do: Enum.max(profile.zero_copy_sizes), else: 0),
      if(:crypto in parts or :scheduler in parts, do: profile.crypto_size, else: 0),
      # the channel part's handoff goes up to the handoff part's largest size
      if(:channel in parts, do: Enum.max(profile.handoff_sizes), else: 0),
      # the per-request handoff: 1 MiB
      if(:per_request in parts, do: SnakepitShm.Bench.PerRequest.size(), else: 0)
    ]

    log("generating a #{div(Enum.max(sizes), 1024 * 1024)} MiB random payload")
    :crypto.strong_rand_bytes(max(Enum.max(sizes), 8))
  end

  # Nothing of this run may stay in /dev/shm: a POSIX segment that appeared during the
  # run and names this VM as its creator is a leak (other VMs' segments are not ours).
  defp segments do
    case File.ls("/dev/shm") do
      {:ok, names} -> names |> Enum.filter(&String.starts_with?(&1, "spshm_")) |> MapSet.new()
      {:error, _} -> MapSet.new()
    end
  end

  defp check_no_leak(before) do
    me = Snakepit.SharedMemory.Native.self_info().os_pid

    leaked =
      for name <- MapSet.difference(segments(), before),
          {:ok, header} <- [Snakepit.SharedMemory.Native.inspect_path("/dev/shm/" <> name)],
          header.creator_pid == me,
          do: name

    if leaked != [],
      do:
        raise(
          "the bench left #{length(leaked)} segment(s) in /dev/shm: #{Enum.join(leaked, ", ")}"
        )
  end

  defp timed_ms(fun) do
    start = System.monotonic_time(:millisecond)
    result = fun.()
    {System.monotonic_time(:millisecond) - start, result}
  end

  defp log(message), do: Mix.shell().info("bench: #{message}")
end
