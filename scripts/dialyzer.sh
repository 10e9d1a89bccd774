#!/usr/bin/env bash
# Dialyzer (Debian erlang-dialyzer) run directly on the app's .beam files, with a PLT of
# erts, kernel, stdlib, crypto, elixir, logger, mix and eex cached in _build/ (built once,
# a few minutes). Fails on any warning in the app's own modules.
set -euo pipefail
cd "$(dirname "$0")/.."
mix compile >/dev/null
plt=_build/snakepit_shm.plt
lib() { elixir -e "IO.write(:code.lib_dir(:$1))"; }
elixir_ebin="$(lib elixir)/ebin"
deps=("$elixir_ebin" "$(lib logger)/ebin" "$(lib mix)/ebin" "$(lib eex)/ebin")
if [ ! -f "$plt" ]; then
  echo "dialyzer: building the PLT in $plt (once, a few minutes)"
  dialyzer --build_plt --output_plt "$plt.tmp" -pa "$elixir_ebin" \
    --apps erts kernel stdlib crypto -r "${deps[@]}" >/dev/null || {
    status=$?
    # 2 means "warnings found" while building, which is normal for the stdlib PLT.
    [ "$status" -eq 2 ] || { echo "dialyzer: building the PLT failed ($status)" >&2; exit 1; }
  }
  mv "$plt.tmp" "$plt"
fi
dialyzer --no_check_plt --plt "$plt" -pa "$elixir_ebin" -Wno_opaque _build/dev/lib/snakepit_shm/ebin
