defmodule Snakepit.SharedMemory.PlatformTest do
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.Platform
  alias Snakepit.SharedMemory.Platform.{Linux, MacOS, Windows}

  doctest Platform

  describe "select/1" do
    test "one module per OS" do
      assert Platform.select({:unix, :linux}) == {:ok, Linux}
      assert Platform.select({:unix, :darwin}) == {:ok, MacOS}
      assert Platform.select({:win32, :nt}) == {:ok, Windows}
      assert {:error, message} = Platform.select({:unix, :freebsd})
      assert message =~ "freebsd"
    end
  end

  describe "current/0" do
    test "is this machine's" do
      assert {:ok, Platform.current()} == Platform.select(:os.type())
    end
  end

  describe "resolve_backend/3" do
    test "auto picks the default, or the named backend when needed" do
      assert Platform.resolve_backend(Linux, :auto, false) == {:ok, :memfd}
      assert Platform.resolve_backend(Linux, :auto, true) == {:ok, :posix}
      assert Platform.resolve_backend(MacOS, :auto, false) == {:ok, :posix}
      assert Platform.resolve_backend(Windows, :auto, true) == {:ok, :windows}
    end

    test "refuses backends the OS lacks, and memfd for names" do
      assert {:error, message} = Platform.resolve_backend(MacOS, :memfd, false)
      assert message =~ "not available on macOS"
      assert {:error, message} = Platform.resolve_backend(Linux, :memfd, true)
      assert message =~ "memfd has no name"
      assert Platform.resolve_backend(Linux, :posix, true) == {:ok, :posix}
    end
  end

  describe "callbacks" do
    test "every platform declares its backends, default first, and its shm dir" do
      for platform <- [Linux, MacOS, Windows] do
        assert [default | _] = platform.backends()
        assert default == platform.default_backend()
        assert platform.named_backend() in platform.backends()
        assert is_binary(platform.name())
      end

      assert Linux.shm_dir() == "/dev/shm"
      assert MacOS.shm_dir() == nil
      assert Windows.shm_dir() == nil
    end
  end
end
