defmodule Snakepit.SharedMemory.Adoption do
  @moduledoc """
  Taking over regions that Python workers created (`adopt_region/2`).

  A worker that only learns the size of its result while computing allocates the
  output itself (`snakepit_shm.allocate/4`, `snakepit_shm.from_array/1`) and hands back
  its ref. `adopt/2` opens that region read-write, registers it in this VM exactly like
  a region allocated here (owner, cleanup policy, timeout, limits and quotas apply;
  `role: :created`, so freeing it destroys it) and sets the `adopted` bit in its header,
  which tells the worker to close its own descriptors: from then on the VM alone owns
  it. A region can be adopted once (`:already_adopted`).

  Until adoption the worker owns the region: if it dies first, a memfd region dies with
  its descriptors and a POSIX region is an orphan (creator gone) that the next orphan
  sweep removes. A pending POSIX output holds its worker's liveness lock, so sweeps leave
  it and adoption takes it as alive in any PID namespace (the creator pid in its header
  means nothing in another one). After adoption of a POSIX region, the header still names the worker
  as creator, and carries the adopted bit: the orphan sweeps of other VMs on the host
  leave it alone while a process (this VM) holds it open, and remove it once this VM
  is gone too. The memfd backend (the worker's default) needs none of this.
  """

  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{
    Allocator,
    Error,
    HostQuota,
    JSON,
    Native,
    Options,
    Platform,
    Quota,
    Registry
  }

  alias Snakepit.SharedMemory.{Config, Stats, ZeroCopy}

  import Snakepit.SharedMemory.Registry, only: [region: 1]

  @id ~r/\Aspshm_[a-z2-7]{20}\z/
  @proc_fd ~r/\A\/proc\/[1-9][0-9]*\/fd\/[0-9]+\z/
  @adopt_keys [:owner, :cleanup_policy, :timeout, :allowed_processes, :access_mode]

  @doc "Adopts the region of `ref` (see `Snakepit.SharedMemory.adopt_region/2`)."
  @spec adopt(term(), keyword() | map()) :: {:ok, String.t()} | {:error, Error.t()}
  def adopt(ref, opts) do
    with {:ok, opts} <- adopt_options(opts),
         :ok <- not_a_bare_id(ref),
         {:ok, ref} <- ZeroCopy.unwrap(ref),
         {:ok, id, target} <- target(ref),
         :ok <- not_registered(id),
         held = held_by_others?(target),
         {:ok, handle, info} <- open(id, target),
         :ok <- same_region(id, info),
         :ok <- check_header(id, handle, info, held),
         :ok <- check_creator(id, handle, target),
         {:ok, opts} <- Options.allocate(info.size, worker_timeout(opts, handle)) do
      register(handle, info, opts)
    end
  end

  defp target(%{"region_id" => id, "backend" => "memfd"} = ref) when is_binary(id) do
    control = Map.get(ref, "control_path")
    data = Map.get(ref, "data_path")

    cond do
      not Regex.match?(@id, id) -> bad_ref("region_id #{inspect(id)} is not a region id")
      not (is_binary(control) and Regex.match?(@proc_fd, control)) -> bad_ref("control_path")
      not (is_binary(data) and Regex.match?(@proc_fd, data)) -> bad_ref("data_path")
      true -> {:ok, id, {control, data}}
    end
  end

  defp target(%{"region_id" => id, "backend" => "posix"}) when is_binary(id) do
    if Regex.match?(@id, id),
      do: {:ok, id, id},
      else: bad_ref("region_id #{inspect(id)} is not a region id of a worker output")
  end

  # A ref decoded with atom keys (Jason.decode!(json, keys: :atoms)) has region_id and
  # backend, as atoms: say that, not that they are missing.
  defp target(%{region_id: _} = ref),
    do:
      bad_ref(
        "its keys are atoms (#{inspect(Map.keys(ref) |> Enum.take(4))}...): pass the " <>
          "map with string keys that decoding the worker's JSON gives (Jason.decode/1 " <>
          "without keys: :atoms), or the JSON text itself"
      )

  defp target(%{} = ref) when not is_map_key(ref, "region_id") or not is_map_key(ref, "backend"),
    do:
      bad_ref(
        "it has no #{if is_map_key(ref, "region_id"), do: ~s("backend"), else: ~s("region_id")}" <>
          " (a ref passed on with fields dropped?), got: #{inspect(ref, limit: 8)}"
      )

  defp target(%{"backend" => backend}) when backend not in ["memfd", "posix"],
    do: bad_ref(~s(its "backend" is #{inspect(backend)}: a worker output's is "memfd" or "posix"))

  defp target(other),
    do: bad_ref("expected a ref with region_id and backend, got: #{inspect(other, limit: 8)}")

  # A bare id names a POSIX segment at best; a memfd output (the worker's default) is
  # reached only through the worker's descriptors its ref names.
  defp not_a_bare_id(ref) when is_binary(ref) do
    if Regex.match?(@id, ref),
      do:
        bad_ref(
          "got the bare region id #{inspect(ref)}; pass the whole ref (region.ref or " <>
            "region.zero_copy_ref(), a map or its JSON): a memfd output is reached only " <>
            "through the worker descriptors its ref names"
        ),
      else: :ok
  end

  defp not_a_bare_id(_ref), do: :ok

  defp bad_ref(problem) do
    Error.error(
      :invalid_argument,
      "adopt_region/2 needs the ref a worker returned (snakepit_shm.allocate(...).ref): " <>
        problem
    )
  end

  defp adopt_options(opts) do
    cond do
      is_list(opts) and Keyword.keyword?(opts) ->
        with {:ok, map} <- Snakepit.SharedMemory.Options.keyword_to_map(opts),
             do: known_options(map)

      is_map(opts) and not is_struct(opts) ->
        known_options(opts)

      true ->
        Error.error(
          :invalid_option,
          "options must be a keyword list or a map, got: #{inspect(opts, limit: 8)}"
        )
    end
  end

  defp known_options(opts) do
    case Map.keys(opts) -- @adopt_keys do
      [] ->
        {:ok, opts}

      unknown ->
        Error.error(
          :invalid_option,
          "adopt_region/2 accepts #{inspect(@adopt_keys)}, got: #{inspect(unknown)} (size, " <>
            "metadata, backend and security level come from the worker's region)"
        )
    end
  end

  defp not_registered(id) do
    if Registry.lookup(id) == nil,
      do: :ok,
      else:
        Error.error(
          :already_adopted,
          "region #{id} is already registered in this VM (adopted before, or allocated here)",
          %{region_id: id}
        )
  end

  defp open(id, target) do
    case Native.open(target, true) do
      {:ok, handle, info} ->
        {:ok, handle, info}

      {:error, native} ->
        error = Error.from_native(native, %{region_id: id})

        {:error, %{error | message: error.message <> advice(error.reason)}}
    end
  end

  defp advice(:not_found),
    do:
      " (adopt the ref while the worker that made it is alive, has not discarded it, and " <>
        "within its keep_seconds (600 s unless the worker's allocate/from_array gave " <>
        "another): a worker gives up an output nobody adopted by then, with an " <>
        "UnadoptedOutputWarning)"

  defp advice(:deallocated),
    do:
      " (its worker gave the output up before adoption: discard(), its keep_seconds " <>
        "(600 s unless allocate/from_array gave another) or the end of its exit grace; " <>
        "adopt the ref promptly)"

  defp advice(_reason),
    do: " (adopt the ref while the worker that made it is alive and has not discarded it)"

  # The descriptors a ref names may now hold another region (the worker discarded the
  # output and made another, or it exited and its pid was reused): never adopt that one.
  defp same_region(id, %{id: id}), do: :ok

  defp same_region(id, info),
    do:
      Error.error(
        :not_found,
        "region #{id} is gone: the descriptors its ref names now hold region #{info.id} (the " <>
          "worker discarded or closed the output, or exited); adopt the ref while the worker " <>
          "keeps its output",
        %{region_id: id}
      )

  # The idle timeout the worker asked for (allocate(timeout=...)) applies unless the
  # caller gives one.
  defp worker_timeout(opts, handle) do
    case Native.header(handle) do
      {:ok, %{idle_timeout_ns: ns}} when ns > 0 and not is_map_key(opts, :timeout) ->
        Map.put(opts, :timeout, max(div(ns, 1_000_000), 1))

      _ ->
        opts
    end
  end

  # Whether some open of a POSIX output (its worker's, which holds the liveness lock while
  # the output is pending) holds it, asked before this VM opens it: the kernel's answer,
  # valid in every PID namespace. The header's creator pid is not: a worker in another
  # PID namespace (a sidecar container sharing /dev/shm, a sandboxed worker) has a pid
  # that names nothing, or another process, here. A memfd output is reached through
  # /proc/<pid>/fd of its live worker, so it is checked by the header alone.
  defp held_by_others?({_control, _data}), do: false

  defp held_by_others?(id) do
    case Platform.current().shm_dir() do
      nil ->
        false

      dir ->
        case Native.inspect_path(Path.join(dir, id)) do
          {:ok, %{in_use: in_use}} -> in_use
          _ -> false
        end
    end
  end

  defp check_header(id, handle, info, held) do
    {:ok, header} = Native.header(handle)

    cond do
      info.encrypted ->
        Error.error(
          :unsupported,
          "region #{id} is encrypted: only unencrypted worker outputs can be adopted",
          %{region_id: id}
        )

      header.deallocated ->
        Error.error(:deallocated, "region #{id} was deallocated", %{region_id: id})

      not header.creator_alive and not held ->
        Error.error(
          :not_found,
          "region #{id} is an orphan: the worker that created it (OS pid " <>
            "#{header.creator_pid}) died before adoption, so it is left to the orphan sweep",
          %{region_id: id}
        )

      true ->
        :ok
    end
  end

  # Only a worker's own output: the process whose descriptors the ref names must be the
  # region's creator, and it must not be this VM (its regions are registered already,
  # or were freed). Same-uid processes are trusted (docs/SECURITY.md), but a mistaken
  # ref must not make this VM destroy another VM's region.
  defp check_creator(id, handle, target) do
    {:ok, header} = Native.header(handle)
    me = Native.self_info()

    named_pid =
      case target do
        {control, _data} -> control |> String.split("/") |> Enum.at(2) |> String.to_integer()
        _posix -> header.creator_pid
      end

    cond do
      # Pid, start time and boot: a worker in another PID namespace (a sidecar container)
      # may well have this VM's pid (both are pid 1 of their containers).
      header.creator_pid == me.os_pid and header.creator_start_time == me.start_time and
          header.boot_id == me.boot_id ->
        Error.error(
          :invalid_argument,
          "region #{id} was created by this VM, not by a worker: nothing to adopt",
          %{region_id: id}
        )

      header.creator_pid != named_pid ->
        Error.error(
          :invalid_argument,
          "region #{id} was created by OS process #{header.creator_pid}, but the ref names " <>
            "the descriptors of process #{named_pid}: only a worker's own output can be adopted",
          %{region_id: id}
        )

      true ->
        :ok
    end
  end

  defp register(handle, info, opts) do
    id = info.id
    {:ok, header} = Native.header(handle)

    # Monitored by the manager, as an allocating caller: killed between the registry
    # insert and the directory's announcement below, the directory reconciles.
    Registry.register_caller()

    with {:ok, charge} <- Quota.reserve(opts.owner, info.size, Config.get()),
         {:ok, host} <- host_reserve(info.size, charge),
         :ok <- mark(handle, id, charge, host) do
      timeout = opts.timeout
      _ = Native.set_idle_timeout(handle, if(timeout == :infinity, do: 0, else: timeout))
      # The worker's own holds before adoption do not count: a :reference_counted output
      # is freed once a holder of it after adoption lets go, not at once. Still held
      # (the worker keeps its output object): the baseline waits until it lets go.
      held_after =
        case Native.hold_counts(handle) do
          {generation, 0} -> generation
          {_generation, _held} -> nil
        end

      record =
        region(
          id: id,
          ref: handle,
          size: info.size,
          backend: info.backend,
          role: :created,
          name: nil,
          owner: opts.owner,
          created_at: System.os_time(:millisecond),
          seq: System.unique_integer([:monotonic]),
          permissions: opts.permissions,
          security_level: :standard,
          cleanup_policy: opts.cleanup_policy,
          timeout: timeout,
          access_mode: opts.access_mode,
          allowed: opts.allowed,
          metadata: decode(header.metadata),
          counters: Allocator.new_counters(info),
          adopted: true,
          quota: charge,
          held_after: held_after
        )

      # The charge and the host reservation stay exact if this caller is killed at any
      # instant (see Snakepit.SharedMemory.Quota): the row first, then the record.
      HostQuota.Regions.bind(host, id, :created)

      if Registry.insert_new(record) do
        watch(handle, id, opts.owner)
        # Other nodes find it with locate/1 and fetch/2, as a region allocated here.
        Snakepit.SharedMemory.Cluster.Directory.added(id)
        Stats.count(:allocations)
        {:ok, id}
      else
        HostQuota.Regions.release(id)
        Quota.release(charge)
        not_registered(id)
      end
    end
  end

  # The host-wide quota (config :host_quota) holds adopted regions as it holds allocated
  # ones: the region counts against the budget from now until it is freed.
  defp host_reserve(size, charge) do
    case HostQuota.Regions.reserve(size, charge) do
      {:ok, host} ->
        {:ok, host}

      {:error, _} = error ->
        Quota.release(charge)
        error
    end
  end

  defp mark(handle, id, charge, host) do
    case Native.mark_adopted(handle) do
      :ok ->
        :ok

      {:error, {reason, message, _}} ->
        HostQuota.Regions.discard(host)
        Quota.release(charge)

        reason = if reason == :busy, do: :already_adopted, else: reason
        Error.error(reason, "cannot adopt #{id}: #{message}", %{region_id: id})
    end
  end

  defp watch(handle, id, owner) do
    case Native.monitor_owner(handle, owner) do
      :ok ->
        :ok

      {:error, _} ->
        case Process.whereis(Snakepit.SharedMemory.Manager) do
          nil -> :ok
          manager -> send(manager, {:snakepit_shm_owner_down, id, owner})
        end
    end
  end

  defp decode(json) do
    case JSON.decode(json) do
      {:ok, map} when is_map(map) -> map
      _ -> %{}
    end
  end
end
