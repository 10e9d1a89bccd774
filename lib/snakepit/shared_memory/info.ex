defmodule Snakepit.SharedMemory.Info do
  @moduledoc """
  Describing regions: `get_region_info/1` and `list_regions/1`, read straight from the
  registry (ETS) and the region headers, without a process.
  """

  require Snakepit.SharedMemory.Registry

  alias Snakepit.SharedMemory.{Native, Registry}

  import Snakepit.SharedMemory.Registry, only: [region: 1, region: 2]

  @type t :: %{
          id: String.t(),
          size: pos_integer(),
          backend: atom(),
          name: String.t() | nil,
          role: :created | :opened,
          created_at: DateTime.t(),
          last_accessed: DateTime.t() | nil,
          access_count: non_neg_integer(),
          reference_count: non_neg_integer(),
          owner: pid() | nil,
          permissions: map(),
          security_level: atom(),
          cleanup_policy: atom(),
          timeout: pos_integer() | :infinity,
          access_mode: atom(),
          allowed_processes: [pid()],
          metadata: map(),
          sealed: boolean(),
          encrypted: boolean(),
          adopted: boolean(),
          mapped_by: [pid() | %{os_pid: pos_integer(), holds: pos_integer(), writable: boolean()}]
        }

  @doc "Everything known about one region record (reads its header)."
  @spec describe(Registry.region_record()) :: t()
  def describe(record) do
    region(id: id, ref: ref, counters: counters) = record
    info = Native.info(ref)

    {refcount, last_access, os_holders} =
      case Native.header(ref) do
        {:ok, header} ->
          {header.refcount, header.last_access_ns, os_holders(header.holders, info.os_pid)}

        _ ->
          {0, 0, []}
      end

    %{
      id: id,
      size: region(record, :size),
      backend: region(record, :backend),
      name: region(record, :name),
      role: region(record, :role),
      created_at: DateTime.from_unix!(region(record, :created_at), :millisecond),
      last_accessed: from_ns(last_access),
      access_count: :counters.get(counters, 1),
      reference_count: refcount,
      owner: region(record, :owner),
      permissions: region(record, :permissions),
      security_level: region(record, :security_level),
      cleanup_policy: region(record, :cleanup_policy),
      timeout: region(record, :timeout),
      access_mode: region(record, :access_mode),
      allowed_processes: region(record, :allowed),
      metadata: region(record, :metadata),
      sealed: info.sealed,
      encrypted: info.encrypted,
      adopted: region(record, :adopted),
      mapped_by: Registry.mapped_by(id) ++ os_holders
    }
  end

  # Holders other than this VM's own OS process (whose holds are the BEAM mappings).
  defp os_holders(holders, self_os_pid) do
    for %{pid: pid, count: count, writable: writable} <- holders, pid != self_os_pid do
      %{os_pid: pid, holds: count, writable: writable}
    end
  end

  defp from_ns(0), do: nil
  defp from_ns(ns), do: DateTime.from_unix!(div(ns, 1000), :microsecond)

  @doc "Records matching a validated filter (see `Snakepit.SharedMemory.Options.filter/1`)."
  @spec select(map()) :: [Registry.region_record()]
  def select(filter) do
    now = System.system_time(:millisecond)

    Registry.all()
    |> Enum.filter(&matches?(&1, filter, now))
    |> Enum.sort_by(&{region(&1, :created_at), region(&1, :seq)})
  end

  defp matches?(record, filter, now) do
    Enum.all?(filter, fn
      {:owner, pid} -> region(record, :owner) == pid
      {:backend, backend} -> region(record, :backend) == backend
      {:security_level, level} -> region(record, :security_level) == level
      {:cleanup_policy, policy} -> region(record, :cleanup_policy) == policy
      {:older_than, ms} -> now - region(record, :created_at) > ms
      {:name, name} -> region(record, :name) == name
      {:sealed, sealed} -> :counters.get(region(record, :counters), 2) == 1 == sealed
    end)
  end
end
