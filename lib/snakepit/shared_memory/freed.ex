defmodule Snakepit.SharedMemory.Freed do
  @moduledoc """
  Why a region was freed, remembered where its mappings can see it.

  A `Snakepit.SharedMemory.Mapping` outlives its region when someone else frees it
  (`deallocate_region/1`, the owner's death, expiry, a cleanup). The mapping then reads
  `:closed` from the NIF, which alone would suggest mapping again; this module records
  the reason in slot 3 of the region's counters (the mapping carries them), so reads and
  writes answer `:deallocated` with what happened instead.
  """

  alias Snakepit.SharedMemory.Error

  @slot 3
  @codes %{
    deallocated: 1,
    owner_down: 2,
    expired: 3,
    unreferenced: 4,
    vanished: 5,
    requested: 6,
    replaced: 7,
    orphan: 8
  }
  @reasons Map.new(@codes, fn {reason, code} -> {code, reason} end)

  @doc "Number of counter slots a region needs (this module uses the last one)."
  @spec slots() :: pos_integer()
  def slots, do: @slot

  @doc "Records that the region of `counters` was freed for `reason`."
  @spec mark(:counters.counters_ref(), atom()) :: :ok
  def mark(counters, reason), do: :counters.put(counters, @slot, Map.get(@codes, reason, 99))

  @doc "The reason the region of `counters` was freed, or nil while it lives."
  @spec reason(:counters.counters_ref()) :: atom() | nil
  def reason(counters) do
    case :counters.get(counters, @slot) do
      0 -> nil
      code -> Map.get(@reasons, code, :freed)
    end
  end

  @doc """
  Turns a `:closed` error of a mapping whose region was freed into `:deallocated`,
  saying who freed it; other errors pass unchanged.
  """
  @spec explain({:error, Error.t()}, String.t(), :counters.counters_ref()) ::
          {:error, Error.t()}
  def explain({:error, %Error{reason: :closed}} = error, id, counters) when is_binary(id) do
    case reason(counters) do
      nil ->
        error

      why ->
        Error.error(
          :deallocated,
          "region #{id} was freed (#{describe(why)}), which ended this mapping; its " <>
            "data is gone. Allocate a new region (mapping it again gives :not_found)",
          %{region_id: id, freed_because: why}
        )
    end
  end

  def explain(error, _id, _counters), do: error

  defp describe(:deallocated), do: "deallocate_region/1 was called"
  defp describe(:owner_down), do: "its owner process died, cleanup_policy :automatic"
  defp describe(:expired), do: "it was idle longer than its :timeout"
  defp describe(:unreferenced), do: "its last holder let go, cleanup_policy :reference_counted"
  defp describe(:vanished), do: "its segment was removed from /dev/shm behind our back"
  defp describe(:requested), do: "cleanup_regions/1 selected it"
  defp describe(:replaced), do: "open_mode: :remove_and_create replaced it"
  defp describe(other), do: "#{other}"
end
