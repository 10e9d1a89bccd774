# Elixir peer of priv/python/tests/test_channel.py: opens a Snakepit.SharedMemory.Channel
# (transport from argv), prints its ref as one JSON line, then, in active mode:
#   echo  - sends every message back ("stop" makes it close the channel, "big:N" makes
#           it send N bytes instead: a region message above the inline threshold);
#   mute  - never reads (back-pressure tests);
#   sink  - reads every message and never answers ("stop" closes the channel);
# and prints "closed <reason>" when the channel closes.
alias Snakepit.SharedMemory.{Channel, JSON}

[transport, mode] = System.argv()
active = mode != "mute"
{:ok, ch} = Channel.open(transport: String.to_atom(transport), active: active, ring_size: 65_536)
{:ok, json} = JSON.encode(Channel.export_ref(ch))
IO.puts(json)

loop = fn loop ->
  receive do
    {:snakepit_shm_channel, ^ch, "stop"} ->
      Channel.close(ch)
      IO.puts("closed by_elixir")

    {:snakepit_shm_channel, ^ch, "big:" <> n} ->
      :ok = Channel.send(ch, :binary.copy("b", String.to_integer(n)))
      loop.(loop)

    {:snakepit_shm_channel, ^ch, msg} ->
      if mode != "sink", do: :ok = Channel.send(ch, msg)
      loop.(loop)

    {:snakepit_shm_channel_closed, ^ch, reason} ->
      IO.puts("closed #{reason}")
  after
    60_000 -> IO.puts("closed idle")
  end
end

loop.(loop)
