defmodule Snakepit.SharedMemory.Reliability.Attack6F2Test do
  # Attack run 6 (F2): the configuration as a careless first-time user writes it.
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.{Config, JSON}

  # Used to: the second list of a key given twice replaced the first silently (Map.new/1),
  # so `linux: [shm_path: ...], linux: [use_hugepages: false]` dropped the shm_path and the
  # VM used /dev/shm; `shm_path: "/a", shm_path: "/b"` used "/b" (the top level, and every
  # option list of the API, refuse a key given twice or name the contradiction).
  test "a platform_options key given twice is an error naming it, never the last one silently" do
    for {bad, key} <- [
          {[linux: [shm_path: "/dev/shm"], linux: [use_hugepages: false]], ":linux"},
          {[linux: [shm_path: "/dev/shm", shm_path: "/tmp"]], ":shm_path"},
          {%{linux: [use_hugepages: false, use_hugepages: true]}, ":use_hugepages"},
          {%{windows: [use_large_pages: false, use_large_pages: true]}, ":use_large_pages"}
        ] do
      assert {:error, message} = Config.validate([], platform_options: bad), inspect(bad)
      assert message =~ "config :snakepit, :shared_memory, platform_options"
      assert message =~ "#{key} is given twice"
      assert message =~ "give each key once"
    end

    # Once each is still fine, in a list or a map.
    assert {:ok, %{shm_path: "/dev/shm"}} =
             Config.validate([], platform_options: [linux: [shm_path: "/dev/shm"]])
  end

  # Used to: with an invalid setting the doctor's only sign of it was "memfd sealing FAIL:
  # the :snakepit_shm application did not start: {:snakepit_shm, {{:snakepit_shm,
  # "invalid configuration: ..."}, {...}}}" (fix: "check the configuration"), next to
  # "peer VMs WARN" whose fix was to make the presence directory 0700, and health rows
  # "regions ok 0.0 % (0 of 100000)" against the default limit, not the one configured.
  @tag timeout: 180_000
  test "the doctor with an invalid setting names it first, and sends nobody elsewhere" do
    {out, 1} =
      System.cmd("mix", ["snakepit.shm.doctor", "--format", "json"],
        env: [
          {"MIX_ENV", "test"},
          {"MIX_QUIET", "1"},
          {"ELIXIR_ERL_OPTIONS", "-snakepit_shm max_regions 0"}
        ],
        cd: File.cwd!()
      )

    {:ok, %{"ok" => false, "findings" => findings}} = JSON.decode(String.trim(out))
    by_check = Map.new(findings, &{&1["check"], &1})

    assert %{"status" => "fail", "detail" => detail, "fix" => fix} = by_check["application"]
    assert detail =~ "does not start: invalid configuration: config :snakepit_shm, max_regions"
    assert fix =~ "correct the setting it names"

    for check <- ["peer VMs", "memfd sealing"] do
      assert %{"status" => "fail", "detail" => "not checked: " <> _} = by_check[check]
    end

    refute Enum.any?(findings, &((&1["fix"] || "") =~ "mode 0700"))
    refute Map.has_key?(by_check, "health: regions")
    assert %{"status" => "ok"} = by_check["health: host_memory"]
  end
end
