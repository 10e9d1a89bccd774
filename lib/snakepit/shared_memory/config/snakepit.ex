defmodule Snakepit.SharedMemory.Config.Snakepit do
  @moduledoc """
  Maps `config :snakepit, :shared_memory, ...` (the configuration surface of the
  Snakepit shared-memory design) onto the settings of `Snakepit.SharedMemory.Config`.

  Each Snakepit key either asks something of one setting or means nothing here:

    * `enabled`, `max_regions`, `max_region_size`, `max_total_memory`,
      `max_regions_per_process`, `cleanup_interval`, `default_timeout`,
      `security_level`, `health_check_interval`: the setting of the same name;
    * `encryption_enabled: true` asks for `security_level` `:high` or `:maximum` (`:high`
      when nothing else says), `false` for `:standard`;
    * `secure_cleanup`: `zero_on_free`;
    * `telemetry_enabled`: `telemetry`;
    * `platform_options: %{linux: %{shm_path: dir}}`: `shm_path`;
    * `audit_access`, `allocation_strategy`, `enable_defragmentation`,
      `performance_monitoring`, `platform_options.linux.use_hugepages`,
      `platform_options.windows.use_large_pages`, `platform_options.windows.security_descriptor`:
      accepted, with a one-time notice saying why they change nothing here.

  Where `config :snakepit_shm` sets a setting too, its value wins if it satisfies what
  the Snakepit key asks (`encryption_enabled: true` and `security_level: :maximum`);
  otherwise the start fails with a message naming both keys. Two Snakepit keys that
  ask incompatible things (`encryption_enabled: false, security_level: :high`) fail
  the same way. Unknown keys fail the start too: a typo must not pass silently.
  """

  require Logger

  alias Snakepit.SharedMemory.Config

  @same [
    :enabled,
    :max_regions,
    :max_region_size,
    :max_total_memory,
    :max_regions_per_process,
    :cleanup_interval,
    :default_timeout,
    :security_level,
    :health_check_interval
  ]
  @noticed_only [
    :audit_access,
    :allocation_strategy,
    :enable_defragmentation,
    :performance_monitoring
  ]
  @known @same ++
           @noticed_only ++
           [:encryption_enabled, :secure_cleanup, :telemetry_enabled, :platform_options]

  @notices %{
    audit_access:
      "audit_access: every access to a security_level :maximum region is audited " <>
        "(Logger at config :snakepit_shm, audit_log_level, and [:snakepit_shm, :audit] " <>
        "telemetry); regions of other levels have no access audit. The key changes nothing.",
    allocation_strategy:
      "allocation_strategy: every region is its own shared memory segment (there is no " <>
        "shared heap to fit regions into), so there is no strategy to choose. The key changes nothing.",
    enable_defragmentation:
      "enable_defragmentation: regions are separate segments whose memory goes back to the " <>
        "kernel when they are freed, so nothing fragments. The key changes nothing.",
    performance_monitoring:
      "performance_monitoring: counters and latency histograms are always on (two counter " <>
        "increments per call; see Snakepit.SharedMemory.stats/0 and mix snakepit.shm.stats). " <>
        "The key changes nothing.",
    use_hugepages:
      "platform_options.linux.use_hugepages: regions use normal 4 KiB pages; transparent " <>
        "huge pages for shared memory are a kernel setting " <>
        "(/sys/kernel/mm/transparent_hugepage/shmem_enabled). The key changes nothing.",
    use_large_pages:
      "platform_options.windows.use_large_pages: file mappings use normal pages (large " <>
        "pages need SeLockMemoryPrivilege and are not used). The key changes nothing.",
    security_descriptor:
      "platform_options.windows.security_descriptor: every region gets an owner-only " <>
        "DACL (the current user); other descriptors are not supported. The key changes nothing.",
    shm_path_elsewhere:
      "platform_options.linux.shm_path: this is not Linux, where POSIX shared memory is " <>
        "not a directory of files. The key changes nothing here."
  }

  @typep requirement :: {atom(), [term()], term(), String.t()}

  @doc """
  Merges the Snakepit keys into `own` (the validated `config :snakepit_shm` settings;
  `explicit` is what that config set explicitly). Returns the merged settings and the
  notices to give once.
  """
  @spec merge(map(), keyword(), term()) :: {:ok, map(), [String.t()]} | {:error, String.t()}
  def merge(own, _explicit, empty) when empty in [nil, []] or empty == %{}, do: {:ok, own, []}

  def merge(own, explicit, snakepit_env) do
    with {:ok, env} <- normalize(snakepit_env),
         {:ok, requirements, notices} <- requirements(env),
         {:ok, merged} <- apply_requirements(own, explicit, requirements) do
      {:ok, merged, notices}
    end
  end

  @doc """
  Logs each notice once per VM (Logger notice level) and remembers them all for
  `notices/0`.
  """
  @spec notify([String.t()]) :: :ok
  def notify(notices) do
    key = {__MODULE__, :noticed}
    seen = :persistent_term.get(key, [])

    for notice <- notices, notice not in seen do
      Logger.notice("snakepit_shm: config :snakepit, :shared_memory, #{notice}")
    end

    new = Enum.uniq(seen ++ notices)
    if new != seen, do: :persistent_term.put(key, new)
    :ok
  end

  @doc "Every notice given so far in this VM."
  @spec notices() :: [String.t()]
  def notices, do: :persistent_term.get({__MODULE__, :noticed}, [])

  # ---- reading the Snakepit keys ----

  defp normalize(env) when is_map(env), do: normalize(Map.to_list(env))

  defp normalize(env) when is_list(env) do
    if Enum.all?(env, &match?({k, _} when is_atom(k), &1)),
      do: {:ok, env},
      else:
        {:error, "invalid configuration: config :snakepit, :shared_memory must be a keyword list"}
  end

  defp normalize(other),
    do:
      {:error,
       "invalid configuration: config :snakepit, :shared_memory must be a keyword list, got: " <>
         inspect(other)}

  defp requirements(env) do
    Enum.reduce_while(env, {:ok, [], []}, fn {key, value}, {:ok, reqs, notices} ->
      case requirement(key, value) do
        {:ok, more_reqs, more_notices} ->
          {:cont, {:ok, reqs ++ more_reqs, notices ++ more_notices}}

        {:error, message} ->
          {:halt, {:error, message}}
      end
    end)
  end

  defp requirement(key, value) when key in @same do
    with :ok <- valid(key, value, key), do: {:ok, [req(key, [value], value, key, value)], []}
  end

  defp requirement(:encryption_enabled, true),
    do: {:ok, [req(:security_level, [:high, :maximum], :high, :encryption_enabled, true)], []}

  defp requirement(:encryption_enabled, false),
    do: {:ok, [req(:security_level, [:standard], :standard, :encryption_enabled, false)], []}

  defp requirement(:secure_cleanup, value) when is_boolean(value),
    do: {:ok, [req(:zero_on_free, [value], value, :secure_cleanup, value)], []}

  defp requirement(:telemetry_enabled, value) when is_boolean(value),
    do: {:ok, [req(:telemetry, [value], value, :telemetry_enabled, value)], []}

  defp requirement(key, value)
       when key in [:encryption_enabled, :secure_cleanup, :telemetry_enabled],
       do: invalid(key, value, "true or false")

  defp requirement(key, _value) when key in @noticed_only, do: {:ok, [], [@notices[key]]}

  defp requirement(:platform_options, value) when is_map(value) or is_list(value) do
    with {:ok, value} <- pairs(value, "platform_options") do
      platforms(value)
    end
  end

  defp requirement(:platform_options, value),
    do: invalid(:platform_options, value, "a map such as %{linux: %{shm_path: \"/dev/shm\"}}")

  defp requirement(key, value) do
    {:error,
     "invalid configuration: unknown key config :snakepit, :shared_memory, #{key}: " <>
       "#{inspect(value)}; known keys are #{Enum.join(@known, ", ")}"}
  end

  # A map, or a list of {key, value} pairs, as a map; anything else names `key`. A key
  # given twice in a list is an error: Map.new/1 would keep the last one silently (a
  # second `linux: [...]` dropped the first one's shm_path).
  defp pairs(value, _key) when is_map(value), do: {:ok, value}

  defp pairs(value, key) when is_list(value) do
    if Enum.all?(value, &match?({_, _}, &1)) do
      case value |> Enum.map(&elem(&1, 0)) |> then(&(&1 -- Enum.uniq(&1))) do
        [] ->
          {:ok, Map.new(value)}

        [twice | _] ->
          {:error,
           "invalid configuration: config :snakepit, :shared_memory, #{key}: " <>
             "#{inspect(twice)} is given twice (#{inspect(value)}): give each key once " <>
             "(merge the two lists)"}
      end
    else
      invalid(key, value, "a map or a keyword list")
    end
  end

  defp platforms(value) do
    Enum.reduce_while(value, {:ok, [], []}, fn {os, opts}, {:ok, reqs, notices} ->
      case platform(os, opts) do
        {:ok, r, n} -> {:cont, {:ok, reqs ++ r, notices ++ n}}
        error -> {:halt, error}
      end
    end)
  end

  defp platform(os, opts) when os in [:linux, :windows] and is_list(opts) do
    with {:ok, opts} <- pairs(opts, "platform_options.#{os}"), do: platform(os, opts)
  end

  defp platform(:linux, opts) when is_map(opts) do
    # A config shared by Linux and macOS developers must start on both.
    linux? = :os.type() == {:unix, :linux}

    Enum.reduce_while(opts, {:ok, [], []}, fn
      {:shm_path, path}, {:ok, reqs, notices} ->
        case valid(:shm_path, path, "platform_options.linux.shm_path") do
          :ok when not linux? ->
            {:cont, {:ok, reqs, notices ++ [@notices.shm_path_elsewhere]}}

          :ok ->
            r = req(:shm_path, [path], path, "platform_options.linux.shm_path", path)
            {:cont, {:ok, [r | reqs], notices}}

          error ->
            {:halt, error}
        end

      {:use_hugepages, true}, {:ok, reqs, notices} ->
        {:cont, {:ok, reqs, notices ++ [@notices.use_hugepages]}}

      {:use_hugepages, false}, acc ->
        {:cont, acc}

      {key, value}, _acc ->
        {:halt, unknown_platform_key(:linux, key, value, [:use_hugepages, :shm_path])}
    end)
  end

  defp platform(:windows, opts) when is_map(opts) do
    Enum.reduce_while(opts, {:ok, [], []}, fn
      {:use_large_pages, true}, {:ok, reqs, notices} ->
        {:cont, {:ok, reqs, notices ++ [@notices.use_large_pages]}}

      {:use_large_pages, false}, acc ->
        {:cont, acc}

      {:security_descriptor, :default}, acc ->
        {:cont, acc}

      {:security_descriptor, _other}, {:ok, reqs, notices} ->
        {:cont, {:ok, reqs, notices ++ [@notices.security_descriptor]}}

      {key, value}, _acc ->
        {:halt,
         unknown_platform_key(:windows, key, value, [:use_large_pages, :security_descriptor])}
    end)
  end

  defp platform(:macos, opts) when opts in [[], %{}], do: {:ok, [], []}

  defp platform(os, opts) do
    {:error,
     "invalid configuration: config :snakepit, :shared_memory, platform_options: " <>
       "#{inspect(%{os => opts})}: expected the keys linux and windows, each a map"}
  end

  defp unknown_platform_key(os, key, value, known) do
    {:error,
     "invalid configuration: unknown key config :snakepit, :shared_memory, " <>
       "platform_options.#{os}.#{key}: #{inspect(value)}; known keys are " <>
       Enum.join(known, ", ")}
  end

  defp valid(setting, value, key) do
    case Config.check_setting(setting, value) do
      :ok -> :ok
      {:error, what} -> invalid(key, value, what)
    end
  end

  defp invalid(key, value, what) do
    {:error,
     "invalid configuration: config :snakepit, :shared_memory, #{key}: must be #{what}, " <>
       "got: #{inspect(value)}"}
  end

  defp req(setting, allowed, preferred, key, value),
    do:
      {setting, allowed, preferred, "config :snakepit, :shared_memory, #{key}: #{inspect(value)}"}

  # ---- applying them ----

  @spec apply_requirements(map(), keyword(), [requirement()]) ::
          {:ok, map()} | {:error, String.t()}
  defp apply_requirements(own, explicit, requirements) do
    requirements
    |> Enum.group_by(&elem(&1, 0))
    |> Enum.reduce_while({:ok, own}, fn {setting, reqs}, {:ok, acc} ->
      case settle(setting, reqs, explicit) do
        {:ok, value} -> {:cont, {:ok, Map.put(acc, setting, value)}}
        error -> {:halt, error}
      end
    end)
  end

  defp settle(setting, reqs, explicit) do
    [{_, first_allowed, _, first_source} | rest] = reqs

    allowed =
      Enum.reduce_while(rest, {:ok, first_allowed, first_source}, fn {_, a, _, source},
                                                                     {:ok, acc, acc_source} ->
        case Enum.filter(acc, &(&1 in a)) do
          [] -> {:halt, contradiction(acc_source, source)}
          both -> {:cont, {:ok, both, acc_source}}
        end
      end)

    with {:ok, allowed, _} <- allowed do
      case Keyword.fetch(explicit, setting) do
        {:ok, own_value} ->
          case Enum.find(reqs, fn {_, a, _, _} -> own_value not in a end) do
            nil ->
              {:ok, own_value}

            {_, _, _, source} ->
              contradiction(source, "config :snakepit_shm, #{setting}: #{inspect(own_value)}")
          end

        :error ->
          preferred = Enum.find_value(reqs, fn {_, _, p, _} -> if p in allowed, do: p end)
          {:ok, preferred || hd(allowed)}
      end
    end
  end

  defp contradiction(one, other) do
    {:error,
     "invalid configuration: #{one} contradicts #{other}: set it in one place only " <>
       "(config :snakepit_shm wins where both agree)"}
  end
end
