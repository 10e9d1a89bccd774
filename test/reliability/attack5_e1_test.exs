defmodule Snakepit.SharedMemory.Reliability.Attack5E1Test do
  # Attack run 5 (E1): small-region arenas, the warm pool and the runtime index.
  use Snakepit.SharedMemory.ReliabilityCase, async: false

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.ReliabilityHelpers

  @bare_id_attacher ~S"""
  import sys, time, collections, snakepit_shm
  live, freed = sys.argv[1].split(","), sys.argv[2].split(",")
  seen = collections.Counter()
  end = time.monotonic() + float(sys.argv[3])
  while time.monotonic() < end:
      for rid, want in [(r, "live") for r in live] + [(r, "freed") for r in freed]:
          try:
              with snakepit_shm.attach(rid) as region:
                  got = bytes(region.read(0, len(rid))).decode("latin-1")
                  seen[f"{want} attached {'own' if got == rid else 'OTHER:' + got[:8]}"] += 1
          except snakepit_shm.SnakepitShmError as e:
              seen[f"{want} {type(e).__name__} {str(e)[:60]}"] += 1
  for k, v in sorted(seen.items()):
      print(v, k)
  """

  test "bare-id attaches racing a churn of small regions never attach the wrong region" do
    put = fn id, bytes ->
      {:ok, m} = SHM.map_region(id)
      :ok = SHM.write(m, 0, bytes)
      :ok = SHM.unmap_region(m)
    end

    live =
      for _ <- 1..8 do
        {:ok, id} = SHM.allocate_region(4096)
        put.(id, id)
        id
      end

    freed =
      for _ <- 1..8 do
        {:ok, id} = SHM.allocate_region(4096)
        put.(id, id)
        {:ok, _} = SHM.export_ref(id)
        # let the index writer list it, then free it
        Process.sleep(5)
        :ok = SHM.deallocate_region(id)
        id
      end

    :erlang.garbage_collect()
    parent = self()

    churn =
      spawn_link(fn ->
        Stream.repeatedly(fn ->
          {:ok, id} = SHM.allocate_region(4096)
          put.(id, String.duplicate("Z", 29))
          :ok = SHM.deallocate_region(id)
        end)
        |> Stream.take_while(fn _ ->
          receive do
            :stop -> send(parent, :stopped) && false
          after
            0 -> true
          end
        end)
        |> Stream.run()
      end)

    {out, status} =
      ReliabilityHelpers.python(@bare_id_attacher, [
        Enum.join(live, ","),
        Enum.join(freed, ","),
        "4"
      ])

    send(churn, :stop)
    assert_receive :stopped, 5000
    assert status == 0, out
    refute out =~ "OTHER", out
    refute out =~ "live Region", out
    refute out =~ "freed attached", out
    refute out =~ "Corrupt", out
    for id <- live, do: :ok = SHM.deallocate_region(id)
  end

  # A process of the user that overwrote a region's control block with zeros (a raw
  # mmap of the arena written past a neighbour's end, a hostile scribble) made
  # map_region/2 answer :holder_table_full, "all 64 holder slots of the region are in use
  # by live processes: unmap it in some of them and retry" (and the health monitor
  # counted "64 processes already hold a region"): the zeroed holder_capacity left no
  # slot to claim. Retrying never helps and nobody holds it; the header is damaged.
  @zero_control_block ~S"""
  import os, sys, json
  ref = json.loads(sys.argv[1])
  fd = os.open(ref["control_path"], os.O_RDWR)
  os.pwrite(fd, bytes(4096), ref.get("control_offset") or 0)
  print("zeroed")
  """

  for arena <- [true, false] do
    test "a control block zeroed by another process is :corrupt, not holder_table_full (arena: #{arena})" do
      {:ok, id} = SHM.allocate_region(4096, arena: unquote(arena))
      {:ok, ref} = SHM.export_ref(id)
      assert Map.has_key?(ref, "control_offset") == unquote(arena)
      {:ok, json} = SHM.JSON.encode(ref)
      {out, 0} = ReliabilityHelpers.python(@zero_control_block, [json])
      assert out =~ "zeroed", out

      for access <- [:read_write, :read_only] do
        assert {:error, %SHM.Error{reason: :corrupt, message: message}} =
                 SHM.map_region(id, access_mode: access)

        assert message =~ "overwritten", message
        assert message =~ id, message
        refute message =~ "holder slots", message
      end

      assert :ok = SHM.deallocate_region(id)
    end
  end

  # `huge_pages: true` is documented for "memfd regions of at least one huge page", and a
  # small region in an arena never uses one; but a small dedicated memfd region
  # (`arena: false`, `backend: :memfd`, or the `:huge_pages` setting `true` for the whole
  # VM) took a whole 2 MiB huge page for its 4 KiB, and failed with :no_space ("the
  # host's hugetlb pool has 0 free pages") once the pool was empty or on a host without
  # one, while the same call with the default `arena: true` succeeded.
  test "huge_pages: true leaves regions smaller than one huge page on ordinary pages" do
    before = Snakepit.SharedMemory.Native.huge_page_info()

    for opts <- [[arena: false], [backend: :memfd], [arena: true]] do
      assert {:ok, id} = SHM.allocate_region(4096, [huge_pages: true] ++ opts), inspect(opts)
      {:ok, m} = SHM.map_region(id)
      :ok = SHM.write(m, 4095, "z")
      assert {:ok, "z"} = SHM.read(m, 4095, 1)
      :ok = SHM.unmap_region(m)
      # no huge page was taken for it
      assert Snakepit.SharedMemory.Native.huge_page_info().free == before.free
      :ok = SHM.deallocate_region(id)
    end

    # Regions of at least one huge page still honour `true`: without free huge pages,
    # :no_space as documented.
    if before.page_size > 0 and before.free == 0 do
      assert {:error, %SHM.Error{reason: :no_space, message: message}} =
               SHM.allocate_region(before.page_size, huge_pages: true)

      assert message =~ "huge_pages: true"
      # the core's advice only: no "/dev/shm ... use backend: :memfd" for a memfd region
      refute message =~ "/dev/shm", message
      refute message =~ "backend: :memfd", message
    end
  end

  # A worker given the ref of a live small region whose control block another process
  # had overwritten with zeros was told RegionNotFound, "its arena chunk ... is free. The
  # owner freed the region (deallocated, or the owner exited)": neither was true (the
  # VM still held the region), and asking for a fresh ref of the same region failed the
  # same way. A freed chunk is zeroed only once nobody holds its liveness lock.
  @attach_zeroed ~S"""
  import os, sys, json, snakepit_shm
  ref = json.loads(sys.argv[1])
  fd = os.open(ref["control_path"], os.O_RDWR)
  os.pwrite(fd, bytes(4096), ref["control_offset"])
  for target in (ref, json.dumps(ref)):
      try:
          snakepit_shm.attach(target).close()
          print("ATTACHED")
      except snakepit_shm.SnakepitShmError as e:
          print(type(e).__name__, e)
  """

  test "a worker attaching a live arena region whose control block was zeroed is told it was overwritten" do
    {:ok, id} = SHM.allocate_region(4096)
    {:ok, ref} = SHM.export_ref(id)
    assert ref["control_offset"] != nil
    {:ok, json} = SHM.JSON.encode(ref)
    {out, 0} = ReliabilityHelpers.python(@attach_zeroed, [json])
    lines = String.split(out, "\n", trim: true)
    assert length(lines) == 2, out

    for line <- lines do
      assert line =~ ~r/^CorruptRegion region #{id}: its control block/, out
      assert line =~ "overwrote it", out
      refute line =~ "freed the region", out
    end

    :ok = SHM.deallocate_region(id)
  end

  # A worker attached to a region whose control block another process then overwrote
  # with zeros lost its result at the end of the `with` block: close() raised
  # CorruptRegion ("cannot release this process's hold: not a snakepit_shm header"),
  # so `with attach(...) as r: ...; return result` returned nothing. The hold belongs to
  # the worker's open of the control object (its slot lock), which close() closes: there
  # is nothing left to release in a header that is no longer one.
  @close_zeroed ~S"""
  import os, sys, json, snakepit_shm
  ref = json.loads(sys.argv[1])
  def work():
      with snakepit_shm.attach(ref, mode="rw") as region:
          region.write(0, b"result")
          fd = os.open(ref["control_path"], os.O_RDWR)
          os.pwrite(fd, bytes(4096), ref.get("control_offset") or 0)
          os.close(fd)
          return "RESULT"
  try:
      print(work())
  except snakepit_shm.SnakepitShmError as e:
      print(type(e).__name__, e)
  print("FDS", len(os.listdir("/proc/self/fd")))
  """

  for arena <- [true, false] do
    test "close() of a region whose control block was zeroed meanwhile keeps the result (arena: #{arena})" do
      {:ok, id} = SHM.allocate_region(4096, arena: unquote(arena))
      {:ok, ref} = SHM.export_ref(id)
      {:ok, json} = SHM.JSON.encode(ref)
      {out, 0} = ReliabilityHelpers.python(@close_zeroed, [json])
      assert out =~ ~r/^RESULT$/m, out
      :ok = SHM.deallocate_region(id)
    end
  end

  # The same for a dedicated memfd region: RegionBusy, "has no header yet while a
  # process holds it: its creator is still creating it ...; retry in a moment", for
  # ever. A creator may sit seconds between its lock and its header (a large fallocate,
  # a pooled object zeroed), so no wait tells the two apart: the message names both.
  @attach_zeroed_dedicated ~S"""
  import os, sys, json, snakepit_shm
  ref = json.loads(sys.argv[1])
  fd = os.open(ref["control_path"], os.O_RDWR)
  os.pwrite(fd, bytes(4096), 0)
  try:
      snakepit_shm.attach(ref).close()
      print("ATTACHED")
  except snakepit_shm.SnakepitShmError as e:
      print(type(e).__name__, e)
  """

  test "a worker attaching a live memfd region whose header was zeroed is told it may be overwritten" do
    {:ok, id} = SHM.allocate_region(4096, arena: false)
    {:ok, ref} = SHM.export_ref(id)
    {:ok, json} = SHM.JSON.encode(ref)
    {out, 0} = ReliabilityHelpers.python(@attach_zeroed_dedicated, [json])
    assert out =~ ~r/^RegionBusy region #{id} has no header yet/, out
    assert out =~ "another process of this user overwrote its header", out
    :ok = SHM.deallocate_region(id)
  end
end
