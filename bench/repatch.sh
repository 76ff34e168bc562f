#!/usr/bin/env bash
# What `library previews` saves by keeping the checkpoint loaded (issue 14 §2): seconds to switch
# the loaded text encoder, UNet and VAE from one LoRA to the next by re-patching in place, against
# loading them afresh, bare and with the LoRA patched in as each tensor is read (`preview`'s load).
# Needs bench/make_sd15.py's data (sd15_ldm.safetensors, lora_r32.safetensors) and, for a second
# LoRA, lora_r128.safetensors (bench/make_extract_data.py); file pages are warm (read once first).
# Usage: bench/repatch.sh [DATA_DIR] [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-bench-data}
repeats=${2:-3}
cargo build --release --quiet --example repatch_bench
bin="${CARGO_TARGET_DIR:-target}/release/examples/repatch_bench"
loras=("$data/lora_r32.safetensors")
[ -f "$data/lora_r128.safetensors" ] && loras+=("$data/lora_r128.safetensors")
cat "$data/sd15_ldm.safetensors" "${loras[@]}" >/dev/null
line=$("$bin" "$data/sd15_ldm.safetensors" "${loras[@]}" --repeats "$repeats")
echo "$line"
python3 - "$line" <<'PY'
import json, statistics, sys
r = json.loads(sys.argv[1])
load = statistics.median(r["load_s"])
patches = r["repatch_s"]
with_lora = statistics.median(r["load_with_lora_s"])
print(f"bare load (median of {len(r['load_s'])}): {load:.2f} s over {r['tensors']} tensors; "
      f"load with a LoRA: {with_lora:.2f} s")
print(f"re-patch (median of {len(patches)}): {statistics.median(patches):.2f} s, "
      f"{r['rebuilt'][0]} tensors rebuilt; load with a LoRA / re-patch = "
      f"{with_lora / statistics.median(patches):.2f}x, bare load / re-patch = "
      f"{load / statistics.median(patches):.2f}x")
PY
