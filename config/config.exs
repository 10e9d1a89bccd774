import Config

# Settings of the :snakepit_shm application (see Snakepit.SharedMemory.Config for each
# one and its default). An unknown key or an invalid value fails the application start
# with a message naming the key.
config :snakepit_shm,
  max_regions: 100_000,
  max_region_size: 4 * 1024 * 1024 * 1024,
  max_total_memory: :infinity,
  max_regions_per_process: :infinity,
  cleanup_interval: 5_000,
  holder_scan_interval: 200,
  default_timeout: :infinity,
  security_level: :standard,
  default_backend: :auto,
  default_cleanup_policy: :automatic,
  zero_on_free: false,
  orphan_sweep: true,
  audit_log_level: :info

import_config "#{config_env()}.exs"
