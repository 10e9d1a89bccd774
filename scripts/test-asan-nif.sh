#!/usr/bin/env bash
# Runs the NIF under AddressSanitizer + UBSan inside the stock BEAM:
#   1. builds the NIF with SNAKEPIT_SHM_SANITIZE=1 (output priv/asan/, see mix.exs);
#   2. proves that the sanitizers are really active: a deliberately bad program built
#      with the same flags must be stopped by ASan and by UBSan, the NIF must carry ASan
#      instrumentation, and the test VM must have libasan mapped and the NIF loaded
#      from priv/asan/ (checked by the VM itself, see ASAN_PROBE below);
#   3. runs the NIF tests, the fuzz suites, the model and the chaos suites with
#      SNAKEPIT_SHM_NIF_DIR=priv/asan and the sanitizer runtimes preloaded into the VM
#      (LD_PRELOAD works: erl is a shell script; VMs started by the tests inherit both);
#   4. fails if any sanitizer report appears in the output, even if the tests passed.
# Called by scripts/test-all.sh (so by `make test` and `make soak`).
set -euo pipefail
cd "$(dirname "$0")/.."

log_dir=_build/asan-nif
fail() { echo "test-asan-nif: $*" >&2; exit 1; }

# What went wrong with the test run, from its exit status and whether the VM confirmed
# ASan: a hang or a failure is reported as such, never as "ASan not loaded".
# Usage (also for tests): classify STATUS PROBE_SEEN(0|1) TIMEOUT_S LOG
classify() {
  local status=$1 probe=$2 limit=$3 log=$4
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "the suites did not finish within ${limit} s and were killed: a test hangs (for example one blocked opening a FIFO or waiting for a message); the last lines of $log show where"
  elif [ "$status" -ne 0 ] && [ "$probe" -eq 1 ]; then
    echo "tests failed under ASan (status $status, full log: $log)"
  elif [ "$status" -ne 0 ]; then
    echo "the test VM failed (status $status) before confirming that ASan was loaded: it did not start, or crashed early; see $log"
  elif [ "$probe" -eq 0 ]; then
    echo "the tests passed but the test VM never confirmed that ASan was loaded (LD_PRELOAD or SNAKEPIT_SHM_NIF_DIR lost?): full log $log"
  fi
}
if [ "${1:-}" = "--classify" ]; then
  shift
  classify "$@"
  exit 0
fi
mkdir -p "$log_dir"

libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
[ -f "$libasan" ] || fail "libasan.so not found (gcc -print-file-name gave '$libasan'): install gcc's libasan"
[ -f "$libubsan" ] || fail "libubsan.so not found (gcc -print-file-name gave '$libubsan')"

echo "test-asan-nif: building the NIF with -fsanitize=address,undefined into priv/asan/"
SNAKEPIT_SHM_SANITIZE=1 mix compile >"$log_dir/build.log" 2>&1 || {
  cat "$log_dir/build.log" >&2
  fail "the sanitized build failed"
}
nif=priv/asan/snakepit_shm_nif.so
[ -f "$nif" ] || fail "$nif was not built"
# (nm's output is captured first: `nm | grep -q` fails under pipefail when grep exits early)
undefined_symbols=$(nm -D --undefined-only "$nif")
grep -q '__asan_report_' <<<"$undefined_symbols" ||
  fail "$nif has no AddressSanitizer instrumentation (__asan_report_* missing)"

# A program that must be stopped by each sanitizer: proves the runtime reports errors.
probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT
cat >"$probe_dir/bad.cpp" <<'EOF'
#include <climits>
#include <cstdlib>
#include <cstring>
int main(int argc, char** argv) {
  if (argv[1][0] == 'a') {
    char* p = static_cast<char*>(std::malloc(16));
    std::memset(p, 0, 17 + (argc > 5));  // heap-buffer-overflow by one byte
    return p[3];
  }
  int big = INT_MAX - 1 + argc;  // signed overflow when argc >= 2
  return big + argc > 0 ? 0 : 1;
}
EOF
g++ -O1 -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
  -o "$probe_dir/bad" "$probe_dir/bad.cpp"
if ASAN_OPTIONS=detect_leaks=0 "$probe_dir/bad" a >"$probe_dir/asan.out" 2>&1; then
  fail "a heap overflow was not caught: AddressSanitizer is not working"
fi
grep -q 'AddressSanitizer: heap-buffer-overflow' "$probe_dir/asan.out" ||
  fail "AddressSanitizer did not report the deliberate heap overflow"
if "$probe_dir/bad" u x >"$probe_dir/ubsan.out" 2>&1; then
  fail "a signed overflow was not caught: UBSan is not working"
fi
grep -q 'runtime error' "$probe_dir/ubsan.out" ||
  fail "UBSan did not report the deliberate signed overflow"
echo "test-asan-nif: sanitizers verified (deliberate heap overflow and signed overflow caught)"

export SNAKEPIT_SHM_NIF_DIR="$PWD/priv/asan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# The VM checks /proc/self/maps for libasan and the NIF of priv/asan/ before any test.
export SNAKEPIT_SHM_ASAN_PROBE=1

suites=(test/native_test.exs test/reliability/fuzz_native_test.exs test/reliability/fuzz_api_test.exs
  test/reliability/model_property_test.exs test/reliability/chaos_test.exs
  # the message channel (issue 15): rings, region messages, hostile frames, ring model
  test/snakepit/shared_memory/channel_test.exs test/snakepit/shared_memory/channel_hostile_test.exs
  test/reliability/channel_ring_property_test.exs
  test/snakepit/shared_memory/arena_test.exs
  # quota charges given back by the destructors of killed callers' heaps (issue 12)
  test/snakepit/shared_memory/kill_instants_test.exs)
# The plain ExUnit run of `make test` ran these suites at full length a moment ago; here
# the sanitizers check the same code paths with a third of the fuzz calls and 60 % of the
# chaos (a caller's own values win; `make soak` scales both up tenfold as usual).
export SNAKEPIT_SHM_FUZZ_NATIVE_CALLS=${SNAKEPIT_SHM_FUZZ_NATIVE_CALLS:-66000}
export SNAKEPIT_SHM_FUZZ_API_CALLS=${SNAKEPIT_SHM_FUZZ_API_CALLS:-20000}
export SNAKEPIT_SHM_CHAOS_MS=${SNAKEPIT_SHM_CHAOS_MS:-6000}
present=()
for s in "${suites[@]}"; do [ -f "$s" ] && present+=("$s"); done

echo "test-asan-nif: running ${present[*]} with LD_PRELOAD=$libasan $libubsan"
status=0
# A hang must end with its own diagnosis, not with the CI's timeout.
limit=${SNAKEPIT_SHM_ASAN_TIMEOUT:-1800}
LD_PRELOAD="$libasan $libubsan" MIX_ENV=test timeout --kill-after=30 "$limit" \
  mix test "${present[@]}" >"$log_dir/test.log" 2>&1 || status=$?
tail -n 25 "$log_dir/test.log"

if grep -qE 'ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer' \
  "$log_dir/test.log"; then
  grep -nE -A30 'ERROR: AddressSanitizer|runtime error:' "$log_dir/test.log" | head -80 >&2
  fail "a sanitizer reported an error (full log: $log_dir/test.log)"
fi
probe=0
grep -q 'asan probe: libasan mapped, NIF from priv/asan' "$log_dir/test.log" && probe=1
problem=$(classify "$status" "$probe" "$limit" "$log_dir/test.log")
[ -z "$problem" ] || fail "$problem"
echo "test-asan-nif: passed under AddressSanitizer + UBSan"
