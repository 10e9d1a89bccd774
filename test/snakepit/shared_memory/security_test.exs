Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.SecurityTest do
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog

  alias Snakepit.SharedMemory.{Error, Security}

  doctest Security

  describe "normalize_permissions/1" do
    test "fills defaults, accepts keywords" do
      assert Security.normalize_permissions(%{}) ==
               {:ok, %{owner: :read_write, group: :none, other: :none}}

      assert Security.normalize_permissions(group: :read_only) ==
               {:ok, %{owner: :read_write, group: :read_only, other: :none}}
    end

    test "refuses unknown keys and values" do
      for bad <- [%{owner: :none}, %{world: :read_only}, %{group: :rw}, [:x], "0600"] do
        assert {:error, %Error{reason: :invalid_option}} = Security.normalize_permissions(bad)
      end
    end
  end

  describe "mode/1" do
    test "maps each class to its bits" do
      assert Security.mode(Security.default_permissions()) == 0o600
      assert Security.mode(%{owner: :read_only, group: :read_write, other: :read_only}) == 0o464
    end
  end

  describe "shared_beyond_owner?/1" do
    test "only owner-only sets stay private" do
      refute Security.shared_beyond_owner?(Security.default_permissions())
      assert Security.shared_beyond_owner?(%{owner: :read_write, group: :none, other: :read_only})
    end
  end

  describe "level_flags/1 and level_from_int/1" do
    test "each level turns on more" do
      assert %{encrypted: false, zero_on_free: false, lock_memory: false} =
               Security.level_flags(:standard)

      assert %{encrypted: true, zero_on_free: true, lock_memory: false} =
               Security.level_flags(:high)

      assert %{encrypted: true, lock_memory: true, audit: true} = Security.level_flags(:maximum)

      for level <- [:standard, :high, :maximum],
          do: assert(Security.level_from_int(Security.level_flags(level).level) == level)
    end
  end

  describe "authorize/5" do
    test "empty allow-list, the owner and listed pids pass; others are refused and logged" do
      other = spawn(fn -> :ok end)
      assert :ok = Security.authorize("spshm_x", self(), [], other, :map)
      assert :ok = Security.authorize("spshm_x", self(), [other], self(), :map)
      assert :ok = Security.authorize("spshm_x", nil, [other], other, :map)

      log =
        capture_log(fn ->
          assert {:error, %Error{reason: :permission_denied, details: details}} =
                   Security.authorize("spshm_x", nil, [other], self(), :seal)

          assert details.action == :seal
        end)

      assert log =~ "refused seal of spshm_x"
    end
  end

  describe "audit/4" do
    test "logs accesses to :maximum regions only, at the configured level" do
      Snakepit.SharedMemory.TestSupport.with_config([audit_log_level: :warning], fn ->
        log = capture_log(fn -> Security.audit(:maximum, "spshm_m", :read, %{bytes: 4}) end)
        assert log =~ "[warning]"
        assert log =~ "audit: read spshm_m"
        assert log =~ "bytes=4"
        assert capture_log(fn -> Security.audit(:high, "spshm_h", :read, %{}) end) == ""
      end)
    end
  end
end
