defmodule Snakepit.SharedMemory.CLI.Entry do
  @moduledoc false
  # One region as the mix tasks show it, whether read offline from its header
  # (HostScan) or asked from a running node (Remote). Plain maps with atom keys, so the
  # table renderers and `--format json` see the same thing.
  #
  #   status      :ok | :corrupt | :not_ours | :not_found | :unreadable
  #   in_use      some open of it holds its liveness lock (asked of the kernel)
  #   orphaned    nobody uses it (not in_use): what cleanup decides on
  #   expired     idle longer than its timeout
  #   owner       %{os_pid, start_time, alive, liveness}: see owner/4
  #   holders     [%{os_pid, start_time, count, writable, alive, liveness}]
  #   open_by     OS pids that keep an fd of a memfd region open

  alias Snakepit.SharedMemory.CLI.ProcessIdentity
  alias Snakepit.SharedMemory.JSON
  alias Snakepit.SharedMemory.Native

  @type t :: map()
  @type context :: %{
          now_ns: integer(),
          boot_id: String.t() | nil,
          os_pid: integer() | nil,
          nested: ProcessIdentity.index()
        }

  @levels %{0 => "standard", 1 => "high", 2 => "maximum"}

  @doc "True for a well-formed region id: spshm_ + 20 of [a-z2-7], or spshm_n_ + 1..21 of [a-z0-9_-]."
  @spec region_id?(String.t()) :: boolean()
  def region_id?(id), do: Regex.match?(~r/\Aspshm_(?:[a-z2-7]{20}|n_[a-z0-9_-]{1,21})\z/, id)

  @doc "What entries are computed against: the current time and this VM's identity."
  @spec context() :: context()
  def context do
    self = Native.self_info()

    %{
      now_ns: System.os_time(:nanosecond),
      boot_id: self.boot_id,
      os_pid: self.os_pid,
      nested: ProcessIdentity.nested()
    }
  end

  @doc "An entry from a header read by `Native.inspect_path/1` plus `extra` fields."
  @spec from_header(map(), context(), map()) :: t()
  def from_header(h, context, extra) do
    same_boot = h.boot_id == context.boot_id
    in_use = Map.get(h, :in_use, true)
    owner = owner(h, same_boot, in_use, context)

    idle_ns =
      context.now_ns - if(h.last_access_ns > 0, do: h.last_access_ns, else: h.created_at_ns)

    expires_in_ms = if h.idle_timeout_ns > 0, do: div(h.idle_timeout_ns - idle_ns, 1_000_000)

    %{
      id: h.id,
      status: :ok,
      problem: nil,
      backend: Atom.to_string(h.backend),
      size: h.size,
      capacity: h.capacity,
      owner: owner,
      holders: Enum.map(h.holders, &holder(&1, same_boot, in_use, context)),
      refcount: h.refcount,
      created_at: to_datetime(h.created_at_ns),
      last_access_at: to_datetime(h.last_access_ns),
      age_ms: max(div(context.now_ns - h.created_at_ns, 1_000_000), 0),
      idle_ms: max(div(idle_ns, 1_000_000), 0),
      timeout_ms: if(h.idle_timeout_ns > 0, do: div(h.idle_timeout_ns, 1_000_000)),
      expires_in_ms: expires_in_ms,
      expired: expires_in_ms != nil and expires_in_ms <= 0,
      in_use: in_use,
      orphaned: orphaned?(h, in_use, owner),
      sealed: h.sealed,
      encrypted: h.encrypted,
      deallocated: h.deallocated,
      security_level: Map.get(@levels, h.security_level, h.security_level),
      format_version: h.format_version,
      boot_id: h.boot_id,
      metadata: decode_metadata(h.metadata)
    }
    |> Map.merge(extra)
  end

  @doc """
  An entry from what a running node's manager reports (`get_region_info/1`). The owner
  is that VM (`vm_os_pid`), alive since it answered; holders are its BEAM mappings
  (one line for the VM) and the OS processes (workers) the manager tracks, whose
  liveness it watches itself (`alive: nil`, not checked from here).
  """
  @spec from_info(map(), pos_integer()) :: t()
  def from_info(info, vm_os_pid) do
    now_ms = System.os_time(:millisecond)
    # Integer times (list_regions/1) or DateTimes (get_region_info/1, older nodes).
    info = Snakepit.SharedMemory.Info.to_datetimes(info)
    created_ms = DateTime.to_unix(info.created_at, :millisecond)

    last_ms =
      if info[:last_accessed],
        do: DateTime.to_unix(info.last_accessed, :millisecond),
        else: created_ms

    idle_ms = max(now_ms - max(last_ms, created_ms), 0)
    timeout_ms = if is_integer(info[:timeout]), do: info.timeout
    expires_in_ms = if timeout_ms, do: timeout_ms - idle_ms
    mapped_by = Map.get(info, :mapped_by, [])
    beam = Enum.count(mapped_by, &is_pid/1)

    holders =
      if(beam > 0,
        do: [%{os_pid: vm_os_pid, start_time: nil, count: beam, writable: nil, alive: true}],
        else: []
      ) ++
        for %{os_pid: pid} = h <- mapped_by do
          %{os_pid: pid, start_time: nil, count: h[:holds], writable: h[:writable], alive: nil}
        end

    %{
      id: info.id,
      status: :ok,
      problem: nil,
      backend: to_string(info.backend),
      size: info.size,
      owner: %{
        os_pid: vm_os_pid,
        start_time: nil,
        alive: true,
        liveness: :alive,
        process: info[:owner]
      },
      holders: holders,
      refcount: info[:reference_count],
      created_at: info.created_at,
      last_access_at: info[:last_accessed],
      age_ms: max(now_ms - created_ms, 0),
      idle_ms: idle_ms,
      timeout_ms: timeout_ms,
      expires_in_ms: expires_in_ms,
      expired: expires_in_ms != nil and expires_in_ms <= 0,
      orphaned: false,
      sealed: info[:sealed] == true,
      encrypted: info[:encrypted] == true,
      deallocated: false,
      security_level: to_string(info[:security_level]),
      format_version: nil,
      metadata: info[:metadata] || %{},
      name: info[:name],
      cleanup_policy: info[:cleanup_policy],
      access_count: info[:access_count]
    }
  end

  @doc "An entry for a segment whose header could not be read or is not ours."
  @spec unreadable(String.t(), String.t(), String.t() | nil, atom(), String.t()) :: t()
  def unreadable(id, backend, path, reason, message) do
    %{
      id: id,
      status: status(reason),
      problem: message,
      backend: backend,
      path: path,
      size: file_size(path),
      owner: nil,
      holders: [],
      orphaned: false,
      expired: false,
      sealed: false,
      encrypted: false,
      open_by: []
    }
  end

  defp status(:corrupt), do: :corrupt
  defp status(:unsupported_version), do: :corrupt
  defp status(:not_ours), do: :not_ours
  defp status(:not_found), do: :not_found
  defp status(_), do: :unreadable

  defp file_size(nil), do: nil

  defp file_size(path) do
    case File.lstat(path) do
      {:ok, %File.Stat{type: :regular, size: size}} -> size
      _ -> nil
    end
  end

  @doc "Sorts readable entries by creation time, then unreadable ones by id."
  @spec sort([t()]) :: [t()]
  def sort(entries) do
    {ok, bad} = Enum.split_with(entries, &(&1.status == :ok))
    Enum.sort_by(ok, &{created_us(&1.created_at), &1.id}) ++ Enum.sort_by(bad, & &1.id)
  end

  defp created_us(nil), do: 0
  defp created_us(%DateTime{} = dt), do: DateTime.to_unix(dt, :microsecond)

  # Nobody uses it, and it is not a region a live VM freed (an arena chunk, a memfd its
  # VM has not garbage-collected yet, kept by a zero-copy binary): that VM lets go of
  # it by itself, nothing is orphaned.
  defp orphaned?(h, in_use, owner), do: not in_use and not (h.deallocated and owner.alive == true)

  # The owner VM's liveness, from what the kernel holds, never from a pid alone (a
  # header's pid is the creator's pid in its own PID namespace: from another one it
  # names nobody, or somebody else):
  #
  #   :alive       the process of that pid and start time runs, in this PID namespace
  #                or one nested in it (found in /proc: CLI.ProcessIdentity); `seen_as`
  #                is its pid here when that differs. alive: true
  #   :other_boot  the header was written during another boot: its writer is dead.
  #                alive: false
  #   :in_use      not seen from here, but some process holds the region's liveness
  #                lock (the VM, in a namespace this one cannot see, or a worker that
  #                outlived it: the kernel does not say whom). alive: nil
  #   :unused      not seen from here and nobody holds the liveness lock: nothing uses
  #                the region any more (the VM may still run in a namespace this one
  #                cannot see). alive: nil
  defp owner(h, same_boot, in_use, context) do
    {alive, liveness, seen_as} =
      identify(h.creator_pid, h.creator_start_time, same_boot, in_use, context)

    %{os_pid: h.creator_pid, start_time: h.creator_start_time, alive: alive, liveness: liveness}
    |> put_seen_as(seen_as)
  end

  defp identify(_pid, _start, false, _in_use, _context), do: {false, :other_boot, nil}

  defp identify(pid, start, true, in_use, context) do
    case ProcessIdentity.find(pid, start, context.nested) do
      {:here, _} -> {true, :alive, nil}
      {:nested, here} -> {true, :alive, here}
      :not_seen when in_use -> {nil, :in_use, nil}
      :not_seen -> {nil, :unused, nil}
    end
  end

  defp put_seen_as(map, nil), do: map
  defp put_seen_as(map, pid), do: Map.put(map, :seen_as, pid)

  @doc "Flags worth a glance: sealed, encrypted, orphaned, expired, deallocated, dead holders."
  @spec flags(t()) :: [String.t()]
  def flags(%{status: :ok} = e) do
    [
      {e.orphaned, "orphaned"},
      {e.expired, "expired"},
      {e.sealed, "sealed"},
      {e.encrypted, "encrypted"},
      {e[:deallocated] == true, "deallocated"},
      {Enum.any?(e.holders, &(&1.alive == false)), "dead-holder"}
    ]
    |> for_true()
  end

  def flags(%{status: status}),
    do: [status |> Atom.to_string() |> String.replace("_", "-") |> String.upcase()]

  defp for_true(pairs), do: for({true, name} <- pairs, do: name)

  # A holder as the owner (owner/4), except that with nobody holding the liveness lock
  # its hold is known stale (every user of a region holds that lock: a holder that does
  # not has let go of it, or died): alive false, :unused.
  defp holder(h, same_boot, in_use, context) do
    {alive, liveness, seen_as} = identify(h.pid, h.start_time, same_boot, in_use, context)
    alive = if liveness == :unused, do: false, else: alive

    %{
      os_pid: h.pid,
      start_time: h.start_time,
      count: h.count,
      writable: h.writable,
      alive: alive,
      liveness: liveness
    }
    |> put_seen_as(seen_as)
  end

  defp to_datetime(0), do: nil
  defp to_datetime(ns), do: DateTime.from_unix!(div(ns, 1_000), :microsecond)

  defp decode_metadata(""), do: %{}

  defp decode_metadata(json) do
    case JSON.decode(json) do
      {:ok, value} -> value
      {:error, _} -> json
    end
  end
end
