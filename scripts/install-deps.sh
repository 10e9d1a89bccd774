#!/usr/bin/env bash
# Installs the Debian packages snakepit_shm needs, only those missing. Idempotent and
# quiet when everything is there. Needs root (or sudo). Usage: scripts/install-deps.sh [group...]
# Groups: build (default, always), test, wine, bench.
set -euo pipefail

build_pkgs=(make cmake g++ pkg-config elixir erlang-dev erlang-dialyzer erlang-proper erlang-os-mon
  erlang-tools libsodium-dev libboost-dev python3 python3-numpy)
test_pkgs=(catch2 python3-pytest python3-pycodestyle python3-pyflakes clang-format
  python3-venv python3-setuptools)  # pip install priv/python into a venv (issue 13)
wine_pkgs=(g++-mingw-w64-x86-64 wine64)
bench_pkgs=(gnuplot-nox python3-grpcio)

want=("${build_pkgs[@]}")
for group in "$@"; do
  case "$group" in
    build) ;;
    test) want+=("${test_pkgs[@]}") ;;
    wine) want+=("${wine_pkgs[@]}") ;;
    bench) want+=("${bench_pkgs[@]}") ;;
    *) echo "install-deps: unknown group '$group' (use build, test, wine, bench)" >&2; exit 2 ;;
  esac
done

missing=()
for pkg in "${want[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
