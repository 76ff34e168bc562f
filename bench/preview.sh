#!/usr/bin/env bash
# Preview speed and memory against diffusers on the same weights (issue 12 §7).
# Needs bench/make_sd15.py's data (sd15_ldm.safetensors and the sd15_diffusers/ pipeline folder,
# the same random weights) and a Python with torch, diffusers and transformers.
# Usage: bench/preview.sh [DATA_DIR] [PYTHON] [REPEATS]
# For each of loratool and diffusers, in the same run, alternating: seconds per UNet forward at
# batch 2 (one sampling step with CFG) and per VAE decode at 512x512 and 256x256 (median of
# REPEATS after a warm-up), then whole renders timed from process start with their peak RSS:
# 512x512 Euler a 4 steps CFG 7, and 512x512 one step without CFG.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-bench-data}
python=${2:-python3}
repeats=${3:-3}
cargo build --release --quiet --bin loratool --example preview_step_bench
bin="${CARGO_TARGET_DIR:-target}/release"
out=$(mktemp -d /tmp/loratool-preview-bench.XXXXXX)
trap 'rm -rf "$out"' EXIT
timed() { # name, command...: prints the command's JSON line plus its peak RSS in MB
  local name=$1; shift
  /usr/bin/time -f "%M" -o "$out/$name.rss" "$@" >"$out/$name.json" 2>"$out/$name.err" ||
    { cat "$out/$name.err" >&2; exit 1; }
  printf '%-26s %s rss_mb=%d\n' "$name" "$(tail -1 "$out/$name.json")" $(($(cat "$out/$name.rss") / 1024))
}
for size in 512 256; do
  timed "loratool step $size" "$bin/examples/preview_step_bench" "$data/sd15_ldm.safetensors" $size $repeats
  timed "diffusers step $size" "$python" bench/preview_diffusers.py step "$data/sd15_diffusers" $size $repeats
done
render_loratool() { # size steps cfg
  local start=$(date +%s.%N)
  "$bin/loratool" preview --model "$data/sd15_ldm.safetensors" --prompt "a red fox, forest" \
    --negative blurry --sampler euler-a --steps "$2" --cfg "$3" --seed 1 --width "$1" --height "$1" \
    -o "$out/render.png" --force >/dev/null
  echo "{\"size\": $1, \"steps\": $2, \"total_s\": $(echo "$(date +%s.%N) - $start" | bc)}"
}
export -f render_loratool
export bin data out
timed "loratool render 4 cfg7" bash -c 'render_loratool 512 4 7'
timed "diffusers render 4 cfg7" "$python" bench/preview_diffusers.py render "$data/sd15_diffusers" 512 4 7
timed "loratool render 1 nocfg" bash -c 'render_loratool 512 1 1'
timed "diffusers render 1 nocfg" "$python" bench/preview_diffusers.py render "$data/sd15_diffusers" 512 1 1
