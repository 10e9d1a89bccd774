import Config

# Settings of the :snakepit_shm application. Every key has its default in one place,
# Snakepit.SharedMemory.Config (`mix help` / its @moduledoc lists each key, its default
# and what it does); set here only what differs, for example:
#
#     config :snakepit_shm,
#       max_total_memory: 8 * 1024 * 1024 * 1024,
#       zero_on_free: true
#
# An unknown key or an invalid value fails the application start with a message naming
# the key.

import_config "#{config_env()}.exs"
