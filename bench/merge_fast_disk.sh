#!/usr/bin/env bash
# Merge against the durable copy on one filesystem (issue 10 §2): ROUNDS interleaved rounds of
#   cp + sync     the disk's own durable floor for the same 2.13 GB,
#   loratool      merge of the SD1.5-size checkpoint (bench/make_sd15.py) with the rank-32 LoCon at
#                 0.8, to a fresh output,
#   [old]         the same merge by another loratool binary, when OLD_BIN is given,
# each with wall, user and system time and peak RSS, then best and median per command and their
# ratios to cp + sync. The inputs are read from DIR (copy them onto the filesystem under test),
# outputs are written there too; page cache warm, `sync` before every run, outside the timing.
# Usage: bench/merge_fast_disk.sh DIR [OLD_BIN]   (ROUNDS=5 by default; BASE= and LORA= name other
# files in DIR, e.g. the SDXL-size pair sdxl_ldm.safetensors and lora_sdxl_r32.safetensors)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1
old=${2:-}
rounds=${ROUNDS:-5}
data=$dir logs=$dir/fast_disk_logs
. bench/lib_bench.sh
mkdir -p "$logs"
rm -f "$logs"/*.t
cargo build --release --quiet
bin=target/release/loratool
base=$dir/${BASE:-sd15_ldm.safetensors} lora=$dir/${LORA:-lora_r32.safetensors} out=$dir/fast_disk_out.safetensors
echo "filesystem: $(stat -f -c %T "$dir"), device: $(df --output=source "$dir" | tail -1)"
one() {   # one LABEL CMD...: a timed run, appended to $logs/LABEL.t as "wall user sys rss_kib"
    local label=$1; shift
    rm -f "$out"; sync; cat "$base" "$lora" >/dev/null
    wait_quiet "$label" >/dev/null
    /usr/bin/time -f "%e %U %S %M" -o "$logs/$label.one" "$@" >/dev/null 2>"$logs/$label.err" ||
        { echo "FAILED: $*"; cat "$logs/$label.err"; exit 1; }
    tail -1 "$logs/$label.one" >>"$logs/$label.t"
    printf '  %-9s %s\n' "$label" "$(tail -1 "$logs/$label.one" | awk '{printf "%.2f s  user %.2f  sys %.2f  %d MiB", $1, $2, $3, $4/1024}')"
}
for r in $(seq "$rounds"); do
    echo "round $r"
    one cp_sync sh -c 'cp "$1" "$2" && sync "$2"' sh "$base" "$out"
    one loratool "$bin" merge --base "$base" --lora "$lora:0.8" -o "$out"
    [ -n "$old" ] && one old "$old" merge --base "$base" --lora "$lora:0.8" -o "$out"
done
rm -f "$out"
stat_of() { sort -n "$logs/$1.t" | awk -v w="$2" '{v[NR]=$1} END {print (w=="best") ? v[1] : v[int((NR+1)/2)]}'; }
echo "summary ($rounds rounds): best / median wall, ratio to cp + sync (best / median)"
for label in cp_sync loratool ${old:+old}; do
    b=$(stat_of "$label" best) m=$(stat_of "$label" median)
    bc_=$(stat_of cp_sync best) mc=$(stat_of cp_sync median)
    printf '  %-9s %.2f / %.2f s   %.2f× / %.2f×\n' "$label" "$b" "$m" "$(echo "$b / $bc_" | bc -l)" "$(echo "$m / $mc" | bc -l)"
done
