import Config

config :logger, :console, format: "$time [$level] $message\n"
