//! Seconds per sampling step (one UNet forward at batch 2, as CFG runs it) and per VAE decode of
//! the preview sampler, on a single-file checkpoint: the loratool half of `bench/preview.sh`,
//! whose other half runs diffusers on the same weights (bench/preview_diffusers.py).
//!
//!     preview_step_bench CHECKPOINT SIZE [REPEATS] [--dtype f32|f16] [--head-width N]
//!                        [--groups N] [--no-vae]
//!
//! Prints one JSON line: {"size", "dtype", "unet_s": [...], "vae_s": [...]}. The inputs are fixed
//! pseudo-random values; the context is 77 tokens of the UNet's cross-attention width, and an SDXL
//! UNet gets its vector input (`y`) too. `--head-width`/`--groups` are for tiny test models
//! (real ones use the family's 64-wide heads and 32 groups).

use candle_core::{Device, Tensor};
use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{PatchPlan, PlanOptions};
use loratool::preview::unet::{Heads, Unet, UnetConfig};
use loratool::preview::vae::VaeDecoder;
use loratool::preview::weights::{Placement, Weights};
use std::time::Instant;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: preview_step_bench CHECKPOINT SIZE [REPEATS] [--dtype f32|f16] [--head-width N] [--groups N] [--no-vae]";
    let args: Vec<String> = std::env::args().collect();
    let [_, path, size, rest @ ..] = args.as_slice() else {
        return Err(usage.into());
    };
    let size: usize = size.parse()?;
    let mut repeats = 3;
    let (mut dtype, mut head_width, mut groups, mut vae) = ("f32", None, 32, true);
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().ok_or(usage);
        match arg.as_str() {
            "--dtype" => dtype = value()?.as_str(),
            "--head-width" => head_width = Some(value()?.parse::<usize>()?),
            "--groups" => groups = value()?.parse()?,
            "--no-vae" => vae = false,
            n => repeats = n.parse()?,
        }
    }
    let placement = Placement {
        dtype: match dtype {
            "f16" => candle_core::DType::F16,
            "f32" => candle_core::DType::F32,
            _ => return Err(usage.into()),
        },
        ..Placement::default()
    };
    let latent = size / 8;
    let checkpoint = Checkpoint::open(std::path::Path::new(path))?;
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default())?;
    let weights = Weights::new(plan).with_placement(placement);

    let unet_s = {
        let unet = Unet::load(
            &weights,
            &UnetConfig {
                heads: head_width.map(Heads::Width),
                groups,
            },
        )?;
        let width = unet.context_width();
        let x = Tensor::from_vec(
            values(2 * 4 * latent * latent, 1),
            (2, 4, latent, latent),
            &Device::Cpu,
        )?;
        let context = Tensor::from_vec(values(2 * 77 * width, 2), (2, 77, width), &Device::Cpu)?;
        let vector = unet
            .vector_width()
            .map(|w| Tensor::from_vec(values(2 * w, 4), (2, w), &Device::Cpu))
            .transpose()?;
        // One warm-up call, then the timed ones.
        let mut times = Vec::new();
        for i in 0..=repeats {
            let start = Instant::now();
            let out = unet.forward_with_vector(&x, &[500.0, 500.0], &context, vector.as_ref())?;
            std::hint::black_box(out);
            if i > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times
    };
    let vae_s = if !vae {
        Vec::new()
    } else {
        let vae = VaeDecoder::load(&weights, Some(groups))?;
        let z = Tensor::from_vec(
            values(4 * latent * latent, 3),
            (1, 4, latent, latent),
            &Device::Cpu,
        )?;
        let mut times = Vec::new();
        for i in 0..=repeats {
            let start = Instant::now();
            std::hint::black_box(vae.decode(&z)?);
            if i > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times
    };
    println!(
        "{}",
        serde_json::json!({"size": size, "dtype": dtype, "unet_s": unet_s, "vae_s": vae_s})
    );
    Ok(())
}
