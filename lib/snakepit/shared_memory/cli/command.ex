defmodule Snakepit.SharedMemory.CLI.Command do
  @moduledoc false
  # What every `mix snakepit.shm.*` task shares: option parsing with `--help` and
  # `--format`, usage errors (exit status 2), JSON output and the exit status.
  #
  # Exit statuses: 0 success, 1 findings or failure, 2 bad usage. A task runs inside
  # `mix`, so it never halts the VM: it exits with `{:shutdown, status}`, which mix turns
  # into the process exit status (and which a test can catch).

  require Logger

  alias Snakepit.SharedMemory.JSON

  @common [help: :boolean, format: :string]
  @common_aliases [h: :help]
  @remote [node: :string, cookie: :string]

  @type parsed :: %{opts: keyword(), args: [String.t()], format: :table | :json}

  @doc """
  Parses `argv` with `switches` (OptionParser `strict:`) plus `--help`, `--format`
  and, with `remote: true`, `--node` and `--cookie`. Prints `help` and exits 0 on
  `--help`; exits 2 with a message on anything it does not understand.

  Options:
    * `:aliases` - extra OptionParser aliases. Defaults to `[]`.
    * `:remote` - accept `--node NAME --cookie COOKIE`. Defaults to `true`.
    * `:max_args` - most positional arguments accepted. Defaults to `0`.
  """
  @spec parse!(String.t(), String.t(), [String.t()], keyword(), keyword()) :: parsed()
  def parse!(task, help, argv, switches, opts \\ []) do
    remote = if Keyword.get(opts, :remote, true), do: @remote, else: []
    strict = @common ++ remote ++ switches
    aliases = @common_aliases ++ Keyword.get(opts, :aliases, [])
    {parsed, args, invalid} = OptionParser.parse(argv, strict: strict, aliases: aliases)

    cond do
      parsed[:help] ->
        Mix.shell().info(String.trim_trailing(help))
        exit({:shutdown, 0})

      invalid != [] ->
        usage_error!(task, "unknown or malformed option #{describe_invalid(invalid)}")

      length(args) > Keyword.get(opts, :max_args, 0) ->
        usage_error!(task, "unexpected argument #{inspect(Enum.join(args, " "))}")

      parsed[:cookie] && !parsed[:node] ->
        usage_error!(task, "--cookie needs --node NAME (the node to ask)")

      parsed[:node] && not node_name?(parsed[:node]) ->
        usage_error!(task, "--node must look like name@host, got: #{parsed[:node]}")

      true ->
        %{opts: parsed, args: args, format: format!(task, parsed[:format])}
    end
  end

  defp node_name?(name), do: Regex.match?(~r/\A[^@\s]+@[^@\s]+\z/, name)

  defp describe_invalid([{name, nil} | _]), do: name
  defp describe_invalid([{name, value} | _]), do: "#{name} #{inspect(value)}"

  defp format!(_task, nil), do: :table
  defp format!(_task, "table"), do: :table
  defp format!(_task, "json"), do: :json

  defp format!(task, other),
    do: usage_error!(task, "--format must be table or json, got: #{inspect(other)}")

  @doc "Prints `message` and how to get help on stderr, then exits with status 2."
  @spec usage_error!(String.t(), String.t()) :: no_return()
  def usage_error!(task, message) do
    Mix.shell().error("mix #{task}: #{message}\nRun `mix help #{task}` for usage.")
    exit({:shutdown, 2})
  end

  @doc """
  The interpreter a `--python` option names: a bare name (`python3`) is looked up on
  PATH like a shell would; a path is kept as given.
  """
  @spec executable(String.t()) :: String.t()
  def executable(name) do
    if String.contains?(name, "/"), do: name, else: System.find_executable(name) || name
  end

  @doc "Prints `message` on stderr and exits with status 1."
  @spec fail!(String.t()) :: no_return()
  def fail!(message) do
    Mix.shell().error(message)
    exit({:shutdown, 1})
  end

  @doc "Ends the task with `status`: returns for 0, exits `{:shutdown, status}` otherwise."
  @spec finish(0 | 1 | 2) :: :ok
  def finish(0), do: :ok
  def finish(status), do: exit({:shutdown, status})

  @doc """
  Prints `term` as one JSON document on stdout. Straight to stdout, not through the
  Mix shell, so that `MIX_QUIET=1` silences mix's own messages ("Compiling ...") but
  not the document.
  """
  @spec print_json(term()) :: :ok
  def print_json(term) do
    case JSON.encode(jsonable(term)) do
      {:ok, json} -> IO.puts(json)
      {:error, error} -> fail!("cannot encode the output as JSON: #{error.message}")
    end
  end

  @doc """
  Makes a term JSON-encodable: pids, references and ports become strings, tuples become
  lists, `DateTime`s stay (the encoder writes ISO 8601), other structs become maps.
  """
  @spec jsonable(term()) :: term()
  def jsonable(%DateTime{} = dt), do: dt
  def jsonable(%_{} = struct), do: struct |> Map.from_struct() |> jsonable()

  def jsonable(map) when is_map(map),
    do: Map.new(map, fn {k, v} -> {json_key(k), jsonable(v)} end)

  def jsonable(list) when is_list(list), do: Enum.map(list, &jsonable/1)
  def jsonable(tuple) when is_tuple(tuple), do: tuple |> Tuple.to_list() |> jsonable()
  def jsonable(term) when is_pid(term) or is_reference(term) or is_port(term), do: inspect(term)
  def jsonable(term) when is_function(term), do: inspect(term)
  def jsonable(term), do: term

  defp json_key(key) when is_binary(key), do: key
  defp json_key(key) when is_atom(key), do: Atom.to_string(key)
  defp json_key(key), do: inspect(key)

  @doc """
  Runs `fun` with the Logger level raised to :warning: the manager logs every freed
  region at :info, and the tasks' own lines say it better.
  """
  @spec quietly((() -> result)) :: result when result: term()
  def quietly(fun) do
    level = Logger.level()
    Logger.configure(level: :warning)

    try do
      fun.()
    after
      Logger.configure(level: level)
    end
  end

  @doc """
  Makes the project's modules loadable without starting the application: the offline
  tasks read segments themselves and must not start a manager (it would sweep orphans).
  """
  @spec load_code() :: :ok
  def load_code do
    # Quietly: "Compiling N files" on stdout would break `--format json`.
    shell = Mix.shell()
    Mix.shell(Mix.Shell.Quiet)

    try do
      Mix.Task.run("app.config")
    after
      Mix.shell(shell)
    end

    # The segments live where config :snakepit_shm, shm_path: says; the NIF must look there.
    alias Snakepit.SharedMemory.{Config, Platform}

    case Platform.apply_shm_path(Config.get(:shm_path)) do
      :ok -> :ok
      {:error, message} -> fail!(message)
    end
  end
end
