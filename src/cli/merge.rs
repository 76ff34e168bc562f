//! `loratool merge`: flags and the summary it prints.

use super::values::{parse_lora, DtypeArg};
use clap::{Args, ValueEnum};
use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::merge_loras::{merge_loras, LoraMergeMethod, LoraMergeOptions};
use loratool::ops::patch_plan::LoraWeight;
use loratool::{Error, Result};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Checkpoint to bake the LoRAs into (single-file LDM/A1111, a diffusers component file, or a
    /// BFL Flux file). Without it, the LoRAs are merged into one LoRA.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// A LoRA and its weight: PATH, PATH:W, or PATH:TE_W:UNET_W (A1111's order), optionally
    /// followed by :lbw=PRESET or :lbw=W1,W2,… (per-block weights, the LoRA Block Weight
    /// convention). Repeatable.
    #[arg(long = "lora", required = true, value_name = "PATH[:W]")]
    pub loras: Vec<String>,
    /// Output file.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Store float tensors as f32, f16 or bf16 (default: as the base). fp8 (float8_e4m3fn) stores
    /// only the denoiser's block matrices as fp8 and keeps norms, biases, embedders, the final
    /// layer, text encoders and VAE as they are (checkpoints only).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Fail, before writing anything, if any LoRA module matches nothing in the checkpoint.
    #[arg(long)]
    pub strict: bool,
    /// Overwrite an existing output, and merge a LoRA made for another model family.
    #[arg(long)]
    pub force: bool,
    /// LoRA+LoRA merge (no --base): `concat` stacks factors (exact, rank = sum of ranks), `svd`
    /// keeps the best rank-R approximation of the summed delta.
    #[arg(long, value_enum, default_value_t = MethodArg::Concat)]
    pub method: MethodArg,
    /// Target rank for `--method svd`.
    #[arg(long)]
    pub rank: Option<usize>,
}

/// How LoRAs are merged into one LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    Concat,
    Svd,
}

pub fn run(args: MergeArgs) -> Result<i32> {
    let loras: Vec<LoraWeight> = args
        .loras
        .iter()
        .map(|a| parse_lora(a))
        .collect::<Result<_>>()?;
    let Some(base) = args.base else {
        return merge_into_lora(&args, &loras);
    };
    if args.method != MethodArg::Concat || args.rank.is_some() {
        return Err(Error::Invalid(
            "--method and --rank apply to LoRA+LoRA merges (without --base)".into(),
        ));
    }
    let (bar, progress) = super::progress::bytes_bar("merging");
    let opts = MergeOptions {
        dtype: args.dtype.map(Into::into),
        strict: args.strict,
        force: args.force,
        // Working memory of one window (mapped input + encoded output); see docs/DECISIONS.md.
        window_bytes: 32 << 20,
        progress,
    };
    let report = merge_into_checkpoint(&base, &loras, &args.output, &opts);
    bar.finish_and_clear();
    let report = report?;
    for (path, matched, unmatched) in &report.loras {
        if !unmatched.is_empty() {
            let first: Vec<&str> = unmatched.iter().take(3).map(String::as_str).collect();
            eprintln!(
                "loratool: {}: {} of {} LoRA modules matched nothing in the checkpoint: {}{}",
                path.display(),
                unmatched.len(),
                matched + unmatched.len(),
                first.join(", "),
                if unmatched.len() > 3 { ", …" } else { "" }
            );
        }
    }
    println!(
        "merged {} LoRA{} into {}: {} of {} tensors changed ({} checkpoint)",
        report.loras.len(),
        if report.loras.len() == 1 { "" } else { "s" },
        args.output.display(),
        report.tensors_changed,
        report.tensors_total,
        report.base_family.map(|f| f.name()).unwrap_or("unknown")
    );
    Ok(0)
}

fn merge_into_lora(args: &MergeArgs, loras: &[LoraWeight]) -> Result<i32> {
    let method = match (args.method, args.rank) {
        (MethodArg::Svd, Some(rank)) => LoraMergeMethod::Svd { rank },
        (MethodArg::Svd, None) => return Err(Error::Invalid("--method svd needs --rank R".into())),
        (_, Some(_)) => return Err(Error::Invalid("--rank needs --method svd".into())),
        _ => LoraMergeMethod::Concat,
    };
    let (bar, progress) = super::progress::count_bar("merging", "modules");
    let opts = LoraMergeOptions {
        method,
        dtype: args.dtype.map(DtypeArg::uniform).transpose()?,
        force: args.force,
        progress,
    };
    let r = merge_loras(loras, &args.output, &opts);
    bar.finish_and_clear();
    let r = r?;
    let ranks = if r.ranks.0 == r.ranks.1 {
        r.ranks.1.to_string()
    } else {
        format!("{}–{}", r.ranks.0, r.ranks.1)
    };
    println!(
        "merged {} LoRAs into {}: {} modules ({} low-rank, rank {}; {} dense diff), {} LoRA",
        loras.len(),
        args.output.display(),
        r.modules,
        r.low_rank_modules,
        ranks,
        r.dense_modules,
        r.family.map(|f| f.name()).unwrap_or("unknown")
    );
    Ok(0)
}
