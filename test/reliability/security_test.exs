defmodule Snakepit.SharedMemory.Reliability.SecurityTest do
  # Security properties that hold against other processes: file modes whatever the
  # umask, predicted names that cannot capture an allocation, sealed regions that a peer
  # cannot write or shrink by any route. Encryption, zeroing and keys:
  # crypto_security_test.exs.
  use ExUnit.Case, async: false

  import Bitwise

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Error, ReliabilityHelpers, ShmHelpers}

  @moduletag :reliability
  @moduletag timeout: 300_000

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    ReliabilityHelpers.check_segments_on_exit()
    :ok
  end

  describe "segment modes" do
    @permission_sets [
      %{},
      %{owner: :read_only},
      %{group: :read_only},
      %{group: :read_write},
      %{group: :read_only, other: :read_only},
      %{owner: :read_only, group: :read_only, other: :read_only},
      %{group: :read_write, other: :read_write}
    ]

    # The VM runs with umask 000 (would widen a mode left to the kernel) and 077 (would
    # narrow it): the segment's mode must be exactly the permission set's.
    for umask <- ["000", "077", "022"] do
      test "match the permission set under umask #{umask}" do
        code = """
        {:ok, _} = Application.ensure_all_started(:snakepit_shm)
        alias Snakepit.SharedMemory
        for perms <- #{inspect(@permission_sets)} do
          {:ok, id} = SharedMemory.allocate_region(4096, permissions: perms, backend: :posix)
          {:ok, %File.Stat{mode: mode}} = File.stat("/dev/shm/" <> id)
          expected = Snakepit.SharedMemory.Security.mode(Map.merge(Snakepit.SharedMemory.Security.default_permissions(), perms))
          IO.puts("MODE \#{inspect(perms)} \#{Integer.to_string(expected, 8)} \#{Integer.to_string(Bitwise.band(mode, 0o7777), 8)}")
          :ok = SharedMemory.deallocate_region(id)
        end
        """

        {out, 0} = ReliabilityHelpers.elixir_vm(code, umask: unquote(umask))
        lines = for "MODE " <> rest <- String.split(out, "\n"), do: rest
        assert length(lines) == length(@permission_sets), out

        for line <- lines do
          [expected, actual] = line |> String.split() |> Enum.take(-2)
          assert actual == expected, "umask #{unquote(umask)}: #{line}"
        end
      end
    end

    test "memfd regions are owner-only; wider permissions need (and get) :posix" do
      {:ok, id} = SharedMemory.allocate_region(4096)
      {:ok, ref} = SharedMemory.export_ref(id)
      assert ref["backend"] == "memfd"
      {:ok, %File.Stat{mode: mode}} = File.stat(ref["data_path"])
      assert band(mode, 0o077) == 0, "memfd data mode #{Integer.to_string(mode, 8)}"
      :ok = SharedMemory.deallocate_region(id)

      assert {:error, %Error{}} =
               SharedMemory.allocate_region(4096,
                 backend: :memfd,
                 permissions: %{other: :read_only}
               )
    end
  end

  describe "predicted names" do
    test "a pre-created file cannot capture a named allocation (:create)" do
      name = ShmHelpers.unique_name("cap")
      path = "/dev/shm/spshm_n_" <> name
      bait = :binary.copy("attacker", 1024)

      for plant <- [:file, :symlink] do
        target =
          Path.join(System.tmp_dir!(), "reliability_bait_#{System.unique_integer([:positive])}")

        File.write!(target, bait)
        if plant == :file, do: File.cp!(target, path), else: File.ln_s!(target, path)

        try do
          assert {:error, %Error{reason: :already_exists, message: message}} =
                   SharedMemory.allocate_region(8192, name: name, open_mode: :create)

          assert message =~ name
          assert File.read!(target) == bait
          assert {:ok, _} = File.lstat(path)
        after
          File.rm(path)
          File.rm(target)
        end
      end
    end

    test "opening a planted name (:create_or_open, :open_only) is refused, never used" do
      name = ShmHelpers.unique_name("plant")
      path = "/dev/shm/spshm_n_" <> name

      target =
        Path.join(System.tmp_dir!(), "reliability_plant_#{System.unique_integer([:positive])}")

      File.write!(target, :binary.copy(<<0>>, 16_384))

      plants = [
        junk: fn -> File.write!(path, :binary.copy("junk", 4096)) end,
        symlink: fn -> File.ln_s!(target, path) end,
        other_user: fn ->
          File.write!(path, :binary.copy(<<0>>, 16_384))
          :ok = File.chown(path, 65_534)
        end
      ]

      try do
        for {plant, make} <- plants,
            mode <- [:create_or_open, :open_only, :remove_and_create] do
          make.()

          result = SharedMemory.allocate_region(8192, name: name, open_mode: mode)
          assert {:error, %Error{reason: reason}} = result, "#{plant} #{mode}"

          assert reason in [:corrupt, :not_ours, :not_found, :permission_denied],
                 "#{plant} #{mode}: #{reason}"

          # Not removed (:remove_and_create removes only a valid segment of ours), not
          # followed, not written.
          assert {:ok, _} = File.lstat(path), "#{plant} #{mode}: the plant was removed"
          assert File.read!(target) == :binary.copy(<<0>>, 16_384)
          File.rm!(path)
        end
      after
        File.rm(path)
        File.rm(target)
      end
    end

    test "random ids are created with O_EXCL | O_NOFOLLOW and retried on EEXIST (by design)" do
      # A collision of 100 random bits cannot be provoked; what makes it harmless is that
      # creation never opens an existing object (shown above on the named path, the same
      # call) and picks a fresh id when the name exists.
      root = ReliabilityHelpers.root()
      platform = File.read!(Path.join(root, "c_src/core/platform_posix.cpp"))
      # (Linux opens named objects in the shm directory with open(2), elsewhere shm_open.)
      assert platform =~ ~r/open_named_object\([^;]*O_CREAT \| O_EXCL[^;]*O_NOFOLLOW/s
      assert platform =~ ~r/::open\(named_path\([^;]*O_NOFOLLOW \| O_CLOEXEC/s
      region = File.read!(Path.join(root, "c_src/core/region.cpp"))

      assert region =~
               ~r/already_exists\) return[^}]*if \(!named\) \{\s*id = random_region_id\(\);/s
    end
  end

  describe "a sealed region" do
    @peer """
    import ctypes, errno, mmap, os, sys, json, warnings
    warnings.simplefilter("ignore")
    import snakepit_shm
    ref = json.loads(sys.argv[1])
    path, size = ref["data_path"], ref["size"]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    def outcome(fn):
        try:
            r = fn()
            return "DONE" if r is None or r == 0 else "FAILED " + str(r)
        except snakepit_shm.SnakepitShmError as e:
            return type(e).__name__
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
        except Exception as e:
            return type(e).__name__
    def reopen_write():
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"PWNED!", 0)
        finally:
            os.close(fd)
    def mmap_write():
        fd = os.open(path, os.O_RDWR)
        try:
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            m[0:6] = b"PWNED!"
        finally:
            os.close(fd)
    def mprotect_write():
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap")
            if libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
            ctypes.memmove(addr, b"PWNED!", 6)
        finally:
            os.close(fd)
    def shrink():
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    def attach_rw():
        with snakepit_shm.attach(ref, mode="rw") as region:
            region.buf[0:6] = b"PWNED!"
    for name, fn in [("reopen_write", reopen_write), ("mmap_write", mmap_write),
                     ("mprotect_write", mprotect_write), ("shrink", shrink), ("attach_rw", attach_rw)]:
        print(name, outcome(fn))
    with snakepit_shm.attach(ref) as region:
        print("read", bytes(region.buf[0:6]).decode())
    """

    test "cannot be written, made writable or shrunk by a peer OS process" do
      # A memfd of its own: the kernel seal is its own (a region in an arena is sealed by
      # its header's word only, docs/SECURITY.md "Arenas").
      {:ok, id} = SharedMemory.allocate_region(64 * 1024, arena: false)
      {:ok, m} = SharedMemory.map_region(id)
      :ok = SharedMemory.write(m, 0, "sealed")
      :ok = SharedMemory.unmap_region(m)
      :ok = SharedMemory.seal(id)
      {:ok, ref} = SharedMemory.export_ref(id)
      assert ref["backend"] == "memfd" and ref["sealed"] == true
      {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)

      {out, 0} = ReliabilityHelpers.python(@peer, [json])

      results =
        for line <- String.split(out, "\n", trim: true), into: %{} do
          [name, result] = String.split(line, " ", parts: 2)
          {name, result}
        end

      for attack <- ["reopen_write", "mmap_write", "mprotect_write", "shrink"] do
        assert results[attack] in ["EPERM", "EACCES"],
               "#{attack}: #{inspect(results[attack])}\n#{out}"
      end

      assert results["attach_rw"] in ["PermissionError"], out
      assert results["read"] == "sealed", out

      {:ok, m} = SharedMemory.map_region(id)
      assert {:ok, "sealed"} = SharedMemory.read(m, 0, 6)
      assert {:ok, %{reference_count: 1}} = SharedMemory.get_region_info(id)
      :ok = SharedMemory.deallocate_region(id)
    end
  end
end
