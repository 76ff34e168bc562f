#!/usr/bin/env python3
"""Peer for bench/merge_sd15.sh and bench/merge_sdxl.sh: bake a kohya LoRA into a diffusers SD1 or
SDXL pipeline folder with diffusers' own path (load_lora_weights + fuse_lora + unload_lora_weights),
then save the fused UNet and text encoder(s) as safetensors.  Offline; torch on 2 threads; weights
kept in f16 as stored (peft upcasts f16 to f32 on CPU for the delta).  A folder with a
text_encoder_2/ is loaded as StableDiffusionXLPipeline, otherwise as StableDiffusionPipeline.

    python bench/peer_merge_diffusers.py FOLDER LORA WEIGHT OUT_DIR
writes OUT_DIR/peer_unet.safetensors, OUT_DIR/peer_text_encoder.safetensors (and, for SDXL,
OUT_DIR/peer_text_encoder_2.safetensors)
"""
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
t0 = time.perf_counter()

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
import diffusers  # noqa: E402
from diffusers import (AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline,  # noqa: E402
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

torch.set_num_threads(2)
diffusers.logging.set_verbosity_error()


def main():
    folder, lora, w, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    kw = dict(torch_dtype=torch.float16, local_files_only=True)     # diffusers spelling
    tkw = dict(dtype=torch.float16, local_files_only=True)          # transformers spelling
    sdxl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    t_imp = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **tkw)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
    components = [("unet", unet), ("text_encoder", te)]
    # no tokenizers/scheduler in the folder (nothing from the Hub): the LoRA loader needs none of them
    if sdxl:
        te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **tkw)
        components.append(("text_encoder_2", te2))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=None, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=None,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    t_load = time.perf_counter()
    pipe.load_lora_weights(os.path.dirname(os.path.abspath(lora)), weight_name=os.path.basename(lora),
                           adapter_name="bench")
    with safe_open(lora, "pt") as f:
        n_file = len({k.split(".", 1)[0] for k in f.keys()})
    n_adapted = sum(1 for _, m in components for n, _ in m.named_modules() if n.endswith(".lora_A.bench"))
    t_lora = time.perf_counter()
    pipe.fuse_lora(lora_scale=w, adapter_names=["bench"])
    pipe.unload_lora_weights()
    t_fuse = time.perf_counter()
    for name, m in components:
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(out, f"peer_{name}.safetensors"))
    t_save = time.perf_counter()
    print(f"peer: diffusers {diffusers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"LoRA modules adapted {n_adapted} of {n_file}")
    print(f"peer phases: imports {t_imp - t0:.2f}s, load components {t_load - t_imp:.2f}s, "
          f"load_lora_weights {t_lora - t_load:.2f}s, fuse+unload {t_fuse - t_lora:.2f}s, save {t_save - t_fuse:.2f}s")


if __name__ == "__main__":
    main()
