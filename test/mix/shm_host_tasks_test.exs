Code.require_file("support/task_helpers.exs", __DIR__)

defmodule Mix.Tasks.Snakepit.Shm.HostTasksTest do
  # list, info and cleanup, offline, against real segments: orphans of a VM killed with
  # SIGKILL, a segment whose header was overwritten, a planted symlink, live regions of
  # this VM. Not async: cleanup looks at the whole host.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.TaskHelpers

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.ShmHelpers

  # The second VM creates POSIX regions (the second expires after 1 ms of idleness; the
  # last two are for the removal test), maps the first one (a hold by its own OS pid),
  # prints them and waits.
  @orphan_vm """
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SHM
  {:ok, a} = SHM.allocate_region(1_048_576, backend: :posix, metadata: %{dtype: "uint8", who: "orphan"})
  {:ok, b} = SHM.allocate_region(65_536, backend: :posix, timeout: 1)
  {:ok, c} = SHM.allocate_region(8_192, backend: :posix)
  {:ok, v1} = SHM.allocate_region(4_096, backend: :posix)
  {:ok, v2} = SHM.allocate_region(4_096, backend: :posix)
  {:ok, _mapping} = SHM.map_region(a)
  IO.puts("READY \#{System.pid()} \#{a} \#{b} \#{c} \#{v1} \#{v2}")
  Process.sleep(:infinity)
  """

  # Any VM starting on this host sweeps orphans at start-up (and cleanup_regions/1 does
  # too), so each test that needs them makes its own, just before it looks.
  setup_all do
    link = random_id()
    File.write!("/tmp/#{link}.target", "not a segment")
    File.ln_s!("/tmp/#{link}.target", "/dev/shm/#{link}")

    {:ok, live} = SHM.allocate_region(4096, backend: :posix, metadata: %{who: "live"})
    {:ok, live_memfd} = SHM.allocate_region(4096, backend: :memfd)
    {:ok, mapping} = SHM.map_region(live_memfd)

    on_exit(fn ->
      SHM.unmap_region(mapping)
      SHM.deallocate_region(live)
      SHM.deallocate_region(live_memfd)
      File.rm("/dev/shm/" <> link)
      File.rm("/tmp/#{link}.target")
      assert present([link, live, live_memfd]) == []
      assert ShmHelpers.segments_created_by() == []
    end)

    %{link: link, live: live, live_memfd: live_memfd, me: System.pid()}
  end

  setup context do
    if context[:orphans], do: orphans(), else: :ok
  end

  defp orphans do
    {_port, [vm, orphan, expired, damaged, victim1, victim2]} = start_vm(@orphan_vm)
    kill9(vm)
    # The leader of a killed VM is a zombie before its other threads have exited and
    # closed its descriptors: wait until the kernel has dropped its liveness locks.
    ShmHelpers.wait_until(fn ->
      match?(
        {:ok, %{in_use: false}},
        Snakepit.SharedMemory.Native.inspect_path("/dev/shm/" <> orphan)
      )
    end)

    # A header no longer matching its CRC: bytes 16.. are data_size and data_capacity.
    corrupt!(damaged, 16, "garbage!garbage!")
    ids = [orphan, expired, damaged, victim1, victim2]

    on_exit(fn ->
      File.rm("/dev/shm/" <> damaged)
      for id <- ids -- [damaged], do: Snakepit.SharedMemory.Native.unlink_segment(id)
      # Nothing of this test's making is left in /dev/shm.
      assert present(ids) == []
      assert ShmHelpers.segments_created_by(String.to_integer(vm)) == []
    end)

    %{
      vm: vm,
      orphan: orphan,
      expired: expired,
      damaged: damaged,
      victims: [victim1, victim2]
    }
  end

  describe "mix snakepit.shm.list" do
    @tag :orphans
    test "shows every region with owner, holders, flags and totals; exit 1 for the damaged ones",
         c do
      {out, _err, status} = run_task("snakepit.shm.list", [])

      assert status == 1
      assert out =~ ~r/^ID\s+BACKEND\s+SIZE\s+OWNER\s+HOLDERS\s+AGE\s+IDLE\s+EXPIRES\s+FLAGS$/m

      assert line(out, c.orphan) =~
               ~r/posix\s+1\.0 MiB\s+#{c.vm} not seen \(unused\)\s+1 \(1 gone\).*never\s+orphaned,dead-holder$/

      assert line(out, c.expired) =~ ~r/#{c.vm} not seen \(unused\).*expired\s+orphaned,expired$/
      assert line(out, c.live) =~ ~r/posix\s+4\.0 KiB\s+#{c.me} alive\s+0/
      assert line(out, c.live_memfd) =~ ~r/memfd\s+4\.0 KiB\s+#{c.me} alive\s+1\s/
      assert line(out, c.damaged) =~ ~r/CORRUPT$/
      assert line(out, c.link) =~ ~r/NOT-OURS$/

      assert out =~
               ~r/^Total: \d+ regions?, .*orphaned.*corrupt.*not ours \(offline scan of this host\)$/m
    end

    @tag :orphans
    test "--orphaned shows only regions whose owner VM is gone", c do
      {out, _err, 0} = run_task("snakepit.shm.list", ["--orphaned"])
      assert line(out, c.orphan) && line(out, c.expired)
      refute out =~ c.live
      refute out =~ c.damaged
    end

    @tag :orphans
    test "--owner and --older-than filter", c do
      {out, _err, 0} = run_task("snakepit.shm.list", ["--owner", c.vm])
      assert out =~ c.orphan and out =~ c.expired
      refute out =~ c.live
      refute out =~ c.damaged
      assert out =~ ~r/^Total: \d regions, .* orphaned/m

      {out, _err, 0} = run_task("snakepit.shm.list", ["--owner", c.vm, "--older-than", "1h"])
      assert out =~ "No snakepit_shm regions found."
      assert out =~ "Total: 0 regions, 0 B"
    end

    @tag :orphans
    test "--format json is one JSON document with the same facts", c do
      {out, _err, 1} = run_task("snakepit.shm.list", ["--format", "json"])
      doc = json!(out)
      by_id = Map.new(doc["regions"], &{&1["id"], &1})

      assert %{"status" => "ok", "orphaned" => true, "backend" => "posix", "size" => 1_048_576} =
               by_id[c.orphan]

      assert by_id[c.orphan]["owner"]["os_pid"] == String.to_integer(c.vm)
      # Nobody holds its lock and its pid is not seen here: not called dead (a pid alone).
      assert %{"alive" => nil, "liveness" => "unused"} = by_id[c.orphan]["owner"]
      assert %{"alive" => true, "liveness" => "alive"} = by_id[c.live]["owner"]
      assert [%{"alive" => false, "count" => 1, "writable" => true}] = by_id[c.orphan]["holders"]
      assert by_id[c.orphan]["metadata"] == %{"dtype" => "uint8", "who" => "orphan"}
      assert by_id[c.expired]["expired"] == true
      assert by_id[c.damaged]["status"] == "corrupt"
      assert by_id[c.damaged]["problem"] =~ "CRC"
      assert by_id[c.link]["status"] == "not_ours"
      assert by_id[c.live]["orphaned"] == false
      assert doc["totals"]["corrupt"] >= 1
    end

    test "bad usage exits 2 with a message" do
      {_out, err, 2} = run_task("snakepit.shm.list", ["--older-than", "soon"])
      assert err =~ "--older-than needs a duration like 250ms, 30s, 5m, 2h or 1d"

      {_out, err, 2} = run_task("snakepit.shm.list", ["--frobnicate"])
      assert err =~ "unknown or malformed option --frobnicate"
      assert err =~ "mix help snakepit.shm.list"
    end
  end

  describe "mix snakepit.shm.info" do
    @tag :orphans
    test "an orphan: owner gone, its dead holder, intact header", c do
      {out, _err, 0} = run_task("snakepit.shm.info", [c.orphan])
      assert out =~ ~r/^Owner VM:\s+OS pid #{c.vm} .*nobody holds the region's liveness lock/m
      assert out =~ ~r/^Orphaned:\s+yes: nobody holds its liveness lock/m
      assert out =~ ~r/^Metadata:\s+\{"dtype":"uint8","who":"orphan"\}$/m
      assert out =~ ~r/^Header:\s+valid/m
      assert out =~ ~r/^\s+#{c.vm}\s+\d+\s+1\s+rw\s+gone \(region unused\)$/m
    end

    test "a live memfd region found through /proc/<pid>/fd, held by this VM", c do
      {out, _err, 0} = run_task("snakepit.shm.info", [c.live_memfd])
      assert out =~ ~r{^Path:\s+/proc/#{c.me}/fd/\d+$}m
      assert out =~ ~r/^Backend:\s+memfd$/m
      assert out =~ ~r/^\s+#{c.me}\s+\d+\s+1\s+rw\s+alive$/m
    end

    @tag :orphans
    test "a corrupted header is reported as such, exit 1", c do
      {out, _err, 1} = run_task("snakepit.shm.info", [c.damaged])
      assert out =~ ~r/^Header:\s+CORRUPT: .*CRC mismatch/m

      {out, _err, 1} = run_task("snakepit.shm.info", [c.damaged, "--format", "json"])
      assert %{"status" => "corrupt", "id" => id} = json!(out)
      assert id == c.damaged
    end

    test "an unknown id is exit 1, a missing one exit 2" do
      {_out, err, 1} = run_task("snakepit.shm.info", [random_id()])
      assert err =~ "no region spshm_"

      {_out, err, 2} = run_task("snakepit.shm.info", [])
      assert err =~ "give the region id"
    end
  end

  describe "mix snakepit.shm.cleanup" do
    @tag :orphans
    test "--dry-run says what it would do and changes nothing", c do
      args = ["--dry-run", "--id", c.orphan, "--id", c.expired]
      {out, _err, 0} = run_task("snakepit.shm.cleanup", args)

      assert line(out, c.orphan) =~
               ~r/would remove\s+1\.0 MiB\s+nobody uses it .*created by VM #{c.vm}$/

      assert line(out, c.expired) =~ "would remove"
      assert out =~ "Would remove 2 segments (1.1 MiB). Nothing was changed (--dry-run)."
      assert present([c.orphan, c.expired]) == [c.orphan, c.expired]
    end

    @tag :orphans
    test "refuses the damaged segment and the symlink: reported, never deleted", c do
      {out, _err, 1} = run_task("snakepit.shm.cleanup", ["--id", c.damaged, "--id", c.link])
      assert line(out, c.damaged) =~ ~r/REFUSED\s+.*damaged header: left in place$/
      assert line(out, c.link) =~ ~r/REFUSED\s+.*not ours: left in place$/
      assert out =~ "symbolic link"
      assert present([c.damaged, c.link]) == [c.damaged, c.link]
    end

    test "never touches a region whose owner is alive", c do
      {out, _err, 0} = run_task("snakepit.shm.cleanup", ["--id", c.live, "--id", c.live_memfd])
      assert out =~ "Nothing to clean up"
      assert present([c.live]) == [c.live]
      assert {:ok, _} = SHM.get_region_info(c.live_memfd)
    end

    @tag :orphans
    test "removes orphans of the killed VM; JSON output", c do
      [v1, v2] = c.victims
      assert present(c.victims) == c.victims

      {out, _err, 0} =
        run_task("snakepit.shm.cleanup", ["--id", v1, "--id", v2, "--format", "json"])

      %{"dry_run" => false, "actions" => actions} = json!(out)
      removed = for %{"action" => "remove", "result" => "done", "id" => id} <- actions, do: id
      assert Enum.sort(removed) == Enum.sort(c.victims)
      assert present(c.victims) == []

      {_out, err, 1} = run_task("snakepit.shm.info", [v1])
      assert err =~ "no region #{v1}"
    end
  end

  defp line(out, id) do
    out |> String.split("\n") |> Enum.find(&String.starts_with?(&1, id)) ||
      flunk("no line for #{id} in:\n#{out}")
  end
end
