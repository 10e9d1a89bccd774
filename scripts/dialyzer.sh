#!/usr/bin/env bash
# Dialyzer (Debian erlang-dialyzer) run directly on the app's .beam files, with a PLT of
# erts, kernel, stdlib, crypto, elixir, logger and mix cached in _build/.
set -euo pipefail
cd "$(dirname "$0")/.."
mix compile >/dev/null
plt=_build/snakepit_shm.plt
elixir_lib=$(elixir -e 'IO.write(:code.lib_dir(:elixir))')
logger_lib=$(elixir -e 'IO.write(:code.lib_dir(:logger))')
mix_lib=$(elixir -e 'IO.write(:code.lib_dir(:mix))')
if [ ! -f "$plt" ]; then
  echo "dialyzer: building the PLT (once, a few minutes)"
  dialyzer --build_plt --output_plt "$plt" --apps erts kernel stdlib crypto \
    -r "$elixir_lib/ebin" "$logger_lib/ebin" "$mix_lib/ebin" >/dev/null 2>&1 || true
fi
dialyzer --no_check_plt --plt "$plt" -Wno_opaque _build/dev/lib/snakepit_shm/ebin
