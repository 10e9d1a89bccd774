#!/usr/bin/env bash
# Fails if any segment of ours is left in /dev/shm (and lists it).
left=$(ls -1 /dev/shm 2>/dev/null | grep '^spshm_' || true)
if [ -n "$left" ]; then
  echo "shm-check: segments of ours left in /dev/shm:" >&2
  echo "$left" >&2
  exit 1
fi
echo "shm-check: no segment of ours left in /dev/shm"
