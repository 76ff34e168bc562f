#!/usr/bin/env bash
# Runs one fuzz target for a total wall-clock budget, restarting libFuzzer after each crash.
# Each crash with a new signature (panic location, or libFuzzer error kind) is copied to
# fuzz/regressions/<target>-<n>.bin with its log excerpt in <target>-<n>.txt.
#
#   fuzz/fuzz_loop.sh <target> [seconds=600] [extra libFuzzer flags...]
#
# One fuzzer process at a time (the loop never runs two).
set -u
target=$1
total=${2:-600}
shift 2 || shift $#
cd "$(dirname "$0")/.."
mkdir -p fuzz/corpus/"$target" fuzz/artifacts/"$target" fuzz/regressions fuzz/logs
# The binary built by `RUSTC_BOOTSTRAP=1 cargo fuzz build` is run directly, so that restarts
# never rebuild (and never pick up half-edited library sources mid-run).
bin=fuzz/target/x86_64-unknown-linux-gnu/release/"$target"
[ -x "$bin" ] || { echo "build first: RUSTC_BOOTSTRAP=1 cargo fuzz build $target"; exit 1; }
end=$((SECONDS + total))
run=0
declare -A seen
for f in fuzz/regressions/"$target"-*.txt; do
  [ -e "$f" ] && seen["$(head -n1 "$f")"]=1
done
n=$(ls fuzz/regressions/"$target"-*.bin 2>/dev/null | wc -l)
while :; do
  left=$((end - SECONDS))
  [ "$left" -le 5 ] && break
  run=$((run + 1))
  log=fuzz/logs/"$target"-run$run.log
  RUST_BACKTRACE=1 "$bin" -artifact_prefix=fuzz/artifacts/"$target"/ -max_len=65536 -rss_limit_mb=2048 -timeout=10 -max_total_time="$left" \
    -print_final_stats=1 "$@" fuzz/corpus/"$target" >"$log" 2>&1
  rc=$?
  echo "run $run: exit $rc, log $log"
  [ "$rc" -eq 0 ] && break
  artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -n1 | awk '{print $5}')
  if [ -z "$artifact" ]; then echo "no artifact written; stopping"; break; fi
  sig=$(grep -m1 -o 'panicked at [^ ]*' "$log" || grep -m1 -o 'ERROR: libFuzzer: [a-z-]*' "$log")
  if [ -z "${seen[$sig]:-}" ]; then
    seen[$sig]=1
    n=$((n + 1))
    cp "$artifact" fuzz/regressions/"$target-$n".bin
    { echo "$sig"; grep -A40 -m1 -E 'panicked at|ERROR: libFuzzer' "$log"; } \
      >fuzz/regressions/"$target-$n".txt
    echo "  new crash $target-$n: $sig"
  else
    echo "  known crash again: $sig"
  fi
done
