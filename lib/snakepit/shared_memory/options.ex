defmodule Snakepit.SharedMemory.Options do
  @moduledoc """
  Validation of the options of every public function. Options come as keyword lists or
  maps; an unknown option, a wrong type or an impossible combination is an
  `:invalid_option` error (never an exception) whose message names the option.
  """

  alias Snakepit.SharedMemory.{Config, Dtype, Error, JSON, Platform, Security}

  @metadata_capacity 1792
  @max_timeout_ms div(0xFFFFFFFFFFFFFFFF, 1_000_000)
  @name_pattern ~r/\A[a-z0-9_-]{1,21}\z/

  @allocate_keys [
    :permissions,
    :timeout,
    :security_level,
    :access_mode,
    :cleanup_policy,
    :allowed_processes,
    :metadata,
    :name,
    :open_mode,
    :backend,
    :owner,
    :arena,
    :huge_pages
  ]

  @doc "Validated `allocate_region/2` options (see `Snakepit.SharedMemory.allocate_region/2`)."
  @spec allocate(term(), term()) :: {:ok, map()} | {:error, Error.t()}
  def allocate(size, opts) do
    config = Config.get()

    with {:ok, opts} <- to_map(opts, @allocate_keys),
         :ok <- check_size(size, config, opts),
         {:ok, perms} <- Security.normalize_permissions(Map.get(opts, :permissions, %{})),
         {:ok, timeout} <- timeout(Map.get(opts, :timeout, config.default_timeout)),
         {:ok, level} <- level(Map.get(opts, :security_level, config.security_level)),
         {:ok, access} <- access_mode(Map.get(opts, :access_mode, :read_write)),
         {:ok, policy} <- policy(Map.get(opts, :cleanup_policy, config.default_cleanup_policy)),
         {:ok, allowed} <- allowed(Map.get(opts, :allowed_processes, [])),
         {:ok, metadata, json} <- metadata(Map.get(opts, :metadata, %{})),
         :ok <- metadata_layout(metadata, size),
         {:ok, name, open_mode} <- name(Map.get(opts, :name), Map.get(opts, :open_mode)),
         {:ok, owner} <- owner(Map.get(opts, :owner, self())),
         {:ok, arena} <- arena(Map.get(opts, :arena, config.arena)),
         {:ok, huge_pages} <- huge_pages(Map.get(opts, :huge_pages, config.huge_pages)),
         {:ok, backend} <- backend(Map.get(opts, :backend, config.default_backend), name, perms) do
      {:ok,
       %{
         size: size,
         permissions: perms,
         mode: Security.mode(perms),
         timeout: timeout,
         security_level: level,
         access_mode: access,
         cleanup_policy: policy,
         allowed: allowed,
         metadata: metadata,
         metadata_json: json,
         name: name,
         open_mode: open_mode,
         owner: owner,
         backend: backend,
         # Arenas serve the :auto backend: an explicit :memfd asks for a memfd of its own
         # (its own kernel seal, its own descriptors).
         arena: arena and Map.get(opts, :backend, config.default_backend) == :auto,
         huge_pages: huge_pages
       }}
    end
  end

  @doc "Validated `map_region/2` options: `%{access_mode: mode | nil}`."
  @spec map(term()) :: {:ok, map()} | {:error, Error.t()}
  def map([]), do: {:ok, %{access_mode: nil}}

  def map(access_mode: mode) when mode in [:read_only, :read_write],
    do: {:ok, %{access_mode: mode}}

  def map(opts) do
    with {:ok, opts} <- to_map(opts, [:access_mode]) do
      case Map.fetch(opts, :access_mode) do
        :error -> {:ok, %{access_mode: nil}}
        {:ok, mode} -> with {:ok, mode} <- access_mode(mode), do: {:ok, %{access_mode: mode}}
      end
    end
  end

  @doc "Validated `export_ref/2` options."
  @spec export(term()) :: {:ok, map()} | {:error, Error.t()}
  def export(opts) do
    with {:ok, opts} <- to_map(opts, [:include_key, :dtype, :shape]),
         {:ok, include_key} <- boolean(opts, :include_key),
         :ok <- optional(opts, :dtype, &is_binary/1, "a string such as \"float32\""),
         :ok <- optional(opts, :shape, &shape?/1, "a list of non-negative integers") do
      {:ok, %{include_key: include_key, dtype: opts[:dtype], shape: opts[:shape]}}
    end
  end

  @doc "Validated `list_regions/1` filter."
  @spec filter(term()) :: {:ok, map()} | {:error, Error.t()}
  def filter(filter) do
    keys = [:owner, :backend, :security_level, :cleanup_policy, :older_than, :name, :sealed]

    with {:ok, filter} <- to_map(filter, keys),
         :ok <- optional(filter, :owner, &is_pid/1, "a pid"),
         :ok <-
           optional(filter, :backend, &(&1 in [:posix, :memfd, :windows]), ":posix | :memfd"),
         :ok <-
           optional(filter, :security_level, &(&1 in levels()), ":standard | :high | :maximum"),
         :ok <- optional(filter, :cleanup_policy, &(&1 in policies()), inspect(policies())),
         :ok <- optional(filter, :older_than, &non_neg_integer?/1, "milliseconds (integer >= 0)"),
         :ok <- optional(filter, :name, &is_binary/1, "a string"),
         :ok <- optional(filter, :sealed, &is_boolean/1, "true or false") do
      {:ok, filter}
    end
  end

  @doc "Validated `cleanup_regions/1` options."
  @spec cleanup(term()) :: {:ok, map()} | {:error, Error.t()}
  def cleanup(opts) do
    keys = [:dry_run, :expired_only, :orphans, :owner, :older_than, :ids, :all]

    with {:ok, opts} <- to_map(opts, keys),
         {:ok, dry_run} <- boolean(opts, :dry_run),
         {:ok, expired_only} <- boolean(opts, :expired_only),
         {:ok, all} <- boolean(opts, :all),
         :ok <- optional(opts, :orphans, &is_boolean/1, "true or false"),
         :ok <- optional(opts, :owner, &is_pid/1, "a pid"),
         :ok <- optional(opts, :older_than, &non_neg_integer?/1, "milliseconds (integer >= 0)"),
         :ok <- optional(opts, :ids, &ids?/1, "a list of region ids") do
      {:ok,
       %{
         dry_run: dry_run,
         expired_only: expired_only,
         all: all,
         orphans: Map.get(opts, :orphans, not expired_only),
         owner: opts[:owner],
         older_than: opts[:older_than],
         ids: opts[:ids]
       }}
    end
  end

  # ---- helpers ----

  @doc false
  def levels, do: [:standard, :high, :maximum]
  @doc false
  def policies, do: [:automatic, :manual, :reference_counted]

  @doc false
  # A keyword list as a map, refusing a key given twice: `Map.new/1` keeps the last value
  # while `Keyword.get/2` (and the reader's eye) takes the first, so
  # `[security_level: :high, security_level: :standard]` silently meant `:standard`.
  @spec keyword_to_map(keyword()) :: {:ok, map()} | {:error, Error.t()}
  def keyword_to_map(opts) do
    map = Map.new(opts)

    if map_size(map) == length(opts) do
      {:ok, map}
    else
      duplicates = Enum.uniq(Keyword.keys(opts) -- Map.keys(map))

      invalid(
        "option(s) #{Enum.map_join(duplicates, ", ", &inspect/1)} given more than once " <>
          "(in #{inspect(opts, limit: 12)}): give each option once"
      )
    end
  end

  @doc false
  # :ok when `opts` (a keyword list or a map) names only `allowed` keys; the error
  # every option check of the API gives otherwise (HostQuota's functions too).
  @spec known_keys(keyword() | map(), [atom()]) :: :ok | {:error, Error.t()}
  def known_keys(opts, allowed) do
    with {:ok, _} <- to_map(opts, allowed), do: :ok
  end

  defp to_map(opts, allowed) when is_list(opts) do
    if Keyword.keyword?(opts) do
      with {:ok, map} <- keyword_to_map(opts), do: to_map(map, allowed)
    else
      invalid("options must be a keyword list or a map, got: #{inspect(opts)}")
    end
  end

  defp to_map(opts, allowed) when is_map(opts) and not is_struct(opts) do
    case Enum.reject(Map.keys(opts), &(&1 in allowed)) do
      [] ->
        {:ok, opts}

      unknown ->
        invalid(
          "unknown option(s) #{Enum.map_join(unknown, ", ", &inspect/1)}; " <>
            "accepted: #{Enum.map_join(allowed, ", ", &inspect/1)}"
        )
    end
  end

  defp to_map(opts, _allowed),
    do: invalid("options must be a keyword list or a map, got: #{inspect(opts)}")

  # size: :any opens a named region whatever its size (open_mode: :open_only only).
  defp check_size(:any, _config, %{name: name, open_mode: :open_only}) when is_binary(name),
    do: :ok

  defp check_size(:any, _config, _opts),
    do:
      Error.error(
        :invalid_size,
        "size :any is only for opening an existing named region (name: ..., open_mode: " <>
          ":open_only): give a size in bytes to create one",
        %{size: :any}
      )

  defp check_size(size, config, _opts), do: check_size(size, config)

  defp check_size(size, config) when is_integer(size) and size > 0 do
    if size > config.max_region_size do
      Error.error(
        :size_exceeds_limit,
        "region size #{Error.format_bytes(size)} exceeds max_region_size " <>
          "#{Error.format_bytes(config.max_region_size)}: raise config :snakepit_shm, " <>
          "max_region_size: ... or allocate a smaller region",
        %{size: size, max_region_size: config.max_region_size}
      )
    else
      :ok
    end
  end

  defp check_size(size, _config) do
    Error.error(
      :invalid_size,
      "size must be a positive integer number of bytes, got: #{inspect(size)}",
      %{size: size}
    )
  end

  defp timeout(:infinity), do: {:ok, :infinity}

  # The header keeps the idle timeout in 64-bit nanoseconds.
  defp timeout(ms) when is_integer(ms) and ms > 0 and ms <= @max_timeout_ms, do: {:ok, ms}

  defp timeout(ms) when is_integer(ms) and ms > 0,
    do:
      invalid(
        ":timeout must be at most #{@max_timeout_ms} ms (64-bit nanoseconds, about 584 " <>
          "years) or :infinity, got: #{ms}"
      )

  defp timeout(other),
    do:
      invalid(
        ":timeout must be a positive number of milliseconds or :infinity, got: #{inspect(other)}"
      )

  defp level(level) do
    if level in levels(),
      do: {:ok, level},
      else:
        invalid(":security_level must be :standard, :high or :maximum, got: #{inspect(level)}")
  end

  defp access_mode(mode) when mode in [:read_write, :read_only], do: {:ok, mode}

  defp access_mode(mode),
    do: invalid(":access_mode must be :read_write or :read_only, got: #{inspect(mode)}")

  defp policy(policy) do
    if policy in policies(),
      do: {:ok, policy},
      else:
        invalid(
          ":cleanup_policy must be :automatic, :manual or :reference_counted, got: #{inspect(policy)}"
        )
  end

  defp allowed(pids) when is_list(pids) do
    if all?(pids, &is_pid/1),
      do: {:ok, Enum.uniq(pids)},
      else: invalid(":allowed_processes must be a list of pids, got: #{inspect(pids)}")
  end

  defp allowed(other),
    do: invalid(":allowed_processes must be a list of pids, got: #{inspect(other)}")

  # The default: nothing to encode (allocate_region/2's hot path).
  defp metadata(map) when map == %{}, do: {:ok, map, "{}"}

  defp metadata(map) when is_map(map) and not is_struct(map) do
    case JSON.encode(map) do
      {:ok, json} when byte_size(json) <= @metadata_capacity ->
        {:ok, map, json}

      {:ok, json} ->
        Error.error(
          :metadata_too_large,
          ":metadata encodes to #{byte_size(json)} bytes of JSON, the region header holds " <>
            "at most #{@metadata_capacity}: keep small descriptors (dtype, shape, ids) in " <>
            ":metadata and put bulk data in the region itself",
          %{bytes: byte_size(json), capacity: @metadata_capacity}
        )

      {:error, error} ->
        Error.error(
          :invalid_metadata,
          ":metadata must be JSON-encodable (string/atom keys; strings, numbers, booleans, " <>
            "nil, lists, maps): #{error.message}"
        )
    end
  end

  defp metadata(other),
    do: Error.error(:invalid_metadata, ":metadata must be a map, got: #{inspect(other)}")

  defp format_ok(format)
       when format in [nil, "numpy", "arrow", "raw", :numpy, :arrow, :raw],
       do: nil

  defp format_ok(format),
    do:
      Error.error(
        :invalid_metadata,
        ":metadata: format must be \"numpy\", \"arrow\" or \"raw\", got: #{inspect(format)}"
      )

  # The dtype and shape a worker will read the region with (Region.ndarray()).
  defp metadata_layout(metadata, _size) when metadata == %{}, do: :ok

  defp metadata_layout(metadata, size) do
    dtype = Map.get(metadata, "dtype", Map.get(metadata, :dtype))
    shape = Map.get(metadata, "shape", Map.get(metadata, :shape))

    format = Map.get(metadata, "format", Map.get(metadata, :format))

    case format_ok(format) || Dtype.check_layout(dtype, shape, size, ":metadata") do
      :ok -> :ok
      {:error, error} -> {:error, %{error | reason: :invalid_metadata}}
    end
  end

  defp name(nil, nil), do: {:ok, nil, :create}

  defp name(nil, mode),
    do: invalid(":open_mode #{inspect(mode)} needs a :name (well-known regions only)")

  defp name(name, mode) when is_binary(name) do
    mode = mode || :create

    cond do
      not Regex.match?(@name_pattern, name) ->
        invalid(":name must be 1 to 21 characters of [a-z0-9_-], got: #{inspect(name)}")

      mode not in [:create, :open_only, :create_or_open, :remove_and_create] ->
        invalid(
          ":open_mode must be :create, :open_only, :create_or_open or :remove_and_create, " <>
            "got: #{inspect(mode)}"
        )

      true ->
        {:ok, name, mode}
    end
  end

  defp name(other, _mode), do: invalid(":name must be a string, got: #{inspect(other)}")

  defp owner(pid) when is_pid(pid) do
    cond do
      node(pid) != node() -> invalid(":owner must be a local pid, got: #{inspect(pid)}")
      not Process.alive?(pid) -> invalid(":owner #{inspect(pid)} is not alive")
      true -> {:ok, pid}
    end
  end

  defp owner(other), do: invalid(":owner must be a pid, got: #{inspect(other)}")

  defp backend(backend, name, perms) when backend in [:auto, :posix, :memfd, :windows] do
    need_name? = name != nil or Security.shared_beyond_owner?(perms)

    case Platform.resolve_backend(Platform.current(), backend, need_name?) do
      {:ok, resolved} -> {:ok, resolved}
      {:error, message} -> Error.error(:unsupported, message, %{backend: backend})
    end
  end

  defp backend(other, _name, _perms),
    do: invalid(":backend must be :auto, :posix or :memfd, got: #{inspect(other)}")

  defp arena(value) when is_boolean(value), do: {:ok, value}
  defp arena(other), do: invalid(":arena must be true or false, got: #{inspect(other)}")

  defp boolean(opts, key) do
    case Map.get(opts, key, false) do
      value when is_boolean(value) -> {:ok, value}
      other -> invalid("#{inspect(key)} must be true or false, got: #{inspect(other)}")
    end
  end

  defp optional(opts, key, valid?, expected) do
    case Map.fetch(opts, key) do
      :error -> :ok
      {:ok, value} -> if valid?.(value), do: :ok, else: invalid_value(key, value, expected)
    end
  end

  defp invalid_value(key, value, expected),
    do: invalid("#{inspect(key)} must be #{expected}, got: #{inspect(value)}")

  defp shape?(shape), do: all?(shape, &non_neg_integer?/1)
  defp ids?(ids), do: all?(ids, &is_binary/1)

  # A proper list whose elements all pass: [a | b] is false, not a FunctionClauseError
  # from Enum.all?/2.
  @doc false
  @spec all?(term(), (term() -> boolean())) :: boolean()
  def all?([], _valid?), do: true
  def all?([head | tail], valid?), do: valid?.(head) and all?(tail, valid?)
  def all?(_other, _valid?), do: false
  defp non_neg_integer?(value), do: is_integer(value) and value >= 0

  defp invalid(message), do: Error.error(:invalid_option, message)

  # :huge_pages (memfd regions; docs/ARCHITECTURE.md "Fresh pages").
  defp huge_pages(value) when value in [:auto, true, false], do: {:ok, value}

  defp huge_pages(other),
    do:
      Error.error(
        :invalid_option,
        ":huge_pages must be :auto, true or false, got: #{inspect(other)}"
      )
end
