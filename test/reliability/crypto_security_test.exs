defmodule Snakepit.SharedMemory.Reliability.CryptoSecurityTest do
  # Encrypted (:high, :maximum) regions seen from outside the VM: shared memory never
  # holds plaintext nor the key, tampered ciphertext is an error (in Elixir and Python),
  # freed regions are zero before their name goes, and no log line carries the key.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Error, ReliabilityHelpers}

  @moduletag :reliability
  @moduletag timeout: 300_000

  @marker "PLAINTEXT-MARKER-0123456789abcdef"
  @size 300 * 1024

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    ReliabilityHelpers.check_segments_on_exit()
    :ok
  end

  defp plaintext(size),
    do: binary_part(:binary.copy(@marker, div(size, byte_size(@marker)) + 1), 0, size)

  # Every byte of shared memory of a region, read through descriptors of our own (not
  # through the VM's mapping): header and data.
  defp shared_bytes(ref) do
    control = File.read!(ref["control_path"])
    data = if ref["data_path"] == ref["control_path"], do: "", else: File.read!(ref["data_path"])
    control <> data
  end

  defp key_forms(key) do
    [
      key,
      Base.encode64(key),
      Base.encode16(key, case: :lower),
      Base.encode16(key, case: :upper),
      Base.url_encode64(key, padding: false),
      inspect(key, binaries: :as_binaries)
    ]
  end

  defp allocate_written(level, backend) do
    {:ok, id} = SharedMemory.allocate_region(@size, security_level: level, backend: backend)
    {:ok, m} = SharedMemory.map_region(id)
    :ok = SharedMemory.write(m, 0, plaintext(@size))
    {id, m}
  end

  for level <- [:high, :maximum], backend <- [:memfd, :posix] do
    test "#{level} #{backend}: shared memory holds neither plaintext nor the key" do
      {id, m} = allocate_written(unquote(level), unquote(backend))
      :ok = SharedMemory.seal(id)
      {:ok, ref} = SharedMemory.export_ref(id, include_key: true)
      key = Base.decode64!(ref["key"])
      bytes = shared_bytes(ref)
      assert byte_size(bytes) > @size

      # Not even 16 bytes of the plaintext, nor the key in any encoding.
      refute :binary.match(bytes, binary_part(@marker, 0, 16)) != :nomatch,
             "plaintext in shared memory"

      for form <- key_forms(key),
          do: refute(:binary.match(bytes, form) != :nomatch, "key in shared memory")

      assert {:ok, data} = SharedMemory.read(m, 1000, 5000)
      assert data == binary_part(plaintext(@size), 1000, 5000)
      :ok = SharedMemory.deallocate_region(id)
    end
  end

  test "tampered ciphertext is an error in Elixir and in Python" do
    {id, m} = allocate_written(:high, :memfd)
    {:ok, ref} = SharedMemory.export_ref(id, include_key: true)
    data_path = ref["data_path"]

    # Flip one byte of the second chunk's ciphertext through a descriptor of our own.
    {:ok, fd} = :file.open(data_path, [:read, :write, :raw, :binary])
    offset = ref["data_offset"] + 65_536 + 40 + 100
    {:ok, <<byte>>} = :file.pread(fd, offset, 1)
    :ok = :file.pwrite(fd, offset, <<Bitwise.bxor(byte, 0x01)>>)
    :ok = :file.close(fd)

    assert {:ok, _} = SharedMemory.read(m, 0, 1000), "the first chunk is intact"

    assert {:error, %Error{reason: :tampered, message: message}} =
             SharedMemory.read(m, 65_536, 10)

    assert message =~ "authentication"
    assert {:error, %Error{reason: :tampered}} = SharedMemory.read(m, 0, @size)

    script = """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import snakepit_shm
    with snakepit_shm.attach(json.loads(sys.argv[1])) as region:
        try:
            region.read()
            print("READ")
        except Exception as exc:
            print(type(exc).__name__, exc)
    """

    {:ok, json} = Snakepit.SharedMemory.JSON.encode(ref)
    {out, 0} = ReliabilityHelpers.python(script, [json])
    refute out =~ "READ", out
    assert out =~ ~r/tamper|authentic|corrupt/i, out
    :ok = SharedMemory.deallocate_region(id)
  end

  for backend <- [:memfd, :posix] do
    test "a freed :high #{backend} region is zero before its name goes" do
      {id, _m} = allocate_written(:high, unquote(backend))
      {:ok, ref} = SharedMemory.export_ref(id)
      # Keep our own descriptors: they still reach the memory after deallocation.
      {:ok, data_fd} = :file.open(ref["data_path"], [:read, :raw, :binary])
      {:ok, control_fd} = :file.open(ref["control_path"], [:read, :raw, :binary])
      {:ok, before} = :file.pread(data_fd, ref["data_offset"], 65_536)
      assert before != <<0::size(65_536)-unit(8)>>

      :ok = SharedMemory.deallocate_region(id)
      if unquote(backend) == :posix, do: refute(File.exists?("/dev/shm/" <> id))

      {:ok, after_free} = :file.pread(data_fd, ref["data_offset"], @size + 40 * 5)
      assert after_free == <<0::size(byte_size(after_free))-unit(8)>>, "data left after free"
      {:ok, <<state::little-32>>} = :file.pread(control_fd, 2048, 4)
      assert Bitwise.band(state, 2) == 2, "the header is not marked deallocated"
      :file.close(data_fd)
      :file.close(control_fd)
    end
  end

  test "no key reaches the logs, even with every audit line of :maximum at :debug" do
    previous = Logger.level()
    Logger.configure(level: :debug)

    {log, keys} =
      try do
        with_log(fn ->
          for level <- [:high, :maximum] do
            {id, m} = allocate_written(level, :memfd)
            {:ok, _} = SharedMemory.read(m, 0, 100)
            :ok = SharedMemory.seal(id)
            {:ok, ref} = SharedMemory.export_ref(id, include_key: true)
            {:ok, no_key} = SharedMemory.export_ref(id)
            refute Map.has_key?(no_key, "key")
            {:ok, info} = SharedMemory.get_region_info(id)
            {:ok, stats} = SharedMemory.stats()
            key = Base.decode64!(ref["key"])
            # Nothing the API returns besides the explicit export carries the key.
            for form <- key_forms(key), term <- [info, stats, no_key] do
              refute inspect(term, limit: :infinity, printable_limit: :infinity) =~ form
            end

            # A refused access and a failed read are logged too.
            other = spawn(fn -> :ok end)

            _ =
              SharedMemory.allocate_region(4096, security_level: level, allowed_processes: [other])

            :ok = SharedMemory.unmap_region(m)
            :ok = SharedMemory.deallocate_region(id)
            key
          end
        end)
        |> then(fn {keys, log} -> {log, keys} end)
      after
        Logger.configure(level: previous)
      end

    assert log =~ "audit", "the :maximum lifecycle produced no audit log: #{log}"

    for key <- keys, form <- key_forms(key) do
      refute String.contains?(log, form), "a key appears in the log"
    end
  end
end
