defmodule Snakepit.SharedMemory.Config do
  @moduledoc """
  Configuration of the `:snakepit_shm` application, validated once at start.

      config :snakepit_shm,
        max_regions: 100_000,
        max_region_size: 4 * 1024 * 1024 * 1024,
        cleanup_interval: 5_000

  An invalid value or an unknown key makes the application fail to start with a message
  that names the key. The validated configuration is kept in `:persistent_term`, so the
  hot paths read it without copying and without a process.

  Settings:

    * `:max_regions` - live regions in this VM (`pos_integer` or `:infinity`).
      Defaults to `100_000`.
    * `:max_region_size` - bytes of one region. Defaults to `4 GiB`.
    * `:max_total_memory` - bytes of all live regions together (requested sizes), or
      `:infinity`. Defaults to `:infinity`.
    * `:max_regions_per_process` - live regions owned by one process, or `:infinity`.
      Defaults to `:infinity`.
    * `:cleanup_interval` - ms between periodic cleanups (idle timeouts, vanished
      segments, leaked segments). Defaults to `5_000`. This and the other periods
      (`:holder_scan_interval`, `:health_check_interval`, `:arena_grace`) are at most
      `4_294_967_295` ms (about 49 days).
    * `:holder_scan_interval` - ms between scans of region headers that discover OS
      processes (Python workers) holding a region, used only where the VM's event
      socket cannot be bound (workers otherwise announce their holds:
      `Snakepit.SharedMemory.Events`). Defaults to `200`.
    * `:default_timeout` - idle ms before a region expires when `allocate_region/2` gets
      no `:timeout`, or `:infinity`. Defaults to `:infinity`.
    * `:security_level` - default `:security_level` of new regions. Defaults to `:standard`.
    * `:default_backend` - default `:backend` (`:auto`, `:posix`, `:memfd`).
      Defaults to `:auto`.
    * `:default_cleanup_policy` - default `:cleanup_policy`. Defaults to `:automatic`.
    * `:zero_on_free` - also zero `:standard` regions when they are freed (`:high` and
      `:maximum` regions always are). Defaults to `false`.
    * `:orphan_sweep` - free segments left in `/dev/shm` by VMs that died: at start-up,
      and when another VM of this user sharing the shm directory dies while this one
      runs (`Snakepit.SharedMemory.Peers`). Defaults to `true`.
    * `:audit_log_level` - Logger level of the access audit of `:maximum` regions.
      Defaults to `:info`.
    * `:barrier_timeout` - removed: it bounded a consistency barrier that no longer
      exists (the quota counters are exact without one, see
      `Snakepit.SharedMemory.Quota`). Setting it fails with a message saying to delete it.
    * `:enabled` - `false` starts the application but refuses every allocation with
      `%Snakepit.SharedMemory.Error{reason: :disabled}`. Defaults to `true`.
    * `:shm_path` - the directory (a tmpfs) of POSIX segments on Linux, for example a
      larger tmpfs than Docker's 64 MiB `/dev/shm`. Every tool follows it; Python
      workers that attach by bare region id need `SNAKEPIT_SHM_PATH` set to it.
      Defaults to `nil` (`/dev/shm`).
    * `:telemetry` - emit `:telemetry` events. Defaults to `true`.
    * `:health_check_interval` - ms between health checks
      (`Snakepit.SharedMemory.Health`), or `false`. Defaults to `60_000`.
    * `:health_thresholds` - `%{degraded: percent, critical: percent, hysteresis:
      points}`: a check is degraded at `degraded` % of a limit, critical at `critical` %,
      and goes back only below the threshold minus `hysteresis` points. Defaults to
      `%{degraded: 80, critical: 95, hysteresis: 5}`.

  Host-wide quota (`Snakepit.SharedMemory.HostQuota`, `docs/QUOTA.md`):

    * `:host_quota` - the name of a host quota (e.g. `"shm_total"`) that every region
      this VM creates is reserved from, so that all VMs (and Python workers) of the host
      configured with it share one budget; `nil` for none. Defaults to `nil`.
    * `:host_quota_limit` - the limit this VM sets for `:host_quota` when it starts
      (bytes), or `nil` to leave it to another VM or tool. Defaults to `nil`.
    * `:host_quota_wait` - ms `allocate_region/2` waits in line for host quota capacity
      before failing with `:quota_exceeded`, or `:infinity`. Defaults to `0`.
    * `:host_quota_dir` - the private directory of the quota server's socket, or `nil`
      for `$XDG_RUNTIME_DIR/snakepit_shm` (then `/run/user/<uid>/snakepit_shm`, then
      `/tmp/snakepit_shm-<uid>`). The `SNAKEPIT_SHM_QUOTA_DIR` environment variable
      overrides it. Defaults to `nil`.

  Arenas of small regions (`Snakepit.SharedMemory.Arena`, docs/ARCHITECTURE.md):

    * `:arena` - carve unnamed `:standard` owner-only `backend: :auto` regions of at most
      `:arena_threshold` bytes out of shared arenas (`arena: false` on
      `allocate_region/2` opts one region out). Defaults to `true`.
    * `:arena_threshold` - largest region (bytes) that goes to an arena, at most
      1 MiB. Defaults to `65_536`.
    * `:arena_size` - bytes of each arena (a memfd; at least 1 MiB). Defaults to 2 MiB
      (every lock call on an arena walks the locks of all its live regions: a worker's
      attach of a region in an 8 MiB arena of 4 KiB regions cost ~30 us more; 10 000
      regions of 4 KiB still need only 40 descriptors; bench/FINDINGS.md section 9.2).
    * `:arena_grace` - ms an empty arena is kept before it is returned to the OS.
      Defaults to `30_000`.

  Large regions (`Snakepit.SharedMemory.WarmPool`):

    * `:pool_bytes` - byte budget of the warm pool of freed large `:standard` memfd
      regions reused by the next allocation of their size; `0` disables it. Defaults to
      `:default`: min(256 MiB, 5 % of RAM).
    * `:huge_pages` - default `:huge_pages` of memfd regions of at least one huge page:
      `:auto` (huge pages when the host's hugetlb pool has enough free ones, else
      ordinary pages, silently), `true` (fail with `:no_space` when it has not) or
      `false`. Smaller regions use ordinary pages whatever the value. Defaults to
      `:auto`.

  ## Snakepit's configuration

  `config :snakepit, :shared_memory, ...` (the keys of the Snakepit shared-memory
  design) is read too and mapped onto these settings by
  `Snakepit.SharedMemory.Config.Snakepit` (the table is in `docs/OPERATIONS.md`).
  Where both set the same setting, `config :snakepit_shm` wins if it satisfies what
  the Snakepit key asks, and a contradiction fails the start with a message naming both
  keys.
  """

  @key {__MODULE__, :config}
  @max_timeout_ms div(0xFFFFFFFFFFFFFFFF, 1_000_000)
  @max_timer_ms 4_294_967_295

  @defaults [
    max_regions: 100_000,
    max_region_size: 4 * 1024 * 1024 * 1024,
    max_total_memory: :infinity,
    max_regions_per_process: :infinity,
    cleanup_interval: 5_000,
    holder_scan_interval: 200,
    default_timeout: :infinity,
    security_level: :standard,
    default_backend: :auto,
    default_cleanup_policy: :automatic,
    zero_on_free: false,
    orphan_sweep: true,
    audit_log_level: :info,
    enabled: true,
    shm_path: nil,
    telemetry: true,
    health_check_interval: 60_000,
    health_thresholds: %{degraded: 80, critical: 95, hysteresis: 5},
    host_quota: nil,
    host_quota_limit: nil,
    host_quota_wait: 0,
    host_quota_dir: nil,
    arena: true,
    arena_threshold: 65_536,
    arena_size: 2 * 1024 * 1024,
    arena_grace: 30_000,
    pool_bytes: :default,
    huge_pages: :auto
  ]

  @type t :: %{
          max_regions: pos_integer() | :infinity,
          max_region_size: pos_integer(),
          max_total_memory: pos_integer() | :infinity,
          max_regions_per_process: pos_integer() | :infinity,
          cleanup_interval: pos_integer(),
          holder_scan_interval: pos_integer(),
          default_timeout: pos_integer() | :infinity,
          security_level: :standard | :high | :maximum,
          default_backend: :auto | :posix | :memfd,
          default_cleanup_policy: :automatic | :manual | :reference_counted,
          zero_on_free: boolean(),
          orphan_sweep: boolean(),
          audit_log_level: Logger.level(),
          enabled: boolean(),
          shm_path: String.t() | nil,
          telemetry: boolean(),
          health_check_interval: pos_integer() | false,
          health_thresholds: %{degraded: number(), critical: number(), hysteresis: number()},
          host_quota: String.t() | nil,
          host_quota_limit: non_neg_integer() | nil,
          host_quota_wait: non_neg_integer() | :infinity,
          host_quota_dir: String.t() | nil,
          arena: boolean(),
          arena_threshold: non_neg_integer(),
          arena_size: pos_integer(),
          arena_grace: non_neg_integer(),
          pool_bytes: :default | non_neg_integer(),
          huge_pages: :auto | boolean()
        }

  @doc "The default value of every setting."
  @spec defaults() :: keyword()
  def defaults, do: @defaults

  @doc """
  Reads `Application.get_all_env(:snakepit_shm)`, validates it and stores it for `get/0`.
  Returns `{:error, message}` naming the first invalid key.
  """
  @spec load() :: {:ok, t()} | {:error, String.t()}
  def load do
    with {:ok, config, notices} <- resolve() do
      :persistent_term.put(@key, config)
      __MODULE__.Snakepit.notify(notices)
      {:ok, config}
    end
  end

  # Both sources: config :snakepit_shm and config :snakepit, :shared_memory.
  defp resolve do
    validate_with_notices(
      Application.get_all_env(:snakepit_shm),
      Application.get_env(:snakepit, :shared_memory, [])
    )
  end

  @doc """
  The validated configuration: what `load/0` stored when the application started, or,
  before that (offline tools), the configuration as the application environment says
  now (the defaults if it is invalid).
  """
  @spec get() :: t()
  def get do
    case :persistent_term.get(@key, nil) do
      nil ->
        case resolve() do
          {:ok, config, _notices} -> config
          {:error, _} -> Map.new(@defaults)
        end

      config ->
        config
    end
  end

  @doc "One setting."
  @spec get(atom()) :: term()
  def get(key), do: Map.fetch!(get(), key)

  @doc """
  Validates a keyword list of settings, filling in defaults. Unknown keys are errors
  (a typo must not silently fall back to a default).
  """
  @spec validate(keyword(), keyword() | map()) :: {:ok, t()} | {:error, String.t()}
  def validate(env, snakepit_env \\ []) when is_list(env) do
    with {:ok, config, _notices} <- validate_with_notices(env, snakepit_env), do: {:ok, config}
  end

  @doc false
  # validate/2 plus the one-time notices about Snakepit keys that mean nothing here.
  @spec validate_with_notices(keyword(), term()) ::
          {:ok, t(), [String.t()]} | {:error, String.t()}
  def validate_with_notices(env, snakepit_env) when is_list(env) do
    env = Keyword.drop(env, [:included_applications])

    with {:ok, own} <- validate_own(env),
         {:ok, merged, notices} <- __MODULE__.Snakepit.merge(own, env, snakepit_env),
         {:ok, config} <- validate_own(Map.to_list(merged)) do
      {:ok, config, notices}
    end
  end

  defp validate_own(env) do
    env =
      case Keyword.fetch(env, :health_thresholds) do
        {:ok, partial} when is_map(partial) ->
          Keyword.put(env, :health_thresholds, Map.merge(@defaults[:health_thresholds], partial))

        _ ->
          env
      end

    Enum.reduce_while(Keyword.merge(@defaults, env), {:ok, %{}}, fn {key, value}, {:ok, acc} ->
      case check(key, value) do
        :ok -> {:cont, {:ok, Map.put(acc, key, value)}}
        {:error, what} -> {:halt, {:error, message(key, value, what)}}
      end
    end)
  end

  @doc false
  # One setting's check, for Snakepit.SharedMemory.Config.Snakepit: :ok or {:error, what it must be}.
  @spec check_setting(atom(), term()) :: :ok | {:error, String.t() | :unknown | :removed}
  def check_setting(key, value), do: check(key, value)

  @doc "The one-time notices given about `config :snakepit, :shared_memory` keys."
  @spec notices() :: [String.t()]
  def notices, do: __MODULE__.Snakepit.notices()

  defp message(:barrier_timeout, value, :removed) do
    "invalid configuration: config :snakepit_shm, barrier_timeout: #{inspect(value)} was " <>
      "removed: the quota counters need no consistency barrier any more (a caller killed " <>
      "mid-allocation gives its quota back by itself); delete this setting"
  end

  defp message(key, value, :unknown) do
    "invalid configuration: unknown key config :snakepit_shm, #{key}: #{inspect(value)}; " <>
      "known keys are #{@defaults |> Keyword.keys() |> Enum.join(", ")}"
  end

  defp message(key, value, what) do
    "invalid configuration: config :snakepit_shm, #{key}: must be #{what}, got: #{inspect(value)}"
  end

  defp check(key, value) when key in [:max_regions, :max_total_memory, :max_regions_per_process],
    do: pos_or_infinity(value)

  # Region headers keep the idle timeout in 64-bit nanoseconds.
  defp check(:default_timeout, value) when is_integer(value) and value > @max_timeout_ms,
    do: {:error, "at most #{@max_timeout_ms} ms (64-bit nanoseconds) or :infinity"}

  defp check(:default_timeout, value), do: pos_or_infinity(value)

  defp check(:max_region_size, value),
    do: if(is_integer(value) and value > 0, do: :ok, else: {:error, "a positive integer"})

  # Periods of timers (erlang:send_after/3 refuses more than about 2^43 ms, and the
  # arena's native layer more than 2^40 ms): bounded like every timeout of ours, by what
  # receive/after takes.
  defp check(key, value) when key in [:cleanup_interval, :holder_scan_interval],
    do: timer_ms(value, 1)

  defp check(:security_level, value), do: one_of(value, [:standard, :high, :maximum])
  defp check(:default_backend, value), do: one_of(value, [:auto, :posix, :memfd])

  defp check(:default_cleanup_policy, value),
    do: one_of(value, [:automatic, :manual, :reference_counted])

  defp check(key, value) when key in [:zero_on_free, :orphan_sweep],
    do: if(is_boolean(value), do: :ok, else: {:error, "true or false"})

  defp check(:audit_log_level, value),
    do: one_of(value, [:debug, :info, :notice, :warning, :error, :critical, :alert, :emergency])

  defp check(key, value) when key in [:enabled, :telemetry],
    do: if(is_boolean(value), do: :ok, else: {:error, "true or false"})

  defp check(:shm_path, nil), do: :ok

  defp check(:shm_path, value) do
    if is_binary(value) and String.starts_with?(value, "/") and not String.contains?(value, "\0"),
      do: :ok,
      else: {:error, "nil or an absolute directory path (a tmpfs mount), as a string"}
  end

  defp check(:health_check_interval, false), do: :ok

  defp check(:health_check_interval, value) do
    case timer_ms(value, 1) do
      :ok -> :ok
      {:error, what} -> {:error, what <> " or false"}
    end
  end

  defp check(:health_thresholds, %{degraded: d, critical: c, hysteresis: h} = t)
       when map_size(t) == 3 and is_number(d) and is_number(c) and is_number(h) and 0 < d and
              d < c and c <= 100 and 0 <= h and h < d,
       do: :ok

  defp check(:health_thresholds, _value),
    do:
      {:error,
       "%{degraded: percent, critical: percent, hysteresis: points} with " <>
         "0 < degraded < critical <= 100 and 0 <= hysteresis < degraded"}

  defp check(:host_quota, nil), do: :ok

  defp check(:host_quota, value) do
    if Snakepit.SharedMemory.HostQuota.Protocol.valid_name?(value),
      do: :ok,
      else: {:error, "nil or a quota name of 1-64 characters of [A-Za-z0-9_.:-]"}
  end

  # The quota protocol carries a limit in 64 bits (a larger one would wrap) and a wait in
  # 32 (HostQuota.reserve/3 refuses a longer one).
  defp check(:host_quota_limit, value)
       when is_nil(value) or (is_integer(value) and value in 0..0xFFFF_FFFF_FFFF_FFFF),
       do: :ok

  defp check(:host_quota_limit, _), do: {:error, "nil or an integer from 0 to 2^64-1"}

  defp check(:host_quota_wait, value)
       when value == :infinity or (is_integer(value) and value in 0..0xFFFF_FFFE),
       do: :ok

  defp check(:host_quota_wait, _),
    do: {:error, "milliseconds from 0 to 4294967294 (about 49 days) or :infinity"}

  defp check(:host_quota_dir, value) when is_nil(value) or (is_binary(value) and value != ""),
    do: :ok

  defp check(:host_quota_dir, _), do: {:error, "nil or a directory path"}

  defp check(:arena, value), do: if(is_boolean(value), do: :ok, else: {:error, "true or false"})

  defp check(:arena_threshold, value) when is_integer(value) and value in 0..1_048_576, do: :ok
  defp check(:arena_threshold, _), do: {:error, "an integer of bytes from 0 to 1048576"}

  defp check(:arena_size, value)
       when is_integer(value) and value >= 1_048_576 and value <= 1_073_741_824,
       do: :ok

  defp check(:arena_size, _), do: {:error, "an integer of bytes from 1 MiB to 1 GiB"}

  defp check(:arena_grace, value), do: timer_ms(value, 0)

  defp check(:pool_bytes, value)
       when value == :default or (is_integer(value) and value >= 0),
       do: :ok

  defp check(:pool_bytes, _),
    do: {:error, ":default or a non-negative integer (bytes; 0 disables)"}

  defp check(:huge_pages, value), do: one_of(value, [:auto, true, false])

  defp check(:barrier_timeout, _value), do: {:error, :removed}
  defp check(_key, _value), do: {:error, :unknown}

  defp timer_ms(value, min) when is_integer(value) and value >= min and value <= @max_timer_ms,
    do: :ok

  defp timer_ms(_value, min),
    do: {:error, "milliseconds, an integer from #{min} to #{@max_timer_ms} (about 49 days)"}

  defp pos_or_infinity(:infinity), do: :ok
  defp pos_or_infinity(value) when is_integer(value) and value > 0, do: :ok
  defp pos_or_infinity(_), do: {:error, "a positive integer or :infinity"}

  defp one_of(value, allowed) do
    if value in allowed,
      do: :ok,
      else: {:error, "one of #{Enum.map_join(allowed, ", ", &inspect/1)}"}
  end
end
