# The bench's own arithmetic and report bookkeeping (bench/lib is compiled by
# `mix snakepit.shm.bench` at run time, not with the library: required here, all of it,
# since the report and the targets call every part's module). No timing.
for file <- Path.wildcard(Path.expand("../../bench/lib/*.ex", __DIR__)) do
  Code.require_file(file)
end

defmodule SnakepitShm.Bench.ReportTest do
  use ExUnit.Case, async: true

  alias SnakepitShm.Bench.{Format, Report, Stats, Targets}

  describe "Stats.summary/1" do
    test "median, quartiles and extremes, whatever the input order" do
      s = Stats.summary([5, 1, 4, 2, 3])
      assert s.median == 3.0 and s.min == 1.0 and s.max == 5.0
      assert s.p25 == 2.0 and s.p75 == 4.0 and s.n == 5
    end

    test "interpolates the median of an even count" do
      assert Stats.summary([1, 2, 3, 10]).median == 2.5
    end
  end

  describe "Stats.paired_ratio/2" do
    test "takes the ratio inside each round, then summarises" do
      # Round 1: 10/5 = 2, round 2: 30/10 = 3, round 3: 8/2 = 4. The ratio of the
      # medians (10/5) would be 2: pairing must not give that.
      r = Stats.paired_ratio([10, 30, 8], [5, 10, 2])
      assert r.median == 3.0 and r.min == 2.0 and r.max == 4.0
    end
  end

  describe "Format" do
    test "sizes and times read as a person writes them" do
      assert Format.bytes(4096) == "4 KiB"
      assert Format.bytes(256 * 1024 * 1024) == "256 MiB"
      assert Format.bytes(1024 * 1024 * 1024) == "1 GiB"
      assert Format.time(1_500) == "1.50 µs"
      assert Format.time(25_000_000) == "25.0 ms"
      assert Format.ratio(%{median: 12.345, min: 9.0, max: 15.0}) == "12.3× (9.00–15.0)"
    end
  end

  describe "Targets.handoff_ratios/1" do
    test "a path twice as fast as the port in every round gives 2×" do
      row = %{
        samples: %{
          fresh: [4, 8],
          warm: [1, 2],
          port: [2, 4],
          port_1m: [2, 4],
          socket: [3, 6],
          reference: [1, 2]
        }
      }

      r = Targets.handoff_ratios(row)
      assert r.warm_vs_port.median == 2.0
      assert r.warm_vs_socket.median == 3.0
      assert r.warm_vs_reference.median == 1.0
      assert r.fresh_vs_port.median == 0.5
      assert r.channel_vs_port == nil, "a run from before the channel path has no ratio"
    end

    test "the channel path (b'): its ratios and the target 'faster than the Port at every size'" do
      row = fn size, channel, port ->
        %{
          size: size,
          breakdown: nil,
          samples: %{
            fresh: port,
            warm: port,
            port: port,
            port_1m: port,
            socket: port,
            reference: port,
            channel: channel
          }
        }
      end

      fast = row.(4096, [1, 2], [2, 4])
      assert Targets.handoff_ratios(fast).channel_vs_port.median == 2.0

      assert [%{part: "1", met: true, measured: "2.00× (2.00–2.00) at 4 KiB"}] =
               Targets.evaluate(%{handoff: [fast, row.(1_048_576, [1, 1], [3, 3])]})

      assert [%{met: false, reason: reason, measured: measured}] =
               Targets.evaluate(%{handoff: [fast, row.(1_048_576, [4, 4], [3, 3])]})

      assert measured =~ "at 1 MiB"
      assert reason =~ "the Port was as fast or faster at 1 MiB"
      assert Targets.evaluate(%{handoff: []}) == []
    end
  end

  describe "the part channel's targets (issue 15)" do
    test "64 B round trip and 256 B one way, from the paired ratios of the rounds" do
      ratios = fn port, socket ->
        %{port: Stats.summary(port), socket: Stats.summary(socket), channel_socket: nil}
      end

      results = %{
        channel: %{
          rtt_ratios: %{64 => ratios.([2.0, 3.5, 4.0], [5.0, 5.0, 5.0])},
          oneway_ratios: %{256 => ratios.([3.0, 3.0, 9.0], [1.5, 1.9, 4.0])}
        }
      }

      assert [
               %{part: "channel", what: "64 B round trip p50 vs Erlang Port", met: true} = rtt,
               %{what: "256 B one way, messages/s vs Erlang Port", met: true},
               %{what: "256 B one way, messages/s vs Unix socket", met: false, reason: reason}
             ] = SnakepitShm.Bench.Channel.targets(results)

      assert rtt.measured == "3.50× (2.00–4.00)"
      assert reason =~ "part \"channel\""
      assert SnakepitShm.Bench.Channel.targets(%{}) == []
    end
  end

  describe "Report.write/3" do
    @tag :tmp_dir
    test "keeps the run history across runs, newest first", %{tmp_dir: dir} do
      path = Report.write(results("2026-01-01T00:00:00Z"), [], dir)
      assert ^path = Report.write(results("2026-01-02T00:00:00Z"), [], dir)
      text = File.read!(path)

      [block] =
        Regex.run(~r/<!-- history:start -->(.*)<!-- history:end -->/s, text,
          capture: :all_but_first
        )

      rows = block |> String.split("\n", trim: true) |> Enum.drop(2)
      assert [newest, oldest] = rows
      assert newest =~ "2026-01-02" and oldest =~ "2026-01-01"
      assert text =~ "No target was measured in this run"
    end

    @tag :tmp_dir
    test "pads history rows written before a column existed", %{tmp_dir: dir} do
      old_row = "| 2025-12-31T00:00:00Z | abc | m | full | 1× | 1× | 1× | 1× | 1× | 0/0 |"

      File.write!(Path.join(dir, "RESULTS.md"), """
      <!-- history:start -->
      | h |
      |---|
      #{old_row}
      <!-- history:end -->
      """)

      text = File.read!(Report.write(results("2026-01-02T00:00:00Z"), [], dir))

      assert text =~
               "| 2025-12-31T00:00:00Z | abc | m | full | 1× | 1× | 1× | 1× | 1× | 0/0 | ? |"
    end
  end

  defp results(date) do
    %{
      meta: %{
        date: date,
        commit: "abc",
        machine: "test machine",
        kernel: "k",
        otp: "25",
        elixir: "1.14",
        python: "3.11",
        schedulers: 2,
        dirty_cpu_schedulers: 2,
        profile: :quick,
        duration_s: 1.0,
        load_average: "0.1 0.1 0.1",
        load_at_start: "0.1 0.1 0.1"
      }
    }
  end
end
