defmodule Snakepit.SharedMemory.MappingTest do
  use ExUnit.Case, async: true

  alias Snakepit.SharedMemory.Mapping

  test "inspect shows the region, mode and size, not the handles" do
    mapping = %Mapping{
      region_id: "spshm_abc",
      id: make_ref(),
      mode: :read_only,
      size: 42,
      ref: make_ref()
    }

    assert inspect(mapping) == "#Snakepit.SharedMemory.Mapping<spshm_abc read_only 42 bytes>"
  end
end
