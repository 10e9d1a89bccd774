#!/usr/bin/env bash
# Runs the Python client's tests with Debian's interpreter (numpy, pytest from apt).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/priv/python${PYTHONPATH:+:$PYTHONPATH}"
export SNAKEPIT_SHM_LIB="$PWD/priv/libsnakepit_shm.so"
export PYTHONDONTWRITEBYTECODE=1
/usr/bin/python3 -m pytest -q -p no:cacheprovider priv/python/tests "$@"
