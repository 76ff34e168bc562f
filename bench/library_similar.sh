#!/usr/bin/env bash
# `library similar` over 1,000 LoRAs (issue target: under 2 s); figures go to docs/BENCHMARKS.md.
#   bench/library_similar.sh [N]   (default 1000)
# N copies of fixtures/loras/sdxl_kohya_lora.safetensors (986 modules: a full SDXL kohya layout,
# so each stored sketch is ~138 KB as for a real SDXL LoRA), each with distinct metadata and one
# perturbed byte of data (distinct sha256 and AutoV3, so no pair is answered as "same tensors").
# Measured: the first scan (hashes + sketches), then `similar` cold (10 exact comparisons computed)
# and warm (from the cache). (`dupes --near` is not run here: every pair of these copies is alike,
# so it would confirm all N(N-1)/2 pairs exactly.)
# Data live under $BENCH_DIR (default /tmp/loratool-bench-similar) and are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/loratool}
DIR=${BENCH_DIR:-/tmp/loratool-bench-similar}
N=${1:-1000}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
ms() { local s=$(date +%s%N); "$@" >/dev/null 2>&1; local e=$(date +%s%N); echo "$(( (e - s) / 1000000 )) ms"; }

python3 - "$DIR/c" "$N" <<'PY'
import json, os, struct, sys
out, n = sys.argv[1], int(sys.argv[2])
b = open("fixtures/loras/sdxl_kohya_lora.safetensors", "rb").read()
hl = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + hl]); data = b[8 + hl:]
for i in range(n):
    hh = dict(h); meta = dict(hh.get("__metadata__", {}))
    meta["ss_output_name"] = f"sim_{i}"; hh["__metadata__"] = meta
    hb = json.dumps(hh).encode(); hb += b" " * (-len(hb) % 8)
    d = bytearray(data); d[(i * 7919) % len(d)] ^= 1
    sub = os.path.join(out, f"f{i % 20:02d}"); os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"sim_{i:05d}.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb))); f.write(hb); f.write(d)
PY
DB="$DIR/lib.db"
echo "files: $N x $(stat -c %s "$DIR/c/f00/sim_00000.safetensors") bytes"
echo "first scan (hashes + sketches): $(ms "$BIN" library --db "$DB" add "$DIR/c" --quiet)"
echo "index size: $(du -h "$DB" | cut -f1)"
echo "similar, cold (10 exact computed): $(ms "$BIN" library --db "$DB" similar sim_00000)"
echo "similar, warm (cached):            $(ms "$BIN" library --db "$DB" similar sim_00000)"
echo "similar --top 1, another file:      $(ms "$BIN" library --db "$DB" similar sim_00500 --top 1)"
"$BIN" library --db "$DB" similar sim_00000 | tail -3
