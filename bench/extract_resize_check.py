#!/usr/bin/env python3
"""Accuracy check for bench/extract_resize.sh (untimed).

    python bench/extract_resize_check.py extract BASE TUNED LORA_A LORA_B [LABEL_A LABEL_B]
    python bench/extract_resize_check.py resize ORIG LORA_A LORA_B [LABEL_A LABEL_B]

extract: over the kohya modules (lora_unet_* / lora_te_*) present in both LoRAs, the total Frobenius
  error sqrt(sum ||D - dW||^2), D = tuned - base (f32, from the f16 checkpoints), dW = alpha/rank *
  up @ down; also ||D|| and the best possible rank-r error (SVD tail of D, r = that LoRA's rank).
resize: the same with D = alpha/rank * up @ down of the original LoRA (every module of both outputs).
Module names -> LDM keys via the diffusers key names of sd15_diffusers/ and fixtures/generate.py.
"""
import json
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.dont_write_bytecode = True
REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(2)


def modules(path):
    with safe_open(path, "pt") as f:
        return {k.split(".", 1)[0] for k in f.keys() if k.endswith("lora_down.weight")}


def delta(f, mod, shape=None):
    up = f.get_tensor(mod + ".lora_up.weight").float()
    down = f.get_tensor(mod + ".lora_down.weight").float()
    r = down.shape[0]
    alpha = f.get_tensor(mod + ".alpha").float().item() if mod + ".alpha" in f.keys() else r
    return (alpha / r) * (up.flatten(1) @ down.flatten(1)), r


def svd_tail_sq(D, r):
    """sum of the squared singular values of D after the first r = ||D||^2 - top-r eigenvalues of the
    (smaller) Gram matrix; the optimal rank-r Frobenius error squared (Eckart-Young)."""
    G = D @ D.T if D.shape[0] <= D.shape[1] else D.T @ D
    lam = torch.linalg.eigvalsh(G.double()).flip(0)
    return max(float(lam.sum() - lam[:r].sum()), 0.0)


def header_keys(path):
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return [k for k in json.loads(fh.read(n)) if k != "__metadata__"]


def kohya_to_ldm():
    """kohya module name -> LDM weight key, for every weight of the SD1.5 UNet and text encoder."""
    sys.path.insert(0, str(REPO / "fixtures"))
    sys.path.insert(0, str(REPO / "bench"))
    import generate as G
    from make_sd15 import UNET_CFG, TE_PREFIX
    folder = REPO / "bench-data" / "sd15_diffusers"
    m = {}
    for k in header_keys(folder / "unet" / "diffusion_pytorch_model.safetensors"):
        if k.endswith(".weight"):
            p = k[: -len(".weight")]
            m["lora_unet_" + p.replace(".", "_")] = "model.diffusion_model." + G.unet_path_to_ldm(p, UNET_CFG) + ".weight"
    for k in header_keys(folder / "text_encoder" / "model.safetensors"):
        if k.endswith(".weight"):
            p = k[: -len(".weight")]
            m["lora_te_" + p.replace(".", "_")] = TE_PREFIX + p + ".weight"
    return m


def report(kind, labels, files, target_fn, mods_a, mods_b):
    common = sorted(mods_a & mods_b)
    print(f"  modules: {labels[0]} {len(mods_a)}, {labels[1]} {len(mods_b)}, in both {len(common)}")
    for lab, only in ((labels[0], mods_a - mods_b), (labels[1], mods_b - mods_a)):
        if only:
            print(f"    only in {lab}: {len(only)}, e.g. {sorted(only)[:4]}")
    fa, fb = (safe_open(p, "pt") for p in files)
    sq = {"D": 0.0, "a": 0.0, "b": 0.0, "opt": 0.0}
    ranks = set()
    for mod in common:
        D = target_fn(mod)
        da, ra = delta(fa, mod)
        db, rb = delta(fb, mod)
        ranks.add((ra, rb))
        sq["D"] += float(D.double().pow(2).sum())
        sq["a"] += float((D - da).double().pow(2).sum())
        sq["b"] += float((D - db).double().pow(2).sum())
        sq["opt"] += svd_tail_sq(D, ra)
    e = {k: v ** 0.5 for k, v in sq.items()}
    print(f"  ranks (a, b) seen: {sorted(ranks)}")
    print(f"  ||D|| total = {e['D']:.6g}; best possible rank-r error (SVD tail) = {e['opt']:.6g} "
          f"({e['opt'] / e['D']:.4%} of ||D||)")
    print(f"  {kind} total Frobenius error: {labels[0]} {e['a']:.6g} ({e['a'] / e['D']:.4%} of ||D||), "
          f"{labels[1]} {e['b']:.6g} ({e['b'] / e['D']:.4%} of ||D||)")
    print(f"  {kind} error ratio {labels[0]}/{labels[1]} = {e['a'] / e['b']:.4f}")
    print(f"RESULT {kind} err_{labels[0]}={e['a']:.6g} err_{labels[1]}={e['b']:.6g} "
          f"ratio={e['a'] / e['b']:.4f} opt={e['opt']:.6g} normD={e['D']:.6g} common={len(common)}")


def main():
    kind = sys.argv[1]
    if kind == "extract":
        base, tuned, a, b = sys.argv[2:6]
        labels = sys.argv[6:8] or ["a", "b"]
        k2l = kohya_to_ldm()
        B, T = safe_open(base, "pt"), safe_open(tuned, "pt")
        ma, mb = modules(a), modules(b)
        unknown = sorted((ma | mb) - set(k2l))
        assert not unknown, f"module names not in the SD1.5 UNet/TE: {unknown[:5]}"

        def target(mod):
            k = k2l[mod]
            D = T.get_tensor(k).float() - B.get_tensor(k).float()
            return D.flatten(1)
        report("extract", labels, (a, b), target, ma, mb)
    elif kind == "resize":
        orig, a, b = sys.argv[2:5]
        labels = sys.argv[5:7] or ["a", "b"]
        O = safe_open(orig, "pt")
        report("resize", labels, (a, b), lambda mod: delta(O, mod)[0], modules(a), modules(b))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
