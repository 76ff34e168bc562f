#!/usr/bin/env bash
# Benchmark of `loratool merge` on an SDXL-base-size checkpoint (6.9 GB f16, random weights of the
# real shapes, sd_xl_base_1.0's LDM key layout) with a rank-32 kohya SDXL LoRA/LoCon (1052 modules:
# UNet 788, TE1 72, TE2 192; 988 checkpoint tensors change, TE2's q/k/v going into fused in_proj), against
#   * the I/O floor: `cp` of the checkpoint, and `cp` + fsync of the copy (loratool fsyncs its output);
#   * the peer: diffusers StableDiffusionXLPipeline load_lora_weights + fuse_lora(0.8) +
#     unload_lora_weights on the same weights as a diffusers folder, then saving UNet + both text
#     encoders (bench/peer_merge_diffusers.py).
# SDXL twin of bench/merge_sd15.sh (same quiet-machine waiting, timing and RSS logic: bench/lib_bench.sh).
# Wall time: best of 2 for cp, cp + fsync and loratool, 1 run for the peer; peak RSS from /usr/bin/time -f %M.
# Page cache warm: base + LoRA cat'ed before cp/loratool runs, diffusers folder + LoRA before the peer
# (all at once, 14 GB, would not stay cached beside a 7 GB output on a 24 GB machine); `sync` between
# runs, outside the timed region. Disk: old outputs are removed before each run, and each 7 GB output
# is cut down to the tensors the correctness check needs (bench/check_sdxl.py pick-*) and deleted, so
# at most one output exists at a time (needs ~8 GB free beside the ~14 GB of inputs).
# Usage: bench/merge_sdxl.sh [data-dir]   (default: bench-data/, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-bench-data}
# quiet-machine waiting, run_timed, timed, best, maxrss, mib, size, bench_inputs (contended, wait_left)
. bench/lib_bench.sh

base="$data/sdxl_ldm.safetensors"
lora="$data/lora_sdxl_r32.safetensors"
folder="$data/sdxl_diffusers"
bench_inputs bench/make_sdxl.py "$base" "$lora" "$folder"
logs="$data/merge_sdxl_logs"
peer_dir="$data/peer_sdxl"
merged="$data/merged_sdxl.safetensors"
lt_pick="$data/sdxl_merged_pick.safetensors"
peer_pick="$data/sdxl_peer_pick.safetensors"
mkdir -p "$logs" "$peer_dir"
rm -f "$merged" "$peer_dir"/*.safetensors "$data/copy.safetensors"
free_gb=$(df -P --block-size=1G "$data" | awk 'NR==2{print $4}')
if [ "$free_gb" -lt 9 ]; then
    echo "need ~9 GB free in $data for one 7 GB output at a time; $free_gb GB free"; exit 1
fi

before_run() {
    rm -f "$merged" "$peer_dir"/*.safetensors; sync
    if [ "$1" = peer ]; then
        cat "$lora" "$folder"/*/*.safetensors >/dev/null      # keep the page cache warm: the peer's inputs
    else
        cat "$base" "$lora" >/dev/null                         # ... cp's and loratool's
    fi
}
rm -f "$logs"/*.times

echo "== timed runs"

timed cp 2 cp "$base" "$data/copy.safetensors"
# loratool fsyncs its output before renaming it into place; this is the matching durable floor
timed cp_fsync 2 sh -c 'cp "$1" "$2" && sync "$2"' sh "$base" "$data/copy.safetensors"
timed loratool 2 "$bin" merge --base "$base" --lora "$lora:0.8" -o "$merged" --force
cp "$logs/loratool.out" "$logs/loratool.last.out"
merged_size=$(size "$merged")
"$py" bench/check_sdxl.py pick-ldm "$merged" "$lt_pick"
rm -f "$merged"
timed peer 1 "$py" bench/peer_merge_diffusers.py "$folder" "$lora" 0.8 "$peer_dir"
peer_size=$(size "$peer_dir")
"$py" bench/check_sdxl.py pick-peer "$peer_dir" "$peer_pick"
rm -f "$peer_dir"/*.safetensors

echo "== correctness (untimed): loratool output vs diffusers fuse_lora vs an f32 reference, all f16"
correct=OK
"$py" bench/check_sdxl.py compare "$base" "$lora" 0.8 "$lt_pick" "$peer_pick" || correct=FAILED
rm -f "$lt_pick" "$peer_pick"

merge_summary "merge SDXL base (LDM single file) + rank-32 kohya LoRA @0.8" 2 \
    "base $(size "$base"), LoRA $(size "$lora"), diffusers folder $(size "$folder"), merged $merged_size, peer output $peer_size"
echo "correctness: $correct"
rm -f "$data/copy.safetensors"
[ "$correct" = OK ]
