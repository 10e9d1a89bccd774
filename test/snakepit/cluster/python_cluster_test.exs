defmodule Snakepit.SharedMemory.PythonClusterTest do
  # A region of another node, a Python worker of this one: fetch straight into the
  # region the worker is attached to, and a ref of another host refused by attach.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.ClusterHelpers

  alias Snakepit.SharedMemory, as: SHM
  alias Snakepit.SharedMemory.{JSON, ReliabilityHelpers}

  @moduletag timeout: 300_000

  # Attaches the ref given as argv[1] read-write, says "attached", waits for a line on
  # stdin, then prints the SHA-256 of the region's bytes as it sees them.
  @worker ~S"""
  import hashlib, json, sys
  import snakepit_shm

  try:
      region = snakepit_shm.attach(json.loads(sys.argv[1]), mode="rw")
  except snakepit_shm.ForeignHostRegion as exc:
      print("foreign " + str(exc), flush=True)
      sys.exit(0)
  print("attached", flush=True)
  sys.stdin.readline()
  print("sha256 " + hashlib.sha256(region.buf).hexdigest(), flush=True)
  region.close()
  """

  setup_all do
    ensure_distributed!()
    {peer, a} = start_peer!("shmpy")
    settle!([node(), a], 2)
    on_exit(fn -> stop_peer(peer) end)
    %{a: a}
  end

  test "fetch into: a region a Python worker is attached to", c do
    id = remote(c.a, :filled_region, [3_000_000])
    settle!([node(), c.a], 2)
    source_digest = remote(c.a, :digest, [id])
    {:ok, target} = SHM.allocate_region(3_000_000)
    {:ok, ref} = SHM.export_ref(target)
    port = worker(ref)
    assert line(port) == "attached"
    assert {:ok, %{mapped_by: [%{os_pid: _}]}} = SHM.get_region_info(target)

    assert {:ok, ^target} = SHM.fetch(id, into: ref, chunk_size: 65_536)
    Port.command(port, "go\n")
    assert line(port) == "sha256 " <> Base.encode16(source_digest, case: :lower)

    :ok = SHM.deallocate_region(target)
    :ok = shm(c.a, :deallocate_region, [id])
  end

  test "a ref of another host is refused by attach; its fetched copy attaches", c do
    id = remote(c.a, :filled_region, [4096])
    {:ok, ref} = shm(c.a, :export_ref, [id])
    assert ref["boot_id"] == Snakepit.SharedMemory.Native.self_info().boot_id
    # The peer runs on this host: make its ref look like one of another host.
    <<first, rest::binary>> = ref["boot_id"]
    foreign = Map.put(ref, "boot_id", <<if(first == ?0, do: ?1, else: ?0), rest::binary>>)

    port = worker(foreign)
    assert "foreign " <> message = line(port)
    assert message =~ "lives on another host on node #{c.a}"
    assert message =~ "Snakepit.SharedMemory.fetch(ref)"

    {:ok, local} = SHM.fetch(foreign)
    {:ok, local_ref} = SHM.export_ref(local)
    port = worker(local_ref)
    assert line(port) == "attached"
    Port.command(port, "go\n")
    assert line(port) == "sha256 " <> Base.encode16(remote(c.a, :digest, [id]), case: :lower)

    :ok = SHM.deallocate_region(local)
    :ok = shm(c.a, :deallocate_region, [id])
  end

  defp worker(ref) do
    {:ok, json} = JSON.encode(ref)

    Port.open({:spawn_executable, "/usr/bin/python3"}, [
      :binary,
      :exit_status,
      :stderr_to_stdout,
      {:line, 65_536},
      args: ["-c", @worker, json],
      env: ReliabilityHelpers.python_env()
    ])
  end

  defp line(port) do
    receive do
      {^port, {:data, {:eol, line}}} -> line
      {^port, {:exit_status, status}} -> flunk("the worker exited with status #{status}")
    after
      60_000 -> flunk("the worker said nothing for 60 s")
    end
  end
end
