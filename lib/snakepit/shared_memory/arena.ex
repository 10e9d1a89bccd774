defmodule Snakepit.SharedMemory.Arena do
  @moduledoc """
  Small regions carved out of per-VM arenas (`c_src/core/arena.hpp`, docs/FORMAT.md
  "Arenas", docs/ARCHITECTURE.md "Arenas").

  A region of at most `:arena_threshold` bytes (default 64 KiB) that needs nothing an
  arena cannot give is a page-aligned chunk of a shared memfd instead of two memfds of
  its own: one control block (the same 4096-byte header as any region) followed by its
  data. Creating and freeing it costs a few system calls instead of ~20, and 10 000
  such regions hold a handful of file descriptors instead of 20 000.

  What goes to an arena: the `:auto` backend (resolving to memfd on Linux; an explicit
  `backend: :memfd` asks for a memfd of its own, with its own kernel seal), no `:name`,
  `:security_level` `:standard`, owner-only permissions (mode 0600), and `arena: true`
  (the per-region option; its default is the `:arena` setting). Everything else keeps a
  dedicated segment, as does every region when arenas are unsupported (not Linux, or
  pages other than 4 KiB).

  The region id stays the only thing a user sees: `export_ref/2` adds
  `"control_offset"` for the worker, and every other function works the same. What
  differs is written in docs/SECURITY.md (a worker able to open the arena can read the
  other small regions in it) and for `seal/1` (no kernel seal of its own: reads copy).

  This module owns the policy (which region goes where) and the upkeep; the native
  layer owns the arenas.
  """

  alias Snakepit.SharedMemory.{Config, Native}

  @doc """
  True if a region with these validated `allocate_region/2` options goes to an arena.
  """
  @spec use?(map(), map(), Config.t()) :: boolean()
  def use?(opts, flags, config) do
    Map.get(opts, :arena, config.arena) == true and is_integer(opts.size) and
      opts.size <= config.arena_threshold and opts.backend == :memfd and opts.name == nil and
      opts.mode == 0o600 and flags.level == 0 and not flags.encrypted and
      not flags.lock_memory
  end

  @doc "Passes `:arena_size` and `:arena_grace` to the native layer (at start-up)."
  @spec configure(Config.t()) :: :ok
  def configure(config) do
    case Native.arena_configure(config.arena_size, config.arena_grace) do
      :ok -> :ok
      {:error, _} -> :ok
    end
  end

  @doc """
  Reclaims freed chunks whose workers have let go, and returns arenas that stayed empty
  for `:arena_grace` ms to the OS. The manager calls it every `:cleanup_interval`.
  Returns the number of arenas returned.
  """
  @spec maintain() :: non_neg_integer()
  def maintain, do: Native.arena_maintain()

  @doc """
  The arenas of this VM: `%{arenas, arena_bytes, arena_size, live_chunks,
  pending_chunks, created, returned}` (`pending_chunks`: freed regions a worker still
  has attached, reusable once it lets go).
  """
  @spec stats() :: %{atom() => non_neg_integer()}
  def stats, do: Native.arena_stats()
end
