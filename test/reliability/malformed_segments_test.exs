defmodule Snakepit.SharedMemory.Reliability.MalformedSegmentsTest do
  # Malformed segments in /dev/shm (forged by Snakepit.SharedMemory.ReliabilityForge from
  # a real region): wrong magic, a future format version, sizes beyond the file, a broken
  # CRC, a truncated file, a name of ours that is a symbolic link, a file of another
  # user. Each must be refused with a clear error by the NIF (inspect_path, open), the
  # manager's orphan sweep, the Python client and the mix tasks, and none may be deleted
  # (only a valid orphan, provably ours with a dead creator, is), even when stale.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Native, ReliabilityForge, ReliabilityHelpers}

  @moduletag :reliability
  @moduletag timeout: 300_000

  # What the core answers for each kind (reason, and a word the message must contain).
  @native %{
    bad_magic: {[:corrupt, :not_ours], ~r/magic/i},
    future_version: {[:unsupported_version], ~r/version/i},
    size_beyond_file: {[:corrupt], ~r/truncated|bytes|size/i},
    bad_crc: {[:corrupt], ~r/crc|checksum/i},
    truncated: {[:corrupt], ~r/truncated|smaller/i},
    symlink: {[:not_ours], ~r/link/i},
    foreign_owner: {[:not_ours, :permission_denied], ~r/uid|user|owner/i}
  }

  # What the Python client raises for each kind.
  @python %{
    bad_magic: ["CorruptRegion"],
    future_version: ["CorruptRegion"],
    size_beyond_file: ["CorruptRegion"],
    bad_crc: ["CorruptRegion"],
    truncated: ["CorruptRegion"],
    symlink: ["CorruptRegion", "PermissionError"],
    foreign_owner: ["PermissionError"]
  }

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    ReliabilityHelpers.check_segments_on_exit()
    %{template: ReliabilityForge.template(), dead_pid: ReliabilityForge.dead_os_pid()}
  end

  setup %{template: template, dead_pid: dead_pid} do
    forged =
      Map.new(ReliabilityForge.kinds(), &{&1, ReliabilityForge.forge(&1, template, dead_pid)})

    on_exit(fn -> Enum.each(Map.values(forged), &ReliabilityForge.remove/1) end)
    %{forged: forged}
  end

  defp malformed(forged), do: Map.delete(forged, :valid)

  test "the NIF refuses each malformed segment with a clear error", %{forged: forged} do
    assert {:ok, header} = Native.inspect_path(forged.valid.path)
    assert header.id == forged.valid.id and header.creator_alive == false

    for {kind, seg} <- malformed(forged) do
      {reasons, words} = @native[kind]

      for {what, result} <- [
            inspect_path: Native.inspect_path(seg.path),
            open: Native.open(seg.id, false)
          ] do
        assert {:error, {reason, message, _errno}} = result, "#{kind} #{what}: #{inspect(result)}"
        assert reason in reasons, "#{kind} #{what}: #{reason}: #{message}"
        assert message =~ words, "#{kind} #{what}: unclear message: #{message}"
        # Every message names the segment (a bad magic or version included: the core
        # names the object it opened, not the header's untrusted id field).
        assert message =~ seg.id, "#{kind} #{what}: names no segment: #{message}"
      end

      assert {:error, {_, _, _}} = Native.unlink_segment(seg.id), "#{kind} was unlinked"
      assert ReliabilityForge.present?(seg), "#{kind} was deleted"
    end
  end

  test "the manager's orphan sweep removes the valid orphan only, even when all are stale",
       %{forged: forged} do
    for seg <- Map.values(forged), do: ReliabilityForge.age!(seg, 3_600)

    {:ok, dry} = SharedMemory.cleanup_regions(orphans: true, dry_run: true)
    dry_ids = MapSet.new(dry, & &1.region_id)
    assert forged.valid.id in dry_ids
    assert ReliabilityForge.present?(forged.valid)

    {:ok, freed} = SharedMemory.cleanup_regions(orphans: true)
    freed_ids = MapSet.new(freed, & &1.region_id)
    assert forged.valid.id in freed_ids
    refute ReliabilityForge.present?(forged.valid)

    for {kind, seg} <- malformed(forged) do
      refute seg.id in freed_ids, "#{kind} was reported freed"
      refute seg.id in dry_ids, "#{kind} was planned for removal"
      assert ReliabilityForge.present?(seg), "#{kind} was deleted by the sweep"
    end

    for %{extra: extra} <- Map.values(forged), path <- extra, do: assert(File.exists?(path))
  end

  test "the Python client refuses each with a clear exception and deletes nothing",
       %{forged: forged} do
    script = """
    import sys, warnings
    warnings.simplefilter("ignore")
    import snakepit_shm
    for region_id in sys.argv[1:]:
        try:
            with snakepit_shm.attach(region_id) as region:
                print(region_id, "ATTACHED", region.size, sep="\\t")
        except Exception as exc:
            message = str(exc).replace("\\n", " ")
            print(region_id, type(exc).__name__, message, sep="\\t")
    """

    ids = for {_k, seg} <- forged, do: seg.id
    {out, 0} = ReliabilityHelpers.python(script, ids)
    lines = for line <- String.split(out, "\n", trim: true), do: String.split(line, "\t")
    by_id = Map.new(lines, fn [id | rest] -> {id, rest} end)

    assert ["ATTACHED", size] = by_id[forged.valid.id], out
    assert String.to_integer(size) == 8192

    for {kind, seg} <- malformed(forged) do
      assert [class, message] = by_id[seg.id], "#{kind}: #{out}"
      assert class in @python[kind], "#{kind}: #{class}: #{message}"

      assert message =~ seg.id or message =~ seg.path,
             "#{kind}: message names nothing: #{message}"

      assert ReliabilityForge.present?(seg), "#{kind} was deleted by the Python client"
    end

    # The command line reports a malformed segment with exit status 1.
    {out, status} =
      ReliabilityHelpers.python(
        "import sys, runpy; sys.argv = ['snakepit_shm'] + sys.argv[1:]; runpy.run_module('snakepit_shm', run_name='__main__')",
        ["info", forged.bad_crc.id]
      )

    assert status == 1, out
    assert out =~ ~r/crc/i
  end

  # Any VM that starts on this host sweeps a valid orphan (that is its job): when another
  # one did so while the task booted, try again with a fresh orphan.
  defp info_of_valid_orphan(template, dead_pid, seg, tries) do
    {out, status} = ReliabilityHelpers.mix_task(["snakepit.shm.info", seg.id])

    if status != 0 and tries > 1 and not ReliabilityForge.present?(seg) do
      fresh = ReliabilityForge.forge(:valid, template, dead_pid)
      on_exit(fn -> ReliabilityForge.remove(fresh) end)
      info_of_valid_orphan(template, dead_pid, fresh, tries - 1)
    else
      if status != 0, do: IO.puts("mix snakepit.shm.info #{seg.id}: #{out}")
      status
    end
  end

  test "mix snakepit.shm.info reports them and mix snakepit.shm.cleanup refuses them",
       %{forged: forged, template: template, dead_pid: dead_pid} do
    for seg <- Map.values(forged), do: ReliabilityForge.age!(seg, 3_600)

    # The valid orphan is reported as such (exit 0).
    assert info_of_valid_orphan(template, dead_pid, forged.valid, 3) == 0

    infos =
      forged
      |> malformed()
      |> Task.async_stream(
        fn {kind, seg} -> {kind, ReliabilityHelpers.mix_task(["snakepit.shm.info", seg.id])} end,
        max_concurrency: 2,
        timeout: 120_000
      )
      |> Map.new(fn {:ok, result} -> result end)

    for {kind, _seg} <- malformed(forged) do
      {out, status} = infos[kind]
      assert status == 1, "#{kind}: mix snakepit.shm.info exited #{status}: #{out}"
      assert out =~ ~r/corrupt|not ours|link|uid|version|owner/i, "#{kind}: #{out}"
    end

    ids = Enum.flat_map(forged, fn {_k, seg} -> ["--id", seg.id] end)

    {out, status} =
      ReliabilityHelpers.mix_task(["snakepit.shm.cleanup", "--format", "json" | ids])

    assert status == 1, "cleanup must report the refusals with status 1: #{out}"
    refute ReliabilityForge.present?(forged.valid), "the valid orphan was not removed: #{out}"

    for {kind, seg} <- malformed(forged) do
      assert ReliabilityForge.present?(seg), "#{kind} was deleted by mix snakepit.shm.cleanup"
    end
  end
end
