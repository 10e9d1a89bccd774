#!/usr/bin/env bash
# Runs the Python client's checks with Debian's interpreter (numpy, pytest from apt):
# PEP 8 (pycodestyle, 99 columns) and pyflakes on priv/python, then the pytest suite.
# Extra arguments go to pytest. The C library must be built first (`mix compile`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/priv/python${PYTHONPATH:+:$PYTHONPATH}"
export SNAKEPIT_SHM_LIB="${SNAKEPIT_SHM_LIB:-$PWD/priv/libsnakepit_shm.so}"
export PYTHONDONTWRITEBYTECODE=1
PY=/usr/bin/python3

for tool in pycodestyle pyflakes; do
  if ! "$PY" -m "$tool" --version >/dev/null 2>&1; then
    echo "run-pytest: $tool is missing: run scripts/install-deps.sh test" >&2
    exit 1
  fi
done
"$PY" -m pycodestyle --max-line-length=99 priv/python/snakepit_shm priv/python/tests priv/python/examples
"$PY" -m pyflakes priv/python/snakepit_shm priv/python/tests priv/python/examples
"$PY" -m pytest -q -p no:cacheprovider priv/python/tests "$@"
