#!/usr/bin/env bash
# Benchmarks of `loratool library` (issue 11 §3); figures go to docs/BENCHMARKS.md.
#   bench/library.sh [small|large|cold|all]   (default all)
# small: 10,000 generated LoRAs (fixture key layouts, distinct metadata and one perturbed byte each,
#        so sha256 and AutoV3 differ): first scan, rescan with nothing changed, list --search, show.
# large: 40 LoRA-shaped files of 150 MB: first scan vs sha256sum over the same files, page cache warm.
# cold:  the same after `echo 3 > /proc/sys/vm/drop_caches` (root), against `cat > /dev/null`.
# Data live under $BENCH_DIR (default /tmp/loratool-bench) and are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/loratool}
DIR=${BENCH_DIR:-/tmp/loratool-bench}
WHAT=${1:-all}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
T() { /usr/bin/time -f "%e s %M KB" "$@"; }
best() { # best wall time in ms of N runs of a command (output discarded)
  local n=$1; shift; local best=999999
  for _ in $(seq "$n"); do
    local s=$(date +%s%N); "$@" >/dev/null 2>&1; local e=$(date +%s%N)
    local ms=$(( (e - s) / 1000000 )); [ $ms -lt $best ] && best=$ms
  done; echo "${best} ms"
}

gen_small() {
python3 - "$1" <<'PY'
import json, os, struct, sys, glob
out = sys.argv[1]
srcs = sorted(glob.glob("fixtures/loras/*.safetensors"))
parsed = []
for p in srcs:
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n]); data = bytearray(b[8 + n:])
    if len(data) == 0: continue
    parsed.append((os.path.basename(p)[:-12], h, data))
for i in range(10000):
    stem, h, data = parsed[i % len(parsed)]
    h = dict(h); meta = dict(h.get("__metadata__", {}))
    meta["ss_output_name"] = f"{stem}_{i}"; meta["bench_index"] = str(i)
    h["__metadata__"] = meta
    hb = json.dumps(h).encode(); hb += b" " * (-len(hb) % 8)
    d = bytearray(data); d[i % len(d)] ^= 1 + (i // len(d)) % 255
    sub = os.path.join(out, f"folder{i % 50:02d}"); os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"{stem}_{i:05d}.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb))); f.write(hb); f.write(d)
    if i % 10 == 0:
        with open(os.path.join(sub, f"{stem}_{i:05d}.json"), "w") as f:
            json.dump({"activation text": f"trig{i}, bench style", "notes": "generated"}, f)
PY
}

gen_large() {
python3 - "$1" <<'PY'
import json, os, struct, sys
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
# 100 kohya modules, rank 64 over 5760 features, f16: 147 MB of factors per file.
mods = 100; r = 64; d = 5760; nb = r * d * 2
base = os.urandom(2 * nb * mods)
for i in range(40):
    h = {"__metadata__": {"ss_network_dim": "64", "ss_network_alpha": "32", "ss_output_name": f"big_{i}",
                          "ss_base_model_version": "sdxl_base_v1-0"}}
    off = 0
    for m in range(mods):
        for part, shape in (("lora_down", [r, d]), ("lora_up", [d, r])):
            h[f"lora_unet_input_blocks_{m}_1_proj_in.{part}.weight"] = {"dtype": "F16", "shape": shape, "data_offsets": [off, off + nb]}
            off += nb
    hb = json.dumps(h).encode(); hb += b" " * (-len(hb) % 8)
    with open(os.path.join(out, f"big_{i:02d}.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb))); f.write(hb)
        f.write(bytes([i]) + base[1:])
PY
}

if [ "$WHAT" = small ] || [ "$WHAT" = all ]; then
  S=$DIR/small; DB=$DIR/small.db; rm -rf "$S" "$DB"*
  echo "generating 10,000 LoRAs…"; gen_small "$S"
  echo "files: $(find "$S" -name '*.safetensors' | wc -l), $(du -sh "$S" | cut -f1)"
  echo "first scan:";            T "$BIN" library --db "$DB" add "$S" --quiet
  echo "rescan, nothing changed (best of 5): $(best 5 "$BIN" library --db "$DB" scan --quiet)"
  T "$BIN" library --db "$DB" scan --quiet
  echo "list --search 'bench style' (best of 10): $(best 10 "$BIN" library --db "$DB" list --search 'trig4240' --json)"
  echo "list --search sdxl (many hits, best of 10): $(best 10 "$BIN" library --db "$DB" list --search sdxl --json)"
  NAME=$(basename "$(find "$S/folder07" -name '*.safetensors' | sort | sed -n 20p)" .safetensors)
  "$BIN" library --db "$DB" show "$NAME" --json > /dev/null  # fails loudly if the name does not resolve
  echo "show $NAME (best of 10): $(best 10 "$BIN" library --db "$DB" show "$NAME" --json)"
  V3=$("$BIN" library --db "$DB" show "$NAME" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["autov3"][:8])')
  "$BIN" library --db "$DB" show "$V3" --json > /dev/null
  echo "show by AutoV3 prefix $V3 (best of 10): $(best 10 "$BIN" library --db "$DB" show "$V3" --json)"
  echo "list (all 10,000, JSON): $(best 3 "$BIN" library --db "$DB" list --json)"
  echo "db size: $(du -h "$DB" | cut -f1)"
  rm -rf "$S" "$DB"*
fi

if [ "$WHAT" = large ] || [ "$WHAT" = cold ] || [ "$WHAT" = all ]; then
  L=$DIR/large; rm -rf "$L"
  echo "generating 40 × 150 MB…"; gen_large "$L"
  echo "total: $(du -sh "$L" | cut -f1)"
fi

if [ "$WHAT" = large ] || [ "$WHAT" = all ]; then
  cat "$L"/*.safetensors > /dev/null
  echo "warm: cat > /dev/null:";  T sh -c "cat $L/*.safetensors > /dev/null"
  echo "warm: sha256sum:";        T sh -c "sha256sum $L/*.safetensors > /dev/null"
  for k in 1 2; do
    rm -f "$DIR"/large.db*
    echo "warm: library add (first scan, both hashes), run $k:"; T "$BIN" library --db "$DIR/large.db" add "$L" --quiet
  done
fi

if [ "$WHAT" = cold ] || [ "$WHAT" = all ]; then
  sync; echo 3 > /proc/sys/vm/drop_caches
  echo "cold: cat > /dev/null:";  T sh -c "cat $L/*.safetensors > /dev/null"
  rm -f "$DIR"/large.db*; sync; echo 3 > /proc/sys/vm/drop_caches
  echo "cold: library add:";      T "$BIN" library --db "$DIR/large.db" add "$L" --quiet
fi
