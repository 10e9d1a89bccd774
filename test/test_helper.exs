# Slow and soak runs are tagged; `mix test --include soak` (or SNAKEPIT_SHM_SOAK=1) runs them.
exclude = if System.get_env("SNAKEPIT_SHM_SOAK") in ["1", "true"], do: [], else: [soak: true]
# Tests of reported, unfixed bugs (test/reliability/found_bugs_test.exs): `--include known_bug`.
exclude = [{:known_bug, true} | exclude]

ExUnit.after_suite(fn _result ->
  # Every suite ends with nothing of this VM left in /dev/shm. (Only this VM's: other
  # suites may be running at the same time on a shared machine; scripts/shm-check.sh
  # checks for every segment of ours once all suites are done.)
  me = String.to_integer(System.pid())

  left =
    for name <- File.ls!("/dev/shm"),
        String.starts_with?(name, "spshm_"),
        {:ok, %{creator_pid: ^me}} <- [
          Snakepit.SharedMemory.Native.inspect_path("/dev/shm/" <> name)
        ],
        do: name

  if left != [] do
    IO.puts(:stderr, "\nsegments of this VM left in /dev/shm: #{Enum.join(left, ", ")}")
    System.at_exit(fn _ -> exit({:shutdown, 1}) end)
  end
end)

# An assert_receive without a timeout waited 100 ms (ExUnit's default) for messages sent
# after NIF calls, process deaths or the manager's asynchronous handling: too short on a
# loaded 2-CPU machine. It returns as soon as the message is there; only a failure waits
# the whole 30 s. (refute_receive keeps its 100 ms.)
ExUnit.start(exclude: exclude, assert_receive_timeout: 30_000)
