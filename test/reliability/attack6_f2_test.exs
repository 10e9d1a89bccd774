defmodule Snakepit.SharedMemory.Reliability.Attack6F2Test do
  # Attack run 6 (F2): the configuration as a careless first-time user writes it.
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.Config

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
end
