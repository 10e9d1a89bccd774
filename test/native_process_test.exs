defmodule Snakepit.SharedMemory.NativeProcessTest do
  # Tests of the NIF layer (c_src/nif) about processes: owner monitors, pidfd watches,
  # identities, a hostile peer process, concurrency and hot code reload. Not async: it
  # reloads the NIF module and may register the manager's name.
  use Snakepit.SharedMemory.NativeCase, async: false

  @manager Snakepit.SharedMemory.Manager

  describe "monitor_owner/2" do
    test "tells the manager when the owner dies" do
      {region, info} = create!(4 * @kib)

      case Process.whereis(@manager) do
        nil ->
          Process.register(self(), @manager)
          owner = spawn(fn -> Process.sleep(:infinity) end)
          assert :ok = Native.monitor_owner(region, owner)
          Process.exit(owner, :kill)
          assert_receive {:snakepit_shm_owner_down, id, ^owner}, 1000
          assert id == info.id
          Process.unregister(@manager)

        manager ->
          :erlang.trace(manager, true, [:receive, {:tracer, self()}])
          owner = spawn(fn -> Process.sleep(:infinity) end)
          assert :ok = Native.monitor_owner(region, owner)
          Process.exit(owner, :kill)
          id = info.id
          assert_receive {:trace, ^manager, :receive, {:snakepit_shm_owner_down, ^id, ^owner}}
          :erlang.trace(manager, false, [:receive])
      end
    end

    test "a dead owner is not_found; a non-pid raises" do
      {region, _} = create!(4 * @kib)
      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, _, _, _}
      assert_error(Native.monitor_owner(region, dead), :not_found)
      assert_raise ArgumentError, fn -> Native.monitor_owner(region, :owner) end
      assert_raise ArgumentError, fn -> Native.monitor_owner(region, make_ref()) end
    end
  end

  describe "watch_os_process/3 and cancel_watch/1" do
    test "the caller receives :ready_input when the process is killed" do
      {port, os_pid, start} = spawn_sleep()
      ref = make_ref()
      assert {:ok, watch} = Native.watch_os_process(os_pid, start, ref)
      refute_received {:select, _, _, _}
      {_, 0} = System.cmd("kill", ["-9", Integer.to_string(os_pid)])
      assert_receive {:select, ^watch, ^ref, :ready_input}, 1000
      assert_receive {^port, {:exit_status, _}}, 1000
      assert :ok = Native.cancel_watch(watch)
      assert :ok = Native.cancel_watch(watch)
    end

    test "a wrong start time or a missing process is not_found" do
      {port, os_pid, start} = spawn_sleep()
      assert_error(Native.watch_os_process(os_pid, start + 1, make_ref()), :not_found)
      Port.close(port)
      System.cmd("kill", ["-9", Integer.to_string(os_pid)])
      assert ShmHelpers.wait_until(fn -> not Native.process_alive(os_pid, start) end)
      assert_error(Native.watch_os_process(os_pid, start, make_ref()), :not_found)
      assert_error(Native.watch_os_process(0, 0, make_ref()), :invalid_argument)
      assert_error(Native.watch_os_process(@u64_max + 1, 0, make_ref()), :invalid_argument)
    end

    test "a watch whose creator exits without cancel_watch closes its pidfd" do
      {port, os_pid, start} = spawn_sleep()
      pidfds = fn -> length(ShmHelpers.own_fds("pidfd")) end
      baseline = pidfds.()
      parent = self()

      pid =
        spawn(fn ->
          {:ok, _watch} = Native.watch_os_process(os_pid, start, make_ref())
          send(parent, {:watching, pidfds.()})
        end)

      assert_receive {:watching, count}
      assert count == baseline + 1
      ref = Process.monitor(pid)
      assert_receive {:DOWN, ^ref, _, _, _}
      assert ShmHelpers.wait_until(fn -> pidfds.() == baseline end)
      Port.close(port)
      System.cmd("kill", ["-9", Integer.to_string(os_pid)])
    end

    test "raise ArgumentError for arguments of the wrong type" do
      assert_raise ArgumentError, fn -> Native.watch_os_process(1, 0, :ref) end
      assert_raise ArgumentError, fn -> Native.watch_os_process(-1, 0, make_ref()) end
      assert_raise ArgumentError, fn -> Native.watch_os_process(1, 1.0, make_ref()) end
      assert_raise ArgumentError, fn -> Native.cancel_watch(make_ref()) end
    end
  end

  describe "process_start_time/1, process_alive/2 and self_info/0" do
    test "identify this VM" do
      %{os_pid: pid, start_time: start, boot_id: boot} = Native.self_info()
      assert pid == String.to_integer(System.pid())
      assert boot =~ ~r/^[0-9a-f]{32}$/
      assert {:ok, ^start} = Native.process_start_time(pid)
      assert Native.process_alive(pid, start)
      refute Native.process_alive(pid, start + 1)
      refute Native.process_alive(0, start)
      refute Native.process_alive(@u64_max + 1, start)
    end

    test "bad pids" do
      assert_error(Native.process_start_time(0), :invalid_argument)
      assert_error(Native.process_start_time(@u64_max), :invalid_argument)
      assert_error(Native.process_start_time(4_194_304 + 12_345), :not_found)
      assert_raise ArgumentError, fn -> Native.process_start_time(-1) end
      assert_raise ArgumentError, fn -> Native.process_start_time("1") end
      assert_raise ArgumentError, fn -> Native.process_alive(1, -1) end
    end
  end

  describe "a peer OS process" do
    test "cannot shrink or grow a memfd region (EPERM) and the VM keeps running" do
      {region, info} = create!(64 * @kib)
      m = map!(region)
      :ok = Native.write(m, 64 * @kib - 5, "tail!")

      script = """
      import errno, os, sys
      for path in sys.argv[1:]:
          fd = os.open(path, os.O_RDWR)
          for size in (0, 1 << 30):
              try:
                  os.ftruncate(fd, size)
                  print("RESIZED")
              except OSError as e:
                  print(errno.errorcode[e.errno])
      """

      {out, 0} =
        System.cmd(ShmHelpers.python(), ["-c", script, info.data_path, info.control_path])

      assert String.split(out) == ["EPERM", "EPERM", "EPERM", "EPERM"]
      assert {:ok, "tail!"} = Native.read(m, 64 * @kib - 5, 5)
    end
  end

  describe "concurrent use" do
    test "readers, writers, unmap and deallocate racing end in clean results" do
      {region, _} = create!(256 * @kib, encrypted: true, security_level: 1)
      parent = self()
      expected = [:closed, :deallocated, :sealed]

      workers =
        for i <- 1..4 do
          spawn_link(fn ->
            m = map!(region)

            results =
              for j <- 1..300 do
                offset = rem(i * 7919 + j * 4099, 200 * @kib)

                case {Native.write(m, offset, pattern(4 * @kib, i)),
                      Native.read(m, offset, 4 * @kib)} do
                  {:ok, {:ok, _}} -> :ok
                  {w, r} -> Enum.find([w, r], &match?({:error, _}, &1)) |> elem(1) |> elem(0)
                end
              end

            send(parent, {:done, self(), results})
          end)
        end

      Process.sleep(5)
      :ok = Native.deallocate(region, false)

      for pid <- workers do
        assert_receive {:done, ^pid, results}, 10_000
        assert Enum.all?(results, &(&1 == :ok or &1 in expected)), inspect(Enum.uniq(results))
      end

      assert {:ok, %{deallocated: true}} = Native.header(region)
    end
  end

  describe "hot code reload" do
    test "upgrade keeps existing resources valid" do
      {region, _} = create!(8 * @kib)
      m = map!(region)
      :ok = Native.write(m, 0, "old code")

      {Native, beam, file} = :code.get_object_code(Native)
      assert {:module, Native} = :code.load_binary(Native, file, beam)
      assert :code.soft_purge(Native)

      assert {:ok, "old code"} = Native.read(m, 0, 8)
      :ok = Native.write(m, 0, "new code")
      assert {:ok, "new code"} = Native.read(m, 0, 8)
      assert Native.info(region).size == 8 * @kib
      assert :ok = Native.unmap(m)
      {fresh, _} = create!(4 * @kib)
      assert {:ok, _} = Native.map(fresh, :read_only)
    end
  end
end
