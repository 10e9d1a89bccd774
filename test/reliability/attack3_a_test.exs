defmodule Snakepit.SharedMemory.Reliability.Attack3ATest do
  # Attack run 3, area A: the public API's option lists used carelessly.
  use Snakepit.SharedMemory.ReliabilityCase, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.Error

  # A marker of kind "shm" whose "ref" was not a map was refused as a marker "of kind
  # \"shm\": only kind \"shm\" carries a shared memory region" (contradicting itself).
  test "a shm marker with a bad ref names the ref" do
    for ref <- [5, nil, "x", [1]] do
      marker = %{"__snakepit_zero_copy__" => true, "kind" => "shm", "ref" => ref}

      assert {:error, %Error{reason: :invalid_argument, message: message}} =
               SM.from_zero_copy_ref(marker)

      assert message =~ ~s("ref" must be the map of export_ref/2, got: #{inspect(ref)})
    end

    marker = %{"__snakepit_zero_copy__" => true, "kind" => "shm"}
    assert {:error, %Error{message: message}} = SM.from_zero_copy_ref(marker)
    assert message =~ "got: :missing"
  end

  # An option given twice was accepted silently, and the *last* value won (Map.new/1),
  # while Keyword.get/2 and every reader take the first: `[security_level: :high | opts]`
  # with opts holding `security_level: :standard` allocated a plaintext region.
  describe "an option given twice is refused, naming it" do
    defp refused_twice(result, key) do
      assert {:error, %Error{reason: :invalid_option, message: message}} = result
      assert message =~ "#{inspect(key)} given more than once"
    end

    test "allocate_region/2" do
      {:ok, before} = SM.list_regions()

      refused_twice(
        SM.allocate_region(4096, security_level: :high, security_level: :standard),
        :security_level
      )

      refused_twice(SM.allocate_region(4096, backend: :memfd, backend: :posix), :backend)

      refused_twice(
        SM.allocate_region(4096, permissions: [owner: :read_write, owner: :read_only]),
        :owner
      )

      assert {:ok, ^before} = SM.list_regions()
    end

    test "map_region/2, export_ref/2, list_regions/1, cleanup_regions/1, adopt_region/2" do
      {:ok, id} = SM.allocate_region(4096)

      try do
        refused_twice(
          SM.map_region(id, access_mode: :read_only, access_mode: :read_write),
          :access_mode
        )

        refused_twice(SM.export_ref(id, include_key: false, include_key: true), :include_key)
        refused_twice(SM.list_regions(sealed: true, sealed: false), :sealed)
        refused_twice(SM.cleanup_regions(dry_run: true, dry_run: false), :dry_run)
        refused_twice(SM.adopt_region(%{"id" => id}, owner: self(), owner: self()), :owner)
        # once each is still fine
        assert {:ok, m} = SM.map_region(id, access_mode: :read_only)
        assert :ok = SM.unmap_region(m)
      after
        SM.deallocate_region(id)
      end
    end

    test "StatusBoard.create/2" do
      refused_twice(
        Snakepit.SharedMemory.StatusBoard.create("a3dup", capacity: 4, capacity: 8),
        :capacity
      )

      assert {:error, %Error{reason: :not_found}} =
               Snakepit.SharedMemory.StatusBoard.snapshot("a3dup")
    end
  end
end
