defmodule Snakepit.SharedMemory.TermGenerator do
  @moduledoc false
  # Random Erlang terms for the fuzz suites (test/reliability/fuzz_*_test.exs).
  #
  # Deterministic for a seed (`seed/1` seeds the calling process's :rand state), so a
  # failure can be replayed with the seed the suite prints. Two kinds of generators:
  #
  #   * `any/2`: any term at all (integers at every 64-bit edge, bignums, floats,
  #     binaries, sub-binaries, odd bitstrings, atoms, pids, ports, references, funs,
  #     lists, improper lists, tuples, maps) nested up to a depth;
  #   * typed ones (`size/0`, `offset/1`, `name/0`, `path/0`, ...) that are *almost*
  #     valid, so that calls pass term decoding and reach deep code paths.
  #
  # `pool` is a map of valid handles ({kind => [term]}, e.g. %{region: [...]}) that
  # `any/2` and `pick/3` mix in. Sizes that could succeed are capped (`@max_valid_size`)
  # so that no generated call can allocate more than a few MiB; the integers between
  # that cap and 2^62 are never generated as sizes. No atom is ever created at run time.

  import Bitwise

  @max_valid_size 4 * 1024 * 1024
  @u64 (1 <<< 64) - 1

  @edge_integers [
    0,
    1,
    -1,
    2,
    4095,
    4096,
    4097,
    65_535,
    65_536,
    65_537,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    (1 <<< 62) + 1,
    (1 <<< 63) - 1,
    1 <<< 63,
    @u64 - 1,
    @u64,
    @u64 + 1,
    @u64 + 2,
    1 <<< 100,
    -(1 <<< 63),
    -(1 <<< 63) - 1,
    -@u64,
    -@u64 - 1,
    -(1 <<< 100),
    10 ** 40,
    -(10 ** 40)
  ]

  @floats [0.0, -0.0, 1.0, 1.5, -1.5, 4096.0, 65_536.0, 1.0e308, -1.0e308, 5.0e-324, 1.0e19]

  @atoms [
    nil,
    true,
    false,
    :ok,
    :error,
    :undefined,
    :infinity,
    :posix,
    :memfd,
    :windows,
    :auto,
    :tmpfs,
    :create,
    :open_only,
    :create_or_open,
    :remove_and_create,
    :open,
    :read_only,
    :read_write,
    :none,
    :write,
    :standard,
    :high,
    :maximum,
    :automatic,
    :manual,
    :reference_counted,
    :backend,
    :name,
    :mode,
    :size,
    :metadata,
    :timeout,
    :owner,
    :all,
    :ids,
    :dry_run,
    :"",
    :spshm_aaaaaaaaaaaaaaaaaaaa,
    :"with space",
    :é
  ]

  @strange_names [
    "",
    "a",
    "z",
    "0",
    "-",
    "_",
    "..",
    ".",
    "a/b",
    "../../etc",
    "UPPER",
    "nul\0byte",
    "\0",
    "space name",
    "é",
    "tab\tname",
    "newline\n",
    "aaaaaaaaaaaaaaaaaaaaa",
    "aaaaaaaaaaaaaaaaaaaaaa",
    "spshm_",
    "spshm_n_x",
    "%s%s%n",
    "x*",
    <<0xFF, 0xFE>>
  ]

  @strange_ids [
    "",
    "spshm_",
    "spshm_aaaaaaaaaaaaaaaaaaaa",
    "spshm_aaaaaaaaaaaaaaaaaaa",
    "spshm_aaaaaaaaaaaaaaaaaaaaa",
    "spshm_AAAAAAAAAAAAAAAAAAAA",
    "spshm_n_",
    "spshm_n_fuzz",
    "spshm_n_../../etc",
    "spshm_/../../etc/passwd",
    "spshm_\0aaaaaaaaaaaaaaaaaaa",
    "../etc/passwd",
    "/dev/shm/spshm_x",
    "/",
    "..",
    "x",
    "spshm_n_aaaaaaaaaaaaaaaaaaaaaa"
  ]

  @strange_paths [
    "",
    "/",
    "/dev/shm",
    "/dev/shm/",
    "/dev/shm/spshm_does_not_exist",
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/etc/passwd",
    "/proc/self/stat",
    "/proc/self/mem",
    "/proc/self/maps",
    "/proc/self/fd/0",
    "/proc/self/fd/1",
    "/proc/self/fd/999999",
    "/proc/1/fd/0",
    "/proc/0/fd/0",
    "/proc/-1/fd/1",
    "/proc/self/fd/",
    "relative/path",
    "/dev/shm/\0x",
    "/tmp",
    String.duplicate("/a", 3000)
  ]

  # ---- seeding ----

  @doc "Seeds this process's :rand state; returns the seed."
  @spec seed(integer()) :: integer()
  def seed(seed) do
    :rand.seed(:exsss, {seed, seed * 7 + 1, seed * 13 + 3})
    seed
  end

  @doc "The largest size a generated call may allocate successfully."
  def max_valid_size, do: @max_valid_size

  # ---- any term ----

  @doc "Any term, nested at most `depth` levels; valid handles of `pool` mixed in."
  @spec any(map(), non_neg_integer()) :: term()
  def any(pool \\ %{}, depth \\ 2) do
    case :rand.uniform(if depth > 0, do: 24, else: 19) do
      1 -> integer()
      2 -> integer()
      3 -> size()
      4 -> float()
      5 -> binary()
      6 -> binary()
      7 -> bitstring()
      8 -> atom()
      9 -> pid(pool)
      10 -> reference(pool)
      11 -> fun()
      12 -> port(pool)
      13 -> name()
      14 -> region_id(pool)
      15 -> path(pool)
      16 -> pool_term(pool)
      17 -> pool_term(pool)
      18 -> charlist()
      19 -> []
      20 -> list(pool, depth - 1)
      21 -> tuple(pool, depth - 1)
      22 -> map(pool, depth - 1)
      23 -> improper_list(pool, depth - 1)
      24 -> keyword(pool, depth - 1)
    end
  end

  @doc "A random element of `list`."
  def one_of(list), do: Enum.at(list, :rand.uniform(length(list)) - 1)

  @doc "With probability `p` (0..1) the result of `valid`, else any term."
  def pick(p, pool, valid) do
    if :rand.uniform() < p, do: valid.(), else: any(pool)
  end

  @doc "A valid handle of `kind` from the pool, or any term if there is none."
  def handle(pool, kind) do
    case Map.get(pool, kind, []) do
      [] -> any(pool, 1)
      handles -> one_of(handles)
    end
  end

  # ---- scalars ----

  @doc "An integer: 64-bit edges, bignums, negatives, small values."
  def integer do
    case :rand.uniform(6) do
      1 -> one_of(@edge_integers)
      2 -> one_of(@edge_integers)
      3 -> :rand.uniform(256) - 128
      4 -> :rand.uniform(70_000)
      5 -> -:rand.uniform(1 <<< 40)
      6 -> (1 <<< (62 + :rand.uniform(80))) + :rand.uniform(1000)
    end
  end

  @doc """
  A size: mostly small valid sizes (at most #{@max_valid_size} bytes), else an edge:
  0, negatives, too large for the core (> 2^62), 2^64 edges, bignums, floats.
  """
  def size do
    case :rand.uniform(10) do
      n when n <= 4 -> :rand.uniform(64 * 1024)
      5 -> :rand.uniform(@max_valid_size)
      6 -> one_of([1, 4095, 4096, 4097, 65_536, 65_537, 1_048_576, @max_valid_size])
      7 -> one_of([0, -1, -4096, -(1 <<< 64), 4096.0, 1.5])
      _ -> one_of([(1 <<< 62) + 1, (1 <<< 63) - 1, 1 <<< 63, @u64, @u64 + 1, 10 ** 40])
    end
  end

  @doc "An offset or length near the bounds of a region of `size` bytes, or an edge."
  def offset(size) when is_integer(size) and size > 0 do
    case :rand.uniform(8) do
      1 -> 0
      2 -> :rand.uniform(size) - 1
      3 -> size
      4 -> size + 1
      5 -> size - 1
      6 -> max(size - :rand.uniform(70_000), 0)
      7 -> one_of([@u64, @u64 + 1, 1 <<< 63, -1, 65_536, 65_537, 1.0])
      8 -> integer()
    end
  end

  def offset(_size), do: integer()

  @doc "A length no larger than what a read may sensibly return, with edges."
  def length_for(size) when is_integer(size) and size > 0 do
    case :rand.uniform(6) do
      1 -> 0
      2 -> :rand.uniform(min(size, 70_000))
      3 -> size
      4 -> size + 1
      5 -> one_of([65_536, 65_537, @u64, @u64 + 1, -1])
      6 -> :rand.uniform(64)
    end
  end

  def length_for(_size), do: integer()

  def float, do: one_of(@floats)

  def atom, do: one_of(@atoms)

  @doc "Binaries: empty, random, large, sub-binaries of a large binary, strange names."
  def binary do
    case :rand.uniform(9) do
      1 -> ""
      2 -> :crypto.strong_rand_bytes(:rand.uniform(64))
      3 -> :binary.copy(<<:rand.uniform(255)>>, :rand.uniform(4096))
      4 -> big_binary(65_536 + :rand.uniform(2))
      5 -> sub_binary()
      6 -> one_of(@strange_names)
      7 -> one_of(@strange_ids)
      8 -> ~s({"dtype":"float32","shape":[2,3]})
      9 -> "{" <> String.duplicate("x", 1800)
    end
  end

  @doc "A sub-binary: a slice of a larger refc binary, at an odd offset."
  def sub_binary do
    big = big_binary(200_000)
    start = :rand.uniform(1000)
    binary_part(big, start, :rand.uniform(100_000))
  end

  @doc "Bitstrings whose bit size is not a multiple of 8 (some of them sub-bitstrings)."
  def bitstring do
    case :rand.uniform(4) do
      1 -> <<1::3>>
      2 -> <<0::7>>
      3 -> <<:crypto.strong_rand_bytes(9)::binary, 5::5>>
      4 -> sub_bitstring()
    end
  end

  defp sub_bitstring do
    <<_::3, rest::bitstring>> = sub_binary()
    rest
  end

  # The same large binaries are reused (kept in the process dictionary): generating
  # hundreds of thousands of terms must not allocate megabytes each time.
  defp big_binary(size) do
    key = {__MODULE__, :big, size}

    case Process.get(key) do
      nil ->
        bin = :crypto.strong_rand_bytes(size)
        Process.put(key, bin)
        bin

      bin ->
        bin
    end
  end

  @doc "A data payload for write: binaries, iodata, big (dirty) payloads, garbage."
  def payload(pool) do
    case :rand.uniform(10) do
      n when n <= 3 -> :crypto.strong_rand_bytes(:rand.uniform(4096))
      4 -> big_binary(65_537)
      5 -> big_binary(300_000)
      6 -> sub_binary()
      7 -> ["ab", ?c, ["de" | "f"], <<1, 2>>]
      8 -> bitstring()
      9 -> ""
      10 -> any(pool)
    end
  end

  def charlist, do: one_of([~c"spshm_x", ~c"/dev/shm/x", ~c"", [0, 255, 256, 1_114_111]])

  def name do
    case :rand.uniform(4) do
      1 -> one_of(@strange_names)
      _ -> "fz" <> Integer.to_string(:rand.uniform(50))
    end
  end

  def region_id(pool) do
    case :rand.uniform(3) do
      1 -> one_of(@strange_ids)
      2 -> "spshm_" <> random_base32(20)
      3 -> handle(pool, :id)
    end
  end

  defp random_base32(n) do
    alphabet = ~c"abcdefghijklmnopqrstuvwxyz234567"
    for _ <- 1..n, into: "", do: <<Enum.at(alphabet, :rand.uniform(32) - 1)>>
  end

  def path(pool) do
    case :rand.uniform(3) do
      1 -> one_of(@strange_paths)
      2 -> handle(pool, :path)
      3 -> {one_of(@strange_paths), handle(pool, :path)}
    end
  end

  # ---- processes, references, funs, ports ----

  @doc "A pid: self, a pool pid (dead, sleeping, external), init, or a made-up one."
  def pid(pool) do
    case :rand.uniform(4) do
      1 -> self()
      2 -> handle(pool, :pid)
      3 -> :erlang.list_to_pid(~c"<0.0.0>")
      4 -> :erlang.list_to_pid(~c"<0.#{:rand.uniform(32_000)}.0>")
    end
  end

  @doc "An external pid (of a node that does not exist), built from the external format."
  def external_pid do
    node = :fuzz@nowhere
    node_bin = Atom.to_string(node)
    # NEW_PID_EXT: tag 88, node (ATOM_UTF8_EXT), id, serial, creation (32-bit each).
    :erlang.binary_to_term(
      <<131, 88, 118, byte_size(node_bin)::16, node_bin::binary, 1::32, 0::32, 1::32>>
    )
  end

  def reference(pool) do
    case :rand.uniform(3) do
      1 -> make_ref()
      _ -> pool_term(pool)
    end
  end

  def fun do
    one_of([fn -> :ok end, fn x -> x end, &:erlang.node/0, &Enum.map/2])
  end

  def port(pool) do
    case Map.get(pool, :port, []) do
      [] -> :erlang.list_to_port(~c"#Port<0.0>")
      ports -> one_of(ports)
    end
  end

  defp pool_term(pool) do
    kinds = pool |> Map.keys() |> Enum.filter(&(Map.get(pool, &1) != []))
    if kinds == [], do: make_ref(), else: handle(pool, one_of(kinds))
  end

  # ---- containers ----

  def list(pool, depth), do: for(_ <- 1..:rand.uniform(4), do: any(pool, depth))

  def improper_list(pool, depth), do: [any(pool, depth) | any(pool, 0)]

  def tuple(pool, depth) do
    case :rand.uniform(5) do
      1 -> {}
      2 -> {path(pool), path(pool)}
      _ -> pool |> list(depth) |> List.to_tuple()
    end
  end

  @doc "A map: small (flat) or large (> 32 keys, a hash map), random keys and values."
  def map(pool, depth) do
    case :rand.uniform(4) do
      1 -> %{}
      2 -> Map.new(1..40, fn i -> {i, any(pool, 0)} end)
      _ -> Map.new(1..:rand.uniform(4), fn _ -> {any(pool, 0), any(pool, depth)} end)
    end
  end

  def keyword(pool, depth) do
    for _ <- 1..:rand.uniform(3), do: {atom(), any(pool, depth)}
  end

  # ---- option maps ----

  @doc """
  Mutates `valid` (a map of valid values): each key is kept with probability
  `keep`, replaced by an edge value or any term otherwise, dropped now and then, and an
  unknown key is added now and then.
  """
  def mutate_map(valid, pool, keep \\ 0.85) do
    mutated =
      Enum.reduce(valid, %{}, fn {key, value}, acc ->
        cond do
          :rand.uniform() < keep -> Map.put(acc, key, value)
          :rand.uniform(8) == 1 -> acc
          true -> Map.put(acc, key, any(pool, 1))
        end
      end)

    if :rand.uniform(20) == 1, do: Map.put(mutated, atom(), any(pool, 0)), else: mutated
  end
end
