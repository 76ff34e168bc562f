#!/usr/bin/env python3
"""Correctness part of bench/merge_sdxl.sh (untimed): a handful of LoRA-targeted tensors and 20 untouched
ones, so that the 7 GB outputs can be deleted as soon as their picks are saved.

    check_sdxl.py pick-ldm  MERGED.safetensors  OUT.safetensors    # loratool's output (LDM names)
    check_sdxl.py pick-peer PEER_DIR            OUT.safetensors    # the peer's peer_*.safetensors
    check_sdxl.py compare   BASE LORA WEIGHT LT_PICK PEER_PICK

compare: each target (a UNet self- and cross-attention, a feed-forward, a 3x3 resnet conv (LoCon), the
down/up samplers, a 1x1 skip connection, a time-embedding projection, TE1 q_proj/fc1, TE2's fused
in_proj q/k/v slices and mlp) against the f32 reference base + w*(alpha/r)*up@down rounded once to f16
(ulps), and loratool vs the peer; the untouched ones must be bit-identical to the base.  Exit 1 on failure.
"""
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.dont_write_bytecode = True
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "fixtures"))
sys.path.insert(0, str(REPO / "bench"))
import generate as G  # noqa: E402
from make_sdxl import UNET_CFG, TE1_PREFIX, TE2_PREFIX  # noqa: E402

torch.set_num_threads(2)
H2 = 1280   # TE2 width: in_proj_weight rows [0:H2) q, [H2:2*H2) k, [2*H2:3*H2) v

UNET_T = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
          "mid_block.attentions.0.transformer_blocks.9.attn2.to_k",        # in = 2048 (cross-attention)
          "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2",
          "down_blocks.2.attentions.1.proj_out",
          "down_blocks.0.resnets.0.conv1",                                 # 3x3 LoCon
          "up_blocks.2.resnets.2.conv2",                                   # 3x3 LoCon
          "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
          "up_blocks.2.resnets.2.conv_shortcut",                           # 1x1 conv
          "down_blocks.2.resnets.0.time_emb_proj"]
TE1_T = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.11.mlp.fc1"]
# (TE2 module, LDM key, row slice of the LDM tensor)
TE2_T = [("text_model.encoder.layers.0.self_attn.q_proj", "transformer.resblocks.0.attn.in_proj_weight", 0),
         ("text_model.encoder.layers.31.self_attn.k_proj", "transformer.resblocks.31.attn.in_proj_weight", 1),
         ("text_model.encoder.layers.31.self_attn.v_proj", "transformer.resblocks.31.attn.in_proj_weight", 2),
         ("text_model.encoder.layers.15.self_attn.out_proj", "transformer.resblocks.15.attn.out_proj.weight", None),
         ("text_model.encoder.layers.31.mlp.fc1", "transformer.resblocks.31.mlp.c_fc.weight", None)]
UNTOUCHED = [
    "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.label_emb.0.2.weight", "model.diffusion_model.out.2.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.norm1.weight",
    "model.diffusion_model.input_blocks.4.1.proj_in.bias",
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_out.0.bias",
    "model.diffusion_model.output_blocks.8.0.in_layers.2.bias",
    "model.diffusion_model.output_blocks.2.2.conv.bias",
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
    TE1_PREFIX + "text_model.embeddings.token_embedding.weight",
    TE1_PREFIX + "text_model.embeddings.position_ids",
    TE1_PREFIX + "text_model.final_layer_norm.weight",
    TE1_PREFIX + "text_model.encoder.layers.5.self_attn.q_proj.bias",
    TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_bias",
    TE2_PREFIX + "positional_embedding", TE2_PREFIX + "text_projection", TE2_PREFIX + "logit_scale",
    "first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.mid.attn_1.q.weight",
]
assert len(UNTOUCHED) == 20


def targets():
    """(label, LDM key, row slice, peer file component, peer key, kohya module)"""
    out = []
    for n in UNET_T:
        ldm = G.unet_path_to_ldm(n, UNET_CFG)
        out.append(("unet " + n, "model.diffusion_model." + ldm + ".weight", None, "unet", n + ".weight",
                    "lora_unet_" + ldm.replace(".", "_")))
    for n in TE1_T:
        out.append(("te1 " + n, TE1_PREFIX + n + ".weight", None, "text_encoder", n + ".weight",
                    "lora_te1_" + n.replace(".", "_")))
    for n, ldm, part in TE2_T:
        out.append(("te2 " + n, TE2_PREFIX + ldm, part, "text_encoder_2", n + ".weight",
                    "lora_te2_" + n.replace(".", "_")))
    return out


def rows(t, part):
    return t if part is None else t[part * H2:(part + 1) * H2]


def pick_ldm(merged, out):
    sd = {}
    with safe_open(merged, "pt") as f:
        for _, key, part, _, _, _ in targets():
            sd[f"{key}#{part}"] = rows(f.get_tensor(key), part).contiguous()
        for key in UNTOUCHED:
            sd[key] = f.get_tensor(key).contiguous()
    save_file(sd, out)


def pick_peer(peer_dir, out):
    sd = {}
    for _, key, part, comp, pkey, _ in targets():
        with safe_open(str(Path(peer_dir) / f"peer_{comp}.safetensors"), "pt") as f:
            sd[f"{key}#{part}"] = f.get_tensor(pkey).contiguous()
    save_file(sd, out)


def ulps(x, ref):
    """|x - ref| in units of the f16 spacing at ref (ref: f32 exact-ish value)."""
    _, e = torch.frexp(ref)
    spacing = torch.ldexp(torch.ones_like(ref), (e - 11).clamp_min(-24))
    return (x.float() - ref).abs() / spacing


def compare(base, lora, w, lt_pick, peer_pick):
    B, L, M, P = (safe_open(p, "pt") for p in (base, lora, lt_pick, peer_pick))
    ok = True
    print(f"  {'target (diffusers name)':<68} {'shape':>18}  loratool: exact% max-ulp | peer: exact% max-ulp | "
          f"max|lt-peer|")
    for label, key, part, _, _, mod in targets():
        b = rows(B.get_tensor(key), part)
        m, p = M.get_tensor(f"{key}#{part}"), P.get_tensor(f"{key}#{part}")
        assert m.dtype == p.dtype == b.dtype == torch.float16 and m.shape == p.shape == b.shape, \
            (label, m.dtype, p.dtype, b.dtype, m.shape, p.shape, b.shape)
        up, down = L.get_tensor(mod + ".lora_up.weight").float(), L.get_tensor(mod + ".lora_down.weight").float()
        scale = L.get_tensor(mod + ".alpha").float().item() / down.shape[0]
        ref = b.float() + w * scale * (up.flatten(1) @ down.flatten(1)).reshape(b.shape)
        ref16 = ref.half()
        el, ep = ulps(m, ref), ulps(p, ref)
        n = m.numel()
        lt_ex, pe_ex = 100 * int((m == ref16).sum()) / n, 100 * int((p == ref16).sum()) / n
        bad = torch.equal(m, b) or el.max().item() > 1.0
        ok &= not bad
        print(f"  {label[:68]:<68} {str(tuple(b.shape)):>18}  {lt_ex:7.3f}% {el.max().item():5.2f} | "
              f"{pe_ex:7.3f}% {ep.max().item():5.2f} | {(m.float() - p.float()).abs().max().item():.3g}"
              f"{'   <-- FAIL (unchanged or > 1 ulp)' if bad else ''}")
    same = [k for k in UNTOUCHED if M.get_tensor(k).dtype == B.get_tensor(k).dtype
            and torch.equal(M.get_tensor(k), B.get_tensor(k))]
    print(f"  untouched tensors bit-identical to the base (loratool): {len(same)} of {len(UNTOUCHED)}"
          + ("" if len(same) == len(UNTOUCHED) else f"; differ: {sorted(set(UNTOUCHED) - set(same))}"))
    ok &= len(same) == len(UNTOUCHED)
    print("  correctness: " + ("OK" if ok else "FAILED"))
    return ok


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "pick-ldm":
        pick_ldm(*args)
    elif cmd == "pick-peer":
        pick_peer(*args)
    elif cmd == "compare":
        sys.exit(0 if compare(args[0], args[1], float(args[2]), args[3], args[4]) else 1)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
