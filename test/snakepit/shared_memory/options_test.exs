defmodule Snakepit.SharedMemory.OptionsTest do
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.{Error, Options}

  defp reason({:error, %Error{reason: reason}}), do: reason

  describe "allocate/2" do
    test "defaults" do
      {:ok, opts} = Options.allocate(100, [])

      assert %{
               size: 100,
               mode: 0o600,
               timeout: :infinity,
               security_level: :standard,
               access_mode: :read_write,
               cleanup_policy: :automatic,
               allowed: [],
               metadata: %{},
               metadata_json: "{}",
               name: nil,
               open_mode: :create,
               backend: :memfd
             } = opts

      assert opts.owner == self()
    end

    test "names pick POSIX; a name is required for open modes" do
      assert {:ok, %{backend: :posix, name: "abc-1", open_mode: :create_or_open}} =
               Options.allocate(1, name: "abc-1", open_mode: :create_or_open)

      assert reason(Options.allocate(1, open_mode: :open_only)) == :invalid_option
      assert reason(Options.allocate(1, name: "x", open_mode: :append)) == :invalid_option
      assert reason(Options.allocate(1, name: String.duplicate("a", 22))) == :invalid_option
      assert reason(Options.allocate(1, name: "a/b")) == :invalid_option
    end

    test "unknown options are listed with the accepted ones" do
      {:error, error} = Options.allocate(1, colour: :red, size: 3)
      assert error.message =~ ":colour"
      assert error.message =~ "accepted: :permissions"
    end

    test "a struct is not an options map" do
      assert reason(Options.allocate(1, %URI{})) == :invalid_option
    end

    test "metadata holding an improper list is :invalid_metadata, not a raise" do
      assert reason(Options.allocate(1, metadata: %{a: [1 | 2]})) == :invalid_metadata
    end

    test "an improper list of :allowed_processes is :invalid_option, not a raise" do
      assert reason(Options.allocate(1, allowed_processes: [self() | self()])) ==
               :invalid_option
    end

    test "metadata must fit the header" do
      assert {:ok, %{metadata_json: ~s({"a":1})}} = Options.allocate(1, metadata: %{a: 1})
      big = %{"x" => String.duplicate("y", 1785)}
      assert reason(Options.allocate(1, metadata: big)) == :metadata_too_large
      assert {:ok, _} = Options.allocate(1, metadata: %{"x" => String.duplicate("y", 1784)})
    end
  end

  describe "map/1" do
    test "access mode or nil" do
      assert Options.map([]) == {:ok, %{access_mode: nil}}
      assert Options.map(%{access_mode: :read_only}) == {:ok, %{access_mode: :read_only}}
      assert reason(Options.map(access_mode: :rw)) == :invalid_option
    end
  end

  describe "export/1" do
    test "include_key, dtype, shape" do
      assert Options.export([]) == {:ok, %{include_key: false, dtype: nil, shape: nil}}

      assert {:ok, %{include_key: true, shape: [2, 3]}} =
               Options.export(include_key: true, shape: [2, 3])

      assert reason(Options.export(include_key: 1)) == :invalid_option
      assert reason(Options.export(shape: [-1])) == :invalid_option
      assert reason(Options.export(shape: [2 | 3])) == :invalid_option

      assert reason(Snakepit.SharedMemory.Dtype.check_layout("uint8", [2 | 3], 6, "x")) ==
               :invalid_option

      assert reason(Options.export(dtype: :f32)) == :invalid_option
    end
  end

  describe "filter/1" do
    test "validates each key" do
      assert {:ok, %{sealed: true}} = Options.filter(sealed: true)
      assert reason(Options.filter(older_than: -1)) == :invalid_option
      assert reason(Options.filter(backend: :disk)) == :invalid_option
    end
  end

  describe "cleanup/1" do
    test "defaults; orphans follow expired_only" do
      assert {:ok, %{dry_run: false, expired_only: false, orphans: true, all: false}} =
               Options.cleanup([])

      assert {:ok, %{orphans: false}} = Options.cleanup(expired_only: true)
      assert reason(Options.cleanup(ids: "spshm_x")) == :invalid_option
      assert reason(Options.cleanup(ids: ["spshm_x" | "spshm_y"])) == :invalid_option
    end
  end
end
