import Config

# Short intervals so that deaths, expiry and leaks are handled within a test's patience.
config :snakepit_shm,
  cleanup_interval: 100,
  holder_scan_interval: 50

config :logger, level: :warning
