# Slow and soak runs are tagged; `mix test --include soak` (or SNAKEPIT_SHM_SOAK=1) runs them.
exclude = if System.get_env("SNAKEPIT_SHM_SOAK") in ["1", "true"], do: [], else: [soak: true]

ExUnit.after_suite(fn _result ->
  # Every suite ends with nothing of ours left in /dev/shm.
  left =
    case File.ls("/dev/shm") do
      {:ok, names} -> Enum.filter(names, &String.starts_with?(&1, "spshm_"))
      {:error, _} -> []
    end

  if left != [] do
    IO.puts(:stderr, "\nsegments of ours left in /dev/shm: #{Enum.join(left, ", ")}")
    System.at_exit(fn _ -> exit({:shutdown, 1}) end)
  end
end)

ExUnit.start(exclude: exclude)
