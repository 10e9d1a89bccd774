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
  @impl true
  def shm_dir, do: "/dev/shm"
end
