#!/usr/bin/env bash
# Runs every test suite of snakepit_shm, in order, stopping at the first failure.
# Called by `make test` (and `make soak` with SNAKEPIT_SHM_SOAK=1).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)
baseline=$(mktemp)
background=$(mktemp -d)
plt_job= wine_job=
# On any exit: stop the background builds still running (each in a process group of its
# own, compilers included), remove the scratch files.
cleanup() {
  for job in $plt_job $wine_job; do kill -- "-$job" 2>/dev/null || true; done
  rm -rf "$baseline" "$background"
}
trap cleanup EXIT
scripts/shm-check.sh --snapshot "$baseline"

step "format check (mix format, clang-format)"
make -s format-check

step "C++ core tests (Catch2 via CTest)"
make -s cpp-test

step "C++ core tests under AddressSanitizer + UBSan"
make -s cpp-asan

step "Elixir build"
mix compile

# Builds that test nothing, at the lowest priority, in the background: they take the CPU
# ExUnit leaves idle (it waits much of its time) instead of running after the suites.
# (Started here, not earlier: the C++ builds above keep both CPUs busy.)
# Each later step runs its script again, which finds the work done (or does it, and
# reports its errors, if the background attempt failed).
step "background builds at nice 19: dialyzer's PLT, the mingw cross-build and wine prefix"
setsid nice -n 19 scripts/dialyzer.sh --plt-only >"$background/plt.log" 2>&1 &
plt_job=$!
setsid nice -n 19 scripts/test-wine.sh --build-only >"$background/wine.log" 2>&1 &
wine_job=$!
# Waits for a background build before its step uses the same files.
await() { wait "$1" || echo "(the background build failed: the step below does it again; its log: $(tail -n 5 "$2"))"; }

step "ExUnit (NIF layer, manager, mix tasks, end-to-end with Python)"
MIX_ENV=test mix test

step "Python client (pytest with /usr/bin/python3)"
scripts/run-pytest.sh

step "scripts/test-asan-nif.sh"
scripts/test-asan-nif.sh

step "scripts/test-wine.sh"
await "$wine_job" "$background/wine.log"
scripts/test-wine.sh

step "dialyzer"
await "$plt_job" "$background/plt.log"
scripts/dialyzer.sh

step "no segment of ours left behind"
scripts/shm-check.sh "$baseline"

echo "test-all: every suite passed in $(( $(date +%s) - started )) s"
