defmodule Snakepit.SharedMemory.CLI.RegionView do
  @moduledoc false
  # Text renderings of entries (CLI.Entry): the `list` table with its totals line, and
  # the `info` details of one region.

  alias Snakepit.SharedMemory.CLI.{Entry, Human, Table}

  @headers ["ID", "BACKEND", "SIZE", "OWNER", "HOLDERS", "AGE", "IDLE", "EXPIRES", "FLAGS"]

  @doc "The list table (or a sentence when there is nothing to show)."
  @spec table([Entry.t()]) :: String.t()
  def table([]), do: "No snakepit_shm regions found."

  def table(entries) do
    rows = Enum.map(entries, &row/1)
    Table.render(@headers, rows, right: [2, 4, 5, 6])
  end

  @doc "The list table of several nodes: the `list` table with a NODE column first."
  @spec cluster_table([Entry.t()]) :: String.t()
  def cluster_table([]), do: "No snakepit_shm regions found on any node."

  def cluster_table(entries) do
    rows = Enum.map(entries, &[&1[:node] || "-" | row(&1)])
    Table.render(["NODE" | @headers], rows, right: [3, 5, 6, 7])
  end

  defp row(%{status: :ok} = e) do
    [
      e.id,
      e.backend,
      Human.bytes(e.size),
      owner(e.owner),
      holders(e.holders),
      Human.duration_ms(e.age_ms),
      Human.duration_ms(e.idle_ms),
      expires(e),
      Enum.join(Entry.flags(e), ",")
    ]
  end

  defp row(e) do
    [
      e.id,
      e.backend,
      Human.bytes(e.size),
      "-",
      "-",
      "-",
      "-",
      "-",
      Enum.join(Entry.flags(e), ",")
    ]
  end

  # "dead" only for a header of another boot: a pid alone proves nothing (PID namespaces,
  # reuse), and the liveness lock says whether the region is used, not by whom (Entry).
  defp owner(nil), do: "-"
  defp owner(%{os_pid: pid, liveness: :other_boot}), do: "#{pid} dead (old boot)"
  defp owner(%{os_pid: pid, liveness: :in_use}), do: "#{pid} not seen (in use)"
  defp owner(%{os_pid: pid, liveness: :unused}), do: "#{pid} not seen (unused)"
  defp owner(%{os_pid: pid, alive: true}), do: "#{pid} alive"

  defp holders([]), do: "0"

  defp holders(list) do
    gone = Enum.count(list, &(&1.alive == false))
    if gone == 0, do: "#{length(list)}", else: "#{length(list)} (#{gone} gone)"
  end

  defp expires(%{timeout_ms: nil}), do: "never"
  defp expires(%{expired: true}), do: "expired"
  defp expires(%{expires_in_ms: ms}), do: "in " <> Human.duration_ms(ms)

  @doc "Totals of `entries` as a map (for JSON) ..."
  @spec totals([Entry.t()]) :: map()
  def totals(entries) do
    ok = Enum.filter(entries, &(&1.status == :ok))
    orphaned = Enum.filter(ok, & &1.orphaned)

    %{
      regions: length(ok),
      bytes: sum_sizes(ok),
      bytes_by_backend:
        ok |> Enum.group_by(& &1.backend) |> Map.new(fn {b, es} -> {b, sum_sizes(es)} end),
      orphaned: length(orphaned),
      orphaned_bytes: sum_sizes(orphaned),
      expired: Enum.count(ok, & &1.expired),
      dead_holders: ok |> Enum.flat_map(& &1.holders) |> Enum.count(&(&1.alive == false)),
      corrupt: Enum.count(entries, &(&1.status == :corrupt)),
      not_ours: Enum.count(entries, &(&1.status == :not_ours)),
      unreadable: Enum.count(entries, &(&1.status in [:unreadable, :not_found]))
    }
  end

  # " (posix 48.0 MiB, memfd 32.0 MiB)" when there is more than one backend: POSIX
  # regions fill /dev/shm, memfd ones do not.
  defp by_backend(map) when map_size(map) < 2, do: ""

  defp by_backend(map),
    do:
      " (" <>
        Enum.map_join(Enum.sort(map), ", ", fn {b, n} -> "#{b} #{Human.bytes(n)}" end) <> ")"

  defp sum_sizes(entries), do: entries |> Enum.map(&(&1.size || 0)) |> Enum.sum()

  @doc "... and as one line of text."
  @spec totals_line(map()) :: String.t()
  def totals_line(t) do
    [
      "#{plural(t.regions, "region")}, #{Human.bytes(t.bytes)}" <> by_backend(t.bytes_by_backend),
      t.orphaned > 0 && "#{t.orphaned} orphaned (#{Human.bytes(t.orphaned_bytes)})",
      t.expired > 0 && "#{t.expired} expired",
      t.dead_holders > 0 && plural(t.dead_holders, "dead holder"),
      t.corrupt > 0 && "#{t.corrupt} corrupt",
      t.not_ours > 0 && "#{t.not_ours} not ours",
      t.unreadable > 0 && "#{t.unreadable} unreadable"
    ]
    |> Enum.filter(& &1)
    |> Enum.join("; ")
    |> then(&("Total: " <> &1))
  end

  @doc "`count thing`, with an s when count is not 1."
  @spec plural(non_neg_integer(), String.t()) :: String.t()
  def plural(1, thing), do: "1 #{thing}"
  def plural(n, thing), do: "#{n} #{thing}s"

  @doc "Everything about one entry, as labelled lines."
  @spec details(Entry.t()) :: String.t()
  def details(%{status: :ok} = e) do
    general =
      Table.pairs(
        [
          {"Region", e.id},
          {"Backend", e.backend},
          {"Size", "#{Human.bytes(e.size)} (#{e.size} bytes)"},
          {"Path", e[:path]},
          {"Data path", if(e[:data_path] != e[:path], do: e[:data_path])},
          {"Owner VM", owner_line(e.owner)},
          {"Orphaned", orphan_line(e)},
          {"Created", "#{e.created_at} (#{Human.duration_ms(e.age_ms)} ago)"},
          {"Last access", "#{e.last_access_at} (idle #{Human.duration_ms(e.idle_ms)})"},
          {"Idle timeout", timeout_line(e)},
          {"Name", e[:name]},
          {"Cleanup policy", e[:cleanup_policy]},
          {"Security", e.security_level},
          {"State", state_line(e)},
          {"Reference count", e.refcount},
          {"Open by (fds)", open_by(e[:open_by])},
          {"Metadata", metadata(e.metadata)},
          {"Header", header_line(e)}
        ]
        |> Enum.reject(fn {_label, value} -> value == nil end)
      )

    general <> "\n\n" <> holders_table(e.holders)
  end

  def details(e) do
    Table.pairs([
      {"Region", e.id},
      {"Backend", e.backend},
      {"Path", e.path},
      {"Size", e.size && "#{Human.bytes(e.size)} (#{e.size} bytes)"},
      {"Header", Enum.join(Entry.flags(e), ",") <> ": " <> e.problem}
    ])
  end

  defp header_line(%{format_version: nil}), do: "as reported by the node's manager"
  defp header_line(e), do: "valid (magic, format version #{e.format_version}, sizes, CRC-32)"

  defp owner_line(%{os_pid: pid, start_time: nil, process: process}),
    do: "OS pid #{pid} (the node asked), owner process #{inspect(process)}"

  defp owner_line(%{os_pid: pid, start_time: st, liveness: :alive} = owner),
    do: "OS pid #{pid} (start time #{st}), alive" <> seen_as(owner)

  defp owner_line(%{os_pid: pid, start_time: st, liveness: :other_boot}),
    do: "OS pid #{pid} (start time #{st}), dead: the header was written during another boot"

  defp owner_line(%{os_pid: pid, start_time: st, liveness: :in_use}),
    do:
      "OS pid #{pid} (start time #{st}), not seen from this PID namespace (it may run in " <>
        "another one); in use: some process holds the region's liveness lock"

  defp owner_line(%{os_pid: pid, start_time: st, liveness: :unused}),
    do:
      "OS pid #{pid} (start time #{st}), not seen from this PID namespace, and nobody " <>
        "holds the region's liveness lock: nothing uses it"

  defp seen_as(%{seen_as: here}), do: " (pid #{here} in this PID namespace)"
  defp seen_as(_owner), do: ""

  defp orphan_line(%{orphaned: true}),
    do: "yes: nobody holds its liveness lock (mix snakepit.shm.cleanup frees it)"

  defp orphan_line(_e), do: nil

  defp timeout_line(%{timeout_ms: nil}), do: "none (never expires)"
  defp timeout_line(%{timeout_ms: t, expired: true}), do: "#{Human.duration_ms(t)}, EXPIRED"

  defp timeout_line(%{timeout_ms: t, expires_in_ms: left}),
    do: "#{Human.duration_ms(t)}, expires in #{Human.duration_ms(left)} unless used"

  defp state_line(e) do
    case for {true, name} <- [
               {e.sealed, "sealed"},
               {e.encrypted, "encrypted"},
               {e[:deallocated] == true, "deallocated"}
             ],
             do: name do
      [] -> "writable"
      names -> Enum.join(names, ", ")
    end
  end

  defp open_by(nil), do: nil
  defp open_by([]), do: nil
  defp open_by(pids), do: Enum.join(pids, ", ")

  defp metadata(value) when value == %{}, do: "{}"

  defp metadata(value) do
    case Snakepit.SharedMemory.JSON.encode(value) do
      {:ok, json} -> json
      _ -> inspect(value)
    end
  end

  defp access(true), do: "rw"
  defp access(false), do: "r"
  defp access(nil), do: "-"

  defp alive(%{liveness: :alive}), do: "alive"
  defp alive(%{liveness: :other_boot}), do: "DEAD (old boot)"
  defp alive(%{liveness: :in_use}), do: "not seen (region in use)"
  defp alive(%{liveness: :unused}), do: "gone (region unused)"
  defp alive(%{alive: true}), do: "alive"
  defp alive(%{alive: nil}), do: "watched by the manager"

  defp holders_table([]), do: "Holders: none"

  defp holders_table(holders) do
    rows =
      Enum.map(holders, fn h ->
        [h.os_pid, h.start_time, h.count, access(h.writable), alive(h)]
      end)

    "Holders:\n" <>
      Table.render(["OS PID", "START TIME", "HOLDS", "ACCESS", "PROCESS"], rows,
        right: [0, 1, 2],
        indent: 2
      )
  end
end
