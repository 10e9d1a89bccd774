defmodule Snakepit.SharedMemory.NativeTest do
  # Tests of the NIF layer (c_src/nif) through its raw stubs: regions, mappings, data.
  # Not async: the final check of Snakepit.SharedMemory.NativeCase looks at /dev/shm.
  use Snakepit.SharedMemory.NativeCase, async: false

  describe "header_layout/0" do
    test "describes the header as JSON" do
      layout = Native.header_layout()
      assert is_binary(layout)
      assert String.starts_with?(String.trim(layout), "{")
      assert layout =~ "4096"
    end
  end

  describe "create/2" do
    for backend <- [:memfd, :posix] do
      test "creates a #{backend} region and describes it" do
        {region, info} = create!(3 * @kib, backend: unquote(backend))
        assert is_reference(region)
        assert info.id =~ ~r/^spshm_[a-z2-7]{20}$/
        assert info.backend == unquote(backend)
        assert info.size == 3 * @kib
        assert info.capacity >= info.size
        assert info.role == :created
        assert info.encrypted == false
        assert info.sealed == false
        assert info.os_pid == String.to_integer(System.pid())
        assert Native.info(region) == info
      end
    end

    test "a memfd region is reachable through /proc and absent from /dev/shm" do
      {_region, info} = create!(4 * @kib)
      assert info.control_path =~ ~r{^/proc/\d+/fd/\d+$}
      assert info.data_path =~ ~r{^/proc/\d+/fd/\d+$}
      assert info.data_offset == 0
      refute info.id in ShmHelpers.our_segments()
      assert File.exists?(info.data_path)
    end

    test "a posix region lives in /dev/shm with the requested mode" do
      {region, info} = create!(4 * @kib, backend: :posix, mode: 0o640)
      assert info.control_path == "/dev/shm/" <> info.id
      assert info.data_offset == 4096
      assert {:ok, %File.Stat{mode: mode}} = File.stat(info.control_path)
      assert Bitwise.band(mode, 0o777) == 0o640
      assert :ok = Native.deallocate(region, false)
      refute File.exists?(info.control_path)
    end

    test "well-known names honour the open modes" do
      name = ShmHelpers.unique_name("nt")
      opts = [backend: :posix, name: name]
      {region, info} = create!(8 * @kib, opts)
      assert info.id == "spshm_n_" <> name

      assert_error(Native.create(8 * @kib, ShmHelpers.create_opts(opts)), :already_exists)

      {:ok, again, info2} =
        Native.create(8 * @kib, ShmHelpers.create_opts(opts ++ [open_mode: :create_or_open]))

      assert info2.role == :opened and info2.id == info.id
      mapping = map!(region)
      :ok = Native.write(mapping, 0, "shared")
      assert {:ok, "shared"} = Native.read(map!(again, :read_only), 0, 6)

      missing = ShmHelpers.create_opts(opts ++ [name: name <> "x", open_mode: :open_only])
      assert_error(Native.create(8 * @kib, missing), :not_found)

      {:ok, fresh, info3} =
        Native.create(8 * @kib, ShmHelpers.create_opts(opts ++ [open_mode: :remove_and_create]))

      assert info3.role == :created
      assert {:ok, <<0, 0, 0, 0, 0, 0>>} = Native.read(map!(fresh), 0, 6)
      assert :ok = Native.deallocate(fresh, false)
    end

    test "an encrypted region has a larger capacity than its size" do
      {_region, info} = create!(200 * @kib, encrypted: true, security_level: 1)
      assert info.encrypted == true
      assert info.capacity > info.size
    end

    test "refuses unusable sizes with an error tuple" do
      opts = ShmHelpers.create_opts()
      assert_error(Native.create(0, opts), :invalid_argument)

      for size <- [Bitwise.bsl(1, 62) + 1, @u64_max, @u64_max + 1, @u64_max + 2, 10 ** 40] do
        assert_error(Native.create(size, opts), :too_large)
      end
    end

    test "raises ArgumentError for sizes of the wrong type" do
      opts = ShmHelpers.create_opts()

      for size <- [-1, -@u64_max - 5, 1.0, 4096.5, :big, "4096", nil, [4096], {4096}] do
        assert_raise ArgumentError, fn -> Native.create(size, opts) end
      end
    end

    test "raises ArgumentError for option maps of the wrong shape" do
      assert_raise ArgumentError, fn -> Native.create(4096, []) end
      assert_raise ArgumentError, fn -> Native.create(4096, backend: :memfd) end

      for key <- Map.keys(ShmHelpers.create_opts()) do
        opts = Map.delete(ShmHelpers.create_opts(), key)
        assert_raise ArgumentError, fn -> Native.create(4096, opts) end
      end

      bad_values = [
        backend: :tmpfs,
        backend: "memfd",
        name: :name,
        name: ~c"name",
        open_mode: :open,
        mode: -1,
        mode: 6.0,
        security_level: -1,
        security_level: :high,
        encrypted: "yes",
        encrypted: nil,
        lock_memory: 1,
        metadata: %{},
        metadata: ~c"{}",
        idle_timeout_ms: -5,
        idle_timeout_ms: 1.5
      ]

      for {key, value} <- bad_values do
        opts = ShmHelpers.create_opts(%{key => value})

        assert_badarg("#{key}: #{inspect(value)}", fn -> Native.create(4096, opts) end)
      end
    end

    test "refuses well-typed but unusable options with an error tuple" do
      bad_values = [
        mode: 0o1000,
        mode: @u64_max + 1,
        security_level: 3,
        idle_timeout_ms: @u64_max,
        name: "",
        name: "a/b",
        name: "..",
        name: "../../etc",
        name: "UPPER",
        name: "nul\0byte",
        name: String.duplicate("a", 22),
        metadata: String.duplicate("x", 1793)
      ]

      for {key, value} <- bad_values do
        opts = ShmHelpers.create_opts(%{key => value, backend: :posix})
        assert {:error, {reason, _, _}} = Native.create(4096, opts), "#{key}: #{inspect(value)}"
        assert reason in [:invalid_argument, :too_large]
      end
    end
  end

  describe "open/2" do
    test "opens a posix region by id and sees the creator's data" do
      {region, info} = create!(16 * @kib, backend: :posix)
      :ok = Native.write(map!(region), 100, "hello")
      {:ok, opened, info2} = Native.open(info.id, true)
      assert info2.role == :opened and info2.id == info.id and info2.size == info.size
      assert {:ok, "hello"} = Native.read(map!(opened, :read_only), 100, 5)
    end

    test "opens a memfd region by its paths" do
      {region, info} = create!(16 * @kib)
      :ok = Native.write(map!(region), 0, "memfd!")
      {:ok, opened, info2} = Native.open({info.control_path, info.data_path}, false)
      assert info2.id == info.id and info2.backend == :memfd
      assert {:ok, "memfd!"} = Native.read(map!(opened, :read_only), 0, 6)
    end

    test "a region opened read-only cannot be mapped read-write" do
      {_region, info} = create!(16 * @kib, backend: :posix)
      {:ok, opened, _} = Native.open(info.id, false)
      assert_error(Native.map(opened, :read_write), :permission_denied)
      assert {:ok, <<0, 0>>} = Native.read(map!(opened, :read_only), 0, 2)
    end

    test "returns clean errors for unknown, malformed and hostile ids and paths" do
      assert_error(Native.open("spshm_aaaaaaaaaaaaaaaaaaaa", true), :not_found)
      assert_error(Native.open("", true), :invalid_argument)
      assert_error(Native.open("spshm_\0aaaaaaaaaaaaaaaaaaa", true), :invalid_argument)

      for id <- ["../etc/passwd", "spshm_/../../etc/passwd", "/dev/shm/spshm_x", "..", "/", "x"] do
        assert {:error, {reason, _, _}} = Native.open(id, true), inspect(id)
        assert reason in [:invalid_argument, :not_found, :not_ours]
      end

      for paths <- [{"/etc/passwd", "/etc/passwd"}, {"/nonexistent", "/nonexistent"}, {"/", "/"}] do
        assert {:error, {reason, _, _}} = Native.open(paths, false), inspect(paths)
        assert reason in [:not_found, :not_ours, :corrupt, :permission_denied, :io_error]
      end

      assert_error(Native.open({"/proc/self/fd/0\0x", "/x"}, false), :invalid_argument)
    end

    test "raises ArgumentError for targets of the wrong type" do
      for target <- [123, :id, ~c"spshm_x", {"a"}, {"a", "b", "c"}, {:a, "b"}, {"a", 1}, nil] do
        assert_raise ArgumentError, fn -> Native.open(target, true) end
      end

      assert_raise ArgumentError, fn -> Native.open("spshm_x", :yes) end
      assert_raise ArgumentError, fn -> Native.open("spshm_x", 1) end
    end
  end

  describe "info/1 and header/1" do
    test "the header snapshot carries every field" do
      metadata = ~s({"dtype":"float32"})
      {region, info} = create!(64 * @kib, metadata: metadata, idle_timeout_ms: 1500)
      mapping = map!(region)
      {:ok, h} = Native.header(region)

      assert h.id == info.id and h.backend == :memfd and h.format_version == 1
      assert h.size == 64 * @kib and h.capacity == info.capacity
      assert h.sealed == false and h.deallocated == false and h.encrypted == false
      assert h.security_level == 0 and is_integer(h.flags)
      assert h.refcount == 1
      assert h.creator_pid == String.to_integer(System.pid())
      assert h.creator_start_time == Native.self_info().start_time
      assert h.boot_id =~ ~r/^[0-9a-f]{32}$/ and h.boot_id == Native.self_info().boot_id
      assert h.created_at_ns > 0 and h.last_access_ns >= h.created_at_ns
      assert h.idle_timeout_ns == 1_500_000_000
      assert h.metadata == metadata
      assert h.creator_alive == true
      assert [%{pid: pid, start_time: st, count: 1, writable: true}] = h.holders
      assert pid == h.creator_pid and st == h.creator_start_time
      :ok = Native.unmap(mapping)
    end

    test "raise ArgumentError for anything but a region" do
      {region, _} = create!(4 * @kib)
      mapping = map!(region)

      for term <- [mapping, make_ref(), "spshm_x", 1, nil] do
        assert_raise ArgumentError, fn -> Native.info(term) end
        assert_raise ArgumentError, fn -> Native.header(term) end
      end
    end
  end

  describe "read_small_files/1" do
    @tag :tmp_dir
    test "reads each file whole, :error for one that cannot be read", %{tmp_dir: dir} do
      a = Path.join(dir, "a")
      File.write!(a, "12345\n")
      big = Path.join(dir, "big")
      File.write!(big, :binary.copy("x", 64 * 1024 + 1))

      assert Native.read_small_files([a, Path.join(dir, "missing"), dir, big, a]) ==
               ["12345\n", :error, :error, :error, "12345\n"]

      assert Native.read_small_files([]) == []
    end

    test "badarg for anything but a list of at most 64 paths without NUL bytes" do
      for bad <- [
            nil,
            "path",
            [~c"charlist"],
            ["a\0b"],
            [""],
            List.duplicate("/proc/self/stat", 65)
          ] do
        assert_raise ArgumentError, fn -> Native.read_small_files(bad) end
      end
    end
  end

  describe "hold_counts/1" do
    test "follows holder changes" do
      {region, _} = create!(4 * @kib)
      {gen0, 0} = Native.hold_counts(region)
      m = map!(region)
      {gen1, 1} = Native.hold_counts(region)
      assert gen1 != gen0
      :ok = Native.unmap(m)
      {gen2, 0} = Native.hold_counts(region)
      assert gen2 != gen1
      assert_raise ArgumentError, fn -> Native.hold_counts(m) end
    end
  end

  describe "map/2 and unmap/1" do
    test "each mapping is one hold of this OS process" do
      {region, _} = create!(4 * @kib)
      m1 = map!(region)
      m2 = map!(region, :read_only)
      assert refcount(region) == 2
      {:ok, %{holders: [%{count: 2, writable: true}]}} = Native.header(region)
      assert :ok = Native.unmap(m1)
      assert refcount(region) == 1
      assert :ok = Native.unmap(m2)
      assert refcount(region) == 0
      assert_error(Native.unmap(m2), :closed)
      assert_error(Native.read(m2, 0, 1), :closed)
      assert_error(Native.write(m1, 0, "x"), :closed)
    end

    test "a mapping garbage collected without unmap releases its hold" do
      {region, _} = create!(4 * @kib)
      parent = self()

      pid =
        spawn(fn ->
          {:ok, _mapping} = Native.map(region, :read_write)
          send(parent, {:mapped, refcount(region)})
        end)

      assert_receive {:mapped, 1}
      ref = Process.monitor(pid)
      assert_receive {:DOWN, ^ref, :process, ^pid, _}
      assert ShmHelpers.wait_until(fn -> refcount(region) == 0 end)
    end

    test "refuses sealed and deallocated regions, and bad arguments" do
      {region, _} = create!(4 * @kib)
      assert_raise ArgumentError, fn -> Native.map(region, :write) end
      assert_raise ArgumentError, fn -> Native.map(region, "read_only") end
      assert_raise ArgumentError, fn -> Native.map(make_ref(), :read_only) end
      assert_raise ArgumentError, fn -> Native.unmap(region) end
      assert_raise ArgumentError, fn -> Native.unmap(:mapping) end

      :ok = Native.seal(region)
      assert_error(Native.map(region, :read_write), :sealed)
      assert {:ok, _} = Native.map(region, :read_only)
      :ok = Native.deallocate(region, false)
      assert_error(Native.map(region, :read_only), :deallocated)
    end
  end

  describe "write/3 and read/3" do
    for backend <- [:memfd, :posix], encrypted <- [false, true] do
      test "round trip on #{backend}, encrypted: #{encrypted}" do
        {region, _} =
          create!(300 * @kib, backend: unquote(backend), encrypted: unquote(encrypted))

        m = map!(region)
        small = pattern(4 * @kib, 1)
        :ok = Native.write(m, 70_000, small)
        assert {:ok, ^small} = Native.read(m, 70_000, 4 * @kib)
        big = pattern(200 * @kib, 9)
        :ok = Native.write_dirty(m, 65_000, big)
        assert {:ok, ^big} = Native.read_dirty(m, 65_000, 200 * @kib)
        assert {:ok, <<0, 0, 0, 0>>} = Native.read(m, 300 * @kib - 4, 4)
        assert {:ok, ""} = Native.read(m, 300 * @kib, 0)
      end
    end

    test "a binary returned by read never changes afterwards" do
      {region, _} = create!(8 * @kib)
      m = map!(region)
      :ok = Native.write(m, 0, "before")
      {:ok, copy} = Native.read(m, 0, 6)
      :ok = Native.write(m, 0, "after!")
      assert copy == "before"
      assert {:ok, "after!"} = Native.read(m, 0, 6)
    end

    test "the plain variants refuse payloads over 64 KiB" do
      {region, _} = create!(@mib)
      m = map!(region)
      message = assert_error(Native.write(m, 0, pattern(64 * @kib + 4, 1)), :invalid_argument)
      assert message =~ "write_dirty"
      assert :ok = Native.write(m, 0, pattern(64 * @kib, 1))
      message = assert_error(Native.read(m, 0, 64 * @kib + 1), :invalid_argument)
      assert message =~ "read_dirty"
      assert {:ok, _} = Native.read(m, 0, 64 * @kib)
    end

    test "reads and writes outside the region are out_of_bounds, without overflow" do
      {region, _} = create!(8 * @kib)
      m = map!(region)

      cases = [
        {8 * @kib, 1},
        {8 * @kib - 1, 2},
        {0, 8 * @kib + 1},
        {@u64_max, 2},
        {@u64_max - 1, 2},
        {2, @u64_max - 1},
        {@u64_max + 1, 0},
        {0, @u64_max + 1},
        {10 ** 30, 10 ** 30}
      ]

      for {offset, length} <- cases do
        assert_error(Native.read_dirty(m, offset, length), :out_of_bounds)
        assert_error(Native.read_zero_copy(m, offset, length), :invalid_argument)
      end

      for offset <- [8 * @kib - 1, @u64_max, @u64_max + 1, Bitwise.bsl(1, 63)] do
        assert_error(Native.write(m, offset, "xy"), :out_of_bounds)
      end
    end

    test "raise ArgumentError for arguments of the wrong type" do
      {region, _} = create!(8 * @kib)
      m = map!(region)

      for {offset, length} <- [{-1, 1}, {0, -1}, {1.0, 1}, {0, 1.0}, {:a, 1}, {0, "1"}, {nil, 1}] do
        assert_raise ArgumentError, fn -> Native.read(m, offset, length) end
        assert_raise ArgumentError, fn -> Native.read_dirty(m, offset, length) end
        assert_raise ArgumentError, fn -> Native.read_zero_copy(m, offset, length) end
      end

      for data <- [~c"abc", ["a", "b"], :abc, 1, <<1::3>>] do
        assert_raise ArgumentError, fn -> Native.write(m, 0, data) end
        assert_raise ArgumentError, fn -> Native.write_dirty(m, 0, data) end
      end

      assert_raise ArgumentError, fn -> Native.write(m, -1, "x") end
      assert_raise ArgumentError, fn -> Native.write(region, 0, "x") end
      assert_raise ArgumentError, fn -> Native.read(region, 0, 1) end
    end

    test "writes are refused on read-only mappings, sealed and deallocated regions" do
      {region, _} = create!(8 * @kib)
      rw = map!(region)
      ro = map!(region, :read_only)
      :ok = Native.write(rw, 0, "data")
      assert_error(Native.write(ro, 0, "x"), :permission_denied)
      assert {:ok, "data"} = Native.read(ro, 0, 4)

      :ok = Native.seal(region)
      assert_error(Native.write(rw, 0, "x"), :sealed)
      assert_error(Native.write_dirty(rw, 0, "x"), :sealed)
      assert {:ok, "data"} = Native.read(rw, 0, 4)

      :ok = Native.deallocate(region, false)
      assert_error(Native.write(rw, 0, "x"), :deallocated)
      assert_error(Native.read(ro, 0, 4), :deallocated)
      assert_error(Native.read_zero_copy(ro, 0, 4), :deallocated)
    end
  end

  describe "read_zero_copy/3" do
    test "refuses unsealed and encrypted regions" do
      {region, _} = create!(8 * @kib)
      message = assert_error(Native.read_zero_copy(map!(region), 0, 4), :invalid_argument)
      assert message =~ "seal"

      {enc, _} = create!(8 * @kib, encrypted: true, security_level: 2)
      :ok = Native.seal(enc)

      message =
        assert_error(Native.read_zero_copy(map!(enc, :read_only), 0, 4), :invalid_argument)

      assert message =~ "encrypted"
    end

    @tag timeout: 120_000
    test "a sealed 1 GiB region is read without copying" do
      {region, _} = create!(@gib)
      m = map!(region)
      offsets = [0, 4096 * 1000 + 3, div(@gib, 2) + 17, @gib - 64]
      for off <- offsets, do: :ok = Native.write(m, off, pattern(64, rem(off, 200)))
      :ok = Native.seal(region)

      :erlang.garbage_collect()
      before = :erlang.memory(:binary)
      {:ok, bin} = Native.read_zero_copy(m, 0, @gib)
      grown = :erlang.memory(:binary) - before

      assert byte_size(bin) == @gib
      assert grown < 16 * @mib, "binary memory grew by #{grown} bytes"

      for off <- offsets do
        assert binary_part(bin, off, 64) == pattern(64, rem(off, 200))
      end

      assert binary_part(bin, 4096, 8) == <<0::64>>
      {:ok, part} = Native.read_zero_copy(m, 17, 100)
      assert byte_size(part) == 100
    end

    test "the binary outlives unmap, deallocate and the region handle" do
      parent = self()

      spawn(fn ->
        {:ok, region, _} = Native.create(64 * @kib, ShmHelpers.create_opts())
        {:ok, m} = Native.map(region, :read_write)
        :ok = Native.write(m, 1000, "still here")
        :ok = Native.seal(region)
        {:ok, bin} = Native.read_zero_copy(m, 1000, 10)
        :ok = Native.unmap(m)
        assert_error(Native.deallocate(region, true), :busy)
        :ok = Native.deallocate(region, false)
        send(parent, {:bin, bin})
      end)

      assert_receive {:bin, bin}
      :erlang.garbage_collect()
      Process.sleep(20)
      assert bin == "still here"
      assert :binary.copy(bin) == "still here"
    end
  end

  describe "seal/1" do
    test "is idempotent and shows in info and header" do
      {region, _} = create!(4 * @kib, backend: :posix)
      assert :ok = Native.seal(region)
      assert :ok = Native.seal(region)
      assert Native.info(region).sealed == true
      assert {:ok, %{sealed: true}} = Native.header(region)
      assert_raise ArgumentError, fn -> Native.seal(:region) end
    end
  end

  describe "deallocate/2" do
    test "marks the region, unlinks posix names, and a second call says deallocated" do
      {region, info} = create!(4 * @kib, backend: :posix)
      assert :ok = Native.deallocate(region, false)
      refute File.exists?(info.control_path)
      assert_error(Native.deallocate(region, false), :deallocated)
      assert_error(Native.seal(region), :deallocated)
      assert Native.info(region).id == info.id
      assert {:ok, %{deallocated: true}} = Native.header(region)
      assert_raise ArgumentError, fn -> Native.deallocate(region, :yes) end
    end

    test "zero: true zeroes the data of a memfd region (seen through another fd)" do
      {region, info} = create!(64 * @kib)
      :ok = Native.write(map!(region), 0, pattern(64 * @kib, 7))
      assert File.read!(info.data_path) == pattern(64 * @kib, 7)
      # Opened before: deallocation closes this VM's own descriptor of the data at once.
      {:ok, fd} = File.open(info.data_path, [:read, :binary, :raw])
      assert :ok = Native.deallocate(region, true)
      assert :file.pread(fd, 0, 64 * @kib) == {:ok, <<0::size(64 * @kib)-unit(8)>>}
      File.close(fd)
    end

    test "zero: true zeroes the data of a posix region (seen through a descriptor opened before)" do
      {region, info} = create!(64 * @kib, backend: :posix)
      :ok = Native.write(map!(region), 0, pattern(64 * @kib, 3))
      {:ok, fd} = :file.open(info.control_path, [:read, :raw, :binary])
      assert {:ok, data} = :file.pread(fd, info.data_offset, 64 * @kib)
      assert data == pattern(64 * @kib, 3)
      assert :ok = Native.deallocate(region, true)
      assert {:ok, zeroed} = :file.pread(fd, info.data_offset, 64 * @kib)
      :ok = :file.close(fd)
      assert zeroed == <<0::size(64 * @kib)-unit(8)>>
    end
  end

  describe "set_idle_timeout/2" do
    test "updates the header" do
      {region, _} = create!(4 * @kib)
      assert :ok = Native.set_idle_timeout(region, 250)
      assert {:ok, %{idle_timeout_ns: 250_000_000}} = Native.header(region)
      assert :ok = Native.set_idle_timeout(region, 0)
      assert {:ok, %{idle_timeout_ns: 0}} = Native.header(region)
      assert_error(Native.set_idle_timeout(region, @u64_max), :invalid_argument)
      assert_raise ArgumentError, fn -> Native.set_idle_timeout(region, -1) end
      assert_raise ArgumentError, fn -> Native.set_idle_timeout(region, 1.5) end
    end
  end

  describe "export_key/1" do
    test "returns the 32-byte key of an encrypted region only" do
      {enc, _} = create!(4 * @kib, encrypted: true, security_level: 1)
      assert {:ok, key} = Native.export_key(enc)
      assert byte_size(key) == 32
      {plain, _} = create!(4 * @kib)
      assert_error(Native.export_key(plain), :invalid_argument)
      assert_raise ArgumentError, fn -> Native.export_key("key") end
    end
  end

  describe "release_holder/3" do
    test "releases every hold of a process" do
      {region, _} = create!(4 * @kib)
      m1 = map!(region)
      _m2 = map!(region)
      %{os_pid: pid, start_time: start} = Native.self_info()
      assert {:ok, 0} = Native.release_holder(region, pid, start + 1)
      assert {:ok, 2} = Native.release_holder(region, pid, start)
      assert refcount(region) == 0
      assert {:ok, 0} = Native.release_holder(region, pid, start)
      assert :ok = Native.unmap(m1)
      assert refcount(region) == 0
      assert_error(Native.release_holder(region, 0, start), :invalid_argument)
      assert_error(Native.release_holder(region, @u64_max + 1, start), :invalid_argument)
      assert_raise ArgumentError, fn -> Native.release_holder(region, -1, start) end
      assert_raise ArgumentError, fn -> Native.release_holder(region, pid, -1) end
    end
  end

  describe "inspect_path/1" do
    test "reads the header of posix and memfd segments" do
      {_posix, pinfo} = create!(4 * @kib, backend: :posix, metadata: ~s({"a":1}))
      assert {:ok, snap} = Native.inspect_path(pinfo.control_path)
      assert snap.id == pinfo.id and snap.path == pinfo.control_path
      assert snap.metadata == ~s({"a":1}) and snap.backend == :posix

      {_memfd, minfo} = create!(4 * @kib)
      assert {:ok, %{id: id, backend: :memfd}} = Native.inspect_path(minfo.control_path)
      assert id == minfo.id
    end

    test "refuses missing, foreign, linked and malformed paths cleanly" do
      assert_error(Native.inspect_path("/dev/shm/spshm_does_not_exist"), :not_found)
      assert_error(Native.inspect_path(""), :invalid_argument)
      assert_error(Native.inspect_path("/dev/shm/\0x"), :invalid_argument)

      for path <- ["/etc/passwd", "/dev/null", "/proc/self/stat", "/"] do
        assert {:error, {reason, _, _}} = Native.inspect_path(path), path
        assert reason in [:not_ours, :corrupt, :permission_denied, :invalid_argument, :io_error]
      end

      {_region, info} = create!(4 * @kib, backend: :posix)
      link = Path.join(System.tmp_dir!(), "spshm_link_#{System.unique_integer([:positive])}")
      File.ln_s!(info.control_path, link)

      try do
        assert {:error, {reason, _, _}} = Native.inspect_path(link)
        assert reason in [:not_ours, :invalid_argument]
      after
        File.rm(link)
      end

      for term <- [1, :path, ~c"/dev/shm/x"] do
        assert_raise ArgumentError, fn -> Native.inspect_path(term) end
      end
    end
  end

  describe "unlink_segment/1" do
    test "unlinks a posix segment of ours by id" do
      {region, info} = create!(4 * @kib, backend: :posix)
      assert :ok = Native.unlink_segment(info.id)
      refute File.exists?(info.control_path)
      assert_error(Native.open(info.id, false), :not_found)
      assert_error(Native.unlink_segment(info.id), :not_found)
      # The mapping is still usable: only the name is gone.
      assert {:ok, <<0>>} = Native.read(map!(region, :read_only), 0, 1)
    end

    test "refuses unknown, hostile and malformed ids" do
      assert_error(Native.unlink_segment("spshm_aaaaaaaaaaaaaaaaaaaa"), :not_found)
      assert_error(Native.unlink_segment(""), :invalid_argument)

      for id <- ["../etc/passwd", "spshm_/../x", "/dev/shm/spshm_x", "..", "foo"] do
        assert {:error, {reason, _, _}} = Native.unlink_segment(id), id
        assert reason in [:invalid_argument, :not_found, :not_ours]
      end

      assert_raise ArgumentError, fn -> Native.unlink_segment(:id) end
    end
  end
end
