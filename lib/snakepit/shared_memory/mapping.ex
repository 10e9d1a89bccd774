defmodule Snakepit.SharedMemory.Mapping do
  @moduledoc """
  A live mapping of a region, returned by `Snakepit.SharedMemory.map_region/2`.

  It is a handle: `write/3`, `read/3` and `unmap_region/1` take it. It belongs to the
  process that mapped the region: when that process dies, the manager unmaps it (the
  hold it added to the region header is released). Fields other than `region_id`,
  `mode` and `size` are internal.
  """

  @enforce_keys [:region_id, :id, :mode, :size, :ref]
  defstruct [
    :region_id,
    :id,
    :mode,
    :size,
    :ref,
    :region,
    :pid,
    encrypted: false,
    security_level: :standard,
    counters: nil,
    cleanup_policy: nil
  ]

  @type t :: %__MODULE__{
          region_id: String.t(),
          id: reference(),
          mode: :read_only | :read_write,
          size: pos_integer(),
          ref: reference(),
          region: reference() | nil,
          pid: pid() | nil,
          encrypted: boolean(),
          security_level: :standard | :high | :maximum,
          counters: :counters.counters_ref() | nil,
          cleanup_policy: atom() | nil
        }

  defimpl Inspect do
    def inspect(mapping, _opts) do
      "#Snakepit.SharedMemory.Mapping<#{mapping.region_id} #{mapping.mode} #{mapping.size} bytes>"
    end
  end
end
