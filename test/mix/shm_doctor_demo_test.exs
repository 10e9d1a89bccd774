Code.require_file("support/task_helpers.exs", __DIR__)

defmodule Mix.Tasks.Snakepit.Shm.DoctorDemoTest do
  # doctor in this VM; demo and JSON output as a user runs them: `mix ...` in a
  # subprocess, its stdout piped through `/usr/bin/python3 -m json.tool`.
  use ExUnit.Case, async: false

  import Snakepit.SharedMemory.TaskHelpers

  setup_all do
    # The doctor's region is this VM's; the demos run in their own VMs and check
    # themselves ("leftovers": []). Nothing of this VM's is left in /dev/shm.
    on_exit(fn -> assert Snakepit.SharedMemory.ShmHelpers.segments_created_by() == [] end)
  end

  @tasks ~w(snakepit.shm.list snakepit.shm.info snakepit.shm.cleanup snakepit.shm.stats
            snakepit.shm.doctor snakepit.shm.demo)

  describe "--help" do
    test "every task prints its documentation and exits 0" do
      for task <- @tasks do
        {out, _err, 0} = run_task(task, ["--help"])
        assert out =~ "mix #{task}", "#{task} --help shows no usage line"
        assert out =~ "## Exit status"
        assert Mix.Task.shortdoc(Mix.Task.get!(task)) =~ ~r/\w/
      end
    end

    test "every task refuses an unknown --format with exit 2" do
      for task <- @tasks do
        {_out, err, 2} = run_task(task, ["--format", "yaml"])
        assert err =~ "--format must be table or json"
      end
    end
  end

  describe "mix snakepit.shm.doctor" do
    test "checks the host and says what to do" do
      {out, _err, status} = run_task("snakepit.shm.doctor", [])

      for check <- [
            "NIF loads",
            "/dev/shm size",
            "leftover segments",
            "kernel",
            "RLIMIT_MEMLOCK",
            "RLIMIT_NOFILE",
            "systemd RemoveIPC",
            "memfd sealing",
            "message channel",
            "Python client",
            "numpy",
            "pidfd"
          ] do
        assert out =~ ~r/^#{Regex.escape(check)}\s+(ok|WARN|FAIL)\s/m,
               "no #{check} row in:\n#{out}"
      end

      # What the tests themselves depend on works on this machine.
      assert out =~ ~r/^NIF loads\s+ok/m
      assert out =~ ~r/^memfd sealing\s+ok\s+allocated a memfd region/m
      assert out =~ ~r/^Python client\s+ok/m
      assert out =~ ~r/^message channel\s+ok\s+shared-memory rings work/m
      assert status == if(out =~ ~r/^\S.*\s+FAIL\s/m, do: 1, else: 0)
      if out =~ ~r/\sWARN\s/, do: assert(out =~ "What to do:")
    end

    test "a missing interpreter is a failure (exit 1) with a fix; --strict fails on warnings" do
      {out, _err, 1} =
        run_task("snakepit.shm.doctor", ["--python", "/nonexistent/python3", "--format", "json"])

      %{"ok" => false, "findings" => findings} = json!(out)
      python = Enum.find(findings, &(&1["check"] == "Python client"))
      assert %{"status" => "fail", "detail" => "/nonexistent/python3 not found"} = python
      assert python["fix"] =~ "apt-get install python3"

      {out, _err, status} = run_task("snakepit.shm.doctor", ["--strict", "--format", "json"])
      warned = Enum.any?(json!(out)["findings"], &(&1["status"] != "ok"))
      assert status == if(warned, do: 1, else: 0)
    end
  end

  describe "as a user runs them (subprocess)" do
    test "mix snakepit.shm.demo hands the data over, checks it, times it and leaves nothing" do
      {out, status} = mix_cmd(["snakepit.shm.demo", "--mib", "4", "--repeat", "1"])
      assert status == 0, out

      assert out =~ "1. Started the :snakepit_shm application"
      assert out =~ "a 256 x 4096 float32 matrix"
      assert out =~ ~r/ok   every value equals the one Elixir wrote/
      assert out =~ ~r/ok   sum in float64: (\d+) \(expected \1\)/

      assert out =~
               ~r/ok   the array's data at 0x[0-9A-F]+ lies inside the shared mapping .* of \/memfd:spshm_\w+\.data/

      assert out =~ "Elixir read them back: all 256 are right."
      assert out =~ ~r/Erlang Port \(stdio, \{packet, 4\}\)\s+\S+ \S+\s+\d+ MB\/s\s+1\.0x/
      assert out =~ ~r/fresh region .*\d+ MB\/s/
      assert out =~ ~r/warm region .*\d+ MB\/s/
      assert out =~ "Nothing of ours is left"
      refute out =~ "FAIL"
    end

    test "--format json output parses with python's json.tool (list and demo, posix backend)" do
      {out, 0} =
        mix_cmd([
          "snakepit.shm.demo",
          "--mib",
          "1",
          "--repeat",
          "1",
          "--backend",
          "posix",
          "--format",
          "json"
        ])

      report = json_tool!(out)
      assert %{"ok" => true, "leftovers" => [], "row_sums_ok" => true} = report
      assert report["verify"]["zero_copy"] == true
      assert report["verify"]["mapping"]["path"] =~ ~r{^/dev/shm/spshm_}
      assert Map.keys(report["timings"]) |> Enum.sort() == ["fresh_region", "port", "warm_region"]

      {out, status} = mix_cmd(["snakepit.shm.list", "--format", "json"], quiet: true)
      assert status in [0, 1]
      assert %{"regions" => regions, "totals" => %{"regions" => _}} = json_tool!(out)
      assert is_list(regions)
    end
  end

  # Parses with /usr/bin/python3 -m json.tool (the reference parser), then with ours.
  defp json_tool!(text) do
    path = Path.join(System.tmp_dir!(), "shm_task_#{System.unique_integer([:positive])}.json")
    File.write!(path, text)

    try do
      {pretty, status} =
        System.cmd("/usr/bin/python3", ["-m", "json.tool", path], stderr_to_stdout: true)

      assert status == 0, "python's json.tool rejected:\n#{text}\n#{pretty}"
      json!(pretty)
    after
      File.rm(path)
    end
  end
end
