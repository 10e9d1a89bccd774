defmodule Snakepit.SharedMemory.Security do
  @moduledoc """
  Permissions, security levels, process allow-lists and the access audit.

  ## Permission sets

  `%{owner: :read_write | :read_only, group: :read_write | :read_only | :none,
  other: :read_write | :read_only | :none}` map to the file mode of the segment
  (`owner: :read_write` is `0o600`, `group: :read_only` adds `0o040`, ...). Missing
  keys default to `owner: :read_write, group: :none, other: :none`. Anything wider than
  owner-only needs a file the kernel checks modes on, that is the `:posix` backend (a
  memfd is reachable only through `/proc/<pid>/fd`, which the kernel limits to the same
  user whatever its mode).

  ## Security levels

    * `:standard` - OS permissions only.
    * `:high` - the data is encrypted at rest (XChaCha20-Poly1305 per 64 KiB chunk, the
      key in this VM), reads verify it (`:tampered` on modification), and the memory is
      zeroed when the region is freed.
    * `:maximum` - `:high`, plus the mapping is locked in RAM and kept out of core dumps
      (`mlock`, `MADV_DONTDUMP`; fails honestly when `RLIMIT_MEMLOCK` is too low), it is
      shared with other OS processes only read-only (`export_ref/2` requires `seal/1`
      first), and every access is audited (Logger and telemetry).

  See `docs/SECURITY.md` for the threat model.
  """

  require Logger

  alias Snakepit.SharedMemory.{Error, Stats}

  @type access :: :read_write | :read_only | :none
  @type permissions :: %{owner: :read_write | :read_only, group: access(), other: access()}
  @type level :: :standard | :high | :maximum

  @default_permissions %{owner: :read_write, group: :none, other: :none}
  @shift %{owner: 6, group: 3, other: 0}

  @doc "Owner-only read-write: the default permissions."
  @spec default_permissions() :: permissions()
  def default_permissions, do: @default_permissions

  @doc "Validates a permission set given as a map or keyword list and fills in defaults."
  @spec normalize_permissions(term()) :: {:ok, permissions()} | {:error, Error.t()}
  def normalize_permissions(perms) when is_list(perms) do
    if Keyword.keyword?(perms) do
      with {:ok, map} <- Snakepit.SharedMemory.Options.keyword_to_map(perms),
           do: normalize_permissions(map)
    else
      invalid_permissions(perms)
    end
  end

  def normalize_permissions(perms) when is_map(perms) do
    merged = Map.merge(@default_permissions, perms)

    cond do
      map_size(merged) != 3 ->
        invalid_permissions(perms)

      merged.owner not in [:read_write, :read_only] ->
        invalid_permissions(perms)

      merged.group not in [:read_write, :read_only, :none] or
          merged.other not in [:read_write, :read_only, :none] ->
        invalid_permissions(perms)

      true ->
        {:ok, merged}
    end
  end

  def normalize_permissions(perms), do: invalid_permissions(perms)

  defp invalid_permissions(perms) do
    Error.error(
      :invalid_option,
      "invalid :permissions #{inspect(perms)}: expected %{owner: :read_write | :read_only, " <>
        "group: :read_write | :read_only | :none, other: :read_write | :read_only | :none}"
    )
  end

  @doc """
  The file mode of a permission set.

  ## Examples

      iex> Snakepit.SharedMemory.Security.mode(%{owner: :read_write, group: :read_only, other: :none})
      0o640
  """
  @spec mode(permissions()) :: non_neg_integer()
  def mode(perms) do
    Enum.reduce(@shift, 0, fn {who, shift}, acc ->
      acc + Bitwise.bsl(bits(Map.fetch!(perms, who)), shift)
    end)
  end

  defp bits(:read_write), do: 6
  defp bits(:read_only), do: 4
  defp bits(:none), do: 0

  @doc "True if group or other get any access: such regions need the `:posix` backend."
  @spec shared_beyond_owner?(permissions()) :: boolean()
  def shared_beyond_owner?(perms), do: perms.group != :none or perms.other != :none

  @doc "What a security level turns on in the native core."
  @spec level_flags(level()) :: %{
          level: 0..2,
          encrypted: boolean(),
          lock_memory: boolean(),
          zero_on_free: boolean(),
          audit: boolean()
        }
  def level_flags(:standard),
    do: %{level: 0, encrypted: false, lock_memory: false, zero_on_free: false, audit: false}

  def level_flags(:high),
    do: %{level: 1, encrypted: true, lock_memory: false, zero_on_free: true, audit: false}

  def level_flags(:maximum),
    do: %{level: 2, encrypted: true, lock_memory: true, zero_on_free: true, audit: true}

  @doc "The level recorded in a header (0, 1, 2) as an atom."
  @spec level_from_int(integer()) :: level()
  def level_from_int(0), do: :standard
  def level_from_int(1), do: :high
  def level_from_int(_), do: :maximum

  @doc """
  Checks that `pid` may perform `action` on a region owned by `owner` with allow-list
  `allowed` (empty: every process of this VM). Refusals are audited at every level.
  """
  @spec authorize(String.t(), pid() | nil, [pid()], pid(), atom()) :: :ok | {:error, Error.t()}
  def authorize(_region_id, _owner, [], _pid, _action), do: :ok
  def authorize(_region_id, owner, _allowed, owner, _action), do: :ok

  def authorize(region_id, owner, allowed, pid, action) do
    if pid in allowed do
      :ok
    else
      Logger.warning(
        "snakepit_shm audit: refused #{action} of #{region_id} to #{inspect(pid)} " <>
          "(owner #{inspect(owner)}, allowed_processes #{inspect(allowed)})"
      )

      Stats.event(:access_denied, %{count: 1}, %{region_id: region_id, pid: pid, action: action})

      Error.error(
        :permission_denied,
        "#{inspect(pid)} may not #{action} region #{region_id}: it is neither the owner " <>
          "nor in its :allowed_processes; pass it in :allowed_processes when allocating",
        %{region_id: region_id, pid: pid, action: action}
      )
    end
  end

  @doc """
  Records an access to a `:maximum` region (no-op at lower levels): a Logger entry at
  the configured `:audit_log_level` and a `[:snakepit_shm, :audit]` telemetry event.
  """
  @spec audit(level(), String.t(), atom(), map()) :: :ok
  def audit(:maximum, region_id, action, details) do
    level = Snakepit.SharedMemory.Config.get(:audit_log_level)
    pid = self()

    Logger.log(level, fn ->
      extra = Enum.map_join(details, " ", fn {k, v} -> "#{k}=#{inspect(v)}" end)
      "snakepit_shm audit: #{action} #{region_id} by #{inspect(pid)} #{extra}"
    end)

    Stats.telemetry(
      [:snakepit_shm, :audit],
      %{count: 1},
      Map.merge(details, %{
        region_id: region_id,
        action: action,
        pid: pid
      })
    )
  end

  def audit(_level, _region_id, _action, _details), do: :ok
end
