defmodule Snakepit.SharedMemory.CLI.HostScan do
  @moduledoc false
  # Offline discovery of every segment of ours on this host, without a running manager:
  #
  #   * POSIX segments: the files /dev/shm/spshm_* (or of config :snakepit_shm, shm_path);
  #   * memfd regions: the fds of processes of our uid whose link reads
  #     "/memfd:spshm_<id> (deleted)" (the control memfd; the data memfd ends in ".data").
  #     A memfd region lives as long as some process keeps an fd or a mapping of it; we
  #     find it through the fds, preferring those of its creator.
  #   * arena regions: the fds whose link reads "/memfd:spshm_arena_<id> (deleted)" are
  #     arenas (docs/FORMAT.md "Arenas"); every published control block in one is a
  #     region (Native.inspect_arena/1 walks the chunks).
  #
  # Each one's header is read with Native.inspect_path/1 (which refuses symlinks, objects
  # of other users and damaged headers) and turned into an entry (CLI.Entry).

  alias Snakepit.SharedMemory.CLI.{Entry, ProcessIdentity}
  alias Snakepit.SharedMemory.Native

  @prefix "spshm_"
  @memfd_prefix "/memfd:" <> @prefix
  @deleted " (deleted)"

  @doc "Every entry on the host, sorted by creation time (unreadable ones last)."
  @spec scan() :: [Entry.t()]
  def scan do
    context = Entry.context()
    posix = Enum.map(posix_names(), &inspect_posix(&1, context))
    {arenas, regions} = memfd_regions() |> Enum.split_with(&arena?/1)
    data = Map.new(regions, &{&1.id, &1.data})
    {with_control, data_only} = Enum.split_with(regions, &(&1.control != []))
    inspected = Enum.map(with_control, &inspect_memfd(&1, context, data))
    # A data memfd reused from a VM's warm pool keeps its first name: the header of the
    # region using it names it (data_name), and it is not a region of its own.
    used = MapSet.new(inspected, &elem(&1, 1))

    lone =
      for r <- data_only,
          not MapSet.member?(used, r.id),
          not pooled?(r),
          do: inspect_memfd(r, context, data)

    Entry.sort(
      posix ++
        Enum.map(inspected ++ lone, &elem(&1, 0)) ++
        Enum.flat_map(arenas, &inspect_arena(&1, context))
    )
  end

  @doc "The entry of one region id, or nil if no segment of that id is on this host."
  @spec find(String.t()) :: Entry.t() | nil
  def find(id) do
    context = Entry.context()

    cond do
      not String.starts_with?(id, @prefix) ->
        nil

      posix_present?(id) ->
        inspect_posix(id, context)

      true ->
        {arenas, regions} = memfd_regions() |> Enum.split_with(&arena?/1)
        data = Map.new(regions, &{&1.id, &1.data})

        case Enum.find(regions, &(&1.id == id and &1.control != [])) do
          nil ->
            arenas
            |> Stream.flat_map(&inspect_arena(&1, context))
            |> Enum.find(&(&1.id == id))

          region ->
            region |> inspect_memfd(context, data) |> elem(0)
        end
    end
  end

  # ---- arenas (small regions carved out of a VM's arena memfds) ----

  defp arena?(%{id: id}), do: String.starts_with?(id, @prefix <> "arena_")

  defp inspect_arena(%{control: control}, context) do
    open_by = control |> Enum.map(&elem(&1, 0)) |> Enum.uniq() |> Enum.sort()

    case Enum.sort(control) do
      [] ->
        []

      [{_pid, first} | _] ->
        case Native.inspect_arena(first) do
          {:ok, found} ->
            for {offset, header} <- found do
              # The creator's descriptor of the arena when it still has one.
              path =
                case List.keyfind(control, header.creator_pid, 0) do
                  {_, p} -> p
                  nil -> first
                end

              Entry.from_header(header, context, %{
                path: path,
                data_path: path,
                open_by: open_by,
                control_offset: offset
              })
            end

          {:error, _} ->
            []
        end
    end
  end

  @doc "Path of the POSIX segment of `name` (a region id)."
  @spec posix_path(String.t()) :: String.t()
  def posix_path(name), do: Path.join(shm_dir(), name)

  defp shm_dir, do: Snakepit.SharedMemory.Platform.current().shm_dir() || "/dev/shm"

  # ---- POSIX ----

  defp posix_names, do: Enum.sort(Snakepit.SharedMemory.Sweep.segment_ids())

  defp posix_present?(id) do
    # lstat: a planted symlink of that name is still "present" (and reported not ours).
    match?({:ok, _}, File.lstat(posix_path(id)))
  end

  defp inspect_posix(name, context) do
    path = posix_path(name)

    with :ok <- check_name(name),
         {:ok, header} <- Native.inspect_path(path),
         :ok <- check_header_id(name, header) do
      # The file's name, not the id its header claims: that is what cleanup removes.
      # A worker's output adopted by a VM names the (exited) worker as creator, but the
      # adopting VM holds its liveness lock: in use, never an orphan.
      Entry.from_header(header, context, %{id: name, path: path, data_path: path, open_by: []})
    else
      {:error, {reason, message, _errno}} ->
        Entry.unreadable(name, "posix", path, reason, message)
    end
  end

  defp check_header_id(name, %{id: name}), do: :ok

  defp check_header_id(name, %{id: other}),
    do:
      {:error,
       {:corrupt,
        "#{name} holds the header of #{other}: a copy or a rename, not the segment of " <>
          "that name (left in place)", 0}}

  defp check_name(name) do
    if Entry.region_id?(name),
      do: :ok,
      else:
        {:error,
         {:not_ours,
          "#{inspect(name)} is not a snakepit_shm region id " <>
            "(spshm_ + 20 base32 characters, or spshm_n_ + a name): a file of something else", 0}}
  end

  # ---- memfd ----

  # %{id, control: [{pid, path}], data: [{pid, path}]} for every memfd region seen.
  defp memfd_regions do
    own_uid = own_uid()

    ProcessIdentity.proc_pids()
    |> Enum.filter(&owned_by?(&1, own_uid))
    |> Enum.flat_map(&memfd_links/1)
    |> Enum.group_by(fn {id, _kind, _pid, _path} -> id end)
    |> Enum.map(fn {id, links} ->
      %{
        id: id,
        control: for({_, :control, pid, path} <- links, do: {pid, path}),
        data: for({_, :data, pid, path} <- links, do: {pid, path})
      }
    end)
    |> Enum.sort_by(& &1.id)
  end

  # {entry, id of the data memfd's name used}
  defp inspect_memfd(%{id: id, control: control, data: data}, context, all_data) do
    open_by = (control ++ data) |> Enum.map(&elem(&1, 0)) |> Enum.uniq() |> Enum.sort()

    case Enum.sort(control) do
      [] ->
        problem =
          "only the data memfd is open (by pid #{Enum.join(open_by, ", ")}): no header to " <>
            "read (an object in that VM's warm pool, or a worker that kept only the data)"

        entry =
          id |> Entry.unreadable("memfd", nil, :corrupt, problem) |> Map.put(:open_by, open_by)

        {entry, id}

      [{_pid, path} | _] ->
        case Native.inspect_path(path) do
          {:ok, %{data_name: name} = header} ->
            data_id = String.replace_suffix(name, ".data", "")
            region = %{id: id, control: control, data: Map.get(all_data, data_id, [])}
            {entry, _} = inspect_memfd_header(region, header, context, path)
            {entry, data_id}

          {:ok, header} ->
            inspect_memfd_header(%{id: id, control: control, data: data}, header, context, path)

          {:error, {reason, message, _errno}} ->
            entry =
              id |> Entry.unreadable("memfd", path, reason, message) |> Map.put(:open_by, open_by)

            {entry, id}
        end
    end
  end

  defp inspect_memfd_header(%{id: id, control: control, data: data}, header, context, path) do
    open_by = (control ++ data) |> Enum.map(&elem(&1, 0)) |> Enum.uniq() |> Enum.sort()
    # Report the creator's fds when the creator still has them open.
    pid = if List.keymember?(control, header.creator_pid, 0), do: header.creator_pid
    {_, control_path} = if pid, do: List.keyfind(control, pid, 0), else: {nil, path}
    data_pid = pid || control |> Enum.sort() |> hd() |> elem(0)
    data_path = with {_, p} <- List.keyfind(data, data_pid, 0), do: p
    extra = %{path: control_path, data_path: data_path, open_by: open_by}
    {Entry.from_header(Map.delete(header, :data_name), context, extra), id}
  end

  # A data memfd alone in some VM's warm pool (Snakepit.SharedMemory.WarmPool): memory
  # that VM keeps for its next region, not a region, nothing leaked.
  defp pooled?(%{data: [{_pid, path} | _]}), do: Native.pooled_object(path)
  defp pooled?(_), do: false

  defp own_uid do
    case File.stat("/proc/self") do
      {:ok, %File.Stat{uid: uid}} -> uid
      _ -> nil
    end
  end

  defp owned_by?(pid, uid) do
    match?({:ok, %File.Stat{uid: ^uid}}, File.stat("/proc/#{pid}"))
  end

  defp memfd_links(pid) do
    dir = "/proc/#{pid}/fd"

    case File.ls(dir) do
      {:ok, fds} ->
        Enum.flat_map(fds, fn fd ->
          path = dir <> "/" <> fd

          case File.read_link(path) do
            {:ok, @memfd_prefix <> _ = target} -> classify(target, pid, path)
            _ -> []
          end
        end)

      {:error, _} ->
        []
    end
  end

  defp classify(target, pid, path) do
    name = target |> String.trim_leading("/memfd:") |> String.replace_suffix(@deleted, "")

    case String.split(name, ".", parts: 2) do
      [id] -> [{id, :control, pid, path}]
      [id, "data"] -> [{id, :data, pid, path}]
      _ -> []
    end
  end
end
