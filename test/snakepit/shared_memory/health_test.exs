Code.require_file("../test_support.exs", __DIR__)
Code.require_file("../../mix/support/task_helpers.exs", __DIR__)

defmodule Snakepit.SharedMemory.HealthTest do
  # The health checks: thresholds, hysteresis, transitions (logged once, telemetry),
  # the periodic run, failure floods, and the doctor showing the very same checks.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Health, HealthMonitor, Manager, Stats}
  alias Snakepit.SharedMemory.{ShmHelpers, TaskHelpers, TestSupport}

  @t %{degraded: 80, critical: 95, hysteresis: 5}

  setup do
    before = TestSupport.vm_segments()
    # Every test starts from all-ok statuses.
    TestSupport.with_config(
      [health_thresholds: %{degraded: 99.9, critical: 100, hysteresis: 0}],
      fn ->
        capture_log(fn -> SM.health() end)
      end
    )

    on_exit(fn ->
      TestSupport.free_everything()
      TestSupport.assert_nothing_live(before)
    end)
  end

  defp check(report, name), do: Enum.find(report.checks, &(&1.name == name))

  defp status(name), do: check(SM.health(), name).status

  defp allocate(n, opts \\ []) do
    for _ <- 1..n//1 do
      {:ok, id} = SM.allocate_region(4096, opts)
      id
    end
  end

  # Telemetry events reach the test process through a stand-in :telemetry module.
  defp with_telemetry(fun) do
    parent = :erlang.pid_to_list(self())

    Code.compile_string("""
    defmodule :telemetry do
      def execute(name, measurements, metadata) do
        send(:erlang.list_to_pid(#{inspect(parent)}), {:telemetry, name, measurements, metadata})
        :ok
      end
    end
    """)

    try do
      fun.()
    after
      :code.purge(:telemetry)
      :code.delete(:telemetry)
      :code.purge(:telemetry)
    end
  end

  describe "usage_status/3 (thresholds and hysteresis)" do
    test "trips at the thresholds and recovers only below threshold - hysteresis" do
      assert Health.usage_status(79.9, :ok, @t) == :ok
      assert Health.usage_status(80.0, :ok, @t) == :degraded
      assert Health.usage_status(94.9, :degraded, @t) == :degraded
      assert Health.usage_status(95.0, :degraded, @t) == :critical
      # Hovering just under a threshold does not flap.
      assert Health.usage_status(94.0, :critical, @t) == :critical
      assert Health.usage_status(90.0, :critical, @t) == :critical
      assert Health.usage_status(89.9, :critical, @t) == :degraded
      assert Health.usage_status(76.0, :degraded, @t) == :degraded
      assert Health.usage_status(75.0, :degraded, @t) == :degraded
      assert Health.usage_status(74.9, :degraded, @t) == :ok
      assert Health.usage_status(74.9, :critical, @t) == :ok
      # Coming from ok, a value in the hysteresis band stays ok.
      assert Health.usage_status(78.0, :ok, @t) == :ok
      assert Health.usage_status(nil, :critical, @t) == :ok
    end
  end

  describe "the limit checks" do
    test ":regions trips at 80 % and 95 % of max_regions and recovers with hysteresis" do
      TestSupport.with_config([max_regions: 20], fn ->
        ids = allocate(15)
        assert status(:regions) == :ok
        [a] = allocate(1)
        r = check(SM.health(), :regions)
        assert {r.status, r.value, r.limit, r.percent} == {:degraded, 16, 20, 80.0}
        assert r.message =~ "max_regions"
        [b, c, d] = allocate(3)
        assert status(:regions) == :critical
        # 18 of 20 = 90 %: still critical (95 - 5); 17 = 85 %: degraded.
        :ok = SM.deallocate_region(d)
        assert status(:regions) == :critical
        :ok = SM.deallocate_region(c)
        assert status(:regions) == :degraded
        # 15 = 75 %: still degraded (80 - 5); 14 = 70 %: ok.
        :ok = SM.deallocate_region(b)
        :ok = SM.deallocate_region(a)
        assert status(:regions) == :degraded
        :ok = SM.deallocate_region(hd(ids))
        assert status(:regions) == :ok
      end)
    end

    test ":memory and :regions_per_process trip on bytes and on the busiest owner" do
      TestSupport.with_config([max_total_memory: 10 * 4096, max_regions_per_process: 4], fn ->
        allocate(4)
        report = SM.health()
        assert check(report, :regions_per_process).status == :critical
        assert check(report, :regions_per_process).measurements.owner == self()
        assert check(report, :regions_per_process).message =~ inspect(self())
        assert check(report, :memory).status == :ok
        # Another owner: the per-process count stays at 4, the bytes grow to 80 %.
        task = Task.async(fn -> allocate(4, cleanup_policy: :manual) end)
        Task.await(task)
        report = SM.health()
        assert check(report, :memory).status == :degraded
        assert check(report, :memory).value == 8 * 4096
        assert check(report, :memory).message =~ "max_total_memory"
        assert report.status == :critical
      end)
    end

    test "expired_held: a region past its idle timeout that a process still holds" do
      {:ok, id} = SM.allocate_region(4096, timeout: 100)
      {:ok, mapping} = SM.map_region(id)
      Process.sleep(250)
      r = check(SM.health(), :expired_held)
      assert {r.status, r.value, r.measurements.region_ids} == {:degraded, 1, [id]}
      assert r.message =~ id
      :ok = SM.unmap_region(mapping)
      Manager.sync()
      assert status(:expired_held) == :ok
    end

    test "dead_processes counts what was cleaned up since the previous check" do
      assert status(:dead_processes) == :ok
      Stats.count(:os_holders_released, 2)
      Stats.count(:orphans, 1)
      r = check(SM.health(), :dead_processes)
      assert r.status == :degraded
      assert r.measurements == %{orphaned_segments: 1, dead_holds_released: 2, leaked_segments: 0}
      # Nothing new since: back to ok.
      assert status(:dead_processes) == :ok
    end

    test "dead_processes: a worker killed while holding a region (SIGKILL, for real)" do
      assert status(:dead_processes) == :ok
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      {:ok, ref} = SM.export_ref(id)
      {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)

      script = """
      import os, signal, sys, time, snakepit_shm
      r = snakepit_shm.attach(sys.argv[1])
      print("ATTACHED", flush=True)
      time.sleep(0.5)   # the manager's holder scan sees us
      os.kill(os.getpid(), signal.SIGKILL)
      """

      {out, status} = Snakepit.SharedMemory.ReliabilityHelpers.python(script, [json])
      assert out =~ "ATTACHED" and status == 137, out

      assert ShmHelpers.wait_until(
               fn ->
                 r = check(SM.health(), :dead_processes)
                 r.status == :degraded and r.measurements.dead_holds_released >= 1
               end,
               5_000
             )

      # Nothing new since: back to ok (at the next check, or the one after if a worker
      # of an earlier test died in between: those deaths count too).
      assert ShmHelpers.wait_until(fn -> status(:dead_processes) == :ok end, 5_000)
    end

    test "memlock counts the pages :maximum regions lock" do
      {:ok, limits} = File.read("/proc/self/limits")
      [_, soft] = Regex.run(~r/^Max locked memory\s+(\S+)/m, limits)

      if soft == "unlimited" do
        IO.puts("skipped: RLIMIT_MEMLOCK is unlimited here, nothing to trip")
      else
        limit = String.to_integer(soft)
        size = div(limit, 4)
        before = check(SM.health(), :memlock).value
        # Thresholds just above the current use, below it plus one region.
        degraded = (before + div(size, 2)) * 100 / limit

        TestSupport.with_config(
          [health_thresholds: %{degraded: degraded, critical: 99, hysteresis: 0.01}],
          fn ->
            assert status(:memlock) == :ok
            {:ok, id} = SM.allocate_region(size, security_level: :maximum)
            r = check(SM.health(), :memlock)
            assert r.status == :degraded
            assert r.value >= before + size
            assert r.message =~ "RLIMIT_MEMLOCK"
            :ok = SM.deallocate_region(id)

            # The pages are unlocked when the region's last reference is collected.
            assert ShmHelpers.wait_until(
                     fn ->
                       :erlang.garbage_collect()
                       status(:memlock) == :ok
                     end,
                     5_000
                   )
          end
        )
      end
    end

    test "file_descriptors counts the VM's open fds against RLIMIT_NOFILE" do
      r = check(SM.health(), :file_descriptors)
      assert r.value > 0 and is_integer(r.limit)
      # Dedicated memfd regions hold two fds each: 20 regions move the count by 40
      # (arena: false: a region in an arena holds none of its own).
      degraded = (r.value + 20) * 100 / r.limit

      TestSupport.with_config(
        [health_thresholds: %{degraded: degraded, critical: 100, hysteresis: 0.0001}],
        fn ->
          ids = allocate(20, backend: :memfd, arena: false)
          r2 = check(SM.health(), :file_descriptors)
          assert r2.status == :degraded
          # The count is the whole VM's: descriptors of earlier tests' regions that the
          # reaper closes meanwhile lower it (85 against 86 in a full run). 30 still tells
          # two descriptors per region from one.
          assert r2.value >= r.value + 30
          for id <- ids, do: :ok = SM.deallocate_region(id)
          Manager.sync()
          :erlang.garbage_collect()

          assert ShmHelpers.wait_until(fn -> status(:file_descriptors) == :ok end, 5_000),
                 "fds did not come back: #{inspect(check(SM.health(), :file_descriptors))}"
        end
      )
    end

    test "shm_space is critical when the configured shm_path is gone" do
      # Found by an attack run: the directory removed after start (an unmounted tmpfs, a
      # cleaned-up /tmp) left every POSIX allocation failing while health said :ok.
      dir = Path.join(System.tmp_dir!(), "spshm_health_#{System.unique_integer([:positive])}")
      File.mkdir_p!(dir)

      try do
        TestSupport.with_config([shm_path: dir], fn ->
          assert Health.run() |> check(:shm_space) |> Map.fetch!(:status) == :ok
          File.rmdir!(dir)
          shm = Health.run() |> check(:shm_space)
          assert shm.status == :critical
          assert shm.message =~ dir
          assert shm.message =~ "shm_path"
        end)
      after
        File.rm_rf(dir)
      end
    end

    test "host_memory, shm_space and cgroup_memory report what they measure" do
      report = SM.health()
      host = check(report, :host_memory)
      assert host.limit > 0 and host.value > 0 and host.value < host.limit
      shm = check(report, :shm_space)
      assert shm.measurements.path == "/dev/shm" and shm.measurements.tmpfs == true

      # Thresholds under the host's current use trip the host check.
      low = max(host.percent / 4, 0.002)

      TestSupport.with_config(
        [health_thresholds: %{degraded: low, critical: low * 2, hysteresis: low / 2}],
        fn ->
          r = check(SM.health(), :host_memory)
          assert r.status == :critical
          assert r.message =~ "memory available"
        end
      )
    end
  end

  describe "transitions" do
    test "log once per change, with telemetry, and every check emits its measurements" do
      with_telemetry(fn ->
        TestSupport.with_config([max_regions: 10], fn ->
          allocate(8)

          log =
            capture_log(fn ->
              for _ <- 1..3, do: SM.health()
            end)

          assert [_] = Regex.scan(~r/health: regions ok -> degraded/, log)
          assert log =~ "[warning]" or log =~ "[warn"

          assert_received {:telemetry, [:snakepit_shm, :health, :transition], %{percent: 80.0},
                           %{name: :regions, from: :ok, to: :degraded, message: message}}

          assert message =~ "max_regions"

          refute_received {:telemetry, [:snakepit_shm, :health, :transition], _,
                           %{name: :regions}}

          assert_received {:telemetry, [:snakepit_shm, :health, :check],
                           %{value: 8, limit: 10, percent: 80.0, regions: 8},
                           %{name: :regions, status: :degraded}}

          allocate(2)
          log = capture_log(fn -> SM.health() end)
          assert log =~ ~r/\[error\].*health: regions degraded -> critical/s
          TestSupport.free_everything()

          log =
            capture_log([level: :notice], fn ->
              Logger.configure(level: :notice)

              try do
                SM.health()
              after
                Logger.configure(level: :warning)
              end
            end)

          assert log =~ "health: regions critical -> ok: recovered"

          assert_received {:telemetry, [:snakepit_shm, :health, :transition], _,
                           %{name: :regions, from: :critical, to: :ok}}
        end)
      end)
    end

    test "the periodic check runs every health_check_interval without being asked" do
      with_telemetry(fn ->
        TestSupport.with_config([health_check_interval: 50], fn ->
          restart_monitor()

          assert_receive {:telemetry, [:snakepit_shm, :health, :check], _, %{name: :regions}},
                         2_000

          assert_receive {:telemetry, [:snakepit_shm, :health, :check], _, %{name: :regions}},
                         2_000

          assert %{status: _, checks: [_ | _]} = HealthMonitor.last()
        end)

        restart_monitor()
      end)
    end

    test "telemetry: false (Snakepit's telemetry_enabled: false) silences the events" do
      with_telemetry(fn ->
        TestSupport.with_config([telemetry: false], fn ->
          SM.health()
          refute_received {:telemetry, _, _, _}
        end)

        SM.health()
        assert_received {:telemetry, [:snakepit_shm, :health, :check], _, _}
      end)
    end

    test "health_check_interval: false runs no periodic check" do
      with_telemetry(fn ->
        TestSupport.with_config([health_check_interval: false], fn ->
          restart_monitor()
          refute_receive {:telemetry, [:snakepit_shm, :health, :check], _, _}, 300
          assert HealthMonitor.last() == nil
          assert %{checks: [_ | _]} = SM.health()
        end)

        restart_monitor()
      end)
    end
  end

  defp restart_monitor do
    :ok = Supervisor.terminate_child(Snakepit.SharedMemory.HealthSupervisor, HealthMonitor)
    {:ok, _} = Supervisor.restart_child(Snakepit.SharedMemory.HealthSupervisor, HealthMonitor)
  end

  describe "failure floods" do
    test "many allocation failures of one kind give one summary line, not one per call" do
      TestSupport.with_config([max_regions: 1], fn ->
        allocate(1)

        log =
          capture_log(fn ->
            for _ <- 1..200,
                do: {:error, %{reason: :region_limit_exceeded}} = SM.allocate_region(4096)

            # The summary comes within the next second.
            Process.sleep(1_300)
          end)

        lines = Regex.scan(~r/(\d+) operation\(s\) failed with :region_limit_exceeded/, log)
        assert length(lines) in [1, 2], log
        assert lines |> Enum.map(fn [_, n] -> String.to_integer(n) end) |> Enum.sum() == 200
      end)
    end
  end

  describe "the doctor" do
    test "shows the very checks of health/0, with the same statuses" do
      TestSupport.with_config([max_regions: 10], fn ->
        allocate(9)
        report = SM.health()

        {out, _err, _status} = TaskHelpers.run_task("snakepit.shm.doctor", ["--format", "json"])

        doctor = TaskHelpers.json!(out)

        rows =
          for %{"check" => "health: " <> name, "status" => status} <- doctor["findings"],
              do: {name, status}

        expected =
          for c <- report.checks,
              do:
                {Atom.to_string(c.name),
                 %{ok: "ok", degraded: "warn", critical: "fail"}[c.status]}

        # host memory and fds move between the two runs: compare names, and statuses of
        # the limit checks this test controls.
        assert Enum.map(rows, &elem(&1, 0)) == Enum.map(expected, &elem(&1, 0))
        assert {"regions", "warn"} in rows
        assert {"regions", "warn"} in expected
        assert doctor["health"]["status"] in ["ok", "degraded", "critical"]
        assert length(doctor["health"]["checks"]) == length(Health.names())
      end)
    end
  end

  describe "with the application stopped" do
    test "health/0 says the application is not running (critical), not :ok" do
      :ok = Application.stop(:snakepit_shm)

      try do
        report = SM.health()
        assert report.status == :critical
        assert [%{name: :application, status: :critical, message: message} | rest] = report.checks
        assert message =~ "not running"
        # The host's own checks are still there, after it.
        assert Enum.any?(rest, &(&1.name == :shm_space))
      after
        {:ok, _} = Application.ensure_all_started(:snakepit_shm)
      end

      refute Enum.any?(SM.health().checks, &(&1.name == :application))
    end
  end
end
