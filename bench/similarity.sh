#!/usr/bin/env bash
# Similarity benchmark (issue: `similar` against one LoRA over a 1,000-file collection under 2 s).
# Writes COUNT (default 1000) small SD1-layout LoRAs into a temporary folder, indexes their
# sketches, times one query (sketches from bytes, ranking, exact re-rank of the top 10), measures the
# estimate's error against the exact cosine of every file, and removes the folder.
# Usage: bench/similarity.sh [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example similarity_bench
dir=$(mktemp -d /tmp/loratool-similarity.XXXXXX)
trap 'rm -rf "$dir"' EXIT
"${CARGO_TARGET_DIR:-target}/release/examples/similarity_bench" "$dir/lib" "${1:-1000}"
