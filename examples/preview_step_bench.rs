//! Seconds per sampling step (one UNet forward at batch 2, as CFG runs it) and per VAE decode of
//! the preview sampler, on a single-file checkpoint: the loratool half of `bench/preview.sh`,
//! whose other half runs diffusers on the same weights (bench/preview_diffusers.py).
//!
//!     preview_step_bench CHECKPOINT SIZE [REPEATS]
//!
//! Prints one JSON line: {"size", "unet_s": [...], "vae_s": [...]}. The inputs are fixed
//! pseudo-random values; the context is 77 tokens of the text encoder's width.

use candle_core::{Device, Tensor};
use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{PatchPlan, PlanOptions};
use loratool::preview::unet::{Unet, UnetConfig};
use loratool::preview::vae::VaeDecoder;
use loratool::preview::weights::Weights;
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
    let args: Vec<String> = std::env::args().collect();
    let [_, path, size, rest @ ..] = args.as_slice() else {
        return Err("usage: preview_step_bench CHECKPOINT SIZE [REPEATS]".into());
    };
    let size: usize = size.parse()?;
    let repeats: usize = rest.first().map(|r| r.parse()).transpose()?.unwrap_or(3);
    let latent = size / 8;
    let checkpoint = Checkpoint::open(std::path::Path::new(path))?;
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default())?;
    let weights = Weights::new(plan);

    let unet_s = {
        let unet = Unet::load(
            &weights,
            &UnetConfig {
                heads: None,
                groups: 32,
            },
        )?;
        let width = weights
            .shape(
                loratool::preview::weights::Part::Unet,
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            )
            .map(|s| s[1])
            .unwrap_or(768);
        let x = Tensor::from_vec(
            values(2 * 4 * latent * latent, 1),
            (2, 4, latent, latent),
            &Device::Cpu,
        )?;
        let context = Tensor::from_vec(values(2 * 77 * width, 2), (2, 77, width), &Device::Cpu)?;
        // One warm-up call, then the timed ones.
        let mut times = Vec::new();
        for i in 0..=repeats {
            let start = Instant::now();
            let out = unet.forward(&x, &[500.0, 500.0], &context)?;
            std::hint::black_box(out);
            if i > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times
    };
    let vae_s = {
        let vae = VaeDecoder::load(&weights, None)?;
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
        serde_json::json!({"size": size, "unet_s": unet_s, "vae_s": vae_s})
    );
    Ok(())
}
