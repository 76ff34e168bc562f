#!/usr/bin/env bash
# Benchmark of `loratool merge` on an SD1.5-size checkpoint (2.1 GB f16, random weights of the real
# shapes) with a rank-32 kohya LoRA/LoCon (350 modules), against
#   * the I/O floor: `cp` of the checkpoint, and
#   * the peer: diffusers load_lora_weights + fuse_lora(0.8) + unload_lora_weights on the same
#     weights as a diffusers folder, then saving UNet + text encoder (bench/peer_merge_diffusers.py).
# Also cp + fsync of the copy, since loratool fsyncs its output (src/tensors/writer.rs).
# Wall time: best of 3 for cp and loratool, 1 run for the peer; peak RSS from /usr/bin/time -f %M.
# Page cache warm (inputs cat'ed first); `sync` between runs, outside the timed region.
# Usage: bench/merge_sd15.sh [data-dir]   (default: bench-data/, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-bench-data}
# quiet-machine waiting, run_timed, timed, best, maxrss, mib, size, bench_inputs (contended, wait_left)
. bench/lib_bench.sh

base="$data/sd15_ldm.safetensors"
lora="$data/lora_r32.safetensors"
folder="$data/sd15_diffusers"
bench_inputs bench/make_sd15.py "$base" "$lora" "$folder"
logs="$data/merge_logs"
mkdir -p "$logs" "$data/peer"

merged="$data/merged.safetensors"
# Every run writes a fresh file, as cp's runs do: replacing the previous 2 GB output would add the
# kernel's cost of dropping the old file to loratool's time (measured in docs/BENCHMARKS.md).
before_run() {
    if [ "$1" != peer ]; then rm -f "$merged"; sync; fi   # the peer's run keeps it for the check
    cat "$base" "$lora" "$folder"/*/*.safetensors >/dev/null   # keep the page cache warm
}
rm -f "$logs"/*.times

echo "== timed runs"

timed cp 3 cp "$base" "$data/copy.safetensors"
# loratool fsyncs its output before renaming it into place; this is the matching durable floor
timed cp_fsync 3 sh -c 'cp "$1" "$2" && sync "$2"' sh "$base" "$data/copy.safetensors"
timed loratool 3 "$bin" merge --base "$base" --lora "$lora:0.8" -o "$merged"
cp "$logs/loratool.out" "$logs/loratool.last.out"
rm -f "$data"/peer/*.safetensors
timed peer 1 "$py" bench/peer_merge_diffusers.py "$folder" "$lora" 0.8 "$data/peer"

echo "== correctness (untimed): loratool output vs diffusers fuse_lora vs an f32 reference, all f16"
"$py" - "$base" "$merged" "$data/peer" "$lora" 0.8 <<'PY'
import sys
from pathlib import Path
import torch
from safetensors import safe_open
sys.dont_write_bytecode = True
sys.path.insert(0, "fixtures")
sys.path.insert(0, "bench")
import generate as G
from make_sd15 import UNET_CFG, TE_PREFIX
torch.set_num_threads(2)

base, merged, peer, lora, w = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], float(sys.argv[5])
B, M, L = safe_open(base, "pt"), safe_open(merged, "pt"), safe_open(lora, "pt")
lora_mods = {k.split(".", 1)[0] for k in L.keys()}

def ulps(x, ref):
    """|x - ref| in units of the f16 spacing at ref (ref: f32 exact-ish value)."""
    _, e = torch.frexp(ref)
    spacing = torch.ldexp(torch.ones_like(ref), (e - 11).clamp_min(-24))
    return (x.float() - ref).abs() / spacing

KEY_D = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
S = dict(n=0, lora=0, lt_changed=0, peer_changed=0, untouched_bad=0, lt_exact=0, peer_exact=0, elems=0,
         lt_max=0.0, peer_max=0.0, lt_off=0, peer_off=0, lt_vs_peer=0.0)
for comp, pre, to_ldm in (("unet", "lora_unet_", lambda k: "model.diffusion_model." + G.unet_path_to_ldm(k, UNET_CFG)),
                          ("text_encoder", "lora_te_", lambda k: TE_PREFIX + k)):
    with safe_open(str(peer / f"peer_{comp}.safetensors"), "pt") as P:
        for k in P.keys():
            p = P.get_tensor(k)
            if not p.is_floating_point():
                continue
            lk = to_ldm(k)
            m, b = M.get_tensor(lk), B.get_tensor(lk)
            assert m.dtype == p.dtype == b.dtype == torch.float16, (k, m.dtype, p.dtype, b.dtype)
            S["n"] += 1
            S["lt_changed"] += int(not torch.equal(m, b))
            S["peer_changed"] += int(not torch.equal(p, b))
            S["lt_vs_peer"] = max(S["lt_vs_peer"], (m.float() - p.float()).abs().max().item())
            mod = pre + k.rsplit(".", 1)[0].replace(".", "_")
            if not (k.endswith(".weight") and mod in lora_mods):
                S["untouched_bad"] += int(not torch.equal(m, b))
                continue
            S["lora"] += 1
            up, down = L.get_tensor(mod + ".lora_up.weight").float(), L.get_tensor(mod + ".lora_down.weight").float()
            scale = L.get_tensor(mod + ".alpha").float().item() / down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(b.shape)
            ref = b.float() + w * scale * delta           # f32 reference, rounded once when compared
            ref16 = ref.half()
            el, ep = ulps(m, ref), ulps(p, ref)
            S["elems"] += m.numel()
            S["lt_exact"] += int((m == ref16).sum()); S["peer_exact"] += int((p == ref16).sum())
            S["lt_off"] += int((el > 1).sum()); S["peer_off"] += int((ep > 1).sum())
            S["lt_max"] = max(S["lt_max"], el.max().item()); S["peer_max"] = max(S["peer_max"], ep.max().item())
            if k == KEY_D:
                d = (m.float() - p.float()).abs()
                print(f"  model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight (loratool)\n"
                      f"    vs {k} (peer): max |loratool - peer| = {d.max().item():.3g}, "
                      f"{int((d > 0).sum())} of {d.numel()} elements differ; max |merged - base| = "
                      f"{(m.float() - b.float()).abs().max().item():.3g}; f16 spacing at max |w| = "
                      f"{torch.ldexp(torch.tensor(1.0), torch.frexp(m.float().abs().max())[1] - 11).item():.3g}")
                print(f"    vs f32 reference W + {w}*(alpha/r)*up@down: loratool max {el.max().item():.2f} ulp, "
                      f"{int((m == ref16).sum())} exact; peer max {ep.max().item():.2f} ulp, {int((p == ref16).sum())} exact")
print(f"  all {S['n']} UNet + text-encoder float tensors: changed vs base: loratool {S['lt_changed']}, peer "
      f"{S['peer_changed']} (LoRA targets {S['lora']}); non-targets changed by loratool: {S['untouched_bad']}; "
      f"max |loratool - peer| = {S['lt_vs_peer']:.3g}")
print(f"  over the {S['lora']} targets ({S['elems']} elements) vs the f32 reference rounded to f16: "
      f"loratool {S['lt_exact']} exact ({100 * S['lt_exact'] / S['elems']:.4f}%), max {S['lt_max']:.2f} ulp, "
      f"{S['lt_off']} > 1 ulp; peer {S['peer_exact']} exact ({100 * S['peer_exact'] / S['elems']:.4f}%), "
      f"max {S['peer_max']:.2f} ulp, {S['peer_off']} > 1 ulp")
PY

merge_summary "merge SD1.5 (LDM single file) + rank-32 kohya LoRA @0.8" 3 \
    "base $(size "$base"), LoRA $(size "$lora"), diffusers folder $(size "$folder"), merged $(size "$merged"), peer output $(size "$data/peer")"
rm -f "$data/copy.safetensors"
exit 0
