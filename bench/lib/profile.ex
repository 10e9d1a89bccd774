defmodule SnakepitShm.Bench.Profile do
  @moduledoc """
  How much each part of the bench measures: `:quick` (a CI smoke run, under 2 minutes)
  or `:full` (under 15 minutes). Sizes are bytes.
  """

  @kib 1024
  @mib 1024 * 1024
  @gib 1024 * 1024 * 1024

  @doc "The settings of a profile."
  @spec get(:quick | :full) :: map()
  def get(:quick) do
    %{
      name: :quick,
      headline_size: 256 * @mib,
      handoff_sizes: [4 * @kib, 1 * @mib, 64 * @mib, 256 * @mib],
      handoff_reps: 3,
      headline_reps: 5,
      handoff_budget_bytes: 8 * @mib,
      max_iterations: 100,
      lifecycle_cycles: 2_000,
      lifecycle_reps: 3,
      concurrency_levels: [1, 10, 100],
      concurrency_ms: 300,
      concurrency_reps: 2,
      refcount_ms: 300,
      zero_copy_sizes: [1 * @mib, 64 * @mib, 256 * @mib],
      zero_copy_reps: 3,
      crypto_size: 64 * @mib,
      crypto_reps: 3,
      scale_regions: 10_000,
      scale_orphans: 1_000,
      scale_reps: 3,
      fresh_pages_size: 256 * @mib,
      fresh_pages_reps: 2,
      cluster_sizes: [64 * @mib, 1 * @gib],
      cluster_reps: 2,
      host_quota_reps: 3,
      host_quota_pairs: 5_000,
      host_quota_kills: 5
    }
  end

  def get(:full) do
    %{
      name: :full,
      headline_size: 256 * @mib,
      handoff_sizes: [4 * @kib, 64 * @kib, 1 * @mib, 16 * @mib, 256 * @mib, 1 * @gib],
      handoff_reps: 7,
      headline_reps: 15,
      handoff_budget_bytes: 32 * @mib,
      max_iterations: 500,
      lifecycle_cycles: 10_000,
      lifecycle_reps: 7,
      concurrency_levels: [1, 10, 100],
      concurrency_ms: 1_000,
      concurrency_reps: 5,
      refcount_ms: 1_000,
      zero_copy_sizes: [1 * @mib, 16 * @mib, 256 * @mib, 1 * @gib],
      zero_copy_reps: 7,
      crypto_size: 256 * @mib,
      crypto_reps: 5,
      scale_regions: 10_000,
      scale_orphans: 1_000,
      scale_reps: 5,
      fresh_pages_size: 1 * @gib,
      fresh_pages_reps: 3,
      cluster_sizes: [64 * @mib, 1 * @gib],
      cluster_reps: 5,
      host_quota_reps: 7,
      host_quota_pairs: 20_000,
      host_quota_kills: 20
    }
  end
end
