Code.require_file("../test_support.exs", __DIR__)

defmodule Snakepit.SharedMemory.AttackS3Test do
  # Attacks on the work merged in session 3 (runtime index, events, kept slot locks,
  # dirty slices, deferred encrypted creation): each test is one break that was found.
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Error, Native, Registry}
  alias Snakepit.SharedMemory.{ShmHelpers, TestSupport}

  @mib 1_048_576

  setup do: TestSupport.no_leaks()

  describe "read buffers (large reads in slices)" do
    test "never hand out bytes no slice filled (uninitialised VM memory)" do
      {:ok, id} = SM.allocate_region(2 * @mib)
      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      :ok = SM.write(m, 0, :binary.copy(<<7>>, 2 * @mib))

      # Taken before any slice: refused, never a binary of whatever the allocator had.
      {:ok, empty} = Native.read_buffer(4096)
      assert {:error, {:invalid_argument, message, _}} = Native.read_buffer_take(empty)
      assert message =~ "filled"

      # A slice that would leave a hole before it is refused; in order, it completes.
      {:ok, buffer} = Native.read_buffer(1000)
      assert {:error, {:invalid_argument, _, _}} = Native.read_into(m.ref, 0, buffer, 500, 500)
      assert :ok = Native.read_into(m.ref, 0, buffer, 0, 500)
      assert {:error, {:invalid_argument, _, _}} = Native.read_buffer_take(buffer)
      assert :ok = Native.read_into(m.ref, 0, buffer, 500, 500)
      assert {:ok, bin} = Native.read_buffer_take(buffer)
      assert bin == :binary.copy(<<7>>, 1000)

      # A zero-length buffer has nothing to fill.
      {:ok, none} = Native.read_buffer(0)
      assert {:ok, <<>>} = Native.read_buffer_take(none)
      :ok = SM.unmap_region(m)
    end
  end

  describe "encrypted regions created in slices" do
    test "a creator that dies before publishing leaves no named segment behind" do
      name = ShmHelpers.unique_name("atk")
      path = Path.join("/dev/shm", "spshm_n_" <> name)
      parent = self()

      opts =
        ShmHelpers.create_opts(%{
          backend: :posix,
          name: name,
          security_level: 1,
          encrypted: true,
          defer_chunks: true
        })

      # The allocating process is killed between two slices (here: after the first),
      # so the region is neither published nor registered: only that process's
      # reference kept it.
      pid =
        spawn(fn ->
          {:ok, region, %{role: :created}} = Native.create_cpu(40 * 65_536, opts)
          {:ok, _left} = Native.init_chunks(region, 0, 16)
          send(parent, :half_made)
          Process.sleep(:infinity)
        end)

      assert_receive :half_made, 10_000
      assert File.exists?(path)
      Process.exit(pid, :kill)

      assert ShmHelpers.wait_until(
               fn ->
                 :erlang.garbage_collect()
                 not File.exists?(path)
               end,
               10_000
             ),
             "#{path} was left behind, headerless"
    end

    test "another opener of a named region being created is told busy, not corrupt" do
      name = ShmHelpers.unique_name("atk")

      opts =
        ShmHelpers.create_opts(%{
          backend: :posix,
          name: name,
          security_level: 1,
          encrypted: true,
          defer_chunks: true
        })

      {:ok, region, %{role: :created}} = Native.create_cpu(40 * 65_536, opts)
      {:ok, _left} = Native.init_chunks(region, 0, 16)

      # The creator is alive and still encrypting: no header yet, but nothing is wrong
      # with the segment (and no cleanup should be run on it).
      assert {:error, %Error{reason: :busy} = error} =
               SM.allocate_region(:any, name: name, open_mode: :open_only)

      assert Exception.message(error) =~ "still creating it"

      {:ok, _} = Native.init_chunks(region, 16, 16)
      {:ok, 0} = Native.init_chunks(region, 32, 16)
      :ok = Native.publish(region)
      assert {:ok, id} = SM.allocate_region(:any, name: name, open_mode: :open_only)
      :ok = SM.deallocate_region(id)
      :ok = Native.deallocate(region, false)
    end

    test "allocate_region killed mid-creation: nothing left, nothing registered" do
      name = ShmHelpers.unique_name("atk")
      path = Path.join("/dev/shm", "spshm_n_" <> name)

      pid =
        spawn(fn ->
          SM.allocate_region(128 * @mib, name: name, backend: :posix, security_level: :high)
        end)

      # Killed once the segment exists (mid-creation, or just after: either way it goes).
      assert ShmHelpers.wait_until(fn -> File.exists?(path) end, 10_000)
      Process.exit(pid, :kill)
      assert ShmHelpers.wait_until(fn -> not File.exists?(path) end, 10_000)
      assert ShmHelpers.wait_until(fn -> not Enum.any?(Registry.ids(), &(&1 =~ name)) end)
    end
  end

  describe "holders learned by announcement" do
    test "list_regions/1 does not count a holder that died unannounced" do
      # No periodic check reaps a :manual region's slots of a holder the manager never
      # heard of (it reaps only where a watched holder was seen); the listing's count
      # and mapped_by must still not show a dead process.
      {:ok, id} = SM.allocate_region(4096, cleanup_policy: :manual)
      {:ok, ref} = SM.export_ref(id)
      {port, os_pid} = silent_holder(ref)
      assert %{reference_count: 1, mapped_by: [%{os_pid: ^os_pid}]} = listed(id)
      TestSupport.kill9(os_pid)
      assert_receive {^port, {:exit_status, _}}, 5_000

      assert %{reference_count: 0, mapped_by: []} = listed(id)
      :ok = SM.deallocate_region(id)
    end
  end

  describe "the exported quota directory" do
    test "is absolute, whatever the working directory of the worker" do
      alias Snakepit.SharedMemory.HostQuota.RuntimeDir
      previous = System.get_env("SNAKEPIT_SHM_VM_QUOTA_DIR")

      try do
        # A first-time user's host_quota_dir: "tmp/quota" (relative to the VM's cwd).
        :ok = RuntimeDir.export_env("tmp/quota")
        assert System.get_env("SNAKEPIT_SHM_VM_QUOTA_DIR") == Path.expand("tmp/quota")
      after
        if previous,
          do: System.put_env("SNAKEPIT_SHM_VM_QUOTA_DIR", previous),
          else: System.delete_env("SNAKEPIT_SHM_VM_QUOTA_DIR")
      end
    end
  end

  defp listed(id) do
    {:ok, all} = SM.list_regions()
    Enum.find(all, &(&1.id == id))
  end

  # A worker that holds `ref` but never announces it (an older client, or its datagram
  # was lost: a full queue makes sendto fail with EAGAIN, which is ignored).
  defp silent_holder(ref) do
    TestSupport.python_holder(ref, "r", """
    from snakepit_shm import _announce
    _announce.announce = lambda *args: None
    """)
  end
end
