defmodule Snakepit.SharedMemory.NativeCase do
  @moduledoc false
  # Case template of the NIF-layer suites (test/native_*_test.exs): helpers, constants, and
  # a final check that no segment created by this VM is left in /dev/shm.
  use ExUnit.CaseTemplate

  alias Snakepit.SharedMemory.Native
  alias Snakepit.SharedMemory.ShmHelpers

  using do
    quote do
      import Snakepit.SharedMemory.NativeCase
      alias Snakepit.SharedMemory.Native
      alias Snakepit.SharedMemory.ShmHelpers

      @kib 1024
      @mib 1024 * 1024
      @gib 1024 * 1024 * 1024
      @u64_max 0xFFFF_FFFF_FFFF_FFFF
    end
  end

  setup_all do
    before = ShmHelpers.segments_created_by()

    on_exit(fn ->
      # Every test deallocates what it created: no segment of this VM may remain (other
      # VMs on the machine may be running their own suites, so only ours are counted).
      assert ShmHelpers.segments_created_by() -- before == []
    end)

    :ok
  end

  @doc "Creates a region (options merged into the defaults), deallocated when the test exits."
  def create!(size, overrides \\ %{}) do
    {:ok, region, info} = Native.create(size, ShmHelpers.create_opts(overrides))
    on_exit(fn -> Native.deallocate(region, false) end)
    {region, info}
  end

  def map!(region, mode \\ :read_write) do
    {:ok, mapping} = Native.map(region, mode)
    mapping
  end

  @doc "Asserts {:error, {reason, message, errno}} with a non-empty message; returns it."
  def assert_error(result, reason) do
    assert {:error, {^reason, message, errno}} = result
    assert is_binary(message) and byte_size(message) > 0
    assert is_integer(errno)
    message
  end

  @doc "Asserts that `fun` raises ArgumentError; `context` names the case on failure."
  def assert_badarg(context, fun) do
    fun.()
    flunk("expected ArgumentError for #{context}")
  rescue
    ArgumentError -> :ok
  end

  def refcount(region) do
    {:ok, header} = Native.header(region)
    header.refcount
  end

  @doc "A `sleep 60` child of the VM: {port, os_pid, start_time}."
  def spawn_sleep do
    port = Port.open({:spawn_executable, "/bin/sleep"}, [:exit_status, args: ["60"]])
    {:os_pid, os_pid} = Port.info(port, :os_pid)
    {:ok, start} = Native.process_start_time(os_pid)
    {port, os_pid, start}
  end

  @doc "`size` bytes (a multiple of 4) of a pattern that depends on `seed` (< 253)."
  def pattern(size, seed), do: :binary.copy(<<seed, seed + 1, seed + 2, seed + 3>>, div(size, 4))
end
