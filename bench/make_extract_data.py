#!/usr/bin/env python3
"""Benchmark data for bench/extract_resize.sh.  Deterministic (fixed seeds); existing files are skipped.

    /work/fixtures-venv/bin/python bench/make_extract_data.py [data-dir] [--sdxl]     (default: bench-data)

Needs data-dir/sd15_ldm.safetensors and data-dir/lora_r32.safetensors (bench/make_sd15.py); with
--sdxl also data-dir/sdxl_ldm.safetensors (bench/make_sdxl.py).  Writes:

  sd15_tuned.safetensors   tuned = base + U.V + noise on every 2-D and 4-D (conv) weight of the UNet
                           (model.diffusion_model.*) and text encoder (cond_stage_model.*):
                           U (out x 16), V (16 x in*kh*kw) ~ normal(0, 0.02), noise ~ normal(0, 1e-4);
                           all other tensors (VAE, norms, biases, position_ids) copied unchanged; f16
                           like the base.  Same header as the base (same dtypes/shapes/offsets), so it is
                           written tensor by tensor in place: peak memory is one tensor, not the model.
  lora_r128.safetensors    kohya LoRA on the same modules as lora_r32.safetensors, rank 128, alpha 64,
                           lora_down/lora_up of the same shapes as rank 32 but with 128 rows/cols,
                           entries ~ normal(0, 0.01), f16.
  sdxl_tuned.safetensors   (--sdxl) the same change on sdxl_ldm.safetensors: every 2-D and 4-D weight of
                           the UNet and both text encoders (conditioner.embedders.*, including TE2's
                           fused attn.in_proj_weight) gets base + U.V + noise as above.
"""
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

DELTA_RANK, DELTA_STD, NOISE_STD = 16, 0.02, 1e-4
LORA_RANK, LORA_ALPHA, LORA_STD = 128, 64, 0.01
PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.")
TE_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")
DT = {"F16": np.float16, "F32": np.float32, "BF16": None, "I64": np.int64}


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def rng_for(name, salt):
    return np.random.default_rng([zlib.crc32(name.encode()), salt])


def make_tuned(base, out):
    if out.exists():
        print(f"  [skip] {out} exists")
        return
    n, header = read_header(base)
    data_start = 8 + n
    tmp = out.with_suffix(".tmp")
    changed = te_max = 0
    with open(base, "rb") as fi, open(tmp, "wb") as fo:
        fo.write(fi.read(data_start))  # same header: same shapes, dtypes and offsets
        entries = sorted(((v["data_offsets"], k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda e: e[0][0])
        pos = 0
        for (a, b), name, info in entries:
            assert a == pos, f"gap before {name}"
            fi.seek(data_start + a)
            raw = fi.read(b - a)
            shape = info["shape"]
            if (name.startswith(PREFIXES) and name.endswith((".weight", "_weight")) and len(shape) in (2, 4)
                    and info["dtype"] == "F16"):
                w = np.frombuffer(raw, dtype=np.float16).astype(np.float32).reshape(shape[0], -1)
                g = rng_for(name, 1)
                u = g.standard_normal((w.shape[0], DELTA_RANK), dtype=np.float32) * DELTA_STD
                v = g.standard_normal((DELTA_RANK, w.shape[1]), dtype=np.float32) * DELTA_STD
                noise = g.standard_normal(w.shape, dtype=np.float32) * NOISE_STD
                d = u @ v + noise
                if name.startswith(TE_PREFIXES):
                    te_max = max(te_max, float(np.abs(d).max()))
                w += d
                raw = w.astype(np.float16).tobytes()
                changed += 1
            fo.write(raw)
            pos = b
    os.replace(tmp, out)
    print(f"  wrote {out}: {changed} weights changed; text encoder max|delta| = {te_max:.5f}")


def make_lora(r32, out):
    if out.exists():
        print(f"  [skip] {out} exists")
        return
    from safetensors import safe_open
    from safetensors.numpy import save_file
    sd = {}
    with safe_open(str(r32), "np") as f:
        meta = dict(f.metadata() or {})
        for k in f.keys():
            if k.endswith(".alpha"):
                sd[k] = np.array(LORA_ALPHA, dtype=np.float16)
                continue
            shape = list(f.get_slice(k).get_shape())
            if ".lora_down." in k:
                shape[0] = LORA_RANK
            elif ".lora_up." in k:
                shape[1] = LORA_RANK
            else:
                raise SystemExit(f"unexpected key {k}")
            g = rng_for(k, 2)
            sd[k] = (g.standard_normal(shape, dtype=np.float32) * LORA_STD).astype(np.float16)
    args = json.loads(meta.get("ss_network_args", "{}"))
    if "conv_dim" in args:
        args.update(conv_dim=str(LORA_RANK), conv_alpha=str(LORA_ALPHA))
    meta.update(ss_network_dim=str(LORA_RANK), ss_network_alpha=str(LORA_ALPHA),
                ss_network_args=json.dumps(args), ss_output_name=out.stem)
    save_file(sd, str(out), metadata=meta)
    print(f"  wrote {out}: {sum(k.endswith('.alpha') for k in sd)} modules, rank {LORA_RANK}, alpha {LORA_ALPHA}")


def main():
    args = [a for a in sys.argv[1:] if a != "--sdxl"]
    data = Path(args[0] if args else "bench-data")
    make_tuned(data / "sd15_ldm.safetensors", data / "sd15_tuned.safetensors")
    make_lora(data / "lora_r32.safetensors", data / "lora_r128.safetensors")
    if "--sdxl" in sys.argv[1:]:
        make_tuned(data / "sdxl_ldm.safetensors", data / "sdxl_tuned.safetensors")


if __name__ == "__main__":
    main()
