Code.require_file("support/task_helpers.exs", __DIR__)

defmodule Mix.Tasks.Snakepit.Shm.QuotaTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  import Snakepit.SharedMemory.TaskHelpers

  alias Snakepit.SharedMemory.HostQuota, as: HQ
  alias Snakepit.SharedMemory.HostQuota.Client

  setup do
    dir = Path.join(System.tmp_dir!(), "spshm_hqt_#{System.unique_integer([:positive])}")

    on_exit(fn ->
      for {_, pid, _, _} <- DynamicSupervisor.which_children(HQ.Supervisor), is_pid(pid) do
        case :sys.get_state(pid, 1_000) do
          %{dir: ^dir, listen: _} -> Process.exit(pid, :kill)
          _ -> :ok
        end
      end

      File.rm_rf!(dir)
    end)

    %{dir: dir}
  end

  defp client(dir, label) do
    {:ok, pid} = Client.start_link(dir: dir, label: label)
    Process.unlink(pid)
    on_exit(fn -> Process.exit(pid, :kill) end)
    pid
  end

  test "lists quotas, holders and waiters as a table and as JSON", %{dir: dir} do
    a = client(dir, "app@host")
    :ok = HQ.define("shm_total", 1000, client: a)
    :ok = HQ.define("gpu0", 4, client: a)
    {:ok, _} = HQ.reserve("shm_total", 600, client: a)
    {:ok, _} = HQ.reserve("shm_total", 100, client: a)
    waiter = spawn(fn -> HQ.reserve("shm_total", 500, client: a, wait: :infinity) end)
    on_exit(fn -> Process.exit(waiter, :kill) end)

    Stream.repeatedly(fn -> HQ.usage("shm_total", client: a) end)
    |> Enum.find(&match?({:ok, [%{waiters: [_]}]}, &1))

    {out, _err, 0} = run_task("snakepit.shm.quota", ["--dir", dir])
    assert out =~ ~r/shm_total\s+1000\s+700\s+300\s+1\s+1/
    assert out =~ ~r/gpu0\s+4\s+0\s+4\s+0\s+0/
    assert out =~ ~r/holder\s+node app@host \(os pid #{System.pid()}\)\s+700\s+2 reservation/
    assert out =~ ~r/waiter\s+node app@host \(os pid #{System.pid()}\)\s+500\s+waiting/
    # The node name is whatever this VM is called when the server started (other suites
    # make the test VM distributed for a while).
    assert out =~ ~r/served by \S+ \(os pid #{System.pid()}\)/

    {out, _err, 0} =
      run_task("snakepit.shm.quota", ["shm_total", "--dir", dir, "--format", "json"])

    json = json!(out)
    assert [%{"name" => "shm_total", "used" => 700, "limit" => 1000} = q] = json["quotas"]

    assert [%{"amount" => 700, "count" => 2, "kind" => "beam", "label" => "app@host"}] =
             q["holders"]

    assert [%{"amount" => 500}] = q["waiters"]
    assert json["server_os_pid"] == String.to_integer(System.pid())
  end

  test "no server, a refused directory, bad usage, --help", %{dir: dir} do
    File.mkdir_p!(dir)
    File.chmod!(dir, 0o700)
    {_out, err, 1} = run_task("snakepit.shm.quota", ["--dir", dir])
    assert err =~ "no host quota server at #{dir}/quota.sock"

    File.chmod!(dir, 0o755)
    {_out, err, 1} = run_task("snakepit.shm.quota", ["--dir", dir])
    assert err =~ "group/other permissions"

    {_out, err, 2} = run_task("snakepit.shm.quota", ["--bogus"])
    assert err =~ "unknown or malformed option --bogus"
    {_out, err, 2} = run_task("snakepit.shm.quota", ["bad name"])
    assert err =~ "is not a quota name"
    {_out, err, 2} = run_task("snakepit.shm.quota", ["--dir", dir, "--node", "a@b"])
    assert err =~ "exclude each other"
    {out, _err, 0} = run_task("snakepit.shm.quota", ["--help"])
    assert out =~ "mix snakepit.shm.quota [QUOTA]"
  end

  test "a socket that hangs up at once or answers garbage is a clean failure", %{dir: dir} do
    File.mkdir_p!(dir)
    File.chmod!(dir, 0o700)
    path = Path.join(dir, "quota.sock")
    {:ok, l} = :gen_tcp.listen(0, [:binary, active: false, ifaddr: {:local, path}])

    serve = fn answer ->
      spawn(fn ->
        Stream.repeatedly(fn ->
          {:ok, s} = :gen_tcp.accept(l)
          answer.(s)
        end)
        |> Stream.run()
      end)
    end

    # Hangs up with a reset (the serving VM killed between accept and HELLO): the
    # probe's send failed with a MatchError and a stack trace.
    acceptor =
      serve.(fn s ->
        :ok = :inet.setopts(s, linger: {true, 0})
        :gen_tcp.close(s)
      end)

    for _ <- 1..5 do
      {_out, err, 1} = run_task("snakepit.shm.quota", ["--dir", dir])
      assert err =~ "quota server", err
      refute err =~ "MatchError"
    end

    Process.exit(acceptor, :kill)

    acceptor =
      serve.(fn s ->
        :gen_tcp.send(s, <<0, 0, 0, 3, 1, 0x99, 0>>)
        Process.sleep(100)
        :gen_tcp.close(s)
      end)

    {_out, err, 1} = run_task("snakepit.shm.quota", ["--dir", dir])
    assert err =~ "bad answer from the quota server", err
    Process.exit(acceptor, :kill)
    :gen_tcp.close(l)
  end

  test "--node asks a running node's client", %{dir: dir} do
    {_, 0} = System.cmd("epmd", ["-daemon"])
    cookie = "c#{System.unique_integer([:positive])}"
    name = "shmquota#{System.unique_integer([:positive])}"

    body = """
    System.put_env("SNAKEPIT_SHM_QUOTA_DIR", "#{dir}")
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    alias Snakepit.SharedMemory.HostQuota
    :ok = HostQuota.define("lic", 3)
    {:ok, _} = HostQuota.reserve("lic", 2, owner: nil)
    IO.puts("READY \#{System.pid()} \#{node()}")
    Process.sleep(:infinity)
    """

    {_port, [vm, node]} = start_vm(body, ["--sname", name, "--cookie", cookie])

    on_exit(fn ->
      kill9(vm)
      :net_kernel.stop()
    end)

    {out, _err, 0} = run_task("snakepit.shm.quota", ["--node", node, "--cookie", cookie])
    assert out =~ ~r/lic\s+3\s+2\s+1\s+1\s+0/
    assert out =~ "node #{node}"
    assert out =~ ~r/holder\s+node #{node} \(os pid #{vm}\)\s+2/

    {out, _err, 0} =
      run_task("snakepit.shm.quota", [
        "lic",
        "--node",
        node,
        "--cookie",
        cookie,
        "--format",
        "json"
      ])

    assert %{"quotas" => [%{"name" => "lic", "used" => 2}]} = json!(out)
  end
end
