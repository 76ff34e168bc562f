//! What `library previews` saves by keeping a checkpoint loaded: the seconds to switch the loaded
//! models (text encoder, UNet, VAE) from one LoRA to the next by re-patching the tensors they touch,
//! against loading the models afresh, bare and with the LoRA patched in at load (what a render
//! per LoRA does).
//!
//!     repatch_bench CHECKPOINT LORA... [--repeats N]
//!
//! Prints one JSON line: {"load_s": [...], "load_with_lora_s": [...], "repatch_s": [...],
//! "rebuilt": [...], "tensors": N}. Each repeat cycles through the LoRAs, so every re-patch undoes
//! the previous LoRA and applies the next.

use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{LoraWeight, PatchPlan, PlanOptions};
use loratool::preview::clip::{ClipConfig, ClipTextEncoder};
use loratool::preview::txt2img::{LoadedModels, Txt2Img};
use loratool::preview::unet::{Unet, UnetConfig};
use loratool::preview::vae::VaeDecoder;
use loratool::preview::weights::Weights;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let repeats = match args.iter().position(|a| a == "--repeats") {
        Some(i) => {
            let n = args.get(i + 1).ok_or("--repeats N")?.parse()?;
            args.drain(i..i + 2);
            n
        }
        None => 2,
    };
    let [path, loras @ ..] = args.as_slice() else {
        return Err("usage: repatch_bench CHECKPOINT LORA... [--repeats N]".into());
    };
    if loras.is_empty() {
        return Err("give at least one LoRA".into());
    }
    let checkpoint = Checkpoint::open(std::path::Path::new(path))?;
    let request = Txt2Img::new(path);
    let mut load_s = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        drop(LoadedModels::load(&checkpoint, &request)?);
        load_s.push(t.elapsed().as_secs_f64());
    }
    // A fresh load with a LoRA: the models `preview` builds, each tensor patched as it is read.
    let mut load_with_lora_s = Vec::new();
    for i in 0..repeats.max(1) {
        let lora = LoraWeight::new(&loras[i % loras.len()]);
        let t = Instant::now();
        let plan = PatchPlan::build(&checkpoint, &[lora], &PlanOptions::default())?;
        let weights = Weights::new(plan);
        let encoder = ClipTextEncoder::load(&weights, ClipConfig::infer(&weights, None)?)?;
        let unet = Unet::load(&weights, &UnetConfig::default())?;
        let vae = VaeDecoder::load(&weights, None)?;
        drop((encoder, unet, vae));
        load_with_lora_s.push(t.elapsed().as_secs_f64());
    }
    let mut models = LoadedModels::load(&checkpoint, &request)?;
    let mut repatch_s = Vec::new();
    let mut rebuilt = Vec::new();
    for _ in 0..repeats {
        for lora in loras {
            let t = Instant::now();
            rebuilt.push(models.apply_loras(&[LoraWeight::new(lora)])?);
            repatch_s.push(t.elapsed().as_secs_f64());
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "load_s": load_s,
            "load_with_lora_s": load_with_lora_s,
            "repatch_s": repatch_s,
            "rebuilt": rebuilt,
            "tensors": checkpoint.files.iter().map(|f| f.file.tensors().len()).sum::<usize>(),
        })
    );
    Ok(())
}
