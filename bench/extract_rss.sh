#!/usr/bin/env bash
# Peak RSS and wall time of `loratool extract --rank 32 --conv-rank 32` at SD1.5 and SDXL size, two
# binaries interleaved (OLD, NEW: e.g. a build of the previous commit and of this one), ROUNDS rounds
# each, page cache warm (inputs cat'ed before every run), outputs to a fresh path in the data dir.
# Data: bench/make_sd15.py + bench/make_sdxl.py, then bench/make_extract_data.py DIR --sdxl.
# Usage: OLD=/path/loratool-old NEW=target/release/loratool bench/extract_rss.sh [data-dir] [ROUNDS] [sizes]
#        sizes: "sd15 sdxl" (default) or either one.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-bench-data}
rounds=${2:-3}
sizes=${3:-sd15 sdxl}
: "${OLD:?set OLD to the baseline binary}" "${NEW:=target/release/loratool}"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/^Mem:/{print $2}') GiB RAM; $(date)"
for size in $sizes; do
    base=$data/${size}_ldm.safetensors tuned=$data/${size}_tuned.safetensors
    for round in $(seq "$rounds"); do
        for which in OLD NEW; do
            bin=${!which}
            out=$data/extract_rss_$which.safetensors
            rm -f "$out"; sync
            cat "$base" "$tuned" >/dev/null
            load=$(cut -d' ' -f1 /proc/loadavg)
            /usr/bin/time -f "$size round $round $which: %e s wall, %U s user, %S s sys, %M KB peak RSS (load before $load)" \
                "$bin" extract --base "$base" --tuned "$tuned" --rank 32 --conv-rank 32 -o "$out" >/dev/null
        done
        cmp -s "$data/extract_rss_OLD.safetensors" "$data/extract_rss_NEW.safetensors" \
            && echo "$size round $round: outputs byte-identical" || echo "$size round $round: outputs differ"
    done
done
rm -f "$data"/extract_rss_{OLD,NEW}.safetensors
