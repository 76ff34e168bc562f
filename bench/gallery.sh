#!/usr/bin/env bash
# Benchmark of `loratool library gallery` on 5,000 LoRAs; figures go to docs/BENCHMARKS.md.
#   bench/gallery.sh
# 5,000 copies of a small fixture (distinct metadata, each with a 200-entry ss_tag_frequency) in
# 20 folders, each with a 768×1152 PNG preview (1.1 MB, noisy so it does not compress away; one
# file hard-linked 5,000 times, so it costs no disk but every path is its own preview). Times: the
# scan, the first gallery (every thumbnail decoded and written), a second one (all reused), and
# headless Chromium's time from navigation start to the page's script having built the first cards.
# Data live under $BENCH_DIR (default /tmp/loratool-gallery-bench) and are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/loratool}
DIR=${BENCH_DIR:-/tmp/loratool-gallery-bench}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR/c"
trap 'rm -rf "$DIR"' EXIT
python3 - "$DIR" fixtures/loras/sd1_lokr_tucker.safetensors <<'PY'
import json, os, random, struct, sys, zlib
out, fixture = sys.argv[1], sys.argv[2]
src = open(fixture, 'rb').read()
n = struct.unpack('<Q', src[:8])[0]
header, data = json.loads(src[8:8 + n]), src[8 + n:]
w, h = 768, 1152
random.seed(1)
rows = []
for y in range(h):
    r = bytearray([0])
    for x in range(w):
        v = (x * 7 + y * 3 + random.randint(0, 40)) & 255
        r += bytes((v, (v * 3) & 255, 255 - v))
    rows.append(bytes(r))
def chunk(t, d):
    return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
png = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
       + chunk(b'IDAT', zlib.compress(b''.join(rows), 6)) + chunk(b'IEND', b''))
open(os.path.join(out, 'preview.png'), 'wb').write(png)
tags = json.dumps({'ds': {'tag%d' % k: k for k in range(200)}})
for i in range(5000):
    d = os.path.join(out, 'c', 'd%d' % (i % 20))
    os.makedirs(d, exist_ok=True)
    meta = dict(header.get('__metadata__', {}), ss_output_name='bench_%d' % i, ss_tag_frequency=tags)
    hb = json.dumps(dict(header, __metadata__=meta)).encode()
    hb += b' ' * ((8 - len(hb) % 8) % 8)
    open(os.path.join(d, 'lora_%05d.safetensors' % i), 'wb').write(struct.pack('<Q', len(hb)) + hb + data)
    os.link(os.path.join(out, 'preview.png'), os.path.join(d, 'lora_%05d.png' % i))
PY
T() { /usr/bin/time -f "$1: %e s, %M KB peak RSS" "${@:2}"; }
T "scan" "$BIN" library --db "$DIR/lib.db" add "$DIR/c" --quiet >/dev/null
T "gallery, first run" "$BIN" library --db "$DIR/lib.db" gallery -o "$DIR/site" --quiet
T "gallery, second run" "$BIN" library --db "$DIR/lib.db" gallery -o "$DIR/site" --quiet
ls -l "$DIR/site/index.html" | awk '{print "index.html: " $5 " bytes"}'
du -sh "$DIR/site/thumbs" | awk '{print "thumbs: " $1}'
# The page as is, plus a last script noting the time and the cards built (CSP left out for it).
python3 - "$DIR/site" <<'PY'
import re, sys
s = open(sys.argv[1] + '/index.html').read()
s = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', '', s)
s = s.replace('</body>', '<script>document.body.dataset.ms = Math.round(performance.now());'
              'document.body.dataset.cards = document.querySelectorAll(".card").length;</script></body>')
open(sys.argv[1] + '/timed.html', 'w').write(s)
PY
chromium=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
for _ in 1 2 3; do
  "$chromium" --headless --no-sandbox --disable-gpu --no-first-run --user-data-dir="$DIR/profile" \
      --dump-dom "file://$DIR/site/timed.html" 2>/dev/null | grep -o '<body[^>]*>'
done
