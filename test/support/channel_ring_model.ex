defmodule Snakepit.SharedMemory.ChannelRingModel do
  @moduledoc false
  # A proper_statem model of the channel ring's indices (test/reliability/
  # channel_ring_property_test.exs): random writes of random lengths, reads and flushes
  # against the real C++ ring (through the Native.ring_probe_* test NIFs). The model
  # predicts, for every command, whether a write fits (free space = capacity - (head -
  # acknowledged tail)), which bytes a read returns, and, after every command, the exact
  # head, acknowledged (shared) tail and private tail, under each ack mode.

  import Bitwise

  alias Snakepit.SharedMemory.Native

  @key {__MODULE__, :probe}

  @doc "Starts a fresh ring for a run: capacity, ack mode (0 immediate, 1 batch, 2 deferred), batch."
  def setup(cap, mode, batch) do
    Process.put(@key, {Native.ring_probe_new(cap, mode, batch), cap, mode, batch})
    :ok
  end

  defp probe, do: elem(Process.get(@key), 0)
  defp config, do: Process.get(@key)

  # ---- commands ----

  def write(len, seed), do: Native.ring_probe_write(probe(), len, seed)
  def read, do: Native.ring_probe_read(probe())
  def flush, do: Native.ring_probe_flush(probe())

  # ---- proper_statem callbacks ----

  def initial_state do
    {_, cap, mode, batch} = config()

    %{
      cap: cap,
      mode: mode,
      batch: batch,
      queue: :queue.new(),
      head: 0,
      tail: 0,
      published: 0,
      unpublished: 0
    }
  end

  def command(state) do
    t = :proper_types

    t.frequency([
      {5, {:call, __MODULE__, :write, [t.integer(0, div(state.cap, 4)), t.integer(0, 255)]}},
      {4, {:call, __MODULE__, :read, []}},
      {1, {:call, __MODULE__, :flush, []}}
    ])
  end

  def precondition(_state, _call), do: true

  def frame_size(len), do: 8 + (len + 7 &&& bnot(7))

  def next_state(state, _result, {:call, _, :write, [len, seed]}) do
    if fits?(state, len) do
      %{state | head: state.head + frame_size(len), queue: :queue.in({len, seed}, state.queue)}
    else
      state
    end
  end

  def next_state(state, _result, {:call, _, :read, []}) do
    case :queue.out(state.queue) do
      {:empty, _} ->
        state

      {{:value, {len, _}}, q} ->
        state = %{
          state
          | queue: q,
            tail: state.tail + frame_size(len),
            unpublished: state.unpublished + 1
        }

        publish? =
          case state.mode do
            0 -> true
            1 -> state.unpublished >= state.batch
            2 -> state.tail - state.published >= div(state.cap, 2)
          end

        if publish?, do: %{state | published: state.tail, unpublished: 0}, else: state
    end
  end

  def next_state(state, _result, {:call, _, :flush, []}),
    do: %{state | published: state.tail, unpublished: 0}

  def postcondition(state, {:call, _, :write, [len, _]}, result) do
    expected = if fits?(state, len), do: :ok, else: :full
    result == expected
  end

  def postcondition(state, {:call, _, :read, []}, result) do
    case :queue.peek(state.queue) do
      :empty -> result == :empty
      {:value, {len, seed}} -> result == {:ok, pattern(len, seed)}
    end
  end

  def postcondition(_state, {:call, _, :flush, []}, result), do: result == :ok

  @doc "The real indices agree with the model's after the run's last command."
  def indices_agree?(state) do
    Native.ring_probe_indices(probe()) == {state.head, state.published, state.tail}
  end

  defp fits?(state, len), do: state.cap - (state.head - state.published) >= frame_size(len)

  defp pattern(len, seed), do: for(i <- 0..(len - 1)//1, into: <<>>, do: <<seed + i &&& 255>>)
end
