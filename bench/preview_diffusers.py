#!/usr/bin/env python3
"""The diffusers half of bench/preview.sh: the same measurements as loratool's, on the same weights
(bench/make_sd15.py writes both the single-file checkpoint and this pipeline folder), on the CPU in
f32 with as many torch threads as the machine has cores.

    preview_diffusers.py step   PIPELINE_DIR SIZE [REPEATS [DTYPE [novae]]]
                                                    -> {"size", "dtype", "unet_s": [...], "vae_s": [...]}
    preview_diffusers.py render PIPELINE_DIR SIZE STEPS CFG [DTYPE]   -> {"size", "steps", "dtype", "total_s"}

An SDXL pipeline (its UNet has addition_embed_type "text_time", its folder a text_encoder_2/) gets
SDXL's inputs: the step its added conditioning (pooled embedding + size ids), the render both text
encoders' penultimate states and the pooled projection, and the VAE's own scaling factor (0.13025).
DTYPE is f32 (default) or f16.

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
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

torch.set_num_threads(os.cpu_count())


def values(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


DTYPES = {"f32": torch.float32, "f16": torch.float16}


def load(folder, cls, sub, dtype=torch.float32):
    return cls.from_pretrained(os.path.join(folder, sub), torch_dtype=dtype).eval()


def added_conditioning(unet, batch, size, dtype):
    """SDXL's added_cond_kwargs (pooled embedding and the six size ids), None for SD1/SD2."""
    if unet.config.addition_embed_type != "text_time":
        return None
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=dtype)
    return {"text_embeds": values((batch, pooled), 4).to(dtype), "time_ids": ids}


def step(folder, size, repeats, dtype="f32", with_vae=True):
    latent = size // 8
    out = {"size": size, "dtype": dtype}
    dt = DTYPES[dtype]
    with torch.inference_mode():
        unet = load(folder, UNet2DConditionModel, "unet", dt)
        width = unet.config.cross_attention_dim
        x = values((2, 4, latent, latent), 1).to(dt)
        ctx = values((2, 77, width), 2).to(dt)
        added = added_conditioning(unet, 2, size, dt)
        t = torch.tensor([500.0, 500.0])
        times = []
        for i in range(repeats + 1):
            s = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)
            if i > 0:
                times.append(time.perf_counter() - s)
        out["unet_s"] = times
        del unet
        times = []
        if with_vae:
            vae = load(folder, AutoencoderKL, "vae", dt)
            z = values((1, 4, latent, latent), 3).to(dt)
            for i in range(repeats + 1):
                s = time.perf_counter()
                vae.decode(z)
                if i > 0:
                    times.append(time.perf_counter() - s)
        out["vae_s"] = times
    print(json.dumps(out))


def render(folder, size, steps, cfg, dtype="f32"):
    latent = size // 8
    dt = DTYPES[dtype]
    sdxl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    with torch.inference_mode():
        # Every model loaded up front, as a diffusers pipeline holds them.
        text_encoder = load(folder, CLIPTextModel, "text_encoder", dt)
        text_encoder_2 = load(folder, CLIPTextModelWithProjection, "text_encoder_2", dt) if sdxl else None
        unet = load(folder, UNet2DConditionModel, "unet", dt)
        vae = load(folder, AutoencoderKL, "vae", dt)
        # Fixed token ids (start, a few words, end padding): the tokenizer is not what is measured.
        ids = torch.full((2, 77), 49407)
        ids[:, 0] = 49406
        ids[0, 1:6] = torch.tensor([320, 736, 3240, 267, 2117])
        added = None
        if sdxl:
            first = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            second = text_encoder_2(ids, output_hidden_states=True)
            cond = torch.cat([first, second.hidden_states[-2]], dim=-1)
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=dt)
            added = {"text_embeds": second.text_embeds, "time_ids": time_ids}
        else:
            cond = text_encoder(ids)[0]
        scheduler = EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(1)
        x = torch.randn((1, 4, latent, latent), generator=g).to(dt) * scheduler.init_noise_sigma
        guided = cfg != 1.0
        context = cond if guided else cond[:1]
        if added is not None and not guided:
            added = {k: v[:1] for k, v in added.items()}
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guided else x
            inp = scheduler.scale_model_input(inp, t)
            eps = unet(inp, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            if guided:
                c, u = eps.chunk(2)
                eps = u + cfg * (c - u)
            x = scheduler.step(eps, t, x, generator=g).prev_sample
        image = vae.decode(x / vae.config.scaling_factor).sample
        pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        del pixels
    print(json.dumps({"size": size, "steps": steps, "dtype": dtype, "total_s": time.perf_counter() - START}))


def main():
    mode, folder, size, *rest = sys.argv[1:]
    if mode == "step":
        step(folder, int(size), int(rest[0]) if rest else 3, rest[1] if len(rest) > 1 else "f32",
             not (len(rest) > 2 and rest[2] == "novae"))
    elif mode == "render":
        render(folder, int(size), int(rest[0]), float(rest[1]), rest[2] if len(rest) > 2 else "f32")
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
