#!/usr/bin/env bash
# Preview speed and memory against diffusers on the same weights (issue 12 §7).
# Usage: bench/preview.sh [sd15|sdxl] [DATA_DIR] [PYTHON] [REPEATS]   (default sd15)
#
# sd15: needs bench/make_sd15.py's data (sd15_ldm.safetensors and the sd15_diffusers/ pipeline
# folder, the same random weights) and a Python with torch, diffusers and transformers.
# For each of loratool and diffusers, in the same run, alternating: seconds per UNet forward at
# batch 2 (one sampling step with CFG) and per VAE decode at 512x512 and 256x256 (median of
# REPEATS after a warm-up), then whole renders timed from process start with their peak RSS:
# 512x512 Euler a 4 steps CFG 7, and 512x512 one step without CFG.
#
# sdxl: needs bench/make_sdxl.py's data (sdxl_ldm.safetensors, the SGM single file, and the
# sdxl_diffusers/ folder of the same weights). Seconds per UNet forward at batch 2 with SDXL's
# vector input (one CFG step) at 1024x1024 and 512x512, f32, loratool and diffusers alternating;
# then whole 1024x1024 renders (Euler a, 2 steps, CFG 5: both text encoders, the UNet, the VAE)
# in f32 and f16, timed from process start, with their peak RSS.
# Overrides for a test run on a tiny model: SDXL_MODEL, SDXL_PIPELINE (paths), SDXL_SIZES,
# SDXL_RENDER_SIZE, SDXL_RENDER_STEPS (default 2), SDXL_DIFFUSERS_DTYPES (default "f32 f16"), SDXL_STEP_ARGS (extra preview_step_bench flags, e.g. "--head-width 2
# --groups 2") and SDXL_PREVIEW_ARGS (extra `loratool preview` flags, e.g. "--config DIR").
set -euo pipefail
cd "$(dirname "$0")/.."
mode=sd15
case "${1:-}" in sd15 | sdxl) mode=$1; shift ;; esac
data=${1:-bench-data}
python=${2:-python3}
repeats=${3:-3}
profile=${BENCH_PROFILE:-release}
cargo build --profile "$profile" --quiet --bin loratool --example preview_step_bench
bin="${CARGO_TARGET_DIR:-target}/$([ "$profile" = dev ] && echo debug || echo "$profile")"
out=$(mktemp -d /tmp/loratool-preview-bench.XXXXXX)
trap 'rm -rf "$out"' EXIT
timed() { # name, command...: prints the command's JSON line plus its peak RSS in MB
  local name=$1; shift
  /usr/bin/time -f "%M" -o "$out/$name.rss" "$@" >"$out/$name.json" 2>"$out/$name.err" ||
    { cat "$out/$name.err" >&2; exit 1; }
  printf '%-26s %s rss_mb=%d\n' "$name" "$(tail -1 "$out/$name.json")" $(($(cat "$out/$name.rss") / 1024))
}
if [ "$mode" = sdxl ]; then
  model=${SDXL_MODEL:-$data/sdxl_ldm.safetensors}
  pipeline=${SDXL_PIPELINE:-$data/sdxl_diffusers}
  read -r -a step_extra <<<"${SDXL_STEP_ARGS:-}"
  for size in ${SDXL_SIZES:-1024 512}; do
    timed "loratool step $size" "$bin/examples/preview_step_bench" "$model" "$size" "$repeats" \
      --no-vae "${step_extra[@]}"
    timed "diffusers step $size" "$python" bench/preview_diffusers.py step "$pipeline" "$size" "$repeats" f32 novae
  done
  render_sdxl() { # dtype
    local start=$(date +%s.%N)
    # shellcheck disable=SC2086
    "$bin/loratool" preview --model "$model" --prompt "a red fox, forest" --negative blurry \
      --sampler euler-a --steps "$steps" --cfg 5 --seed 1 --width "$size" --height "$size" --dtype "$1" \
      ${SDXL_PREVIEW_ARGS:-} -o "$out/render.png" --force >/dev/null
    echo "{\"size\": $size, \"steps\": $steps, \"dtype\": \"$1\", \"total_s\": $(echo "$(date +%s.%N) - $start" | bc)}"
  }
  export -f render_sdxl
  export bin out model
  export size=${SDXL_RENDER_SIZE:-1024} steps=${SDXL_RENDER_STEPS:-2}
  for dtype in f32 f16; do
    timed "loratool render $dtype" bash -c "render_sdxl $dtype"
    # diffusers in f16 on a CPU without native f16 matrix products can take very long:
    # SDXL_DIFFUSERS_DTYPES=f32 leaves it out.
    case " ${SDXL_DIFFUSERS_DTYPES:-f32 f16} " in *" $dtype "*)
      timed "diffusers render $dtype" "$python" bench/preview_diffusers.py render "$pipeline" "$size" "$steps" 5 "$dtype" ;;
    esac
  done
  exit 0
fi
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
