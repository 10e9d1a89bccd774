defmodule Snakepit.SharedMemory.HostQuota.Reservation do
  @moduledoc """
  A granted reservation of a host quota: `id` (unique within its client), the quota
  `name`, the `amount`, the `owner` pid whose death releases it (or `nil`) and the
  `client` that holds it.
  """
  @enforce_keys [:id, :name, :amount]
  defstruct [:id, :name, :amount, :owner, :client]

  @type t :: %__MODULE__{
          id: pos_integer(),
          name: String.t(),
          amount: pos_integer(),
          owner: pid() | nil,
          client: pid() | nil
        }
end
