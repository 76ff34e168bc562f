#!/usr/bin/env python3
"""Peer for bench/merge_sdxl.sh: bake a kohya SDXL LoRA into a diffusers SDXL pipeline folder with
diffusers' own path (StableDiffusionXLPipeline + load_lora_weights + fuse_lora + unload_lora_weights),
then save the fused UNet and both text encoders as safetensors.  Offline; torch on 2 threads; weights
kept in f16 as stored (peft upcasts f16 to f32 on CPU for the delta).  SDXL twin of
bench/peer_merge_diffusers.py.

    python bench/peer_merge_sdxl.py FOLDER LORA WEIGHT OUT_DIR
writes OUT_DIR/peer_unet.safetensors, OUT_DIR/peer_text_encoder.safetensors and
OUT_DIR/peer_text_encoder_2.safetensors
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
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

torch.set_num_threads(2)
diffusers.logging.set_verbosity_error()


def main():
    folder, lora, w, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    kw = dict(torch_dtype=torch.float16, local_files_only=True)     # diffusers spelling
    tkw = dict(dtype=torch.float16, local_files_only=True)     # transformers spelling
    t_imp = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **tkw)
    te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **tkw)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
    # no tokenizers/scheduler in the folder (nothing from the Hub): the LoRA loader needs none of them
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=None, add_watermarker=False)
    t_load = time.perf_counter()
    pipe.load_lora_weights(os.path.dirname(os.path.abspath(lora)), weight_name=os.path.basename(lora),
                           adapter_name="bench")
    with safe_open(lora, "pt") as f:
        n_file = len({k.split(".", 1)[0] for k in f.keys()})
    n_adapted = sum(1 for m in (unet, te, te2) for n, _ in m.named_modules() if n.endswith(".lora_A.bench"))
    t_lora = time.perf_counter()
    pipe.fuse_lora(lora_scale=w, adapter_names=["bench"])
    pipe.unload_lora_weights()
    t_fuse = time.perf_counter()
    for name, m in (("unet", unet), ("text_encoder", te), ("text_encoder_2", te2)):
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(out, f"peer_{name}.safetensors"))
    t_save = time.perf_counter()
    print(f"peer: diffusers {diffusers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"LoRA modules adapted {n_adapted} of {n_file}")
    print(f"peer phases: imports {t_imp - t0:.2f}s, load components {t_load - t_imp:.2f}s, "
          f"load_lora_weights {t_lora - t_load:.2f}s, fuse+unload {t_fuse - t_lora:.2f}s, save {t_save - t_fuse:.2f}s")


if __name__ == "__main__":
    main()
