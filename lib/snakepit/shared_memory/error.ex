defmodule Snakepit.SharedMemory.Error do
  @moduledoc """
  The one error type of `Snakepit.SharedMemory`.

  Every public function returns `{:error, %Snakepit.SharedMemory.Error{}}` for bad input,
  refusals and OS failures. `reason` is a stable atom to match on, `message` says what
  happened and what to change, `details` carries context (the region id, the limit that
  was hit, the OS `errno` of a failed system call, ...).

  Reasons of the facade: `:invalid_option`, `:invalid_size`, `:size_exceeds_limit`,
  `:memory_limit_exceeded`, `:region_limit_exceeded`, `:process_limit_exceeded`,
  `:invalid_metadata`, `:metadata_too_large`, `:not_found`, `:permission_denied`,
  `:closed`, `:not_sealed`, `:already_exists`, `:unsupported`, `:unavailable`,
  `:invalid_json`, `:disabled`, `:size_mismatch` (open_only of a region of another size),
  `:already_adopted` (`adopt_region/2`), `:deallocated` (a mapping whose region was
  freed, with `details.freed_because`); of the cluster (`locate/1`, `fetch/2`):
  `:nodedown`, `:timeout`, `:corrupt`, `:tampered`; `:quota_exceeded` and
  `:unknown_quota` (host quotas, `Snakepit.SharedMemory.HostQuota`). Reasons coming from the native core are the names of `spshm::Errc`
  (`c_src/core/error.hpp`): `:not_found`, `:no_space`, `:corrupt`, `:sealed`, `:busy`,
  `:expired`, `:deallocated`, `:out_of_bounds`, `:tampered`, `:mlock_failed`, ...

  It is also an exception, so callers that prefer to crash can `raise error`.
  """

  import Bitwise, only: [<<<: 2]

  defexception reason: :unknown, message: "unknown error", details: %{}

  @type t :: %__MODULE__{reason: atom(), message: String.t(), details: map()}

  # What to do, appended to the native message for reasons where the core cannot know it.
  @native_advice %{
    mlock_failed:
      "security_level :maximum locks the region in RAM: raise RLIMIT_MEMLOCK (ulimit -l, " <>
        "systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK, or use security_level: :high",
    no_space:
      "the shared memory filesystem (/dev/shm or the :shm_path setting) or RAM is full: " <>
        "free regions, grow it (docker --shm-size) or use backend: :memfd",
    tampered:
      "the encrypted data failed authentication: another process modified the segment; " <>
        "treat the region as compromised and deallocate it",
    holder_table_full:
      "64 processes already hold this region: unmap or close unused mappings first",
    deallocated: "the region has been freed; allocate a new one",
    expired: "the region outlived its idle :timeout; allocate it with a longer :timeout"
  }

  # The core's mlock message already says how to raise RLIMIT_MEMLOCK: then only the
  # Elixir-side way out is added, so the advice is not given twice.
  defp advice(:mlock_failed, message) do
    if message =~ "RLIMIT_MEMLOCK",
      do: "security_level :maximum locks the region in RAM; security_level: :high does not",
      else: @native_advice.mlock_failed
  end

  # The core says what is full and what to do for a full filesystem ("free regions"),
  # for memory ("free memory") and for the hugetlb pool ("huge_pages: true": the shm
  # filesystem and backend: :memfd have nothing to do with it); the generic advice is
  # only for bare messages.
  defp advice(:no_space, message) do
    if message =~ "free regions" or message =~ "free memory" or message =~ "huge_pages: true",
      do: nil,
      else: @native_advice.no_space
  end

  defp advice(reason, _message), do: Map.get(@native_advice, reason)

  @doc "Builds an error. `details` defaults to an empty map."
  @spec new(atom(), String.t(), map()) :: t()
  def new(reason, message, details \\ %{})
      when is_atom(reason) and is_binary(message) and is_map(details) do
    %__MODULE__{reason: reason, message: message, details: details}
  end

  @doc "Builds `{:error, error}`."
  @spec error(atom(), String.t(), map()) :: {:error, t()}
  def error(reason, message, details \\ %{}), do: {:error, new(reason, message, details)}

  @doc """
  Converts an error of `Snakepit.SharedMemory.Native` (`{reason, message, errno}`) into
  an error struct; the errno goes into `details.errno`, never into the return value.
  """
  @spec from_native({atom(), String.t(), integer()} | term(), map()) :: t()
  def from_native(native, details \\ %{})

  def from_native({reason, message, errno}, details)
      when is_atom(reason) and is_binary(message) and is_integer(errno) do
    message =
      case advice(reason, message) do
        nil -> message
        advice -> message <> " (" <> advice <> ")"
      end

    new(reason, message, Map.put(details, :errno, errno))
  end

  def from_native(other, details) do
    new(:io_error, "unexpected native result: #{inspect(other)}", details)
  end

  @doc "Formats a byte count for messages: `2147483648` -> `\"2 GiB\"`."
  @spec format_bytes(non_neg_integer() | :infinity) :: String.t()
  def format_bytes(:infinity), do: "unlimited"

  def format_bytes(bytes) when is_integer(bytes) and bytes >= 0 do
    units = [{"TiB", 1 <<< 40}, {"GiB", 1 <<< 30}, {"MiB", 1 <<< 20}, {"KiB", 1 <<< 10}]

    case Enum.find(units, fn {_, scale} -> bytes >= scale end) do
      nil ->
        "#{bytes} bytes"

      {unit, scale} when rem(bytes, scale) == 0 ->
        "#{div(bytes, scale)} #{unit}"

      {unit, scale} ->
        "#{:erlang.float_to_binary(bytes / scale, decimals: 1)} #{unit} (#{bytes} bytes)"
    end
  end
end
