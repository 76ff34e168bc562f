#!/usr/bin/env bash
# Benchmarks for `loratool inspect` (issue 2 §7). Records wall time as ratios against baselines
# measured in the same run. Usage: bench/inspect.sh [data-dir]   (default: bench-data/, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-bench-data}
mkdir -p "$data/inspect1000"
cargo build --release --quiet
bin=target/release/loratool

# Best of N wall-clock seconds of a command (page cache warm after the first run).
best_of() {
    local n=$1; shift
    local best=
    for _ in $(seq "$n"); do
        local s e t
        s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N)
        t=$(echo "$e - $s" | bc -l)
        if [ -z "$best" ] || [ "$(echo "$t < $best" | bc -l)" = 1 ]; then best=$t; fi
    done
    printf '%.3f' "$best"
}

# 1,000 LoRA files: copies of every fixture LoRA, cycled.
mapfile -t sources < <(ls fixtures/loras/*.safetensors)
if [ "$(ls "$data/inspect1000" | wc -l)" -ne 1000 ]; then
    rm -f "$data/inspect1000"/*
    for i in $(seq 0 999); do
        src=${sources[$((i % ${#sources[@]}))]}
        cp "$src" "$data/inspect1000/$(printf '%04d' "$i")_$(basename "$src")"
    done
fi
total=$(du -sh "$data/inspect1000" | cut -f1)
echo "inspect: 1000 files ($total), 2 cores"
t_cat=$(best_of 5 sh -c "cat $data/inspect1000/* > /dev/null")
t_table=$(best_of 5 "$bin" inspect "$data"/inspect1000/*)
t_json=$(best_of 5 "$bin" inspect --json "$data"/inspect1000/*)
echo "  cat of all files (read baseline): ${t_cat}s"
echo "  loratool inspect (table):         ${t_table}s"
echo "  loratool inspect --json:          ${t_json}s"
/usr/bin/time -f "  peak RSS %M KiB" "$bin" inspect --json "$data"/inspect1000/* >/dev/null

# --hash on a 2 GiB LoRA-shaped safetensors file vs sha256sum.
big="$data/hash2g.safetensors"
if [ ! -f "$big" ]; then
    python3 - "$big" <<'PY'
import json, os, struct, sys
n = 16 * 67108864  # [16, 64Mi] f16 down factor = 2 GiB
hdr = {"lora_unet_big.lora_down.weight": {"dtype": "F16", "shape": [16, 67108864], "data_offsets": [0, 2 * n]},
       "lora_unet_big.lora_up.weight": {"dtype": "F16", "shape": [16, 16], "data_offsets": [2 * n, 2 * n + 512]}}
h = json.dumps(hdr).encode(); h += b" " * (-len(h) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h)
    chunk = os.urandom(64 << 20)
    for _ in range((2 * n) // len(chunk)):
        f.write(chunk)
    f.write(os.urandom(512))
PY
fi
size=$(du -h "$big" | cut -f1)
cat "$big" > /dev/null
t_sha=$(best_of 3 sha256sum "$big")
t_hash=$(best_of 3 "$bin" inspect --hash "$big")
echo "hash: $size file"
echo "  sha256sum:                 ${t_sha}s"
echo "  loratool inspect --hash:   ${t_hash}s  (ratio $(echo "$t_hash / $t_sha" | bc -l | cut -c1-5))"
/usr/bin/time -f "  peak RSS %M KiB" "$bin" inspect --hash "$big" >/dev/null
