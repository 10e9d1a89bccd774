Code.require_file("support/task_helpers.exs", __DIR__)

defmodule Mix.Tasks.Snakepit.Shm.NodeTasksTest do
  # list, info, stats and cleanup with --node: a second, named VM runs the application;
  # the tasks reach it through distributed Erlang. Not async: the task turns this VM
  # into a (hidden) distributed node, stopped again at the end.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.TaskHelpers

  @node_vm """
  {:ok, _} = Application.ensure_all_started(:snakepit_shm)
  alias Snakepit.SharedMemory, as: SHM
  {:ok, a} = SHM.allocate_region(100_000, metadata: %{dtype: "uint8"}, timeout: 600_000)
  {:ok, b} = SHM.allocate_region(50_000, backend: :memfd)
  {:ok, m} = SHM.map_region(a)
  :ok = SHM.write(m, 0, "hello")
  IO.puts("READY \#{System.pid()} \#{node()} \#{a} \#{b}")
  Process.sleep(:infinity)
  """

  setup_all do
    {_, 0} = System.cmd("epmd", ["-daemon"])
    cookie = "c#{System.unique_integer([:positive])}"
    name = "shmtask#{System.unique_integer([:positive])}"
    {_port, [vm, node, a, b]} = start_vm(@node_vm, ["--sname", name, "--cookie", cookie])

    on_exit(fn ->
      # Only memfd regions: they die with the VM, nothing is left in /dev/shm.
      kill9(vm)
      :net_kernel.stop()
      assert Snakepit.SharedMemory.ShmHelpers.segments_created_by(String.to_integer(vm)) == []
    end)

    %{vm: vm, node: node, cookie: cookie, a: a, b: b}
  end

  defp remote(c), do: ["--node", c.node, "--cookie", c.cookie]

  test "list --node shows the node's regions, its OS pid as owner", c do
    {out, _err, 0} = run_task("snakepit.shm.list", remote(c))
    assert out =~ ~r/^#{c.a}\s+memfd\s+97\.7 KiB\s+#{c.vm} alive\s+1\s.*in 9m/m
    assert out =~ ~r/^#{c.b}\s+memfd\s+48\.8 KiB\s+#{c.vm} alive\s+0\s/m
    assert out =~ "Total: 2 regions, 146 KiB (node #{c.node})"

    {out, _err, 0} = run_task("snakepit.shm.list", remote(c) ++ ["--format", "json"])
    assert %{"source" => "node " <> _, "regions" => [_, _]} = json!(out)
  end

  test "info --node describes one region as its manager knows it", c do
    {out, _err, 0} = run_task("snakepit.shm.info", [c.a | remote(c)])
    assert out =~ ~r/^Owner VM:\s+OS pid #{c.vm} \(the node asked\), owner process #PID</m
    assert out =~ ~r/^Idle timeout:\s+10m, expires in/m
    assert out =~ ~r/^Header:\s+as reported by the node's manager$/m

    {_out, err, 1} = run_task("snakepit.shm.info", [random_id() | remote(c)])
    assert err =~ "no region"
  end

  test "stats --node prints the manager's counters", c do
    {out, _err, 0} = run_task("snakepit.shm.stats", remote(c))
    assert out =~ ~r/^Live regions:\s+2$/m
    assert out =~ ~r/^Allocations:\s+2$/m
    assert out =~ ~r/^allocate\s+2\s/m
    assert out =~ ~r/^write\s+1\s/m

    {out, _err, 0} = run_task("snakepit.shm.stats", remote(c) ++ ["--format", "json"])

    assert %{
             "active_regions" => 2,
             "active_bytes" => 150_000,
             "operations" => %{"allocate" => %{"count" => 2}}
           } = json!(out)
  end

  test "doctor --node shows the node's health checks (Snakepit.SharedMemory.health/0)", c do
    {out, _err, 0} = run_task("snakepit.shm.doctor", remote(c))
    assert out =~ ~r/^health: regions\s+ok\s+0\.0 % \(2 of 100000\)/m
    assert out =~ ~r/^health: memory\s+ok\s+146 KiB/m
    assert out =~ ~r/^health: shm_space\s+ok/m
    refute out =~ "NIF loads"

    {out, _err, 0} = run_task("snakepit.shm.doctor", remote(c) ++ ["--format", "json"])
    report = json!(out)
    assert report["health"]["status"] == "ok"
    assert length(report["findings"]) == length(Snakepit.SharedMemory.Health.names())
  end

  test "cleanup --node --dry-run asks the node's manager and frees nothing", c do
    {out, _err, 0} = run_task("snakepit.shm.cleanup", ["--dry-run" | remote(c)])
    assert out =~ "Nothing to clean up on #{c.node}."

    {out, _err, 0} = run_task("snakepit.shm.cleanup", ["--dry-run", "--id", c.b | remote(c)])
    assert out =~ ~r/^#{c.b}\s+would free\s+48\.8 KiB\s+requested$/m
    assert out =~ "#{c.node}: would free 1 region(s)."

    {_out, err, 2} = run_task("snakepit.shm.cleanup", ["--owner", "1" | remote(c)])
    assert err =~ "--owner OS_PID is an offline filter"
  end

  test "stats needs --node (exit 2); an unreachable node is exit 1", c do
    {_out, err, 2} = run_task("snakepit.shm.stats", [])
    assert err =~ "--node NAME is required"

    {_out, err, 1} =
      run_task("snakepit.shm.stats", ["--node", "nobody@nohost", "--cookie", c.cookie])

    assert err =~ "cannot connect to node nobody@nohost"
  end

  test "a wrong cookie and a node that does not run get different messages", c do
    # An earlier test of this VM may be connected already: a wrong cookie only shows on
    # a new connection.
    node = String.to_atom(c.node)
    Node.disconnect(node)
    on_exit(fn -> Node.set_cookie(node, String.to_atom(c.cookie)) end)
    {_out, err, 1} = run_task("snakepit.shm.stats", ["--node", c.node, "--cookie", "wrong"])
    assert err =~ "is running but refused the connection: the cookie does not match"

    [_, host] = String.split(c.node, "@")

    {_out, err, 1} =
      run_task("snakepit.shm.stats", ["--node", "nosuch_i13@" <> host, "--cookie", c.cookie])

    assert err =~ "no node named nosuch_i13 runs on #{host}"
  end
end
