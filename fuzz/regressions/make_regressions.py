#!/usr/bin/env python3
"""Hand-made adapter_parser inputs that panic in src/adapter/mod.rs build_module (see
docs/FUZZING.md). Writes adapter_parser-<n>.bin into this folder, deterministically."""
import sys, struct
import os
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "seeds"))
from make_seeds import safetensors, scalar
C = {
 "lokr_1d_w1": [("lora_unet_k.lokr_w1","F32",[4]),("lora_unet_k.lokr_w2","F32",[3,2])],
 "locon_mid_1d": [("lora_unet_c.lora_down.weight","F32",[2,3]),("lora_unet_c.lora_mid.weight","F32",[2]),("lora_unet_c.lora_up.weight","F32",[4,2])],
 "oft_1d": [("lora_unet_o.oft_blocks","F32",[4])],
 "lokr_overflow": [("lora_unet_k.lokr_w1","F32",[1<<40,0],b""),("lora_unet_k.lokr_w2","F32",[1<<40,0],b"")],
 "glora_1d": [("lora_unet_g.a1.weight","F32",[2,3]),("lora_unet_g.a2.weight","F32",[6]),("lora_unet_g.b1.weight","F32",[4,2]),("lora_unet_g.b2.weight","F32",[4,2])],
 "loha_scalar_w1b": [("lora_unet_h.hada_w1_a","F32",[4,2]),scalar("lora_unet_h.hada_w1_b"),("lora_unet_h.hada_w2_a","F32",[4,2]),("lora_unet_h.hada_w2_b","F32",[2,3])],
}
ORDER = ["loha_scalar_w1b", "lokr_1d_w1", "locon_mid_1d", "lokr_overflow", "oft_1d", "glora_1d"]
for n, k in enumerate(ORDER, 1):
    with open(os.path.join(HERE, f"adapter_parser-{n}.bin"), "wb") as f:
        f.write(safetensors(C[k]))
