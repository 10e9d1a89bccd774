defmodule Snakepit.SharedMemory.Reliability.FuzzPythonTest do
  # Fuzzing of the Python client (priv/python/snakepit_shm, run by /usr/bin/python3): refs
  # of real regions (memfd, POSIX, encrypted with their key, sealed) with one to three
  # fields replaced by random values (other regions' paths, huge and negative numbers,
  # wrong types, /proc and /dev paths, bad keys), and random ids and JSON. Every attach
  # must succeed on the right region or raise SnakepitShmError, ValueError or TypeError,
  # as its documentation says; never another exception, and never crash the interpreter
  # (the client calls into C through ctypes). Regions attached are read through every
  # accessor and closed.
  use ExUnit.Case, async: false

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{JSON, ReliabilityHelpers}

  @moduletag :reliability
  @moduletag timeout: 1_800_000

  @calls ReliabilityHelpers.scale(
           String.to_integer(System.get_env("SNAKEPIT_SHM_FUZZ_PYTHON_CALLS", "20000"))
         )

  @fuzzer ~S"""
  import base64, json, random, sys, traceback, warnings
  warnings.simplefilter("ignore")
  import snakepit_shm
  from snakepit_shm import SnakepitShmError

  refs, seed, calls = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
  rng = random.Random(seed)
  paths = [p for r in refs for p in (r["control_path"], r["data_path"])]
  values = [None, True, False, 0, 1, -1, 4095, 4096, 4097, 2**31, 2**32, 2**63 - 1, 2**63,
            2**64, 2**64 + 1, 10**40, -2**63, 1.5, float("nan"), float("inf"), "", "x",
            "\x00", "spshm_", "../../etc/passwd", "/dev/zero", "/dev/null", "/proc/self/mem",
            "/proc/self/fd/0", "/proc/1/fd/0", "/proc/self/fd/999999", "/etc/passwd",
            [], [1, 2], [-1], [2**40, 2**40], {}, {"a": 1}, "float32", "uint8", "<f8",
            "object", "V7", base64.b64encode(b"k" * 31).decode(), base64.b64encode(b"k" * 32).decode(),
            "!!notbase64!!", "memfd", "posix", "windows"] + paths
  fields = ["v", "region_id", "backend", "control_path", "data_path", "data_offset", "size",
            "sealed", "encrypted", "dtype", "shape", "metadata", "key"]
  allowed = (SnakepitShmError, ValueError, TypeError)
  counts = {"attached": 0, "refused": 0}
  failures = []

  def target():
      kind = rng.random()
      if kind < 0.8:
          ref = dict(rng.choice(refs))
          for _ in range(rng.randint(1, 3)):
              field = rng.choice(fields)
              if rng.random() < 0.15:
                  ref.pop(field, None)
              else:
                  ref[field] = rng.choice(values)
          return json.dumps(ref) if rng.random() < 0.2 else ref
      if kind < 0.9:
          return rng.choice([r["region_id"] for r in refs] + ["spshm_" + "a" * 20, "x", "", "spshm_n_" + "b" * 22])
      return rng.choice([b"{}", "{", "[]", 12, None, ["a"], "{\"v\": 1}", b"\xff\xfe"])

  def use(region, asked):
      _ = (region.size, region.region_id, region.metadata)
      wanted = asked.get("region_id") if isinstance(asked, dict) else None
      if isinstance(wanted, str) and region.region_id != wanted:
          raise AssertionError(f"asked for {wanted}, attached {region.region_id}")
      try:
          data = region.read()
      except allowed:
          data = None
      # Every region was written with "py" * 256 at offset 0: anything else is another
      # region's data, or ciphertext handed out as plaintext.
      if data is not None and not data.startswith(b"py" * 64):
          raise AssertionError(f"{region.region_id}: wrong content {data[:16]!r}")
      try:
          array = region.ndarray()
          del array
      except allowed:
          pass

  for i in range(calls):
      t = target()
      mode = rng.choice(["r", "r", "rw", "x"])
      try:
          region = snakepit_shm.attach(t, mode=mode)
      except allowed:
          counts["refused"] += 1
          continue
      except Exception as exc:
          if len(failures) < 10:
              failures.append(f"attach({t!r:.300}, {mode!r}) -> {type(exc).__name__}: {exc}\n"
                              + traceback.format_exc(limit=3))
          continue
      counts["attached"] += 1
      try:
          with region:
              use(region, t if isinstance(t, dict) else None)
      except Exception as exc:
          if len(failures) < 10:
              failures.append(f"using attach({t!r:.300}, {mode!r}) -> {type(exc).__name__}: "
                              f"{exc}\n" + traceback.format_exc(limit=3))
  print(json.dumps({"counts": counts, "failures": failures}))
  """

  setup_all do
    {:ok, _} = Application.ensure_all_started(:snakepit_shm)
    ReliabilityHelpers.check_segments_on_exit()
  end

  test "the Python client refuses every mutated ref with its documented exceptions" do
    seed = ReliabilityHelpers.seed()

    specs = [
      [],
      [backend: :posix],
      [security_level: :high, metadata: %{dtype: "uint8", shape: [64]}],
      [backend: :posix, security_level: :high],
      [metadata: %{dtype: "float32", shape: [16, 16]}],
      [sealed: true]
    ]

    ids =
      for spec <- specs do
        {sealed, opts} = Keyword.pop(spec, :sealed, false)
        {:ok, id} = SharedMemory.allocate_region(1024 + :rand.uniform(8192), opts)
        {:ok, m} = SharedMemory.map_region(id)
        :ok = SharedMemory.write(m, 0, :binary.copy("py", 256))
        :ok = SharedMemory.unmap_region(m)
        if sealed, do: :ok = SharedMemory.seal(id)
        id
      end

    refs =
      for id <- ids do
        {:ok, info} = SharedMemory.get_region_info(id)
        {:ok, ref} = SharedMemory.export_ref(id, include_key: info.encrypted)
        ref
      end

    {:ok, json} = JSON.encode(refs)

    try do
      {out, status} =
        ReliabilityHelpers.python(@fuzzer, [
          json,
          Integer.to_string(seed),
          Integer.to_string(@calls)
        ])

      assert status == 0,
             "the Python fuzzer died (status #{status}):\n#{String.slice(out, -3000, 3000)}"

      {:ok, %{"counts" => counts, "failures" => failures}} =
        out |> String.split("\n", trim: true) |> List.last() |> JSON.decode()

      ReliabilityHelpers.record("fuzz_python", %{
        seed: seed,
        calls: @calls,
        attached: counts["attached"],
        refused: counts["refused"],
        failures: length(failures)
      })

      assert failures == [], "seed #{seed}: unexpected exceptions:\n" <> Enum.join(failures, "\n")
      assert counts["attached"] + counts["refused"] + length(failures) >= @calls
      assert counts["attached"] > 0 and counts["refused"] > 0, inspect(counts)
    after
      for id <- ids, do: SharedMemory.deallocate_region(id)
    end
  end
end
