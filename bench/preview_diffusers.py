#!/usr/bin/env python3
"""The diffusers half of bench/preview.sh: the same measurements as loratool's, on the same weights
(bench/make_sd15.py writes both the single-file checkpoint and this pipeline folder), on the CPU in
f32 with as many torch threads as the machine has cores.

    preview_diffusers.py step   PIPELINE_DIR SIZE [REPEATS]   -> {"size", "unet_s": [...], "vae_s": [...]}
    preview_diffusers.py render PIPELINE_DIR SIZE STEPS CFG   -> {"size", "steps", "total_s"}

`step` times one UNet forward at batch 2 (CFG's prompt + negative prompt), timestep 500, a
77-token context, after one warm-up call, and one VAE decode; `render` is a whole txt2img as a
diffusers pipeline runs it (text encoder, Euler a loop with CFG, VAE decode, uint8 pixels), timed
from process start so loading counts as it does for `loratool preview`. Peak RSS is measured from
outside (`/usr/bin/time -v`).
"""
import json
import os
import sys
import time

START = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

torch.set_num_threads(os.cpu_count())


def values(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def load(folder, cls, sub):
    return cls.from_pretrained(os.path.join(folder, sub), torch_dtype=torch.float32).eval()


def step(folder, size, repeats):
    latent = size // 8
    out = {"size": size}
    with torch.inference_mode():
        unet = load(folder, UNet2DConditionModel, "unet")
        width = unet.config.cross_attention_dim
        x = values((2, 4, latent, latent), 1)
        ctx = values((2, 77, width), 2)
        t = torch.tensor([500.0, 500.0])
        times = []
        for i in range(repeats + 1):
            s = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx)
            if i > 0:
                times.append(time.perf_counter() - s)
        out["unet_s"] = times
        del unet
        vae = load(folder, AutoencoderKL, "vae")
        z = values((1, 4, latent, latent), 3)
        times = []
        for i in range(repeats + 1):
            s = time.perf_counter()
            vae.decode(z)
            if i > 0:
                times.append(time.perf_counter() - s)
        out["vae_s"] = times
    print(json.dumps(out))


def render(folder, size, steps, cfg):
    latent = size // 8
    with torch.inference_mode():
        text_encoder = load(folder, CLIPTextModel, "text_encoder")
        unet = load(folder, UNet2DConditionModel, "unet")
        vae = load(folder, AutoencoderKL, "vae")
        # Fixed token ids (start, a few words, end padding): the tokenizer is not what is measured.
        ids = torch.full((2, 77), 49407)
        ids[:, 0] = 49406
        ids[0, 1:6] = torch.tensor([320, 736, 3240, 267, 2117])
        cond = text_encoder(ids)[0]
        scheduler = EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(1)
        x = torch.randn((1, 4, latent, latent), generator=g) * scheduler.init_noise_sigma
        guided = cfg != 1.0
        context = cond if guided else cond[:1]
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guided else x
            inp = scheduler.scale_model_input(inp, t)
            eps = unet(inp, t, encoder_hidden_states=context).sample
            if guided:
                c, u = eps.chunk(2)
                eps = u + cfg * (c - u)
            x = scheduler.step(eps, t, x, generator=g).prev_sample
        image = vae.decode(x / 0.18215).sample
        pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        del pixels
    print(json.dumps({"size": size, "steps": steps, "total_s": time.perf_counter() - START}))


def main():
    mode, folder, size, *rest = sys.argv[1:]
    if mode == "step":
        step(folder, int(size), int(rest[0]) if rest else 3)
    elif mode == "render":
        render(folder, int(size), int(rest[0]), float(rest[1]))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
