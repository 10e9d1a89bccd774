Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.SnakepitConfigTest do
  # config :snakepit, :shared_memory (the Snakepit design's keys) mapped onto this
  # application's settings; enabled: false; contradictions between the two configs.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.Config

  @gib 1024 * 1024 * 1024

  # The "Advanced Configuration" of the Snakepit design, verbatim.
  @advanced [
    enabled: true,
    max_regions: 10_000,
    max_region_size: 4_294_967_296,
    max_total_memory: 107_374_182_400,
    max_regions_per_process: 100,
    cleanup_interval: 30_000,
    default_timeout: 600_000,
    allocation_strategy: :best_fit,
    enable_defragmentation: true,
    security_level: :high,
    encryption_enabled: true,
    audit_access: true,
    secure_cleanup: true,
    platform_options: %{
      linux: %{use_hugepages: true, shm_path: "/dev/shm"},
      windows: %{use_large_pages: true, security_descriptor: :default}
    },
    telemetry_enabled: true,
    performance_monitoring: true,
    health_check_interval: 60_000
  ]

  describe "mapping (Config.validate/2)" do
    test "the design's advanced configuration gives these effective settings" do
      assert {:ok, config, notices} = Config.validate_with_notices([], @advanced)

      assert Map.take(config, [
               :enabled,
               :max_regions,
               :max_region_size,
               :max_total_memory,
               :max_regions_per_process,
               :cleanup_interval,
               :default_timeout,
               :security_level,
               :zero_on_free,
               :shm_path,
               :telemetry,
               :health_check_interval
             ]) == %{
               enabled: true,
               max_regions: 10_000,
               max_region_size: 4 * @gib,
               max_total_memory: 100 * @gib,
               max_regions_per_process: 100,
               cleanup_interval: 30_000,
               default_timeout: 600_000,
               security_level: :high,
               zero_on_free: true,
               shm_path: "/dev/shm",
               telemetry: true,
               health_check_interval: 60_000
             }

      # Keys with no meaning here are accepted, each with a notice that says why.
      for key <- ~w(audit_access allocation_strategy enable_defragmentation
                    performance_monitoring use_hugepages use_large_pages) do
        assert Enum.any?(notices, &(&1 =~ key)), "no notice for #{key}: #{inspect(notices)}"
      end

      assert length(notices) == 6
      assert Enum.all?(notices, &(&1 =~ "changes nothing"))
    end

    test "the basic configuration and encryption_enabled alone" do
      basic = [
        enabled: true,
        max_regions: 1000,
        max_region_size: 1_073_741_824,
        max_total_memory: 10_737_418_240,
        cleanup_interval: 60_000,
        default_timeout: 300_000,
        security_level: :standard
      ]

      assert {:ok, config} = Config.validate([], basic)

      assert {config.max_regions, config.default_timeout, config.security_level} ==
               {1000, 300_000, :standard}

      assert {:ok, %{security_level: :high}} = Config.validate([], encryption_enabled: true)
      assert {:ok, %{security_level: :standard}} = Config.validate([], encryption_enabled: false)

      assert {:ok, %{health_check_interval: false}} =
               Config.validate([], health_check_interval: false)

      assert {:ok, %{telemetry: false}} = Config.validate([], telemetry_enabled: false)
      assert {:ok, %{enabled: false}} = Config.validate([], enabled: false)
    end

    test "config :snakepit_shm wins where it satisfies the Snakepit key" do
      assert {:ok, %{security_level: :maximum}} =
               Config.validate([security_level: :maximum], encryption_enabled: true)

      assert {:ok, %{max_regions: 10}} = Config.validate([max_regions: 10], max_regions: 10)
    end

    test "a contradiction names both keys" do
      assert {:error, message} = Config.validate([max_regions: 5], max_regions: 10)
      assert message =~ "config :snakepit, :shared_memory, max_regions: 10"
      assert message =~ "config :snakepit_shm, max_regions: 5"

      assert {:error, message} =
               Config.validate([security_level: :standard], encryption_enabled: true)

      assert message =~ "encryption_enabled: true"
      assert message =~ "config :snakepit_shm, security_level: :standard"

      assert {:error, message} = Config.validate([zero_on_free: false], secure_cleanup: true)
      assert message =~ "secure_cleanup: true" and message =~ "zero_on_free: false"

      assert {:error, message} =
               Config.validate([shm_path: "/run"],
                 platform_options: %{linux: %{shm_path: "/dev/shm"}}
               )

      assert message =~ "platform_options.linux.shm_path" and
               message =~ "config :snakepit_shm, shm_path"

      # Two Snakepit keys against each other.
      assert {:error, message} =
               Config.validate([], encryption_enabled: false, security_level: :high)

      assert message =~ "encryption_enabled: false" and message =~ "security_level: :high"
    end

    test "unknown keys and bad values name the Snakepit key" do
      assert {:error, message} = Config.validate([], max_region: 5)
      assert message =~ "unknown key config :snakepit, :shared_memory, max_region"

      assert {:error, message} = Config.validate([], max_regions: -1)
      assert message =~ "config :snakepit, :shared_memory, max_regions: must be"

      assert {:error, message} = Config.validate([], platform_options: %{linux: %{shm_dir: "/x"}})
      assert message =~ "platform_options.linux.shm_dir"

      assert {:error, message} =
               Config.validate([], platform_options: %{linux: %{shm_path: "rel"}})

      assert message =~ "platform_options.linux.shm_path: must be"

      assert {:error, message} = Config.validate([], health_check_interval: 0)
      assert message =~ "health_check_interval"
    end

    test "malformed platform_options are an error naming the key, not a raise" do
      # Found by an attack run: Map.new/1 raised ArgumentError on these.
      for bad <- [[1], %{linux: [1]}, [{:linux, %{}, 3}], %{windows: [:x]}, %{linux: 5}] do
        assert {:error, message} = Config.validate([], platform_options: bad)
        assert message =~ "platform_options"
      end
    end

    test "a default_timeout too large for 64-bit nanoseconds names the key" do
      # Found by an attack run: accepted, then every allocation failed.
      huge = Bitwise.bsl(1, 70)
      assert {:error, message} = Config.validate(default_timeout: huge)
      assert message =~ "config :snakepit_shm, default_timeout"
      assert {:error, message} = Config.validate([], default_timeout: huge)
      assert message =~ "config :snakepit, :shared_memory, default_timeout"
    end

    test "health thresholds are validated and may be given in part" do
      assert {:ok, %{health_thresholds: %{degraded: 70, critical: 95, hysteresis: 5}}} =
               Config.validate(health_thresholds: %{degraded: 70})

      assert {:error, message} = Config.validate(health_thresholds: %{degraded: 96})
      assert message =~ "health_thresholds"

      # Found by an attack run: a misspelt key was ignored (the default applied).
      assert {:error, message} =
               Config.validate(health_thresholds: %{degraded: 70, hysterisis: 10})

      assert message =~ "health_thresholds"
    end
  end

  describe "starting the application" do
    test "with the Snakepit design's configuration only" do
      restart_with([], @advanced, fn ->
        assert {:ok, _} = Application.ensure_all_started(:snakepit_shm)
        config = Config.get()
        assert {config.max_regions, config.max_regions_per_process} == {10_000, 100}
        assert {config.security_level, config.zero_on_free} == {:high, true}
        {:ok, stats} = SM.stats()
        assert stats.limits.max_total_memory == 100 * @gib
        {:ok, id} = SM.allocate_region(4096)
        {:ok, info} = SM.get_region_info(id)
        assert info.security_level == :high
        assert info.encrypted
        assert info.timeout == 600_000
        :ok = SM.deallocate_region(id)
        assert Enum.any?(Config.notices(), &(&1 =~ "allocation_strategy"))
      end)
    end

    test "enabled: false starts the application and refuses allocations" do
      restart_with([], [enabled: false], fn ->
        assert {:ok, _} = Application.ensure_all_started(:snakepit_shm)
        assert {:error, %SM.Error{reason: :disabled, message: message}} = SM.allocate_region(4096)
        assert message =~ "enabled: false"
        assert {:ok, []} = SM.list_regions()
        assert %{checks: [_ | _]} = SM.health()
      end)
    end

    test "a contradiction fails the start with a message naming both keys" do
      restart_with([max_regions: 5], [max_regions: 10], fn ->
        assert {:error, {{:snakepit_shm, message}, _}} = Application.start(:snakepit_shm)
        assert message =~ "config :snakepit, :shared_memory, max_regions: 10"
        assert message =~ "config :snakepit_shm, max_regions: 5"
      end)
    end
  end

  # Restarts the application with only `own` as config :snakepit_shm (plus the test
  # intervals) and `snakepit` as config :snakepit, :shared_memory; restores both.
  # (Restarts never sweep orphans: other suites on this machine may be keeping some.)
  defp restart_with(own, snakepit, fun) do
    Application.stop(:snakepit_shm)
    saved = Application.get_all_env(:snakepit_shm)
    for {key, _} <- saved, do: Application.delete_env(:snakepit_shm, key)

    for {key, value} <- [{:orphan_sweep, false} | own],
        do: Application.put_env(:snakepit_shm, key, value)

    Application.put_env(:snakepit, :shared_memory, snakepit)

    try do
      fun.()
    after
      Application.stop(:snakepit_shm)
      Application.delete_env(:snakepit, :shared_memory)

      for {key, _} <- Application.get_all_env(:snakepit_shm),
          do: Application.delete_env(:snakepit_shm, key)

      for {key, value} <- saved, do: Application.put_env(:snakepit_shm, key, value)
      Application.put_env(:snakepit_shm, :orphan_sweep, false)
      {:ok, _} = Application.ensure_all_started(:snakepit_shm)
      Application.put_env(:snakepit_shm, :orphan_sweep, Keyword.get(saved, :orphan_sweep, true))
      {:ok, _} = Config.load()
    end
  end
end
