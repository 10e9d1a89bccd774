defmodule Snakepit.SharedMemory.Platform.MacOS do
  @moduledoc """
  macOS: POSIX shm only (no memfd). Its shm objects are not files, so they cannot be
  listed and the orphan sweep has nothing to scan: a killed VM's POSIX regions stay until
  reboot or until something unlinks them by name.
  """
  @behaviour Snakepit.SharedMemory.Platform

  @impl true
  def name, do: "macOS"
  @impl true
  def backends, do: [:posix]
  @impl true
  def default_backend, do: :posix
  @impl true
  def named_backend, do: :posix
  @impl true
  def shm_dir, do: nil
end
