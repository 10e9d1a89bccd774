# Issue 13: quick bench runs never touch the committed report; the plots' ticks and
# target lines. bench/lib is compiled at run time by the task, so it is required here.
for file <- Path.wildcard(Path.expand("../../bench/lib/*.ex", __DIR__)) do
  Code.require_file(file)
end

defmodule SnakepitShm.Bench.RunnerPlotsTest do
  use ExUnit.Case, async: true

  import Bitwise, only: [<<<: 2]

  alias SnakepitShm.Bench.{Plots, Runner}

  @gp Path.expand("../../bench/gnuplot", __DIR__)

  test "only a full run of every part writes the committed bench/ report" do
    assert Runner.default_out(:full, Runner.parts()) == "bench"
    assert Runner.default_out(:full, Enum.reverse(Runner.parts())) == "bench"
    assert Runner.default_out(:quick, Runner.parts()) == "_build/bench-quick"
    assert Runner.default_out(:full, [:handoff]) == "_build/bench-quick"
  end

  test "the task's --help names every part of the runner, and --only accepts each" do
    {:docs_v1, _, _, _, %{"en" => help}, _, _} = Code.fetch_docs(Mix.Tasks.Snakepit.Shm.Bench)
    [only] = Regex.run(~r/--only PART.*?Defaults to all/s, help)

    for part <- Runner.parts() do
      assert only =~ ~r/\b#{part}\b/, "the --help of --only does not name #{part}"
    end
  end

  test "make bench QUICK=1 passes no --out, so the quick default applies" do
    makefile = File.read!(Path.expand("../../Makefile", __DIR__))
    [line] = Regex.run(~r/.*snakepit\.shm\.bench.*QUICK.*/, makefile)
    refute line =~ "--out"
  end

  test "tick labels name the measured sizes" do
    assert Plots.tic_label(4096) == ~s("4 KiB")
    assert Plots.tic_label(256 * 1024 * 1024) == ~s("256 MiB")
    assert Plots.tic_label(1024 * 1024 * 1024) == ~s("1 GiB")
    assert Plots.tic_label(1000) == ~s("1000 B")
  end

  test "the gnuplot scripts: ticks from the data, targets in handoff, labels that fit" do
    handoff = File.read!(Path.join(@gp, "handoff.gp"))
    zero_copy = File.read!(Path.join(@gp, "zero_copy.gp"))
    fresh = File.read!(Path.join(@gp, "fresh_pages.gp"))

    for script <- [handoff, zero_copy] do
      refute script =~ ~s("64 MiB" 67108864), "a fixed tick list leaves empty ticks"
      assert script =~ "xtic("
    end

    assert handoff =~ "target for (b): 10 x (c)"
    assert handoff =~ "target for (a): 2 x (c)"
    assert handoff =~ "(b') warm region + channel message"
    assert fresh =~ "rotate by 30 right"
  end

  @tag :tmp_dir
  test "the plots render from data without a 64 MiB size", %{tmp_dir: dir} do
    gnuplot = System.find_executable("gnuplot")

    if gnuplot == nil do
      IO.puts("skipped the gnuplot rendering check: gnuplot is not installed (bench group)")
    else
      sizes = [4096, 65_536, 1 <<< 20, 16 <<< 20, 256 <<< 20, 1 <<< 30]

      rows =
        for s <- sizes,
            do: Enum.join([s | List.duplicate("1.0", 21)] ++ [Plots.tic_label(s)], " ")

      File.write!(Path.join(dir, "handoff.dat"), Enum.join(rows, "\n") <> "\n")

      {out, 0} =
        System.cmd(
          gnuplot,
          [
            "-e",
            "dir='#{@gp}/'; datadir='#{dir}'; out='#{dir}/handoff.png'",
            Path.join(@gp, "handoff.gp")
          ],
          stderr_to_stdout: true
        )

      assert out == "" or not (out =~ "error")
      assert File.stat!(Path.join(dir, "handoff.png")).size > 1000
    end
  end

  test "the README's figures are the committed report's, machine and date named" do
    root = Path.expand("../..", __DIR__)
    readme = File.read!(Path.join(root, "README.md"))
    results = File.read!(Path.join(root, "bench/RESULTS.md"))

    [_, block] = String.split(readme, "<!-- bench-summary:start", parts: 2)
    [block, _] = String.split(block, "<!-- bench-summary:end -->", parts: 2)
    [_, this_run] = String.split(results, "## This run", parts: 2)

    [machine, date | _] =
      this_run
      |> String.split("\n")
      |> Enum.find(&(String.starts_with?(&1, "| ") and not String.starts_with?(&1, "| machine")))
      |> String.trim("|")
      |> String.split(" | ")
      |> Enum.map(&String.trim/1)

    assert block =~ "full run of #{date} on #{machine}"

    [_, targets] = String.split(results, "## Targets", parts: 2)

    for "| " <> row <- String.split(block, "\n"), not String.starts_with?(row, "what") do
      [what, measured | _] = row |> String.trim("|") |> String.split(" | ")
      assert targets =~ "| #{what} |", "#{what} is not a target of the report"
      assert targets =~ "| #{measured} |", "#{what}: #{measured} is not the report's figure"
    end
  end

  @tag :tmp_dir
  test "a full run rewrites only the README's bench block", %{tmp_dir: dir} do
    readme = Path.join(dir, "README.md")
    start = "<!-- bench-summary:start (written by a full `make bench`) -->"
    File.write!(readme, "intro\n#{start}\nold figures\n<!-- bench-summary:end -->\noutro\n")

    meta = %{date: "2030-01-01T00:00:00Z", machine: "Test CPU, 2 cores", kernel: "6.1"}
    assert SnakepitShm.Bench.Report.update_readme(%{meta: meta}, readme) == :ok
    text = File.read!(readme)
    assert text =~ "intro\n#{start}\nFrom [`bench/RESULTS.md`]"
    assert text =~ "full run of 2030-01-01T00:00:00Z on Test CPU, 2 cores"
    refute text =~ "old figures"
    assert String.ends_with?(text, "<!-- bench-summary:end -->\noutro\n")

    File.write!(readme, "no markers\n")
    assert SnakepitShm.Bench.Report.update_readme(%{meta: meta}, readme) == :no_markers
    assert File.read!(readme) == "no markers\n"
  end

  test "the ASan script names a hang a hang, not a missing ASan" do
    script = Path.expand("../../scripts/test-asan-nif.sh", __DIR__)
    classify = fn args -> elem(System.cmd("bash", [script, "--classify" | args]), 0) end

    assert classify.(["124", "1", "1800", "log"]) =~ "did not finish within 1800 s"
    assert classify.(["124", "0", "1800", "log"]) =~ "a test hangs"
    assert classify.(["2", "1", "1800", "log"]) =~ "tests failed under ASan"
    assert classify.(["1", "0", "1800", "log"]) =~ "before confirming"
    assert classify.(["0", "0", "1800", "log"]) =~ "never confirmed"
    assert classify.(["0", "1", "1800", "log"]) == ""
  end
end
