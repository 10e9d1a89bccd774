defmodule Snakepit.SharedMemory.Platform.Linux do
  @moduledoc "Linux: sealed memfds by default, POSIX shm for names and shared permissions."
  @behaviour Snakepit.SharedMemory.Platform

  @impl true
  def name, do: "Linux"
  @impl true
  def backends, do: [:memfd, :posix]
  @impl true
  def default_backend, do: :memfd
  @impl true
  def named_backend, do: :posix
  # config :snakepit_shm, shm_path: moves POSIX segments to another tmpfs.
  @impl true
  def shm_dir, do: Snakepit.SharedMemory.Config.get(:shm_path) || "/dev/shm"
end
