Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.ConfigTest do
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory.Config

  describe "validate/1" do
    test "fills every default" do
      assert {:ok, config} = Config.validate([])
      assert Map.keys(config) |> Enum.sort() == Config.defaults() |> Keyword.keys() |> Enum.sort()
      assert config.holder_scan_interval == 200
    end

    test "a bad value or an unknown key names the key" do
      for {key, value} <- [
            max_regions: -1,
            max_region_size: :infinity,
            cleanup_interval: 0,
            security_level: :paranoid,
            default_backend: :tmpfs,
            zero_on_free: "yes",
            audit_log_level: :loud
          ] do
        assert {:error, message} = Config.validate([{key, value}])
        assert message =~ "config :snakepit_shm, #{key}:"
        assert message =~ inspect(value)
      end

      assert {:error, message} = Config.validate(max_region: 5)
      assert message =~ "unknown key config :snakepit_shm, max_region:"
    end

    test "barrier_timeout was removed: setting it says so and what to do" do
      refute Keyword.has_key?(Config.defaults(), :barrier_timeout)
      assert {:error, message} = Config.validate(barrier_timeout: 5_000)
      assert message =~ "barrier_timeout: 5000 was removed"
      assert message =~ "delete this setting"
    end
  end

  describe "load/0 and get/1" do
    test "reads the application environment" do
      Snakepit.SharedMemory.TestSupport.with_config([max_regions: 7], fn ->
        assert Config.get(:max_regions) == 7
      end)

      assert Config.get(:max_regions) != 7
    end

    test "an invalid setting fails the application start with a message naming it" do
      Application.stop(:snakepit_shm)
      Application.put_env(:snakepit_shm, :max_regions_per_process, 0)

      try do
        assert {:error, {{:snakepit_shm, message}, _where}} = Application.start(:snakepit_shm)

        assert message =~ "max_regions_per_process"
      after
        Application.delete_env(:snakepit_shm, :max_regions_per_process)
        Config.load()
        {:ok, _} = Application.ensure_all_started(:snakepit_shm)
      end
    end
  end
end
