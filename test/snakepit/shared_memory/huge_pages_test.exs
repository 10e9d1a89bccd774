defmodule Snakepit.SharedMemory.HugePagesTest do
  # huge_pages: :auto | true | false (issue 14). Reserves a few huge pages as root
  # (vm.nr_hugepages) and always restores the old value; without root the huge-page
  # path is skipped (the fallback is still tested).
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{ShmHelpers, WarmPool}
  alias Snakepit.SharedMemory.Test.PythonWorker

  @mib 1024 * 1024
  @nr "/proc/sys/vm/nr_hugepages"

  @worker ~S"""
  import json, sys
  import snakepit_shm
  for line in sys.stdin:
      cmd, _, arg = line.strip().partition(" ")
      try:
          ref = json.loads(arg)
          with snakepit_shm.attach(ref, mode=cmd) as r:
              head = bytes(r.buf[:4]).hex()
              tail = bytes(r.buf[r.size - 4:r.size]).hex()
              if cmd == "rw":
                  r.buf[r.size - 4:r.size] = b"\x01\x02\x03\x04"
          print(json.dumps({"head": head, "tail": tail}), flush=True)
      except Exception as exc:
          print(json.dumps({"error": repr(exc)}), flush=True)
  """

  defp root?, do: File.read!("/proc/self/status") =~ ~r/^Uid:\s+0\s/m

  defp hugetlb?, do: WarmPool.huge_pages().page_size > 0 and File.exists?(@nr)

  defp free_pages, do: WarmPool.huge_pages().free

  # Sets vm.nr_hugepages to `n` for the test; restores the old value on exit.
  defp reserve(n) do
    old = @nr |> File.read!() |> String.trim()
    on_exit(fn -> File.write!(@nr, old) end)
    File.write!(@nr, Integer.to_string(n))
    WarmPool.huge_pages()
  end

  defp ref_json(id) do
    {:ok, ref} = SM.export_ref(id)
    {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)
    json
  end

  setup do
    # Pooled objects would keep huge pages busy between tests.
    # (and another suite, e.g. the NIF fuzzer, may have left another budget)
    WarmPool.drain()
    :ok = WarmPool.set_budget(WarmPool.default_budget())
    on_exit(fn -> WarmPool.drain() end)
    :ok
  end

  test "huge_pages: true without free huge pages fails clearly; :auto falls back" do
    if root?() and hugetlb?() and free_pages() > 0, do: reserve(0)

    if free_pages() == 0 do
      assert {:error, %{reason: :no_space, message: message}} =
               SM.allocate_region(4 * @mib, huge_pages: true)

      assert message =~ "huge_pages: true"
      assert message =~ "nr_hugepages"

      {:ok, id} = SM.allocate_region(4 * @mib, huge_pages: :auto)
      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      :ok = SM.write(m, 4 * @mib - 1, <<7>>)
      assert {:ok, <<7>>} = SM.read(m, 4 * @mib - 1, 1)
      :ok = SM.unmap_region(m)
      :ok = SM.deallocate_region(id)
    end

    assert {:error, %{reason: :invalid_option}} = SM.allocate_region(4 * @mib, huge_pages: :yes)

    assert {:error, %{reason: :invalid_argument}} =
             SM.allocate_region(4 * @mib, huge_pages: true, backend: :posix)
  end

  @tag :huge_pages
  test "with a hugetlb pool, regions use huge pages and work end to end (Python, seal, pool)" do
    if not (root?() and hugetlb?()) do
      IO.puts("skipped: needs root and hugetlbfs to reserve huge pages")
    else
      info = reserve(8)
      page = info.page_size
      assert info.free >= 8
      free0 = free_pages()
      # 3 MiB + 1 byte: rounds up to two 2 MiB pages.
      size = 3 * @mib + 1
      {:ok, id} = SM.allocate_region(size, huge_pages: true)
      assert free_pages() == free0 - div(size + page - 1, page)

      {:ok, m} = SM.map_region(id, access_mode: :read_write)
      :ok = SM.write(m, 0, <<0xCA, 0xFE, 0xBA, 0xBE>>)
      :ok = SM.write(m, size - 4, <<9, 9, 9, 9>>)
      :ok = SM.unmap_region(m)

      worker = PythonWorker.start(@worker)

      try do
        assert %{"head" => "cafebabe", "tail" => "09090909"} =
                 PythonWorker.ask(worker, "rw " <> ref_json(id))

        {:ok, m} = SM.map_region(id)
        assert {:ok, <<1, 2, 3, 4>>} = SM.read(m, size - 4, 4)
        :ok = SM.unmap_region(m)

        # Sealing works on hugetlbfs (F_SEAL_WRITE), and read-only attach after it.
        :ok = SM.seal(id)
        assert %{"head" => "cafebabe"} = PythonWorker.ask(worker, "r " <> ref_json(id))
        assert %{"error" => _} = PythonWorker.ask(worker, "rw " <> ref_json(id))
        :ok = SM.deallocate_region(id)

        # An unsealed huge region goes to the pool and comes back, zeroed.
        {:ok, a} = SM.allocate_region(4 * @mib, huge_pages: true)
        {:ok, m} = SM.map_region(a, access_mode: :read_write)
        :ok = SM.write(m, 0, :binary.copy(<<0xEE>>, 4 * @mib))
        :ok = SM.unmap_region(m)
        :ok = SM.deallocate_region(a)
        hits = WarmPool.stats().hits
        {:ok, b} = SM.allocate_region(4 * @mib, huge_pages: :auto)
        assert WarmPool.stats().hits == hits + 1
        {:ok, m} = SM.map_region(b)
        assert {:ok, all} = SM.read(m, 0, 4 * @mib)
        assert all == :binary.copy(<<0>>, 4 * @mib)
        :ok = SM.unmap_region(m)
        assert %{"head" => "00000000"} = PythonWorker.ask(worker, "r " <> ref_json(b))
        :ok = SM.deallocate_region(b)
      after
        PythonWorker.stop(worker)
      end

      # :auto with too few free pages falls back to ordinary pages silently.
      WarmPool.drain()
      reserve(1)
      # The pool's objects are released by the core's reaper thread and the Python
      # worker's mapping with its exit: wait until the one reserved page is free (CI read
      # 0 here once, then 1 after the allocation).
      assert ShmHelpers.wait_until(fn -> free_pages() == 1 end, 10_000),
             "huge pages still in use: #{inspect(WarmPool.huge_pages())}"

      free1 = free_pages()
      {:ok, c} = SM.allocate_region(8 * @mib, huge_pages: :auto)
      assert free_pages() == free1
      :ok = SM.deallocate_region(c)
    end
  end

  test "the doctor says what the host offers" do
    finding = Snakepit.SharedMemory.CLI.Doctor.huge_pages()
    assert finding.check == "huge pages"
    assert finding.detail =~ ~r/hugetlbfs|reserved|free/
  end
end
