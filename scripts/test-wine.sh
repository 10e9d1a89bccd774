#!/usr/bin/env bash
# Cross-builds the core and its Windows tests with mingw-w64 and runs them under wine64:
# the Windows backend (CreateFileMappingW / MapViewOfFile, DACLs, two processes) and the
# portable core tests. Called by scripts/test-all.sh (`make test`); runs alone too.
# Build dir: _build/mingw; wine prefix: _build/wineprefix (created on first run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh test wine

build=_build/mingw
export WINEPREFIX="$PWD/_build/wineprefix"
export WINEDEBUG=-all
WINE=/usr/lib/wine/wine64
[ -x "$WINE" ] || WINE=$(command -v wine64 || command -v wine)

# The toolchain can only be given when the build dir is first configured.
toolchain=()
[ -f "$build/CMakeCache.txt" ] || toolchain=(-DCMAKE_TOOLCHAIN_FILE=cmake/mingw-w64.cmake)
cmake -S . -B "$build" "${toolchain[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DSPSHM_WITH_SODIUM=OFF -DSPSHM_BUILD_NIF=OFF >/dev/null
cmake --build "$build" --parallel 2 --target core_tests >/dev/null

# The first start of wine creates the prefix (wineboot, ~10-60 s): do it on its own so a
# slow first boot is not mistaken for a slow test.
if [ ! -f "$WINEPREFIX/system.reg" ]; then
  echo "test-wine: creating the wine prefix $WINEPREFIX"
  mkdir -p "$WINEPREFIX"
  timeout 300 "$WINE" wineboot --init >/dev/null 2>&1 || true
fi

status=0
timeout 300 "$WINE" "$build/core_tests.exe" "$@" || status=$?
# Stop this prefix's wineserver (it lingers for a few seconds otherwise).
"${WINE%/*}/wineserver" -k >/dev/null 2>&1 || wineserver -k >/dev/null 2>&1 || true
exit "$status"
