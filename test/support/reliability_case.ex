defmodule Snakepit.SharedMemory.ReliabilityCase do
  @moduledoc false
  # The frame of a reliability suite (test/reliability/): not async, tagged
  # :reliability, a per-test timeout (`timeout:`, 120 s unless given), and the suite ends
  # asserting that no segment of ours is left in /dev/shm.
  #
  #     use Snakepit.SharedMemory.ReliabilityCase
  #     use Snakepit.SharedMemory.ReliabilityCase, timeout: 300_000

  use ExUnit.CaseTemplate

  using opts do
    timeout = Keyword.get(opts, :timeout, 120_000)

    quote do
      @moduletag :reliability
      @moduletag timeout: unquote(timeout)
    end
  end

  setup_all do
    Snakepit.SharedMemory.ReliabilityHelpers.check_segments_on_exit()
    :ok
  end
end
