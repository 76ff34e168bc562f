#!/usr/bin/env bash
# Benchmark of `loratool extract` and `loratool resize` against kohya-ss/sd-scripts
# (networks/extract_lora_from_models.py, networks/resize_lora.py), CPU only, SD1.5 size:
#   extract: sd15_ldm.safetensors (2.1 GB f16, random weights) vs sd15_tuned.safetensors
#            (base + random rank-16 delta + noise on every UNet/TE 2-D and conv weight), rank 32,
#            conv rank 32;
#   resize:  lora_r128.safetensors (rank 128, alpha 64, 350 modules incl. 3x3 convs) -> rank 32.
# One run of each, wall time and peak RSS from /usr/bin/time; page cache warm (inputs cat'ed first),
# `sync` between runs; each timed run waits (up to 15 min) for a quiet machine.
# Then (untimed) the total Frobenius error of each output (bench/extract_resize_check.py).
# Data: bench/make_extract_data.py (needs bench/make_sd15.py's files).
# Usage: SD_SCRIPTS=/path/to/sd-scripts bench/extract_resize.sh [data-dir]  (default bench-data/)
# sd-scripts' imports need torchvision, opencv-python-headless and imagesize; put them on
# EXTRA_PYTHONPATH if they are not in the venv (e.g. pip install --no-deps --target DIR ...).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-bench-data}
py=${PYTHON:-/work/fixtures-venv/bin/python}
sds=${SD_SCRIPTS:-/work/sd-scripts}
export PYTHONPATH="$sds${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"
cargo build --release --quiet
bin=$PWD/target/release/loratool

base="$data/sd15_ldm.safetensors"
tuned="$data/sd15_tuned.safetensors"
r128="$data/lora_r128.safetensors"
[ -f "$base" ] && [ -f "$data/lora_r32.safetensors" ] || "$py" bench/make_sd15.py "$data"
[ -f "$tuned" ] && [ -f "$r128" ] || "$py" bench/make_extract_data.py "$data"
data=$(cd "$data" && pwd); base=$data/sd15_ldm.safetensors; tuned=$data/sd15_tuned.safetensors
r128=$data/lora_r128.safetensors
logs="$data/extract_logs"
mkdir -p "$logs"

contended=0
cpu_busy() {   # % of all cores busy over 3 s
    local a b idle total=0 i
    a=($(head -1 /proc/stat)); sleep 3; b=($(head -1 /proc/stat))
    idle=$(( (b[4] + b[5]) - (a[4] + a[5]) ))
    for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
    echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}
heavy() { ps -eo pid,pcpu,comm --sort=-pcpu | awk 'NR>1 && $2>20 && $3 ~ /rustc|cargo|python|loratool|pickle|fuzz|merge/' | head -3; }
wait_quiet() {
    local tries=0 busy
    while :; do
        busy=$(cpu_busy)
        if [ "$busy" -lt 25 ] && [ -z "$(heavy)" ]; then
            echo "  [quiet] CPU busy ${busy}% over 3 s before: $1"; return 0
        fi
        echo "  [busy] CPU busy ${busy}% before $1 ($(date +%T)); top processes:"
        ps aux --sort=-%cpu | head -4 | cut -c1-150 | sed 's/^/    /'
        tries=$((tries + 1))
        if [ "$tries" -gt 15 ]; then
            echo "  [busy] still contended after 15 min; timing anyway (numbers flagged)"; contended=1; return 0
        fi
        sleep 60
    done
}
check_after() {
    local busy; busy=$(cpu_busy)
    if [ "$busy" -ge 25 ]; then
        echo "  [busy] CPU busy ${busy}% right after $1 (it may have been contended):"
        ps aux --sort=-%cpu | head -4 | cut -c1-150 | sed 's/^/    /'; contended=1
    fi
}
# run_timed LABEL CMD...: /usr/bin/time -f "%e s %M KB" -> $logs/LABEL.time, output -> $logs/LABEL.out
run_timed() {
    local label=$1; shift
    wait_quiet "$label"
    echo "  running $label: $*"
    /usr/bin/time -f "%e s %M KB" -o "$logs/$label.time" "$@" >"$logs/$label.out" 2>&1 || {
        echo "FAILED ($label, exit $?): $*"; tail -30 "$logs/$label.out"; return 1; }
    echo "  $label: $(cat "$logs/$label.time")"
    sync
    check_after "$label"
}
secs() { awk '{print $1}' "$logs/$1.time"; }
rss() { awk '{printf "%.2f GiB", $3 / 1048576}' "$logs/$1.time"; }

echo "== timed runs ($(date +%T))"
cat "$base" "$tuned" "$r128" >/dev/null; sync   # warm page cache
run_timed lt_extract "$bin" extract --base "$base" --tuned "$tuned" --rank 32 --conv-rank 32 \
    -o "$data/ext_loratool.safetensors" --force
run_timed kohya_extract bash -c "cd '$sds' && exec '$py' networks/extract_lora_from_models.py \
    --model_org '$base' --model_tuned '$tuned' --save_to '$data/ext_kohya.safetensors' \
    --dim 32 --conv_dim 32 --device cpu --save_precision fp16" || true
run_timed lt_resize "$bin" resize "$r128" --rank 32 -o "$data/rs_loratool.safetensors" --force
run_timed kohya_resize bash -c "cd '$sds' && exec '$py' networks/resize_lora.py --model '$r128' \
    --new_rank 32 --save_to '$data/rs_kohya.safetensors' --device cpu --save_precision fp16" || true

echo "== accuracy (untimed)"
[ -f "$data/ext_kohya.safetensors" ] && "$py" bench/extract_resize_check.py extract "$base" "$tuned" \
    "$data/ext_loratool.safetensors" "$data/ext_kohya.safetensors" loratool kohya | tee "$logs/check_extract.out"
[ -f "$data/rs_kohya.safetensors" ] && "$py" bench/extract_resize_check.py resize "$r128" \
    "$data/rs_loratool.safetensors" "$data/rs_kohya.safetensors" loratool kohya | tee "$logs/check_resize.out"

echo
echo "== loratool output"; tail -3 "$logs/lt_extract.out"; tail -3 "$logs/lt_resize.out"
echo
echo "== summary: extract (SD1.5 LDM f16, rank 32 / conv 32) and resize (rank-128 LoRA -> 32), CPU"
echo "machine:  $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/^Mem:/{print $2}') GiB RAM"
echo "versions: $("$bin" --version), sd-scripts ${SD_SCRIPTS_REV:-?}, $("$py" -c 'import torch; print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")')"
printf "%-26s %10s %12s\n" "" "wall (s)" "peak RSS"
for l in lt_extract kohya_extract lt_resize kohya_resize; do
    [ -f "$logs/$l.time" ] && printf "%-26s %10s %12s\n" "$l" "$(secs $l)" "$(rss $l)"
done
for op in extract resize; do
    if [ -f "$logs/kohya_$op.time" ] && [ -f "$logs/lt_$op.time" ]; then
        echo "$op speed ratio kohya/loratool = $(awk -v a="$(secs kohya_$op)" -v b="$(secs lt_$op)" 'BEGIN{printf "%.1fx", a / b}')"
    fi
    grep -h "^RESULT $op" "$logs/check_$op.out" 2>/dev/null || true
done
[ "$contended" = 1 ] && echo "WARNING: some timed runs may have been contended (see [busy] lines)"
true
