defmodule Snakepit.SharedMemory.Health do
  @moduledoc """
  The health checks of a VM's shared memory: one implementation, used by the periodic
  check of `Snakepit.SharedMemory.HealthMonitor`, by `Snakepit.SharedMemory.health/0`
  and by `mix snakepit.shm.doctor` (offline, in its own VM, or `--node`).

  Every check reads counters, ETS tables and small `/proc` and `/sys` files: nothing
  takes a lock or calls the manager, so allocations never wait for a check. Checks:

    * `:regions`, `:memory`, `:regions_per_process` - live regions, live bytes and the
      most regions one process owns, against `:max_regions`, `:max_total_memory` and
      `:max_regions_per_process`;
    * `:shm_space` - used space of the tmpfs holding POSIX segments (`/dev/shm` or
      `:shm_path`);
    * `:cgroup_memory` - usage of the VM's memory cgroup against its limit (v2
      `memory.max`/`memory.current`, v1 `memory.limit_in_bytes`);
    * `:host_memory` - the host's memory in use (`MemTotal - MemAvailable`);
    * `:file_descriptors` - open fds of the VM against `RLIMIT_NOFILE` (each memfd
      region holds two);
    * `:memlock` - memory the VM has locked (`VmLck`: `:maximum` regions lock their
      pages) against `RLIMIT_MEMLOCK`;
    * `:dead_processes` - orphaned segments of dead VMs removed, holds of dead worker
      processes released and segments of callers killed mid-allocation removed since
      the previous check: something keeps killing processes (OOM killer?);
    * `:expired_held` - regions whose idle `:timeout` passed but that a process still
      holds, so they cannot be freed: a worker keeps a region it should have let go.

  A usage check is `:degraded` from the `:degraded` threshold (default 80 % of the
  limit) and `:critical` from `:critical` (95 %); once there, it goes back only below
  the threshold minus `:hysteresis` points (5), so a value hovering at a threshold does
  not flap. A count check is `:degraded` while its count is above zero. A check that
  cannot measure here (no cgroup, no limit, no shm directory) is `:ok` and says so in
  `measurements.skipped`, except a configured `:shm_path` that cannot be measured (it
  was removed or unmounted after start): `:shm_space` is then `:critical`.
  """

  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{Config, MemoryLimits, Native, Platform, Quota, Registry, Stats}

  @type status :: :ok | :degraded | :critical
  @type check :: %{
          name: atom(),
          status: status(),
          value: number() | nil,
          limit: number() | :infinity | nil,
          percent: float() | nil,
          measurements: map(),
          message: String.t() | nil
        }
  @type report :: %{status: status(), checks: [check()]}
  @typedoc "Event counters at the previous check (for the checks of what happened since)."
  @type since :: %{atom() => non_neg_integer()}

  @names [
    :regions,
    :memory,
    :regions_per_process,
    :shm_space,
    :cgroup_memory,
    :host_memory,
    :file_descriptors,
    :memlock,
    :dead_processes,
    :expired_held
  ]
  @death_events [:orphans, :os_holders_released, :leaked]

  @doc "The names of the checks, in report order."
  @spec names() :: [atom()]
  def names, do: @names

  @doc """
  Runs every check. `previous` maps check names to their status at the previous check
  (for hysteresis; default: every check was `:ok`); `since` holds the event counters
  of the previous check (`counters/0`; default: none, i.e. count from zero).
  """
  @spec run(%{atom() => status()}, since() | nil) :: report()
  def run(previous \\ %{}, since \\ nil) do
    config = Config.get()
    thresholds = config.health_thresholds
    since = since || Map.new(@death_events, &{&1, 0})

    checks =
      for name <- @names do
        name |> safe_measure(config, since) |> evaluate(Map.get(previous, name, :ok), thresholds)
      end

    %{status: worst(Enum.map(checks, & &1.status)), checks: checks}
  end

  @doc "The event counters `:dead_processes` compares with (pass them to the next `run/2`)."
  @spec counters() :: since()
  def counters do
    events = Stats.events(@death_events)
    Map.new(@death_events, &{&1, Map.fetch!(events, &1)})
  end

  @doc "The worst of some statuses (`:ok` for none)."
  @spec worst([status()]) :: status()
  def worst(statuses) do
    cond do
      :critical in statuses -> :critical
      :degraded in statuses -> :degraded
      true -> :ok
    end
  end

  # ---- evaluation ----

  @doc """
  The status of one measurement given the previous status and the thresholds
  (`%{degraded: percent, critical: percent, hysteresis: points}`), with its message.
  """
  @spec evaluate(map(), status(), map()) :: check()
  def evaluate(%{kind: :usage} = m, previous, thresholds) do
    percent = percent(m.value, m.limit)
    status = usage_status(percent, previous, thresholds)
    finish(m, status, percent)
  end

  def evaluate(%{kind: :count} = m, _previous, _thresholds) do
    finish(m, if(m.value > 0, do: :degraded, else: :ok), nil)
  end

  def evaluate(%{kind: :failed} = m, _previous, _thresholds), do: finish(m, :critical, nil)

  defp finish(m, status, percent) do
    %{
      name: m.name,
      status: status,
      value: m.value,
      limit: m.limit,
      percent: percent && Float.round(percent, 2),
      measurements: m.measurements,
      message: if(status == :ok, do: nil, else: m.advice.(percent))
    }
  end

  defp percent(nil, _limit), do: nil
  defp percent(_value, limit) when limit in [nil, :infinity, 0], do: nil
  defp percent(value, limit), do: value * 100 / limit

  @doc false
  @spec usage_status(number() | nil, status(), map()) :: status()
  def usage_status(nil, _previous, _t), do: :ok

  def usage_status(p, previous, %{degraded: d, critical: c, hysteresis: h}) do
    cond do
      p >= c -> :critical
      previous == :critical and p >= c - h -> :critical
      p >= d -> :degraded
      previous in [:degraded, :critical] and p >= d - h -> :degraded
      true -> :ok
    end
  end

  # ---- measurements ----

  defp usage(name, value, limit, measurements, advice),
    do: %{
      name: name,
      kind: :usage,
      value: value,
      limit: limit,
      measurements: measurements,
      advice: advice
    }

  # The configured shm_path existed at start: if it cannot be measured now (unmounted,
  # removed), every POSIX allocation fails.
  defp shm_path_unusable(dir, why),
    do: %{
      name: :shm_space,
      kind: :failed,
      value: nil,
      limit: nil,
      measurements: %{path: dir, error: why},
      advice: fn _ ->
        "shm_path #{dir} cannot be used (#{why}): POSIX regions fail until it is back. " <>
          "Recreate or remount it (mount -t tmpfs -o size=2g tmpfs #{dir}), or use " <>
          "backend: :memfd"
      end
    }

  # statvfs(2) of a directory on a filesystem that stopped answering (a hung NFS or FUSE
  # mount as shm_path) never returns: asked in a process of its own, for at most
  # @fs_stat_ms, and never again while that one is still stuck (each stuck call holds a
  # dirty I/O scheduler: health checks must not use them all up).
  @fs_stat_ms 5_000
  @fs_prober :snakepit_shm_health_fs_stat

  defp fs_stat_bounded(dir) do
    if Process.whereis(@fs_prober) do
      :hung
    else
      # An alias: an answer that comes after the deadline is dropped, not left in the
      # caller's mailbox.
      reply_to = :erlang.alias()
      tag = make_ref()

      {prober, monitor} =
        spawn_monitor(fn ->
          try do
            Process.register(self(), @fs_prober)
          rescue
            ArgumentError -> exit(:busy)
          end

          send(reply_to, {tag, Native.fs_stat(dir)})
        end)

      result =
        receive do
          {^tag, result} -> result
          {:DOWN, ^monitor, :process, ^prober, :busy} -> :busy
          {:DOWN, ^monitor, :process, ^prober, _} -> :hung
        after
          @fs_stat_ms -> :hung
        end

      :erlang.unalias(reply_to)
      Process.demonitor(monitor, [:flush])

      receive do
        {^tag, _late} -> :ok
      after
        0 -> :ok
      end

      result
    end
  end

  defp shm_dir_hung(dir),
    do: %{
      name: :shm_space,
      kind: :failed,
      value: nil,
      limit: nil,
      measurements: %{path: dir, error: "no answer within #{@fs_stat_ms} ms"},
      advice: fn _ ->
        "the filesystem of #{dir} did not answer statvfs(2) within #{@fs_stat_ms} ms (a " <>
          "hung NFS or FUSE mount?): POSIX allocations there hang too. Fix or unmount it, " <>
          "or put shm_path on a tmpfs"
      end
    }

  defp skipped(name, why),
    do: usage(name, nil, nil, %{skipped: why}, fn _ -> nil end)

  defp count(name, value, measurements, advice),
    do: %{
      name: name,
      kind: :count,
      value: value,
      limit: nil,
      measurements: measurements,
      advice: advice
    }

  # A check that cannot measure (a /proc file of an unexpected shape, a NIF missing in
  # an offline tool) reports why instead of taking the other checks down with it.
  defp safe_measure(name, config, since) do
    measure(name, config, since)
  rescue
    e -> skipped(name, "could not measure: " <> Exception.message(e))
  end

  defp measure(:regions, config, _since) do
    regions = totals().regions

    usage(:regions, regions, config.max_regions, %{regions: regions}, fn p ->
      "#{regions} live regions are #{pct(p)} of max_regions #{config.max_regions}: " <>
        "allocations fail with :region_limit_exceeded at the limit. Deallocate regions " <>
        "(mix snakepit.shm.list shows them) or raise config :snakepit_shm, max_regions"
    end)
  end

  defp measure(:memory, config, _since) do
    bytes = totals().bytes

    usage(:memory, bytes, config.max_total_memory, %{bytes: bytes}, fn p ->
      "#{bytes(bytes)} in live regions are #{pct(p)} of max_total_memory " <>
        "#{bytes(config.max_total_memory)}: allocations fail with :memory_limit_exceeded " <>
        "at the limit. Deallocate regions or raise config :snakepit_shm, max_total_memory"
    end)
  end

  defp measure(:regions_per_process, config, _since) do
    {owner, most} = busiest_owner()
    limit = config.max_regions_per_process

    usage(:regions_per_process, most, limit, %{regions: most, owner: owner}, fn p ->
      "#{inspect(owner)} owns #{most} regions, #{pct(p)} of max_regions_per_process " <>
        "#{limit}: its allocations fail with :process_limit_exceeded at the limit. " <>
        "Find the leak (Snakepit.SharedMemory.list_regions(owner: pid)) or raise " <>
        "config :snakepit_shm, max_regions_per_process"
    end)
  end

  defp measure(:shm_space, _config, _since) do
    case Platform.current().shm_dir() do
      nil ->
        skipped(:shm_space, "POSIX segments are not files on this platform")

      dir ->
        case fs_stat_bounded(dir) do
          :hung ->
            shm_dir_hung(dir)

          :busy ->
            skipped(:shm_space, "another check was measuring #{dir} at this instant")

          {:ok, fs} ->
            used = fs.total - fs.available

            usage(
              :shm_space,
              used,
              fs.total,
              %{path: dir, total: fs.total, available: fs.available, tmpfs: fs.tmpfs},
              fn p ->
                "#{dir} is #{pct(p)} full (#{bytes(fs.available)} of #{bytes(fs.total)} " <>
                  "free): POSIX regions fail with :no_space when it is full. Free regions " <>
                  "(mix snakepit.shm.list; mix snakepit.shm.cleanup for orphans), grow it " <>
                  "(docker --shm-size, mount -o remount,size=...), move it to a larger " <>
                  "tmpfs (config :snakepit_shm, shm_path), or use backend: :memfd"
              end
            )

          {:error, {_reason, message, _errno}} ->
            if Config.get(:shm_path) == dir,
              do: shm_path_unusable(dir, message),
              else: skipped(:shm_space, message)
        end
    end
  end

  defp measure(:cgroup_memory, _config, _since) do
    case MemoryLimits.cgroup() do
      nil ->
        skipped(:cgroup_memory, "no memory cgroup with readable limits")

      %{max: :infinity} = cg ->
        usage(
          :cgroup_memory,
          cg.current,
          :infinity,
          Map.take(cg, [:version, :path, :current]),
          fn _ ->
            nil
          end
        )

      cg ->
        usage(
          :cgroup_memory,
          cg.current,
          cg.max,
          %{version: cg.version, path: cg.path, current: cg.current, max: cg.max},
          fn p ->
            "the memory cgroup #{cg.path} (v#{cg.version}) uses #{bytes(cg.current)} of its " <>
              "#{bytes(cg.max)} limit (#{pct(p)}): at the limit the OOM killer ends the VM or " <>
              "a worker. Free regions (shared memory counts against the cgroup of the " <>
              "process that first touched it) or raise the container's memory limit"
          end
        )
    end
  end

  defp measure(:host_memory, _config, _since) do
    case MemoryLimits.host() do
      %{total: 0} ->
        skipped(:host_memory, "/proc/meminfo is not readable")

      %{total: total, available: available} ->
        used = total - available

        usage(:host_memory, used, total, %{total: total, available: available}, fn p ->
          "the host has #{bytes(available)} of #{bytes(total)} memory available " <>
            "(#{pct(p)} in use): memfd allocations fail with :no_space, and the OOM " <>
            "killer may end processes. Free regions or add memory"
        end)
    end
  end

  defp measure(:file_descriptors, _config, _since) do
    case {open_fds(), limit("Max open files")} do
      {nil, _} ->
        skipped(:file_descriptors, "/proc/self/fd is not readable")

      {fds, {:ok, soft}} ->
        usage(:file_descriptors, fds, soft, %{open: fds, limit: soft}, fn p ->
          "the VM has #{fds} file descriptors open, #{pct(p)} of RLIMIT_NOFILE #{soft} " <>
            "(each memfd region holds 2): at the limit allocations fail with :io_error. " <>
            "Deallocate regions, or raise the limit before starting the VM (ulimit -n, " <>
            "systemd LimitNOFILE=, docker --ulimit nofile=)"
        end)

      {fds, :error} ->
        usage(:file_descriptors, fds, nil, %{open: fds, skipped: "no RLIMIT_NOFILE"}, fn _ ->
          nil
        end)
    end
  end

  defp measure(:memlock, _config, _since) do
    case {locked(), limit("Max locked memory")} do
      {nil, _} ->
        skipped(:memlock, "/proc/self/status is not readable")

      {locked, {:ok, soft}} ->
        usage(:memlock, locked, soft, %{locked: locked, limit: soft}, fn p ->
          "the VM has #{bytes(locked)} locked in RAM, #{pct(p)} of RLIMIT_MEMLOCK " <>
            "#{bytes(soft)} (security_level :maximum regions lock their pages): at the " <>
            "limit they fail with :mlock_failed. Raise it (ulimit -l, systemd " <>
            "LimitMEMLOCK=, docker --ulimit memlock=-1, CAP_IPC_LOCK) or use :high"
        end)

      {locked, :error} ->
        usage(:memlock, locked, nil, %{locked: locked, skipped: "no RLIMIT_MEMLOCK"}, fn _ ->
          nil
        end)
    end
  end

  defp measure(:dead_processes, _config, since) do
    now = counters()
    delta = Map.new(now, fn {event, n} -> {event, max(n - Map.get(since, event, 0), 0)} end)
    total = delta |> Map.values() |> Enum.sum()

    measurements = %{
      orphaned_segments: delta.orphans,
      dead_holds_released: delta.os_holders_released,
      leaked_segments: delta.leaked
    }

    count(:dead_processes, total, measurements, fn _ ->
      "since the previous check #{delta.orphans} segment(s) of dead VMs were removed, " <>
        "#{delta.os_holders_released} hold(s) of dead worker processes released and " <>
        "#{delta.leaked} segment(s) of callers killed mid-allocation removed: processes " <>
        "are being killed (OOM killer? dmesg | grep -i kill); they were cleaned up"
    end)
  end

  defp measure(:expired_held, _config, _since) do
    held = expired_held(System.os_time(:millisecond))
    shown = Enum.take(held, 5)

    count(:expired_held, length(held), %{regions: length(held), region_ids: shown}, fn _ ->
      "#{length(held)} region(s) passed their idle :timeout but are still held, so " <>
        "they cannot be freed (#{Enum.join(shown, ", ")}#{if length(held) > 5, do: ", ..."}): " <>
        "a worker or process keeps them attached. mix snakepit.shm.info ID names the " <>
        "holders; let them close the region or end them"
    end)
  end

  # ---- sources ----

  defp totals do
    if Registry.available?(), do: Quota.totals(), else: %{regions: 0, bytes: 0}
  rescue
    ArgumentError -> %{regions: 0, bytes: 0}
  end

  defp busiest_owner do
    :ets.foldl(
      fn {pid, counter}, {_, most} = acc ->
        n = Snakepit.SharedMemory.Native.quota_owned(counter)
        if n > most, do: {pid, n}, else: acc
      end,
      {nil, 0},
      Registry.owners_table()
    )
  rescue
    ArgumentError -> {nil, 0}
  end

  # Regions with an idle timeout whose last access is older than it, still held.
  defp expired_held(now_ms) do
    spec = [
      {Registry.region(id: :"$1", ref: :"$2", timeout: :"$3", created_at: :"$4", _: :_),
       [{:"=/=", :"$3", :infinity}], [{{:"$1", :"$2", :"$3", :"$4"}}]}
    ]

    for {id, ref, timeout, created_at} <- :ets.select(Registry.regions_table(), spec),
        last_ms = div(Native.last_access(ref), 1_000_000),
        now_ms - max(last_ms, created_at) > timeout,
        elem(Native.hold_counts(ref), 1) > 0,
        do: id
  rescue
    ArgumentError -> []
  end

  # Linux >= 6.2 reports the number of open fds as the size of /proc/self/fd.
  defp open_fds do
    case File.stat("/proc/self/fd") do
      {:ok, %{size: n}} when n > 0 ->
        n

      _ ->
        case File.ls("/proc/self/fd") do
          {:ok, names} -> length(names)
          {:error, _} -> nil
        end
    end
  end

  defp locked do
    with {:ok, text} <- File.read("/proc/self/status"),
         [_, kib] <- Regex.run(~r/^VmLck:\s+(\d+)\s+kB/m, text) do
      String.to_integer(kib) * 1024
    else
      _ -> nil
    end
  end

  defp limit(name) do
    with {:ok, text} <- File.read("/proc/self/limits"),
         [_, soft] <- Regex.run(~r/^#{name}\s+(\S+)/m, text) do
      {:ok, if(soft == "unlimited", do: :infinity, else: String.to_integer(soft))}
    else
      _ -> :error
    end
  end

  defp pct(nil), do: "?"
  defp pct(p), do: "#{:erlang.float_to_binary(p * 1.0, decimals: 1)} %"

  defp bytes(:infinity), do: "infinity"
  defp bytes(n), do: Snakepit.SharedMemory.Error.format_bytes(n)
end
