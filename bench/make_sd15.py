#!/usr/bin/env python3
"""Benchmark data for bench/merge_sd15.sh: an SD1.5-size model with random weights and a rank-32
kohya LoRA/LoCon on it.  Deterministic (fixed seeds); files that already exist are skipped.

    /work/fixtures-venv/bin/python bench/make_sd15.py [data-dir]     (default: bench-data)

Writes into data-dir:
  sd15_diffusers/            diffusers pipeline folder (unet/, text_encoder/, vae/, model_index.json), f16
  sd15_ldm.safetensors       the same weights as an A1111 single-file LDM checkpoint (~2.1 GB f16)
  lora_r32.safetensors       kohya LoRA, rank 32, alpha 16, f16, on attention/ff/proj/resnets/samplers/TE

The diffusers -> LDM key tables come from fixtures/generate.py (verified there by a round trip through
diffusers' own LDM -> diffusers converters).  Weights: normal(0, 0.02), stored f16.
"""
import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.dont_write_bytecode = True
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "fixtures"))
import generate as G  # noqa: E402  (key tables; main() is not run)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

torch.set_num_threads(2)

# SD1.5's configs (as in runwayml/stable-diffusion-v1-5), written out: nothing from the Hub.
UNET_CFG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
)
TE_CFG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
VAE_CFG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    norm_num_groups=32, sample_size=512, act_fn="silu",
)
assert len(VAE_CFG["block_out_channels"]) == len(G.VAE_CFG["block_out_channels"])  # vae_to_ldm uses it

STD = 0.02
LORA_RANK, LORA_ALPHA, LORA_STD = 32, 16, 0.01
TE_PREFIX = "cond_stage_model.transformer."


def randomize(module, seed):
    """Every parameter ~ normal(0, STD), generated in f32 by a seeded CPU generator, stored f16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0, STD, generator=g).half())
    return module


def build_on_meta(cls, cfg, seed):
    """Build on the meta device (no init cost), materialise in f16, fill with seeded random values."""
    with torch.device("meta"):
        m = cls(**cfg)
    bufs = [n for n, _ in m.named_buffers()]
    assert not bufs, f"{cls.__name__} has buffers {bufs}: to_empty would leave them uninitialised"
    m = m.to(torch.float16).to_empty(device="cpu")
    return randomize(m.eval(), seed)


def build_te(seed):
    torch.manual_seed(seed)
    m = CLIPTextModel(CLIPTextConfig(**TE_CFG)).to(torch.float16)   # keeps position_ids buffer valid
    return randomize(m.eval(), seed)


def save_component(folder, name, model):
    model.save_pretrained(folder / name, safe_serialization=True, max_shard_size="10GB")
    cfgp = folder / name / "config.json"
    cfg = json.loads(cfgp.read_text())
    cfg.pop("_name_or_path", None)
    cfgp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_model_index(folder):
    import diffusers
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    for missing in ("scheduler", "tokenizer", "safety_checker", "feature_extractor"):
        index[missing] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def contiguous(sd):
    return {k: v.contiguous() for k, v in sd.items()}


def save_ldm(ldm, ldm_path):
    """Write the f16 LDM state dict as a single file (through a temp name, renamed when complete)."""
    for k, v in ldm.items():
        assert v.dtype in (torch.float16, torch.int64), (k, v.dtype)
    tmp = ldm_path.with_suffix(".tmp")
    save_file(ldm, str(tmp), metadata={"format": "pt"})
    tmp.rename(ldm_path)
    n = sum(v.numel() for v in ldm.values())
    print(f"  wrote {ldm_path}: {len(ldm)} tensors, {n / 1e6:.1f}M values, "
          f"{ldm_path.stat().st_size / 1e9:.3f} GB")


def build_checkpoint(folder, ldm_path, components, write_index):
    """Build a model's components one at a time, [(label, folder name, build(), to_ldm(state dict))]:
    each is saved as a diffusers component (unless the folder exists) and only its f16 LDM tensors
    are kept; then write_index(folder) and the LDM single file. False when both already exist."""
    have_folder = (folder / "model_index.json").exists()
    if have_folder and ldm_path.exists():
        print(f"  [skip] {folder} and {ldm_path} exist")
        return False
    ldm = {}
    for label, name, build, to_ldm in components:
        print(f"  building {label}", flush=True)
        model = build()
        if not have_folder:
            save_component(folder, name, model)
        ldm.update(to_ldm(contiguous(model.state_dict())))
        del model
        gc.collect()
    if not have_folder:
        write_index(folder)
        print(f"  wrote {folder}")
    if not ldm_path.exists():
        save_ldm(ldm, ldm_path)
    del ldm
    gc.collect()
    return True


def make_model(data):
    build_checkpoint(data / "sd15_diffusers", data / "sd15_ldm.safetensors", [
        ("UNet (SD1.5 config, 860M params)", "unet",
         lambda: build_on_meta(UNet2DConditionModel, UNET_CFG, 1501),
         lambda sd: G.unet_to_ldm(sd, UNET_CFG)),
        ("CLIPTextModel (ViT-L/14 text tower, 123M params)", "text_encoder",
         lambda: build_te(1502),
         lambda sd: G.clip_to_ldm(sd, TE_PREFIX)),
        ("AutoencoderKL (SD VAE config, 84M params)", "vae",
         lambda: build_on_meta(AutoencoderKL, VAE_CFG, 1503),
         lambda sd: {k: v.contiguous() for k, v in G.vae_to_ldm(sd).items()}),
    ], write_model_index)


def random_lora_factors(mods, seed):
    """kohya LoRA/LoCon tensors (rank LORA_RANK, alpha LORA_ALPHA, f16) for [(kohya key, module)],
    drawn in order from one seeded generator; also returns how many modules are k×k convs, k > 1."""
    g = torch.Generator().manual_seed(seed)
    r = LORA_RANK
    sd = {}
    n_conv3 = 0
    for key, m in mods:
        if isinstance(m, nn.Linear):
            down_shape, up_shape = (r, m.in_features), (m.out_features, r)
        else:
            kh, kw = m.kernel_size
            n_conv3 += (kh, kw) != (1, 1)
            down_shape, up_shape = (r, m.in_channels, kh, kw), (m.out_channels, r, 1, 1)
        sd[key + ".lora_down.weight"] = torch.empty(down_shape).normal_(0, LORA_STD, generator=g).half()
        sd[key + ".lora_up.weight"] = torch.empty(up_shape).normal_(0, LORA_STD, generator=g).half()
        sd[key + ".alpha"] = torch.tensor(float(LORA_ALPHA)).half()
    return sd, n_conv3


def unet_lora_targets(unet):
    """kohya sd-scripts' SD1 targets with conv_dim: Linear/Conv2d inside Transformer2DModel,
    ResnetBlock2D, Downsample2D, Upsample2D (not time_embedding, conv_in, conv_out)."""
    out = []
    for name, mod in unet.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        p = name.split(".")
        if p[0] not in ("down_blocks", "mid_block", "up_blocks"):
            continue
        if ".attentions." in f".{name}.":
            leaf = name.split(".attentions.", 1)[1].split(".", 1)[1]
            ok = leaf in ("proj_in", "proj_out") or leaf.endswith(
                (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2"))
            assert ok, name
        elif ".resnets." in f".{name}.":
            assert p[-1] in ("conv1", "conv2", "time_emb_proj", "conv_shortcut"), name
        elif "samplers." in name:
            assert p[-1] == "conv", name
        else:
            raise AssertionError(name)
        out.append((name, mod))
    return out


def te_lora_targets(te):
    return [(n, m) for n, m in te.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("text_model.encoder.layers.")]


def make_lora(data):
    path = data / "lora_r32.safetensors"
    if path.exists():
        print(f"  [skip] {path} exists")
        return
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CFG)
        te = CLIPTextModel(CLIPTextConfig(**TE_CFG))
    mods = [("lora_unet_", n, m) for n, m in unet_lora_targets(unet)] + \
           [("lora_te_", n, m) for n, m in te_lora_targets(te)]
    sd, n_conv3 = random_lora_factors([(p + n.replace(".", "_"), m) for p, n, m in mods], 1504)
    r = LORA_RANK
    meta = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora",
            "ss_network_dim": str(r), "ss_network_alpha": str(LORA_ALPHA),
            "ss_network_args": json.dumps({"conv_dim": str(r), "conv_alpha": str(LORA_ALPHA)}),
            "ss_v2": "False", "ss_output_name": "lora_r32"}
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.rename(path)
    n_u = sum(1 for p, _, _ in mods if p == "lora_unet_")
    print(f"  wrote {path}: {len(mods)} modules (UNet {n_u}, of which {n_conv3} 3x3 convs; "
          f"TE {len(mods) - n_u}), {path.stat().st_size / 1e6:.1f} MB")


def main():
    data = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "bench-data").resolve()
    data.mkdir(parents=True, exist_ok=True)
    print(f"make_sd15: {data}")
    make_model(data)
    make_lora(data)


if __name__ == "__main__":
    main()
