Code.require_file("test_support.exs", __DIR__)

defmodule Snakepit.SharedMemoryTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Error, Mapping, Native, Registry}
  alias Snakepit.SharedMemory.{ShmHelpers, TestSupport}

  require Registry

  @kib 1024
  @mib 1024 * 1024

  setup do: TestSupport.no_leaks()

  defp error_reason({:error, %Error{reason: reason, message: message, details: details}}) do
    assert is_binary(message) and message != ""
    assert is_map(details)
    reason
  end

  describe "allocate_region/2" do
    test "returns a random spshm_ id, memfd by default, owner-only" do
      {:ok, id} = SM.allocate_region(4 * @kib)
      assert id =~ ~r/\Aspshm_[a-z2-7]{20}\z/
      {:ok, info} = SM.get_region_info(id)
      assert info.backend == :memfd
      assert info.size == 4 * @kib
      assert info.owner == self()
      assert info.cleanup_policy == :automatic
      assert info.permissions == %{owner: :read_write, group: :none, other: :none}
      refute File.exists?("/dev/shm/#{id}")
    end

    test "accepts options as a keyword list or a map" do
      {:ok, a} = SM.allocate_region(100, cleanup_policy: :manual)
      {:ok, b} = SM.allocate_region(100, %{cleanup_policy: :manual})
      assert {:ok, %{cleanup_policy: :manual}} = SM.get_region_info(a)
      assert {:ok, %{cleanup_policy: :manual}} = SM.get_region_info(b)
    end

    test "group or other permissions pick the POSIX backend, with the matching mode" do
      {:ok, id} = SM.allocate_region(@kib, permissions: %{group: :read_only})
      assert {:ok, %{backend: :posix}} = SM.get_region_info(id)
      %File.Stat{mode: mode} = File.stat!("/dev/shm/#{id}")
      assert Bitwise.band(mode, 0o777) == 0o640
    end

    test "memfd with group permissions is refused, saying why" do
      result = SM.allocate_region(@kib, backend: :memfd, permissions: %{other: :read_only})
      assert error_reason(result) == :unsupported
      {:error, error} = result
      assert error.message =~ "/proc/<pid>/fd"
    end

    test "invalid sizes and options are error tuples naming the problem" do
      assert error_reason(SM.allocate_region(0)) == :invalid_size
      assert error_reason(SM.allocate_region(-1)) == :invalid_size
      assert error_reason(SM.allocate_region(1.5)) == :invalid_size
      assert error_reason(SM.allocate_region(:big)) == :invalid_size
      assert error_reason(SM.allocate_region(10, bogus: 1)) == :invalid_option
      assert error_reason(SM.allocate_region(10, [:not_a_keyword])) == :invalid_option
      assert error_reason(SM.allocate_region(10, timeout: -5)) == :invalid_option
      assert error_reason(SM.allocate_region(10, security_level: :ultra)) == :invalid_option
      assert error_reason(SM.allocate_region(10, cleanup_policy: :whenever)) == :invalid_option
      assert error_reason(SM.allocate_region(10, allowed_processes: [:me])) == :invalid_option
      assert error_reason(SM.allocate_region(10, permissions: %{owner: :none})) == :invalid_option
      assert error_reason(SM.allocate_region(10, name: "Bad Name")) == :invalid_option
      assert error_reason(SM.allocate_region(10, open_mode: :create)) == :invalid_option
      assert error_reason(SM.allocate_region(10, backend: :floppy)) == :invalid_option
      dead = spawn(fn -> :ok end)
      TestSupport.await_death(dead)
      assert error_reason(SM.allocate_region(10, owner: dead)) == :invalid_option
      assert Registry.count() == 0
    end

    test "metadata is JSON-encoded into the header and limited to 1792 bytes" do
      {:ok, id} = SM.allocate_region(64, metadata: %{dtype: "float32", shape: [4, 4]})
      [record] = :ets.lookup(Registry.regions_table(), id)
      {:ok, header} = Native.header(Registry.region(record, :ref))
      assert header.metadata == ~s({"dtype":"float32","shape":[4,4]})

      {:error, error} = SM.allocate_region(64, metadata: %{blob: String.duplicate("x", 1800)})
      assert error.reason == :metadata_too_large
      assert error.message =~ "1792"
      assert error_reason(SM.allocate_region(64, metadata: %{pid: self()})) == :invalid_metadata
      assert error_reason(SM.allocate_region(64, metadata: [1])) == :invalid_metadata
    end

    test "size limit: the message says which setting to raise" do
      TestSupport.with_config([max_region_size: @mib], fn ->
        {:error, error} = SM.allocate_region(2 * @mib)
        assert error.reason == :size_exceeds_limit
        assert error.message =~ "region size 2 MiB exceeds max_region_size 1 MiB"
        assert error.message =~ "config :snakepit_shm, max_region_size:"
        assert {:ok, _} = SM.allocate_region(@mib)
      end)
    end

    test "total memory limit" do
      TestSupport.with_config([max_total_memory: 3 * @mib], fn ->
        {:ok, _} = SM.allocate_region(2 * @mib)
        {:error, error} = SM.allocate_region(2 * @mib)
        assert error.reason == :memory_limit_exceeded
        assert error.message =~ "max_total_memory 3 MiB"
        assert error.message =~ "config :snakepit_shm, max_total_memory:"
        assert {:ok, _} = SM.allocate_region(@mib)
        assert SM.stats() |> elem(1) |> Map.fetch!(:active_bytes) == 3 * @mib
      end)
    end

    test "region count limit" do
      TestSupport.with_config([max_regions: 3], fn ->
        for _ <- 1..3, do: {:ok, _} = SM.allocate_region(10)
        {:error, error} = SM.allocate_region(10)
        assert error.reason == :region_limit_exceeded
        assert error.message =~ "config :snakepit_shm, max_regions:"
        assert Registry.count() == 3
      end)
    end

    test "per-process limit counts regions by owner" do
      TestSupport.with_config([max_regions_per_process: 2], fn ->
        {:ok, _} = SM.allocate_region(10)
        {:ok, _} = SM.allocate_region(10)
        {:error, error} = SM.allocate_region(10)
        assert error.reason == :process_limit_exceeded
        assert error.message =~ "max_regions_per_process"
        other = spawn(fn -> Process.sleep(:infinity) end)
        assert {:ok, _} = SM.allocate_region(10, owner: other)
        Process.exit(other, :kill)
      end)
    end

    test "a refused allocation gives its reservation back" do
      TestSupport.with_config([max_total_memory: @mib], fn ->
        for _ <- 1..20, do: {:error, _} = SM.allocate_region(2 * @mib)
        assert {:ok, _} = SM.allocate_region(@mib)
      end)
    end

    test "named regions: create, open, create_or_open, remove_and_create" do
      name = ShmHelpers.unique_name("n")
      {:ok, id} = SM.allocate_region(@kib, name: name)
      assert id == "spshm_n_" <> name
      assert File.exists?("/dev/shm/#{id}")
      assert error_reason(SM.allocate_region(@kib, name: name)) == :already_exists
      assert {:ok, ^id} = SM.allocate_region(@kib, name: name, open_mode: :open_only)
      assert {:ok, ^id} = SM.allocate_region(@kib, name: name, open_mode: :create_or_open)
      {:ok, m} = SM.map_region(id)
      :ok = SM.write(m, 0, "old")
      assert {:ok, ^id} = SM.allocate_region(@kib, name: name, open_mode: :remove_and_create)
      {:ok, m2} = SM.map_region(id)
      assert {:ok, <<0, 0, 0>>} = SM.read(m2, 0, 3)
      assert Registry.count() == 1
      missing = ShmHelpers.unique_name("m")

      assert error_reason(SM.allocate_region(@kib, name: missing, open_mode: :open_only)) ==
               :not_found
    end

    test "a named region made by another process of ours is opened, not destroyed on free" do
      name = ShmHelpers.unique_name("o")
      opts = ShmHelpers.create_opts(%{backend: :posix, name: name})
      {:ok, foreign, info} = Native.create(8 * @kib, opts)
      {:ok, id} = SM.allocate_region(:any, name: name, open_mode: :open_only)
      assert {:ok, %{role: :opened, size: 8192}} = SM.get_region_info(id)
      :ok = SM.deallocate_region(id)
      assert File.exists?("/dev/shm/#{info.id}")
      :ok = Native.deallocate(foreign, false)
    end

    test "security levels: :high encrypts, :maximum also locks and audits" do
      {:ok, high} = SM.allocate_region(@kib, security_level: :high)
      assert {:ok, %{encrypted: true, security_level: :high}} = SM.get_region_info(high)

      case SM.allocate_region(@kib, security_level: :maximum) do
        {:ok, max} ->
          assert {:ok, %{encrypted: true, security_level: :maximum}} = SM.get_region_info(max)

        {:error, %Error{reason: :mlock_failed, message: message}} ->
          assert message =~ "RLIMIT_MEMLOCK"
      end
    end

    test "the owner option sets whose death frees an :automatic region" do
      owner = spawn(fn -> Process.sleep(:infinity) end)
      {:ok, id} = SM.allocate_region(@kib, owner: owner)
      assert {:ok, %{owner: ^owner}} = SM.get_region_info(id)
      Process.exit(owner, :kill)
      assert ShmHelpers.wait_until(fn -> Registry.lookup(id) == nil end)
    end
  end

  describe "map_region/2" do
    test "maps read-write by default and adds a hold" do
      {:ok, id} = SM.allocate_region(@kib)
      {:ok, %Mapping{mode: :read_write, size: 1024} = m} = SM.map_region(id)
      assert {:ok, %{reference_count: 1, mapped_by: [pid]}} = SM.get_region_info(id)
      assert pid == self()
      {:ok, _} = SM.map_region(id, access_mode: :read_only)
      assert {:ok, %{reference_count: 2, mapped_by: [^pid]}} = SM.get_region_info(id)
      :ok = SM.unmap_region(m)
    end

    test "unknown ids, bad ids and bad options" do
      assert error_reason(SM.map_region("spshm_nosuchregionxxxxxxx")) == :not_found
      assert error_reason(SM.map_region(42)) == :invalid_argument
      {:ok, id} = SM.allocate_region(10)
      assert error_reason(SM.map_region(id, access_mode: :write)) == :invalid_option
      assert error_reason(SM.map_region(id, mode: :read_only)) == :invalid_option
    end

    test ":allowed_processes refuses other processes, audited" do
      friend = spawn(fn -> Process.sleep(:infinity) end)
      {:ok, id} = SM.allocate_region(@kib, allowed_processes: [friend])
      parent = self()

      spawn(fn -> send(parent, {:stranger, SM.map_region(id)}) end)
      assert_receive {:stranger, {:error, %Error{reason: :permission_denied} = error}}
      assert error.message =~ ":allowed_processes"
      assert {:ok, _} = SM.map_region(id)
      {:ok, stats} = SM.stats()
      assert stats.events.access_denied >= 1
      Process.exit(friend, :kill)
    end

    test "access_mode: :read_only regions are read-only for everyone but the owner" do
      {:ok, id} = SM.allocate_region(@kib, access_mode: :read_only)
      assert {:ok, %Mapping{mode: :read_write}} = SM.map_region(id)
      parent = self()

      spawn(fn ->
        send(parent, {:default, SM.map_region(id)})
        send(parent, {:rw, SM.map_region(id, access_mode: :read_write)})
      end)

      assert_receive {:default, {:ok, %Mapping{mode: :read_only}}}
      assert_receive {:rw, {:error, %Error{reason: :permission_denied}}}
    end

    test "a mapping is unmapped when its process dies" do
      {:ok, id} = SM.allocate_region(@kib)
      parent = self()

      pid =
        spawn(fn ->
          {:ok, _} = SM.map_region(id)
          send(parent, :mapped)
          Process.sleep(:infinity)
        end)

      assert_receive :mapped
      assert {:ok, %{reference_count: 1, mapped_by: [^pid]}} = SM.get_region_info(id)
      Process.exit(pid, :kill)

      assert ShmHelpers.wait_until(fn ->
               match?({:ok, %{reference_count: 0, mapped_by: []}}, SM.get_region_info(id))
             end)
    end
  end

  describe "unmap_region/1" do
    test "removes the hold; a second unmap is :closed" do
      {:ok, id} = SM.allocate_region(@kib)
      {:ok, m} = SM.map_region(id)
      assert :ok = SM.unmap_region(m)
      assert {:ok, %{reference_count: 0, mapped_by: []}} = SM.get_region_info(id)
      assert error_reason(SM.unmap_region(m)) == :closed
      assert error_reason(SM.write(m, 0, "x")) == :closed
      assert error_reason(SM.unmap_region(:nope)) == :invalid_argument
    end
  end

  describe "deallocate_region/1" do
    test "frees at once; the id is gone and mappings are closed" do
      {:ok, id} = SM.allocate_region(@kib, backend: :posix)
      {:ok, m} = SM.map_region(id)
      assert File.exists?("/dev/shm/#{id}")
      assert :ok = SM.deallocate_region(id)
      refute File.exists?("/dev/shm/#{id}")
      assert error_reason(SM.get_region_info(id)) == :not_found
      assert error_reason(SM.deallocate_region(id)) == :not_found
      assert error_reason(SM.read(m, 0, 1)) in [:closed, :deallocated]
      assert error_reason(SM.unmap_region(m)) == :closed
    end

    test "exactly one of many concurrent callers frees" do
      {:ok, id} = SM.allocate_region(@kib, cleanup_policy: :manual)

      results =
        1..20
        |> Enum.map(fn _ -> Task.async(fn -> SM.deallocate_region(id) end) end)
        |> Enum.map(&Task.await/1)

      assert Enum.count(results, &(&1 == :ok)) == 1
      assert Enum.count(results, &match?({:error, %Error{reason: :not_found}}, &1)) == 19
    end

    test "allowed_processes also guards deallocation" do
      {:ok, id} = SM.allocate_region(@kib, allowed_processes: [self()], owner: self())
      parent = self()
      spawn(fn -> send(parent, SM.deallocate_region(id)) end)
      assert_receive {:error, %Error{reason: :permission_denied}}
      assert :ok = SM.deallocate_region(id)
    end
  end

  describe "write/3 and read/3" do
    test "round trip, iodata, offsets, bounds" do
      {:ok, id} = SM.allocate_region(@kib)
      {:ok, m} = SM.map_region(id)
      assert :ok = SM.write(m, 10, ["ab", ?c, ["de"]])
      assert {:ok, "abcde"} = SM.read(m, 10, 5)
      assert {:ok, ""} = SM.read(m, 1024, 0)
      assert error_reason(SM.write(m, 1020, "12345")) == :out_of_bounds
      assert error_reason(SM.read(m, 1000, 100)) == :out_of_bounds
      assert error_reason(SM.write(m, -1, "x")) == :invalid_argument
      assert error_reason(SM.read(m, 0, -1)) == :invalid_argument
      assert error_reason(SM.write(m, 0, [:not_iodata])) == :invalid_argument
      assert error_reason(SM.read(:x, 0, 1)) == :invalid_argument
    end

    test "large payloads (dirty schedulers), encrypted regions round trip" do
      payload = :crypto.strong_rand_bytes(3 * @mib + 17)

      for level <- [:standard, :high] do
        {:ok, id} = SM.allocate_region(4 * @mib, security_level: level)
        {:ok, m} = SM.map_region(id)
        assert :ok = SM.write(m, 5, payload)
        assert {:ok, ^payload} = SM.read(m, 5, byte_size(payload))
      end
    end

    test "tampering with an encrypted region is an error, not wrong data" do
      {:ok, id} = SM.allocate_region(4 * @kib, security_level: :high, backend: :posix)
      {:ok, m} = SM.map_region(id)
      :ok = SM.write(m, 0, "attack at dawn")
      {:ok, file} = File.open("/dev/shm/#{id}", [:read, :write, :binary])
      # The data starts at 4096: nonce (24 bytes), then ciphertext.
      {:ok, <<byte>>} = :file.pread(file, 4096 + 30, 1)
      :ok = :file.pwrite(file, 4096 + 30, <<Bitwise.bxor(byte, 1)>>)
      File.close(file)
      assert error_reason(SM.read(m, 0, 14)) == :tampered
    end

    test ":maximum regions audit every access" do
      TestSupport.with_config([audit_log_level: :warning], fn ->
        case SM.allocate_region(@kib, security_level: :maximum) do
          {:ok, id} ->
            log =
              ExUnit.CaptureLog.capture_log(fn ->
                {:ok, m} = SM.map_region(id)
                :ok = SM.write(m, 0, "x")
                {:ok, _} = SM.read(m, 0, 1)
              end)

            for action <- ["map", "write", "read"], do: assert(log =~ "audit: #{action} #{id}")

          {:error, %Error{reason: :mlock_failed}} ->
            :ok
        end
      end)
    end

    test "a forged mapping is an error, not a crash" do
      {:ok, id} = SM.allocate_region(@kib)
      {:ok, m} = SM.map_region(id)
      forged = %{m | ref: make_ref()}
      assert error_reason(SM.write(forged, 0, "x")) == :invalid_argument
      assert error_reason(SM.read(forged, 0, 1)) == :invalid_argument
      assert error_reason(SM.read(%{m | counters: nil}, 0, 1)) == :invalid_argument
    end

    test "a read-only mapping cannot write" do
      {:ok, id} = SM.allocate_region(@kib)
      {:ok, m} = SM.map_region(id, access_mode: :read_only)
      assert error_reason(SM.write(m, 0, "x")) == :permission_denied
    end

    test "access_count and last_accessed follow accesses" do
      {:ok, id} = SM.allocate_region(@kib)
      {:ok, %{access_count: 0}} = SM.get_region_info(id)
      {:ok, m} = SM.map_region(id)
      :ok = SM.write(m, 0, "x")
      {:ok, _} = SM.read(m, 0, 1)
      assert {:ok, %{access_count: 3, last_accessed: %DateTime{}}} = SM.get_region_info(id)
    end
  end

  describe "seal/1" do
    test "makes the region immutable; reads become zero-copy" do
      {:ok, id} = SM.allocate_region(@mib)
      {:ok, m} = SM.map_region(id)
      :ok = SM.write(m, 0, "sealed data")
      assert :ok = SM.seal(id)
      assert :ok = SM.seal(id)
      assert error_reason(SM.write(m, 0, "x")) == :sealed
      {:ok, bin} = SM.read(m, 0, @mib)
      assert binary_part(bin, 0, 11) == "sealed data"
      # A zero-copy binary refers to the mapping: it does not own a 1 MiB copy.
      assert :binary.referenced_byte_size(bin) < @mib
      assert {:ok, %{sealed: true}} = SM.get_region_info(id)
      assert {:ok, %Mapping{mode: :read_only}} = SM.map_region(id)
      # Zero-copy binaries survive unmap and deallocation.
      :ok = SM.unmap_region(m)
      :ok = SM.deallocate_region(id)
      assert binary_part(bin, 0, 11) == "sealed data"
    end

    test "unknown regions" do
      assert error_reason(SM.seal("spshm_nosuchregionxxxxxxx")) == :not_found
    end
  end

  describe "get_region_info/1" do
    test "describes every field" do
      {:ok, id} =
        SM.allocate_region(2 * @kib,
          metadata: %{"k" => "v"},
          timeout: 60_000,
          cleanup_policy: :manual
        )

      {:ok, info} = SM.get_region_info(id)

      for key <-
            [:id, :size, :created_at, :last_accessed, :access_count, :reference_count] ++
              [:owner, :permissions, :security_level, :cleanup_policy, :metadata, :mapped_by] do
        assert Map.has_key?(info, key), "missing #{key}"
      end

      assert %{timeout: 60_000, metadata: %{"k" => "v"}, reference_count: 0} = info
      assert error_reason(SM.get_region_info(:bad)) == :invalid_argument
    end
  end

  describe "list_regions/1" do
    test "filters by owner, backend, policy, level, age" do
      other = spawn(fn -> Process.sleep(:infinity) end)
      {:ok, a} = SM.allocate_region(10)
      {:ok, b} = SM.allocate_region(10, backend: :posix, cleanup_policy: :manual)
      {:ok, c} = SM.allocate_region(10, owner: other, security_level: :high)
      ids = fn filter -> SM.list_regions(filter) |> elem(1) |> Enum.map(& &1.id) end
      assert ids.([]) == [a, b, c]
      assert ids.(owner: self()) == [a, b]
      assert ids.(backend: :posix) == [b]
      assert ids.(%{cleanup_policy: :manual}) == [b]
      assert ids.(security_level: :high) == [c]
      assert ids.(older_than: 60_000) == []
      assert error_reason(SM.list_regions(colour: :red)) == :invalid_option
      assert error_reason(SM.list_regions(owner: "me")) == :invalid_option
      Process.exit(other, :kill)
    end

    test "times are integers (µs since the Unix epoch); get_region_info/1 has DateTimes" do
      before_us = System.os_time(:microsecond)
      {:ok, id} = SM.allocate_region(10)
      {:ok, [listed]} = SM.list_regions(%{})
      assert %{id: ^id, created_at: created, last_accessed: first} = listed
      assert first == nil or is_integer(first)
      # created_at has millisecond precision (the registry's clock)
      assert is_integer(created) and created >= div(before_us, 1000) * 1000
      assert created <= System.os_time(:microsecond)

      {:ok, mapping} = SM.map_region(id)
      :ok = SM.write(mapping, 0, "x")
      {:ok, [%{last_accessed: last}]} = SM.list_regions(%{})
      assert is_integer(last) and last >= created and last >= (first || 0)

      {:ok, info} = SM.get_region_info(id)
      assert %DateTime{} = info.created_at
      assert DateTime.to_unix(info.created_at, :microsecond) == created
      assert Snakepit.SharedMemory.Info.to_datetimes(listed).created_at == info.created_at
    end
  end

  describe "cleanup_regions/1" do
    test "dry run reports, then frees what was asked" do
      {:ok, a} = SM.allocate_region(10, cleanup_policy: :manual)
      {:ok, b} = SM.allocate_region(20, cleanup_policy: :manual)
      {:ok, report} = SM.cleanup_regions(ids: [a], dry_run: true, orphans: false)
      assert report == [%{region_id: a, reason: :requested, size: 10}]
      assert Registry.lookup(a) != nil
      {:ok, freed} = SM.cleanup_regions(ids: [a], orphans: false)
      assert freed == [%{region_id: a, reason: :requested, size: 10}]
      assert Registry.lookup(a) == nil
      {:ok, freed} = SM.cleanup_regions(owner: self(), orphans: false)
      assert [%{region_id: ^b}] = freed
      assert error_reason(SM.cleanup_regions(dry: true)) == :invalid_option
    end

    test "expired_only frees only idle regions" do
      {:ok, idle} = SM.allocate_region(10, timeout: 30, cleanup_policy: :manual)
      {:ok, _busy} = SM.allocate_region(10, cleanup_policy: :manual)
      Process.sleep(60)
      {:ok, freed} = SM.cleanup_regions(expired_only: true, dry_run: true)
      assert Enum.map(freed, &{&1.region_id, &1.reason}) in [[{idle, :expired}], []]
      {:ok, _} = SM.cleanup_regions(expired_only: true)
      assert Registry.lookup(idle) == nil
      assert Registry.count() == 1
    end
  end

  describe "stats/0" do
    test "counts operations, bytes and errors, with percentiles" do
      {:ok, before} = SM.stats()
      {:ok, id} = SM.allocate_region(@kib)
      {:ok, m} = SM.map_region(id)
      :ok = SM.write(m, 0, "12345")
      {:ok, _} = SM.read(m, 0, 5)
      {:error, _} = SM.read(m, 2000, 5)
      :ok = SM.unmap_region(m)
      :ok = SM.deallocate_region(id)
      {:ok, after_} = SM.stats()
      assert after_.allocations - before.allocations == 1
      assert after_.deallocations - before.deallocations == 1
      assert after_.events.bytes_written - before.events.bytes_written == 5

      assert Map.get(after_.errors, :out_of_bounds, 0) - Map.get(before.errors, :out_of_bounds, 0) ==
               1

      %{count: n, p50_us: p50, p99_us: p99, max_us: max} = after_.operations.map
      assert n >= 1 and p50 > 0 and p50 <= p99 and p99 <= max
      assert after_.active_regions == 0
      assert after_.limits.max_regions > 0
    end
  end

  describe "export_ref/2" do
    test "carries exactly the documented keys" do
      {:ok, id} = SM.allocate_region(64, metadata: %{dtype: "uint8", shape: [8, 8], tag: "x"})
      {:ok, ref} = SM.export_ref(id)

      # "control_offset" only for a region carved out of an arena (the :arena setting).
      arena = if Map.has_key?(ref, "control_offset"), do: ~w(control_offset), else: []

      assert Map.keys(ref) |> Enum.sort() ==
               Enum.sort(
                 arena ++
                   ~w(backend boot_id control_path data_offset data_path dtype encrypted format metadata node region_id sealed shape size v)
               )

      assert %{"v" => 1, "region_id" => ^id, "size" => 64, "dtype" => "uint8"} = ref
      assert ref["shape"] == [8, 8]
      assert ref["metadata"] == %{"dtype" => "uint8", "shape" => [8, 8], "tag" => "x"}
      assert ref["control_path"] =~ ~r{\A/proc/\d+/fd/\d+\z}
      assert {:ok, _json} = Snakepit.SharedMemory.JSON.encode(ref)
      {:ok, ref} = SM.export_ref(id, dtype: "int8", shape: [64])
      assert %{"dtype" => "int8", "shape" => [64]} = ref
    end

    test "the key only on request, only for encrypted regions" do
      {:ok, plain} = SM.allocate_region(64)
      assert error_reason(SM.export_ref(plain, include_key: true)) == :invalid_option
      {:ok, enc} = SM.allocate_region(64, security_level: :high)
      {:ok, ref} = SM.export_ref(enc)
      refute Map.has_key?(ref, "key")
      {:ok, ref} = SM.export_ref(enc, include_key: true)
      assert byte_size(Base.decode64!(ref["key"])) == 32
    end

    test ":maximum regions are exported only sealed" do
      case SM.allocate_region(64, security_level: :maximum) do
        {:ok, id} ->
          assert error_reason(SM.export_ref(id)) == :not_sealed
          :ok = SM.seal(id)
          assert {:ok, %{"sealed" => true, "encrypted" => true}} = SM.export_ref(id)

        {:error, %Error{reason: :mlock_failed}} ->
          :ok
      end
    end
  end
end
