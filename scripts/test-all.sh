#!/usr/bin/env bash
# Runs every test suite of snakepit_shm, in order, stopping at the first failure.
# Called by `make test` (and `make soak` with SNAKEPIT_SHM_SOAK=1).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)
baseline=$(mktemp)
trap 'rm -f "$baseline"' EXIT
scripts/shm-check.sh --snapshot "$baseline"

step "format check (mix format, clang-format)"
make -s format-check

step "C++ core tests (Catch2 via CTest)"
make -s cpp-test

step "C++ core tests under AddressSanitizer + UBSan"
make -s cpp-asan

step "Elixir build"
mix compile

step "ExUnit (NIF layer, manager, mix tasks, end-to-end with Python)"
MIX_ENV=test mix test

step "Python client (pytest with /usr/bin/python3)"
scripts/run-pytest.sh

for extra in scripts/test-asan-nif.sh scripts/test-wine.sh; do
  if [ -x "$extra" ]; then
    step "$extra"
    "$extra"
  fi
done

step "dialyzer"
scripts/dialyzer.sh

step "no segment of ours left behind"
scripts/shm-check.sh "$baseline"

echo "test-all: every suite passed in $(( $(date +%s) - started )) s"
