# The scheduler part's report (issue 12): the default flags' table and, beside it, the
# same rounds in a peer VM started with +sbwt none. bench/lib is compiled by
# `mix snakepit.shm.bench` at run time, not with the library: required here. No timing.
for file <- ~w(stats format programs lifecycle handoff health board report_sections) do
  Code.require_file("../../bench/lib/#{file}.ex", __DIR__)
end

defmodule SnakepitShm.Bench.SchedulerReportTest do
  use ExUnit.Case, async: true

  alias SnakepitShm.Bench.ReportSections

  @ops ~w(idle_sleep otp_crypto_hash encrypt)a

  defp series(late_ms) do
    %{
      size: 64 * 1024 * 1024,
      gc_size: 256 * 1024 * 1024,
      ops: Map.new(@ops, &{&1, [round(late_ms * 1_000_000), 1_000_000]}),
      durations: Map.new(@ops, &{&1, [40_000_000, 41_000_000]}),
      phases: Map.new(@ops, &{&1, [:write, :none]})
    }
  end

  test "the +sbwt none rounds get their own table after the default one" do
    text = ReportSections.scheduler(Map.put(series(3.7), :sbwt_none, series(1.2)))
    [default, peer] = String.split(text, "peer VM started with `+sbwt none`")
    assert default =~ "| `encrypt` | 3.7 (write) / 1.0 | 40 / 41 |"
    assert peer =~ "| `encrypt` | 1.2 / 1.0 | 40 / 41 |"
    refute peer =~ "3.7"
    assert peer =~ "judged on the default flags"
  end

  test "a peer that could not run is said so; an older result without it reads as before" do
    failed =
      ReportSections.scheduler(Map.put(series(3.7), :sbwt_none, %{error: "nodistribution"}))

    assert failed =~ "could not run: nodistribution"
    refute failed =~ "| `encrypt` | 1.2"

    old = ReportSections.scheduler(series(3.7))
    refute old =~ "sbwt"
    assert old =~ "| `encrypt` | 3.7 (write) / 1.0 | 40 / 41 |"
  end
end
