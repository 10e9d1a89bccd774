import Config

# Short intervals so that deaths, expiry and leaks are handled within a test's patience.
config :snakepit_shm,
  cleanup_interval: 100,
  holder_scan_interval: 50,
  # The suites kill VMs on purpose and then look at what they left (the cleanup task, the
  # next VM's start-up sweep, list --orphaned): the test VM must not sweep it first, at
  # its start or when such a VM dies (Snakepit.SharedMemory.Peers). The sweeps are tested
  # in VMs of their own, each with a private shm_path (peers_test.exs, chaos_test.exs, ...).
  orphan_sweep: false

config :logger, level: :warning
