defmodule SnakepitShm.Bench.Crypto do
  @moduledoc """
  Issue 6, part 5: the product's encryption (`write/3` into a `:high` region),
  decryption (`read/3` of it) and secure zeroing (`deallocate_region/1` of a `:high`
  region, which zeroes its memory), against libsodium and libc called directly from
  C++ (`crypto_ref`) on the same number of bytes, in the same rounds. While each product
  operation runs, a probe process on a normal scheduler sleeps 1 ms in a loop and
  records how late it wakes up; the same probe runs once on an idle VM for the floor.
  """

  alias Snakepit.SharedMemory, as: SM
  alias SnakepitShm.Bench.Programs

  @doc """
  Returns `%{size, product: %{op => [ns]}, direct: %{op => [ns]}, probe: %{op => [max
  overshoot ns per round]}, idle: %{same_length_sleep: [max overshoot ns per round]},
  idle_probe: [overshoot ns samples of a 300 ms idle probe before the rounds]}`.
  """
  def run(profile, payload, programs) do
    size = profile.crypto_size
    data = binary_part(payload, 0, size)
    direct = Programs.open_line_port(programs.crypto_ref)

    try do
      Enum.each(~w(encrypt decrypt memset memzero), &direct_ns(direct, &1, size))
      idle_probe = probe_during(fn -> Process.sleep(300) end) |> elem(1)

      rounds = for _ <- 1..profile.crypto_reps, do: round(direct, data)

      %{
        size: size,
        product: collect(rounds, :product),
        direct: collect(rounds, :direct),
        probe: collect(rounds, :probe),
        idle: collect(rounds, :idle),
        idle_probe: idle_probe
      }
    after
      Programs.close_line_port(direct)
    end
  end

  defp collect(rounds, key) do
    keys = rounds |> hd() |> Map.fetch!(key) |> Map.keys()
    Map.new(keys, fn k -> {k, Enum.map(rounds, &get_in(&1, [key, k]))} end)
  end

  defp round(direct, data) do
    size = byte_size(data)
    {:ok, id} = SM.allocate_region(size, security_level: :high)
    {:ok, mapping} = SM.map_region(id, access_mode: :read_write)

    {encrypt, encrypt_probe} = probe_during(fn -> :ok = SM.write(mapping, 0, data) end)
    # The same probe over an idle sleep as long as the encryption: what the machine
    # itself (other work, the OS) does to a 1 ms sleep in this round.
    {_, idle_probe} = probe_during(fn -> Process.sleep(max(1, div(encrypt, 1_000_000))) end)
    # And over OTP's own heavy work on a dirty CPU scheduler (crypto:hash/2 of the same
    # bytes): what any long dirty NIF does to the probe on this machine.
    {_, otp_probe} = probe_during(fn -> :crypto.hash(:sha256, data) end)

    {decrypt, decrypt_probe} =
      probe_during(fn -> Process.put(:decrypted, SM.read(mapping, 0, size)) end)

    verify_decrypted(data)
    :erlang.garbage_collect()
    :ok = SM.unmap_region(mapping)
    {zero, zero_probe} = probe_during(fn -> :ok = SM.deallocate_region(id) end)

    %{
      product: %{encrypt: encrypt, decrypt: decrypt, zero: zero},
      direct: %{
        encrypt: direct_ns(direct, "encrypt", size),
        decrypt: direct_ns(direct, "decrypt", size),
        memzero: direct_ns(direct, "memzero", size),
        memset: direct_ns(direct, "memset", size)
      },
      probe: %{
        encrypt: max_overshoot(encrypt_probe),
        decrypt: max_overshoot(decrypt_probe),
        zero: max_overshoot(zero_probe)
      },
      idle: %{
        same_length_sleep: max_overshoot(idle_probe),
        otp_dirty_hash: max_overshoot(otp_probe)
      }
    }
  end

  # After the probe window: comparing two large binaries is one BIF call on a normal
  # scheduler, the bench's cost, not the product's.
  defp verify_decrypted(data) do
    {:ok, back} = Process.delete(:decrypted)
    if back != data, do: raise("decrypted data differs from what was written")
    :ok
  end

  defp direct_ns(port, op, size),
    do: port |> Programs.line_request("#{op} #{size}") |> String.to_integer()

  defp max_overshoot([]), do: 0
  defp max_overshoot(samples), do: Enum.max(samples)

  @doc """
  Runs `fun` while a probe process sleeps 1 ms in a loop; returns `{ns taken by fun,
  [overshoot ns of each sleep]}`.
  """
  def probe_during(fun) do
    {start, stop, samples} = probe_run(fun)
    {stop - start, Enum.map(samples, fn {late, _woke} -> late end)}
  end

  @doc """
  Runs `fun` while a probe process sleeps 1 ms in a loop; returns `{start, stop,
  [{overshoot ns, monotonic ns it woke at}]}` (monotonic ns around `fun`).
  """
  def probe_run(fun) do
    parent = self()
    probe = spawn_link(fn -> probe_loop(parent, []) end)
    # Let the probe reach its first sleep before the work starts.
    Process.sleep(5)
    start = System.monotonic_time(:nanosecond)
    fun.()
    stop = System.monotonic_time(:nanosecond)
    send(probe, :stop)

    receive do
      {^probe, samples} -> {start, stop, samples}
    end
  end

  defp probe_loop(parent, acc) do
    receive do
      :stop -> send(parent, {self(), acc})
    after
      0 ->
        before = System.monotonic_time(:nanosecond)
        Process.sleep(1)
        woke = System.monotonic_time(:nanosecond)
        probe_loop(parent, [{woke - before - 1_000_000, woke} | acc])
    end
  end
end
