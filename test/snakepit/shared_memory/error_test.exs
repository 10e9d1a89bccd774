defmodule Snakepit.SharedMemory.ErrorTest do
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.Error

  describe "from_native/2" do
    test "moves the errno into details and never returns it raw" do
      error = Error.from_native({:not_found, "no such region", 2}, %{region_id: "x"})
      assert %Error{reason: :not_found, message: "no such region", details: details} = error
      assert details == %{region_id: "x", errno: 2}
    end

    test "adds what to do for reasons the core cannot advise on" do
      error = Error.from_native({:mlock_failed, "mlock failed", 12})
      assert error.message =~ "RLIMIT_MEMLOCK"
    end

    test "an unexpected shape is an io_error, not a crash" do
      assert %Error{reason: :io_error} = Error.from_native(:weird)
    end
  end

  describe "new/3 and error/3" do
    test "build the struct and the tuple; it can be raised" do
      assert {:error, %Error{reason: :busy, details: %{}}} = Error.error(:busy, "busy")
      assert_raise Error, "boom", fn -> raise Error.new(:x, "boom") end
    end
  end

  describe "format_bytes/1" do
    test "binary units" do
      assert Error.format_bytes(512) == "512 bytes"
      assert Error.format_bytes(2 * 1024 * 1024 * 1024) == "2 GiB"
      assert Error.format_bytes(1536) == "1.5 KiB (1536 bytes)"
      assert Error.format_bytes(:infinity) == "unlimited"
    end
  end
end
