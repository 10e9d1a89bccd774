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

    test "timer periods beyond what a timer takes are refused, naming the key" do
      # Found by an attack run: cleanup_interval or health_check_interval of 2^50 ms passed
      # validation and the start crashed in erlang:send_after/3 (badarg, no key named);
      # holder_scan_interval crashed the manager once its event socket was lost; an
      # arena_grace over 2^40 ms was dropped by the NIF and the default silently kept.
      for key <- [:cleanup_interval, :holder_scan_interval, :health_check_interval, :arena_grace],
          value <- [2 ** 32, 2 ** 41, 2 ** 50] do
        assert {:error, message} = Config.validate([{key, value}]), "#{key}: #{value}"
        assert message =~ "config :snakepit_shm, #{key}:"
        assert message =~ "4294967295"
      end

      for key <- [:cleanup_interval, :holder_scan_interval, :health_check_interval, :arena_grace],
          do: assert({:ok, %{^key => 4_294_967_295}} = Config.validate([{key, 4_294_967_295}]))

      assert {:ok, %{arena_grace: 0}} = Config.validate(arena_grace: 0)
      assert {:error, _} = Config.validate(cleanup_interval: 0)

      assert {:ok, %{health_check_interval: false}} =
               Config.validate(health_check_interval: false)
    end

    test "barrier_timeout was removed: setting it says so and what to do" do
      refute Keyword.has_key?(Config.defaults(), :barrier_timeout)
      assert {:error, message} = Config.validate(barrier_timeout: 5_000)
      assert message =~ "barrier_timeout: 5000 was removed"
      assert message =~ "delete this setting"
    end
  end

  describe "load/0 and get/1" do
    for key <- [:cleanup_interval, :health_check_interval] do
      test "#{key} of 2^50 ms fails the start with a message naming it, not a crash" do
        Application.stop(:snakepit_shm)
        # config/test.exs sets cleanup_interval (100 ms): put it back as it was, or every
        # later test that waits for expiry or a sweep waits a minute.
        previous = Application.fetch_env(:snakepit_shm, unquote(key))
        Application.put_env(:snakepit_shm, unquote(key), 2 ** 50)

        try do
          assert {:error, {{:snakepit_shm, message}, _where}} = Application.start(:snakepit_shm)
          assert message =~ "config :snakepit_shm, #{unquote(key)}:"
        after
          case previous do
            {:ok, value} -> Application.put_env(:snakepit_shm, unquote(key), value)
            :error -> Application.delete_env(:snakepit_shm, unquote(key))
          end

          Config.load()
          {:ok, _} = Application.ensure_all_started(:snakepit_shm)
        end
      end
    end

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
