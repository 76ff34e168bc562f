#!/usr/bin/env bash
# Makes docs/gallery.png: a demo collection (examples/gallery_demo.rs) indexed in a throwaway
# library, its gallery, and a 1280×800 screenshot of the page in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo run -q --example gallery_demo -- "$tmp/loras"
lt() { cargo run -q --bin loratool -- library --db "$tmp/lib.db" "$@"; }
lt add "$tmp/loras" --quiet
lt tag add neon_city favourite >/dev/null
lt tag add ukiyoe_waves favourite >/dev/null
lt tag add aurora_sky landscape >/dev/null
lt tag add watercolor_hills landscape >/dev/null
lt gallery -o "$tmp/site" --quiet
chromium=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
"$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --user-data-dir="$tmp/profile" --window-size=1280,800 --virtual-time-budget=5000 \
    --screenshot="$PWD/docs/gallery.png" "file://$tmp/site/index.html" 2>/dev/null
ls -l docs/gallery.png
