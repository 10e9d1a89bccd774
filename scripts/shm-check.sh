#!/usr/bin/env bash
# Fails if a segment of ours (/dev/shm/spshm_*) is left behind, and lists it.
# With a baseline file (one name a line, written by `shm-check.sh --snapshot FILE` before
# the suites ran), segments that already existed are reported but not blamed on this run.
set -euo pipefail
list() { ls -1 /dev/shm 2>/dev/null | grep '^spshm_' | sort || true; }

if [ "${1:-}" = "--snapshot" ]; then
  list >"$2"
  exit 0
fi

baseline=${1:-}
left=$(list)
if [ -n "$baseline" ] && [ -f "$baseline" ]; then
  old=$(comm -12 <(echo "$left") "$baseline" | grep . || true)
  left=$(comm -23 <(echo "$left") "$baseline" | grep . || true)
  if [ -n "$old" ]; then
    echo "shm-check: $(echo "$old" | wc -l) segment(s) predate this run (not ours to blame; see mix snakepit.shm.list):"
    echo "$old" | sed 's/^/  /'
  fi
fi
if [ -n "$left" ]; then
  echo "shm-check: segments left in /dev/shm by this run:" >&2
  echo "$left" | sed 's/^/  /' >&2
  exit 1
fi
echo "shm-check: no segment of ours left in /dev/shm"
