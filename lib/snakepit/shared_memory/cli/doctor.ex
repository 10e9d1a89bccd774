defmodule Snakepit.SharedMemory.CLI.Doctor do
  @moduledoc false
  # The checks of `mix snakepit.shm.doctor`. Each returns a finding:
  #   %{check: name, status: :ok | :warn | :fail, detail: what was seen, fix: what to do}
  # Checks work by behaviour where they can (a memfd region is really allocated and
  # sealed, the Python client is really imported), by version or configuration otherwise.

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.CLI.{DoctorPython, HostScan, Human}
  alias Snakepit.SharedMemory.Native

  @type finding :: %{
          check: String.t(),
          status: :ok | :warn | :fail,
          detail: String.t(),
          fix: String.t() | nil
        }

  @docker_shm 64 * 1024 * 1024
  @memlock_wanted 64 * 1024 * 1024
  @nofile_wanted 4096

  @doc "Runs every check, in order. `python` is the interpreter of the workers."
  @spec run(String.t(), String.t()) :: [finding()]
  def run(python, priv) do
    nif = nif_loads()

    leftovers =
      if nif.status == :ok, do: leftovers(), else: skipped("leftover segments", "the NIF")

    # Started here (and not by health/0 below) so that the presence row can ask it. An
    # application that does not start (an invalid setting) is a finding of its own:
    # the rows that need it say so instead of giving advice for causes that are not
    # the cause (the presence directory, the kernel's memfd seals).
    started = start_application()
    health = health(started)

    [
      nif,
      application(started),
      shm_dir(),
      leftovers,
      if(started == :ok, do: peers(), else: not_started("peer VMs")),
      kernel(),
      memory(),
      memlock(),
      nofile(),
      remove_ipc(),
      cond do
        nif.status != :ok -> skipped("memfd sealing", "the NIF")
        started != :ok -> not_started("memfd sealing")
        true -> memfd_seal()
      end,
      if(nif.status == :ok, do: channel(), else: skipped("message channel", "the NIF")),
      if(nif.status == :ok, do: huge_pages(), else: skipped("huge pages", "the NIF"))
    ] ++ DoctorPython.checks(python, priv) ++ health_findings(health)
  end

  # ---- the other VMs of this host (Snakepit.SharedMemory.Peers) ----

  defp peers do
    dir = Snakepit.SharedMemory.Platform.current().shm_dir()

    cond do
      dir == nil ->
        finding("peer VMs", :ok, "no POSIX shm directory on this platform: nothing to sweep")

      Process.whereis(Snakepit.SharedMemory.Peers) == nil ->
        finding(
          "peer VMs",
          :warn,
          "no presence socket under #{dir}/snakepit_shm-<uid>/vms (the log says why): the " <>
            "POSIX segments of a VM killed with SIGKILL stay until a VM starts",
          "make #{dir}/snakepit_shm-<uid> and its vms subdirectory directories of this " <>
            "user with mode 0700 (or remove them: they are created so)"
        )

      true ->
        n = length(Snakepit.SharedMemory.Peers.list())

        finding(
          "peer VMs",
          :ok,
          "connected to #{n} peer(s) sharing #{dir} (other VMs of this user, and Python " <>
            "workers that made POSIX outputs): the POSIX segments of one that dies are " <>
            "swept at once"
        )
    end
  end

  # ---- the running checks of Snakepit.SharedMemory.Health ----

  @doc """
  The health report of this VM: the very checks the application runs every
  `:health_check_interval` (`Snakepit.SharedMemory.health/0`).
  """
  @spec health() :: map()
  def health, do: health(start_application())

  # Without the application, only the host's checks: the limit checks (regions, bytes,
  # regions per process) would compare nothing against the defaults, not the
  # configured limits, and say "ok".
  defp health(:ok), do: SHM.health()

  # (The application finding says why it does not start: not repeated here.)
  defp health({:error, _why}) do
    report = Snakepit.SharedMemory.Health.run()
    host = Enum.reject(report.checks, &(&1.name in [:regions, :memory, :regions_per_process]))
    %{report | status: :critical, checks: host}
  end

  @doc false
  # :ok, or {:error, the reason as text}: the message the application's start gave
  # (an invalid setting names its key), not the tuples wrapped around it.
  @spec start_application() :: :ok | {:error, String.t()}
  def start_application do
    case Application.ensure_all_started(:snakepit_shm) do
      {:ok, _} -> :ok
      {:error, reason} -> {:error, start_error(reason)}
    end
  end

  defp start_error(reason), do: message_in(reason, 5) || inspect(reason, limit: 10)

  # The first non-empty string in a nested error reason (depth-limited).
  defp message_in(text, _depth) when is_binary(text) and text != "", do: text
  defp message_in(_term, 0), do: nil

  defp message_in(tuple, depth) when is_tuple(tuple),
    do: tuple |> Tuple.to_list() |> message_in(depth)

  defp message_in([head | tail], depth),
    do: message_in(head, depth - 1) || message_in(tail, depth)

  defp message_in(_term, _depth), do: nil

  defp application(:ok),
    do: finding("application", :ok, "the :snakepit_shm application starts")

  defp application({:error, why}),
    do:
      finding(
        "application",
        :fail,
        "the :snakepit_shm application does not start: #{why}",
        "correct the setting it names (config :snakepit_shm or config :snakepit, " <>
          ":shared_memory in config/*.exs; the docs of Snakepit.SharedMemory.Config list " <>
          "each setting): every allocation fails until it starts"
      )

  defp not_started(check),
    do:
      finding(
        check,
        :fail,
        "not checked: the :snakepit_shm application does not start",
        "fix the application finding first"
      )

  @doc "Doctor findings (`health: NAME`) of a health report: degraded warns, critical fails."
  @spec health_findings(map()) :: [finding()]
  def health_findings(%{checks: checks}) do
    for check <- checks do
      finding(
        "health: #{check.name}",
        health_status(check.status),
        health_detail(check),
        check.message
      )
    end
  end

  defp health_status(:ok), do: :ok
  defp health_status(:degraded), do: :warn
  defp health_status(:critical), do: :fail

  defp health_detail(%{measurements: %{skipped: why}}), do: "not measured: #{why}"

  defp health_detail(%{percent: p, value: value, limit: limit} = check) when is_number(p),
    do: "#{p} % (#{health_value(check, value)} of #{health_value(check, limit)})"

  defp health_detail(%{value: value, limit: :infinity} = check),
    do: "#{health_value(check, value)} (no limit)"

  defp health_detail(%{value: value} = check), do: "#{health_value(check, value)}"

  @byte_checks [:memory, :shm_space, :cgroup_memory, :host_memory, :memlock]
  defp health_value(%{name: name}, n) when name in @byte_checks and is_integer(n),
    do: Human.bytes(n)

  defp health_value(_check, other), do: to_string(other)

  @doc false
  def finding(check, status, detail, fix \\ nil),
    do: %{check: check, status: status, detail: detail, fix: fix}

  defp skipped(check, what),
    do: finding(check, :fail, "not checked: #{what} did not load", "fix #{what} first")

  # ---- the NIF ----

  defp nif_loads do
    case Code.ensure_loaded(Native) do
      {:module, Native} ->
        info = Native.self_info()

        finding(
          "NIF loads",
          :ok,
          "snakepit_shm_nif.so loaded (VM OS pid #{info.os_pid}, boot #{String.slice(info.boot_id, 0, 8)}...)"
        )

      {:error, reason} ->
        finding(
          "NIF loads",
          :fail,
          "Snakepit.SharedMemory.Native did not load (#{inspect(reason)})",
          "build it with `mix compile` (needs cmake, g++, libsodium-dev: `make deps`)"
        )
    end
  rescue
    e -> finding("NIF loads", :fail, Exception.message(e), "rebuild with `mix compile`")
  end

  # ---- the message channel (Snakepit.SharedMemory.Channel) ----

  defp channel do
    case Snakepit.SharedMemory.Channel.open(transport: :shm) do
      {:ok, ch} ->
        stats = Snakepit.SharedMemory.Channel.stats(ch)
        Snakepit.SharedMemory.Channel.close(ch)

        finding(
          "message channel",
          :ok,
          "shared-memory rings work (memfd + eventfd + private Unix socket; ring #{Human.bytes(stats.ring_size)})"
        )

      {:error, e} ->
        finding(
          "message channel",
          :warn,
          "channels fall back to the socket transport: #{e.message}",
          "allow memfd_create/eventfd (seccomp profile) and a writable $XDG_RUNTIME_DIR or /tmp"
        )
    end
  rescue
    e -> finding("message channel", :warn, Exception.message(e))
  end

  # ---- /dev/shm ----

  defp shm_dir do
    case df("/dev/shm") do
      {:ok, total, free} ->
        detail = "tmpfs of #{Human.bytes(total)}, #{Human.bytes(free)} free"

        cond do
          total <= @docker_shm ->
            finding(
              "/dev/shm size",
              :warn,
              detail <> " (Docker's default is 64 MB)",
              "POSIX regions (named or shared with other users) are capped by it: run the container with " <>
                "--shm-size=2g (compose: shm_size), or keep to the memfd backend, which it does not limit"
            )

          free < div(total, 10) ->
            finding(
              "/dev/shm size",
              :warn,
              detail <> " (less than 10% free)",
              "`mix snakepit.shm.list` shows who holds it; `mix snakepit.shm.cleanup` frees orphans"
            )

          true ->
            finding("/dev/shm size", :ok, detail)
        end

      {:error, message} ->
        finding(
          "/dev/shm size",
          :fail,
          message,
          "mount a tmpfs on /dev/shm (mount -t tmpfs -o size=2g tmpfs /dev/shm) for the POSIX backend"
        )
    end
  end

  defp df(path) do
    case System.find_executable("df") &&
           System.cmd("df", ["-P", "-B1", path], stderr_to_stdout: true) do
      {out, 0} ->
        case out |> String.split("\n", trim: true) |> List.last() |> String.split() do
          [_fs, total, _used, free | _] ->
            {:ok, String.to_integer(total), String.to_integer(free)}

          _ ->
            {:error, "cannot read the output of df #{path}: #{inspect(out)}"}
        end

      {out, _} ->
        {:error, "df #{path} failed: #{String.trim(out)}"}

      nil ->
        {:error, "df is not installed: cannot measure #{path}"}
    end
  end

  defp leftovers do
    entries = HostScan.scan()
    orphans = Enum.filter(entries, &(&1.status == :ok and &1.orphaned))
    bad = Enum.filter(entries, &(&1.status != :ok))
    bytes = orphans |> Enum.map(& &1.size) |> Enum.sum()

    cond do
      orphans == [] and bad == [] ->
        finding(
          "leftover segments",
          :ok,
          "#{length(entries)} region(s) on the host, none orphaned or damaged"
        )

      true ->
        finding(
          "leftover segments",
          :warn,
          "#{length(orphans)} orphaned (#{Human.bytes(bytes)}), #{length(bad)} damaged or foreign spshm_* segment(s)",
          "`mix snakepit.shm.cleanup --dry-run` shows what would be freed; then run it without --dry-run"
        )
    end
  end

  # ---- kernel and limits ----

  defp kernel do
    release = read_trim("/proc/sys/kernel/osrelease") || "unknown"

    case kernel_version(release) do
      {major, minor} when {major, minor} >= {5, 6} ->
        finding(
          "kernel",
          :ok,
          "Linux #{release}: memfd F_SEAL_FUTURE_WRITE (5.1), pidfd_open (5.3) and pidfd_getfd (5.6) available"
        )

      {major, minor} when {major, minor} >= {5, 3} ->
        finding(
          "kernel",
          :ok,
          "Linux #{release}: F_SEAL_FUTURE_WRITE (5.1) and pidfd_open (5.3) available"
        )

      {major, minor} when {major, minor} >= {5, 1} ->
        finding(
          "kernel",
          :warn,
          "Linux #{release}: no pidfd_open (5.3)",
          "dead workers are then found by polling, not at once: upgrade to Linux >= 5.3"
        )

      {_, _} ->
        finding(
          "kernel",
          :warn,
          "Linux #{release}: no F_SEAL_FUTURE_WRITE (5.1), no pidfd (5.3)",
          "sealed memfd regions are not truly read-only for workers: upgrade to Linux >= 5.3"
        )

      nil ->
        finding(
          "kernel",
          :warn,
          "unknown kernel release #{inspect(release)}",
          "snakepit_shm needs Linux >= 5.3"
        )
    end
  end

  defp kernel_version(release) do
    case Regex.run(~r/^(\d+)\.(\d+)/, release) do
      [_, major, minor] -> {String.to_integer(major), String.to_integer(minor)}
      _ -> nil
    end
  end

  # The host's memory and the memory cgroup's (a container's limit): shared memory is
  # charged to the cgroup, and the allocation guard refuses what it cannot hold.
  defp memory do
    %{host: host, cgroup: cgroup} = Snakepit.SharedMemory.MemoryLimits.snapshot()
    host_text = "host: #{Human.bytes(host.available)} available of #{Human.bytes(host.total)}"

    case cgroup do
      nil ->
        finding("memory", :ok, host_text <> "; no memory cgroup")

      %{max: :infinity} = c ->
        finding(
          "memory",
          :ok,
          host_text <>
            "; memory cgroup v#{c.version} #{c.path}: no limit, #{Human.bytes(c.current)} in use"
        )

      %{max: max, current: current} = c ->
        headroom = max(max - current, 0)

        detail =
          host_text <>
            "; memory cgroup v#{c.version} #{c.path}: #{Human.bytes(current)} of " <>
            "#{Human.bytes(max)} in use (#{Human.bytes(headroom)} left: allocations beyond it " <>
            "are refused)"

        if headroom < div(max, 10),
          do:
            finding(
              "memory",
              :warn,
              detail,
              "raise the container's memory limit or free memory in it"
            ),
          else: finding("memory", :ok, detail)
    end
  end

  defp memlock do
    case limit("Max locked memory") do
      {:ok, :unlimited, _} ->
        finding("RLIMIT_MEMLOCK", :ok, "unlimited")

      {:ok, soft, hard} when soft >= @memlock_wanted ->
        finding("RLIMIT_MEMLOCK", :ok, "#{Human.bytes(soft)} (hard #{limit_text(hard)})")

      {:ok, soft, hard} ->
        memlock_low(soft, hard, ipc_lock?())

      :error ->
        finding(
          "RLIMIT_MEMLOCK",
          :warn,
          "cannot read /proc/self/limits",
          "check `ulimit -l` by hand"
        )
    end
  end

  # CAP_IPC_LOCK (bit 14 of CapEff) lifts RLIMIT_MEMLOCK: root usually has it.
  @cap_ipc_lock 14

  @doc false
  @spec ipc_lock?(String.t()) :: boolean()
  def ipc_lock?(status_path \\ "/proc/self/status") do
    with {:ok, status} <- File.read(status_path),
         [_, hex] <- Regex.run(~r/^CapEff:\s*([0-9a-fA-F]+)$/m, status),
         {caps, ""} <- Integer.parse(hex, 16) do
      Bitwise.band(Bitwise.bsr(caps, @cap_ipc_lock), 1) == 1
    else
      _ -> false
    end
  end

  @doc false
  def memlock_low(soft, hard, true) do
    finding(
      "RLIMIT_MEMLOCK",
      :ok,
      "#{Human.bytes(soft)} (hard #{limit_text(hard)}), but this process has CAP_IPC_LOCK, " <>
        "which lifts the limit: security_level :maximum can lock any size"
    )
  end

  def memlock_low(soft, hard, false) do
    finding(
      "RLIMIT_MEMLOCK",
      :warn,
      "#{Human.bytes(soft)} (hard #{limit_text(hard)}): security_level :maximum regions lock their pages in RAM, " <>
        "so all of them together cannot exceed this",
      "raise it for the VM's user: `ulimit -l unlimited` before starting it, systemd LimitMEMLOCK=infinity, " <>
        "docker --ulimit memlock=-1, or grant CAP_IPC_LOCK; or use security_level :high"
    )
  end

  defp nofile do
    case limit("Max open files") do
      {:ok, soft, hard} when soft == :unlimited or soft >= @nofile_wanted ->
        finding(
          "RLIMIT_NOFILE",
          :ok,
          "#{limit_text(soft)} open files (hard #{limit_text(hard)}); each memfd region uses 2"
        )

      {:ok, soft, hard} ->
        finding(
          "RLIMIT_NOFILE",
          :warn,
          "#{soft} open files (hard #{limit_text(hard)}); each memfd region uses 2 fds",
          "raise it before starting the VM (`ulimit -n 65536`, systemd LimitNOFILE=): the VM sizes its poll set at boot"
        )

      :error ->
        finding(
          "RLIMIT_NOFILE",
          :warn,
          "cannot read /proc/self/limits",
          "check `ulimit -n` by hand"
        )
    end
  end

  defp limit(name) do
    with {:ok, text} <- File.read("/proc/self/limits"),
         line when is_binary(line) <-
           text |> String.split("\n") |> Enum.find(&String.starts_with?(&1, name)),
         [soft, hard | _] <- line |> String.replace_prefix(name, "") |> String.split() do
      {:ok, limit_value(soft), limit_value(hard)}
    else
      _ -> :error
    end
  end

  defp limit_value("unlimited"), do: :unlimited
  defp limit_value(text), do: String.to_integer(text)

  defp limit_text(:unlimited), do: "unlimited"
  defp limit_text(n) when n > 65_536, do: Human.bytes(n)
  defp limit_text(n), do: Integer.to_string(n)

  # systemd-logind removes the POSIX shm segments of a user at their last logout when
  # RemoveIPC=yes (the default), except for root and system users.
  defp remove_ipc do
    files = Path.wildcard("/etc/systemd/logind.conf.d/*.conf") ++ ["/etc/systemd/logind.conf"]
    setting = files |> Enum.flat_map(&remove_ipc_lines/1) |> List.first()
    uid = own_uid()
    systemd = File.dir?("/run/systemd/system")

    value = if setting, do: elem(setting, 1), else: "yes (systemd's default)"
    where = if setting, do: " in #{elem(setting, 0)}", else: ""

    cond do
      setting && String.downcase(elem(setting, 1)) in ["no", "false", "0"] ->
        finding("systemd RemoveIPC", :ok, "RemoveIPC=no#{where}")

      uid != nil and uid < 1000 ->
        finding(
          "systemd RemoveIPC",
          :ok,
          "RemoveIPC=#{value}#{where}, but uid #{uid} is a system user: not affected"
        )

      not systemd ->
        finding(
          "systemd RemoveIPC",
          :ok,
          "RemoveIPC=#{value}#{where}; systemd is not running here"
        )

      true ->
        finding(
          "systemd RemoveIPC",
          :warn,
          "RemoveIPC=#{value}#{where}: logind deletes uid #{uid}'s /dev/shm segments at its last logout",
          "put `[Login]\\nRemoveIPC=no` in /etc/systemd/logind.conf.d/snakepit.conf, or run the VM as a system user"
        )
    end
  end

  defp remove_ipc_lines(file) do
    case File.read(file) do
      {:ok, text} ->
        for line <- String.split(text, "\n"),
            [_, value] <- [Regex.run(~r/^\s*RemoveIPC\s*=\s*(\S+)/, line)],
            do: {file, value}

      {:error, _} ->
        []
    end
  end

  defp own_uid do
    case File.stat("/proc/self") do
      {:ok, stat} -> stat.uid
      _ -> nil
    end
  end

  # ---- behaviour: a sealed memfd region, through the API ----

  defp memfd_seal do
    with {:ok, _} <- Application.ensure_all_started(:snakepit_shm),
         {:ok, id} <-
           SHM.allocate_region(4096,
             backend: :memfd,
             # a memfd of its own: an arena region gets no kernel seal
             arena: false,
             metadata: %{doctor: true}
           ) do
      try do
        seal_check(id)
      after
        SHM.deallocate_region(id)
      end
    else
      {:error, %SHM.Error{} = e} ->
        finding(
          "memfd sealing",
          :fail,
          "allocating a memfd region failed: #{e.message}",
          "needs Linux memfd_create with MFD_ALLOW_SEALING (3.17+); check the kernel finding"
        )

      {:error, reason} ->
        finding(
          "memfd sealing",
          :fail,
          "the :snakepit_shm application did not start: #{inspect(reason)}",
          "check the configuration in config/*.exs"
        )
    end
  end

  # seal/1 of a memfd region adds F_SEAL_WRITE | F_SEAL_FUTURE_WRITE: it fails on kernels without them.
  defp seal_check(id) do
    with {:ok, mapping} <- SHM.map_region(id, access_mode: :read_write),
         :ok <- SHM.write(mapping, 0, "doctor"),
         :ok <- SHM.unmap_region(mapping),
         :ok <- SHM.seal(id),
         {:ok, reader} <- SHM.map_region(id, access_mode: :read_only) do
      writable = SHM.map_region(id, access_mode: :read_write)
      read = SHM.read(reader, 0, 6)
      SHM.unmap_region(reader)

      case {writable, read} do
        {{:error, _}, {:ok, "doctor"}} ->
          finding(
            "memfd sealing",
            :ok,
            "allocated a memfd region, wrote it, sealed it (F_SEAL_WRITE): read-write mappings are refused, the data reads back"
          )

        {{:ok, mapping}, _} ->
          SHM.unmap_region(mapping)

          finding(
            "memfd sealing",
            :fail,
            "a sealed region could still be mapped read-write",
            "report it with the output of `uname -a`"
          )

        {_, other} ->
          finding(
            "memfd sealing",
            :fail,
            "reading the sealed region gave #{inspect(other)}",
            "report it with the output of `uname -a`"
          )
      end
    else
      {:error, %SHM.Error{} = e} ->
        finding(
          "memfd sealing",
          :fail,
          "#{e.reason}: #{e.message}",
          "needs Linux >= 5.1 (F_SEAL_FUTURE_WRITE)"
        )
    end
  end

  defp read_trim(path) do
    case File.read(path) do
      {:ok, text} -> String.trim(text)
      _ -> nil
    end
  end

  # What the host offers for `huge_pages:` (MFD_HUGETLB memfds from the hugetlb pool).
  @doc false
  def huge_pages do
    %{page_size: size, total: total, free: free} = Snakepit.SharedMemory.WarmPool.huge_pages()

    cond do
      size == 0 ->
        finding("huge pages", :ok, "no hugetlbfs: huge_pages: :auto uses ordinary pages")

      total == 0 ->
        finding(
          "huge pages",
          :ok,
          "none reserved (vm.nr_hugepages = 0, #{div(size, 1024)} KiB pages): " <>
            "huge_pages: :auto uses ordinary pages, huge_pages: true fails",
          "optional: reserve some as root (echo N > /proc/sys/vm/nr_hugepages) for " <>
            "faster fresh large regions"
        )

      true ->
        finding(
          "huge pages",
          :ok,
          "#{free} of #{total} pages of #{div(size, 1024)} KiB free " <>
            "(#{div(free * size, 1024 * 1024)} MiB): huge_pages: :auto uses them"
        )
    end
  end
end
