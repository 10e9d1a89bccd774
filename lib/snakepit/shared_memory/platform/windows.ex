defmodule Snakepit.SharedMemory.Platform.Windows do
  @moduledoc """
  Windows: named file mappings in the `Local\\` namespace. The kernel frees a mapping
  with its last handle, so a killed VM leaks nothing and there is no orphan sweep.
  """
  @behaviour Snakepit.SharedMemory.Platform

  @impl true
  def name, do: "Windows"
  @impl true
  def backends, do: [:windows]
  @impl true
  def default_backend, do: :windows
  @impl true
  def named_backend, do: :windows
  @impl true
  def shm_dir, do: nil
end
