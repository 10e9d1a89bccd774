defmodule SnakepitShm.Bench.Handoff do
  @moduledoc """
  Issue 6, part 1: handing an Elixir binary to a persistent Python worker that reads
  every byte (xor-reduce over a numpy uint64 view), by five paths measured in the same
  rounds, their order rotated from round to round:

    * `:fresh` - allocate a region, map, write, export the ref, the worker attaches,
      reduces and closes, reply; then unmap, deallocate and the garbage collection
      that releases the memory (all timed);
    * `:warm` - the same region every time (allocated once per size, outside the
      timing); the worker keeps its attachment; timed: write, message, reduce, reply;
    * `:port` - the payload through the worker's Erlang port (stdio, `{packet, 4}`),
      with the pipe as the OS makes it (64 KiB): what an Erlang Port is by default;
    * `:port_1m` - the same with the pipe enlarged to 1 MiB (F_SETPIPE_SZ), the
      fastest Port we could make here (a second worker process);
    * `:socket` - the payload through a Unix domain socket (`gen_tcp`, `{packet, 4}`);
    * `:reference` - C++: one memcpy into touched memory plus the same read pass;
    * `:channel` - (b') the warm region, but the message naming it (region id + length,
      24 bytes) and the 8-byte answer travel over a `Snakepit.SharedMemory.Channel`
      (shared-memory rings, eventfd doorbells) instead of the Port: the product's best
      path (issue 15). Target: faster than the Port at every size.
    * `:fresh_pooled` - (a') the fresh path with the warm pool on (issue 14): each
      handoff's region is made from the object the previous one freed (one untimed
      handoff warms the pool before the timed ones). `:fresh` itself runs with the pool
      off and ordinary pages: the cost of truly fresh pages.
    * `:fresh_huge` - (a'') the fresh path on huge pages (`huge_pages: true`, pool off),
      only where the host's hugetlb pool has room for the payload.
  """

  alias Snakepit.SharedMemory, as: SM
  alias Snakepit.SharedMemory.{Channel, Config, JSON, WarmPool}
  alias SnakepitShm.Bench.Programs

  @paths [
    :fresh,
    :warm,
    :port,
    :port_1m,
    :socket,
    :reference,
    :channel,
    :fresh_pooled,
    :fresh_huge
  ]
  @socket_buffer 4 * 1024 * 1024

  def paths, do: @paths

  # :fresh_huge only where the host's hugetlb pool holds the payload.
  defp active_paths(size) do
    %{page_size: page, free: free} = WarmPool.huge_pages()
    huge? = page > 0 and free * page >= div(size + page - 1, page) * page
    if huge?, do: @paths, else: @paths -- [:fresh_huge]
  end

  @doc """
  Runs every size of `profile.handoff_sizes`. Returns one map per size with
  `samples: %{path => [ns per handoff, one per round]}` and, for the largest size, a
  breakdown of the fresh and warm paths.
  """
  def run(profile, payload, programs) do
    worker = Programs.open_python("worker.py", [Programs.python_client_dir()])
    plain = Programs.open_python("worker.py", [Programs.python_client_dir(), "--default-pipe"])
    reference = Programs.open_line_port(programs.handoff_ref)
    # the channel path has a worker process of its own: its channel thread (spinning
    # briefly after each message) must not share a GIL with the other paths' serving
    chan_worker = Programs.open_python("worker.py", [Programs.python_client_dir()])
    {listener, socket, socket_path} = open_socket(worker)
    channel = open_channel(chan_worker)

    ctx = %{
      worker: worker,
      chan_worker: chan_worker,
      plain_worker: plain,
      reference: reference,
      socket: socket,
      channel: channel
    }

    try do
      sizes = Enum.filter(profile.handoff_sizes, &(&1 <= byte_size(payload)))

      Enum.map(sizes, fn size ->
        data = binary_part(payload, 0, size)
        measure_size(ctx, profile, data, size == profile.headline_size)
      end)
    after
      Channel.close(channel)
      :gen_tcp.close(socket)
      :gen_tcp.close(listener)
      File.rm(socket_path)
      Programs.close_python(worker)
      Programs.close_python(plain)
      Programs.close_python(chan_worker)
      Programs.close_line_port(reference)
    end
  end

  defp open_socket(worker) do
    path = Path.join(System.tmp_dir!(), "snakepit_bench_#{System.pid()}.sock")
    File.rm(path)

    opts = [
      :binary,
      {:ifaddr, {:local, String.to_charlist(path)}},
      packet: 4,
      active: false,
      sndbuf: @socket_buffer,
      recbuf: @socket_buffer
    ]

    {:ok, listener} = :gen_tcp.listen(0, opts)
    Port.command(worker, ["U", path])
    {:ok, socket} = :gen_tcp.accept(listener, 30_000)
    <<?R, _::binary>> = Programs.await_reply(worker)
    {listener, socket, path}
  end

  # The worker connects to the channel in a thread of its own and answers on the port
  # once connected. Active mode: an answer arrives as a message, as a Port's does.
  defp open_channel(worker) do
    {:ok, channel} = ok!(Channel.open(active: true), :channel_open)
    {:ok, json} = JSON.encode(Channel.export_ref(channel))

    case Programs.request(worker, ["C", json]) do
      <<?R, _::binary>> -> channel
      other -> raise "the worker could not connect to the channel: #{inspect(other)}"
    end
  end

  defp measure_size(ctx, profile, data, headline?) do
    size = byte_size(data)
    iterations = iterations(profile, size)
    warm = setup_warm(data)
    ctx = Map.put(ctx, :warm, warm)

    try do
      bind_channel(ctx, warm, size)
      paths = active_paths(size)
      check_agreement(ctx, data, paths)

      rounds =
        for round <- 1..rounds(profile, headline?) do
          order = rotate(paths, round)
          Map.new(order, fn path -> {path, time_path(ctx, path, data, iterations)} end)
        end

      samples = Map.new(paths, fn p -> {p, Enum.map(rounds, &Map.fetch!(&1, p))} end)
      breakdown = if headline?, do: breakdown(ctx, data, profile.handoff_reps), else: nil
      %{size: size, iterations: iterations, samples: samples, breakdown: breakdown}
    after
      teardown_warm([ctx.worker, ctx.chan_worker], warm)
    end
  end

  # The headline size carries the targets: more rounds there (they are cheap at
  # 256 MiB), so that one round disturbed by other work moves the median less.
  defp rounds(profile, true), do: profile.headline_reps
  defp rounds(profile, false), do: profile.handoff_reps

  defp iterations(profile, size) do
    (profile.handoff_budget_bytes / size) |> trunc() |> max(1) |> min(profile.max_iterations)
  end

  defp rotate(list, n),
    do: Enum.drop(list, rem(n, length(list))) ++ Enum.take(list, rem(n, length(list)))

  # One untimed handoff by every path: warms each up, and checks that all agree on the
  # xor of the payload (a wrong path must fail the bench, not report a number).
  defp check_agreement(ctx, data, paths) do
    results =
      for path <- paths -- [:reference],
          do: {path, with_pool(path, fn -> handoff(ctx, path, data) end)}

    values = results |> Enum.map(fn {_, {x, _}} -> x end) |> Enum.uniq()

    if length(values) != 1,
      do:
        raise(
          "handoff paths disagree on the xor of #{byte_size(data)} bytes: #{inspect(results)}"
        )

    Programs.line_request(ctx.reference, "run #{byte_size(data)} 1")
  end

  defp time_path(ctx, :reference, data, iterations) do
    [ns, _xor] =
      ctx.reference
      |> Programs.line_request("run #{byte_size(data)} #{iterations}")
      |> String.split()

    String.to_integer(ns) / iterations
  end

  defp time_path(ctx, path, data, iterations) do
    with_pool(path, fn ->
      # (a'): one untimed handoff leaves an object of this size in the pool.
      if path == :fresh_pooled, do: handoff(ctx, path, data)
      start = System.monotonic_time(:nanosecond)
      for _ <- 1..iterations, do: handoff(ctx, path, data)
      (System.monotonic_time(:nanosecond) - start) / iterations
    end)
  end

  # The fresh paths other than (a') run with the warm pool off (budget 0), untimed
  # around them; the configured budget is restored after each.
  defp with_pool(path, fun) when path in [:fresh, :fresh_huge] do
    :ok = WarmPool.set_budget(0)

    try do
      fun.()
    after
      :ok = WarmPool.set_budget(WarmPool.budget(Config.get(:pool_bytes)))
    end
  end

  defp with_pool(_path, fun), do: fun.()

  # ---- the paths; each returns {xor, worker timings} ----

  defp handoff(ctx, path, data) when path in [:fresh, :fresh_pooled, :fresh_huge] do
    size = byte_size(data)
    huge = path == :fresh_huge
    {:ok, id} = ok!(SM.allocate_region(size, huge_pages: huge), :allocate_region)
    {:ok, mapping} = ok!(SM.map_region(id, access_mode: :read_write), :map_region)
    :ok = ok!(SM.write(mapping, 0, data), :write)
    {:ok, ref} = ok!(SM.export_ref(id), :export_ref)
    {:ok, json} = JSON.encode(ref)
    result = decode(Programs.request(ctx.worker, ["S", json]))
    :ok = ok!(SM.unmap_region(mapping), :unmap_region)
    :ok = ok!(SM.deallocate_region(id), :deallocate_region)
    release_memory()
    result
  end

  defp handoff(ctx, :warm, data) do
    :ok = ok!(SM.write(ctx.warm.mapping, 0, data), :write)
    {:ok, json} = JSON.encode(%{"ref" => ctx.warm.ref, "length" => byte_size(data)})
    decode(Programs.request(ctx.worker, ["W", json]))
  end

  defp handoff(ctx, :channel, data) do
    :ok = ok!(SM.write(ctx.warm.mapping, 0, data), :write)
    channel_request(ctx.channel, [<<byte_size(data)::little-64>>, ctx.warm.id])
  end

  defp handoff(ctx, :port, data), do: decode(Programs.request(ctx.plain_worker, ["P", data]))
  defp handoff(ctx, :port_1m, data), do: decode(Programs.request(ctx.worker, ["P", data]))

  defp handoff(ctx, :socket, data) do
    :ok = :gen_tcp.send(ctx.socket, data)
    {:ok, reply} = :gen_tcp.recv(ctx.socket, 0, 600_000)
    decode(reply)
  end

  # The region's memory goes back to the OS when its resource is garbage collected
  # (munmap, close, pages freed). Collected here, inside the timing, so that the cost is
  # counted where it belongs instead of landing in whichever path runs next.
  defp release_memory, do: :erlang.garbage_collect()

  defp decode(<<?R, xor::little-64, timings::binary>>),
    do: {xor, for(<<ns::little-64 <- timings>>, do: ns)}

  defp channel_request(channel, message) do
    :ok = ok!(Channel.send(channel, message), :channel_send)

    receive do
      {:snakepit_shm_channel, ^channel, reply} -> decode(reply)
      {:snakepit_shm_channel_closed, ^channel, reason} -> raise "channel closed: #{reason}"
    after
      600_000 -> raise "the worker did not answer on the channel"
    end
  end

  # Once per size, untimed: the worker attaches the warm region (by its full ref) and
  # keeps it, so that each timed message needs only the region id and the length.
  defp bind_channel(ctx, warm, size) do
    {:ok, json} = JSON.encode(%{"ref" => warm.ref, "length" => size})
    channel_request(ctx.channel, json)
  end

  defp setup_warm(data) do
    {:ok, id} = ok!(SM.allocate_region(byte_size(data)), :allocate_region)
    {:ok, mapping} = ok!(SM.map_region(id, access_mode: :read_write), :map_region)
    {:ok, ref} = ok!(SM.export_ref(id), :export_ref)
    %{id: id, mapping: mapping, ref: ref}
  end

  defp teardown_warm(workers, warm) do
    for worker <- workers, do: Programs.request(worker, ["D", warm.id])
    SM.unmap_region(warm.mapping)
    SM.deallocate_region(warm.id)
  end

  # ---- where the time of the fresh and warm paths goes (headline size) ----

  defp breakdown(ctx, data, reps) do
    fresh = for _ <- 1..reps, do: fresh_steps(ctx, data)
    warm = for _ <- 1..reps, do: warm_steps(ctx, data)
    channel = for _ <- 1..reps, do: channel_steps(ctx, data)
    %{fresh: transpose(fresh), warm: transpose(warm), channel: transpose(channel)}
  end

  defp fresh_steps(ctx, data) do
    t = fn -> System.monotonic_time(:nanosecond) end
    t0 = t.()
    {:ok, id} = SM.allocate_region(byte_size(data))
    t1 = t.()
    {:ok, mapping} = SM.map_region(id, access_mode: :read_write)
    t2 = t.()
    :ok = SM.write(mapping, 0, data)
    t3 = t.()
    {:ok, ref} = SM.export_ref(id)
    {:ok, json} = JSON.encode(ref)
    t4 = t.()
    {_xor, [attach, reduce, close]} = decode(Programs.request(ctx.worker, ["S", json]))
    t5 = t.()
    :ok = SM.unmap_region(mapping)
    t6 = t.()
    :ok = SM.deallocate_region(id)
    t7 = t.()
    release_memory()
    t8 = t.()
    released = await_release(ref["data_path"], id)

    [
      {"allocate_region", t1 - t0},
      {"map_region", t2 - t1},
      {"write", t3 - t2},
      {"export_ref + JSON", t4 - t3},
      {"worker: attach", attach},
      {"worker: xor-reduce", reduce},
      {"worker: close", close},
      {"messaging (round trip less worker time)", t5 - t4 - attach - reduce - close},
      {"unmap_region", t6 - t5},
      {"deallocate_region", t7 - t6},
      {"garbage collection of the caller", t8 - t7},
      {"total (as the caller sees it)", t8 - t0},
      {"not in the total: the VM closes the region (memory back to the OS), after deallocate",
       released}
    ]
  end

  # The region's memory goes back to the OS when the VM's last reference to its resource
  # is collected, which may be in another process (the manager keeps region references
  # between holder scans): poll the data memfd's descriptor until it is closed. Returns
  # ns since the call, or the cap (5 s) if it stays open.
  @release_cap_ns 5_000_000_000
  defp await_release(data_path, id) do
    start = System.monotonic_time(:nanosecond)
    poll_release(data_path, "memfd:" <> id, start)
  end

  defp poll_release(nil, _link, _start), do: 0

  defp poll_release(path, link, start) do
    elapsed = System.monotonic_time(:nanosecond) - start

    case File.read_link(path) do
      {:ok, target} when elapsed < @release_cap_ns ->
        if String.contains?(target, link) do
          Process.sleep(1)
          poll_release(path, link, start)
        else
          elapsed
        end

      _ ->
        elapsed
    end
  end

  defp warm_steps(ctx, data) do
    t = fn -> System.monotonic_time(:nanosecond) end
    t0 = t.()
    :ok = SM.write(ctx.warm.mapping, 0, data)
    t1 = t.()
    {:ok, json} = JSON.encode(%{"ref" => ctx.warm.ref, "length" => byte_size(data)})
    {_xor, [_attach, reduce, _close]} = decode(Programs.request(ctx.worker, ["W", json]))
    t2 = t.()

    [
      {"write", t1 - t0},
      {"worker: xor-reduce", reduce},
      {"messaging (round trip less worker time)", t2 - t1 - reduce},
      {"total", t2 - t0}
    ]
  end

  defp channel_steps(ctx, data) do
    t = fn -> System.monotonic_time(:nanosecond) end
    t0 = t.()
    :ok = SM.write(ctx.warm.mapping, 0, data)
    t1 = t.()
    message = [<<byte_size(data)::little-64>>, ctx.warm.id]
    {_xor, [_attach, reduce, _close]} = channel_request(ctx.channel, message)
    t2 = t.()

    [
      {"write", t1 - t0},
      {"worker: xor-reduce", reduce},
      {"channel messaging (round trip less worker time)", t2 - t1 - reduce},
      {"total", t2 - t0}
    ]
  end

  defp transpose([first | _] = runs) do
    for {{name, _}, i} <- Enum.with_index(first) do
      {name, Enum.map(runs, fn run -> run |> Enum.at(i) |> elem(1) end)}
    end
  end

  defp ok!({:error, error}, what), do: raise("#{what} failed: #{inspect(error)}")
  defp ok!(:ok, _what), do: :ok
  defp ok!({:ok, _} = ok, _what), do: ok
end
