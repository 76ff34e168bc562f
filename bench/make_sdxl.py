#!/usr/bin/env python3
"""Benchmark data for bench/merge_sdxl.sh: an SDXL-base-size model with random weights and a rank-32
kohya LoRA/LoCon on it.  Deterministic (fixed seeds); files that already exist are skipped.

    /work/fixtures-venv/bin/python bench/make_sdxl.py [data-dir]     (default: bench-data)

Writes into data-dir:
  sdxl_diffusers/            diffusers pipeline folder (unet/, text_encoder/, text_encoder_2/, vae/,
                             model_index.json for StableDiffusionXLPipeline), f16
  sdxl_ldm.safetensors       the same weights as a single-file LDM checkpoint in sd_xl_base_1.0's key
                             layout (model.diffusion_model.*, conditioner.embedders.0.transformer.*,
                             conditioner.embedders.1.model.* with fused in_proj, first_stage_model.*), ~6.9 GB f16
  lora_sdxl_r32.safetensors  kohya SDXL LoRA, rank 32, alpha 16, f16, on UNet attention/ff/proj/resnets/samplers
                             (LDM names, LoCon 3x3 where the layer is 3x3) and both text encoders (lora_te1_/lora_te2_)

The diffusers -> LDM key tables come from fixtures/generate.py (verified there by a round trip through
diffusers' own LDM -> diffusers converters, on a tiny model of the same topology); here the LDM file's
names and shapes are also checked with diffusers' infer_diffusers_model_type (-> xl_base).
Weights: normal(0, 0.02), stored f16.  Peak RSS ~7.5 GB: one component is built at a time, and the
LDM dict only keeps references to the f16 tensors (safetensors >= 0.6 writes them without a copy).
"""
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.dont_write_bytecode = True
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "fixtures"))
sys.path.insert(0, str(REPO / "bench"))
import generate as G  # noqa: E402  (key tables; main() is not run)
import make_sd15 as S  # noqa: E402  (randomize, build_on_meta, save_component, LoRA target rules)

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

torch.set_num_threads(2)

# SDXL base 1.0's configs (as in stabilityai/stable-diffusion-xl-base-1.0), written out: nothing from the Hub.
UNET_CFG = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
TE1_CFG = dict(S.TE_CFG)      # CLIP ViT-L/14 text tower, as SD1.5's
TE2_CFG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
               num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
               projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1)
VAE_CFG = dict(S.VAE_CFG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
assert len(VAE_CFG["block_out_channels"]) == len(G.VAE_CFG["block_out_channels"])  # vae_to_ldm uses it

SEED = 2500
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
LORA_RANK, LORA_ALPHA = S.LORA_RANK, S.LORA_ALPHA


def build_te(cls, cfg, seed):
    torch.manual_seed(seed)
    m = cls(CLIPTextConfig(**cfg)).to(torch.float16)   # built for real: keeps position_ids buffer valid
    return S.randomize(m.eval(), seed)


def write_model_index(folder):
    import diffusers
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
             "force_zeros_for_empty_prompt": True,
             "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "vae": ["diffusers", "AutoencoderKL"]}
    for missing in ("scheduler", "tokenizer", "tokenizer_2", "image_encoder", "feature_extractor"):
        index[missing] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_ldm_layout(path):
    """Names + shapes of the written LDM file through diffusers' own model-type detection (meta tensors)."""
    from diffusers.loaders import single_file_utils as sfu
    with safe_open(str(path), "pt") as f:
        ck = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    mt = sfu.infer_diffusers_model_type(ck)
    assert mt == "xl_base", f"diffusers infer_diffusers_model_type -> {mt}, expected xl_base"
    print(f"  [ok] diffusers infer_diffusers_model_type({path.name}) -> {mt}")


def make_model(data):
    def te2_to_ldm(sd):
        t2 = G.openclip_to_ldm(sd, TE2_PREFIX, TE2_CFG["num_hidden_layers"])
        return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in t2.items()}

    ldm_path = data / "sdxl_ldm.safetensors"
    built = S.build_checkpoint(data / "sdxl_diffusers", ldm_path, [
        ("CLIPTextModel (ViT-L/14 text tower, 123M params)", "text_encoder",
         lambda: build_te(CLIPTextModel, TE1_CFG, SEED + 2),
         lambda sd: G.clip_to_ldm(sd, TE1_PREFIX)),
        ("CLIPTextModelWithProjection (OpenCLIP bigG text tower, 695M params)", "text_encoder_2",
         lambda: build_te(CLIPTextModelWithProjection, TE2_CFG, SEED + 3),
         te2_to_ldm),
        ("AutoencoderKL (SD VAE config, scaling_factor 0.13025, 84M params)", "vae",
         lambda: S.build_on_meta(AutoencoderKL, VAE_CFG, SEED + 4),
         lambda sd: {k: v.contiguous() for k, v in G.vae_to_ldm(sd).items()}),
        ("UNet (SDXL base config, 2.57B params)", "unet",
         lambda: S.build_on_meta(UNet2DConditionModel, UNET_CFG, SEED + 1),
         lambda sd: G.unet_to_ldm(sd, UNET_CFG)),
    ], write_model_index)
    if built:
        check_ldm_layout(ldm_path)


def make_lora(data):
    path = data / "lora_sdxl_r32.safetensors"
    if path.exists():
        print(f"  [skip] {path} exists")
        return
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CFG)
        te1 = CLIPTextModel(CLIPTextConfig(**TE1_CFG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TE2_CFG))
    # kohya's SDXL networks name UNet modules by the LDM (sgm) UNet: lora_unet_input_blocks_4_1_...
    mods = [("lora_unet_" + G.unet_path_to_ldm(n, UNET_CFG).replace(".", "_"), m)
            for n, m in S.unet_lora_targets(unet)]
    mods += [("lora_te1_" + n.replace(".", "_"), m) for n, m in S.te_lora_targets(te1)]
    mods += [("lora_te2_" + n.replace(".", "_"), m) for n, m in S.te_lora_targets(te2)]
    assert len({k for k, _ in mods}) == len(mods)
    sd, n_conv3 = S.random_lora_factors(mods, SEED + 5)
    r = LORA_RANK
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora",
            "ss_network_dim": str(r), "ss_network_alpha": str(LORA_ALPHA),
            "ss_network_args": json.dumps({"conv_dim": str(r), "conv_alpha": str(LORA_ALPHA)}),
            "ss_v2": "False", "ss_resolution": "(1024, 1024)", "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
            "ss_output_name": "lora_sdxl_r32",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.rename(path)
    n_u = sum(1 for k, _ in mods if k.startswith("lora_unet_"))
    n_t1 = sum(1 for k, _ in mods if k.startswith("lora_te1_"))
    print(f"  wrote {path}: {len(mods)} modules (UNet {n_u}, of which {n_conv3} 3x3 convs; "
          f"TE1 {n_t1}; TE2 {len(mods) - n_u - n_t1}), {path.stat().st_size / 1e6:.1f} MB")


def main():
    data = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "bench-data").resolve()
    data.mkdir(parents=True, exist_ok=True)
    print(f"make_sdxl: {data}")
    t0 = time.perf_counter()
    make_model(data)
    make_lora(data)
    print(f"make_sdxl: done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
