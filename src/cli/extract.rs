//! `loratool extract`: flags and per-component report.

use super::values::{DtypeArg, LoraFormatArg};
use clap::Args;
use loratool::ops::extract::{extract_lora, ExtractOptions, ExtractReport, Unextracted};
use loratool::ops::resize::RankRule;
use loratool::Result;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// The original checkpoint.
    #[arg(long)]
    pub base: PathBuf,
    /// The fine-tuned checkpoint (same family and layout as the base).
    #[arg(long)]
    pub tuned: PathBuf,
    /// Rank of linear modules (and, with --dynamic, the largest rank allowed).
    #[arg(long)]
    pub rank: usize,
    /// Rank of 3×3 convolutions; without it convolutions are left out (as kohya does).
    #[arg(long)]
    pub conv_rank: Option<usize>,
    /// Rank of text-encoder modules (default: --rank).
    #[arg(long)]
    pub te_rank: Option<usize>,
    /// Skip modules whose largest absolute difference is at most this.
    #[arg(long, default_value_t = 0.0)]
    pub min_diff: f32,
    /// Per-module rank from the spectrum: sv_ratio:X, sv_fro:X or sv_cumulative:X.
    #[arg(long)]
    pub dynamic: Option<String>,
    /// Clamp both factors to ± this quantile of their values (kohya's 0.99; off by default).
    #[arg(long)]
    pub clamp_quantile: Option<f64>,
    /// Output dialect.
    #[arg(long, value_enum, default_value_t = LoraFormatArg::Kohya)]
    pub format: LoraFormatArg,
    /// Storage dtype of the LoRA.
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    pub dtype: DtypeArg,
    /// Output file.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Write a LoRA even when the checkpoints do not differ.
    #[arg(long)]
    pub allow_empty: bool,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ExtractArgs) -> Result<i32> {
    let (bar, progress) = super::progress::count_bar("extracting", "modules");
    let opts = ExtractOptions {
        rank: args.rank,
        conv_rank: args.conv_rank,
        te_rank: args.te_rank,
        min_diff: args.min_diff,
        dynamic: args
            .dynamic
            .as_deref()
            .map(RankRule::parse_dynamic)
            .transpose()?,
        clamp_quantile: args.clamp_quantile,
        dtype: args.dtype.uniform()?,
        format: args.format.into(),
        force: args.force,
        allow_empty: args.allow_empty,
        progress,
    };
    let report = extract_lora(&args.base, &args.tuned, &args.output, &opts);
    bar.finish_and_clear();
    let report = report?;
    for (component, s) in &report.components {
        let retained = if s.total_energy > 0.0 {
            (s.kept_energy / s.total_energy).sqrt()
        } else {
            1.0
        };
        println!(
            "{component}: {} modules extracted, {} skipped (no difference), {:.2}% of the difference's Frobenius norm kept{}",
            s.extracted,
            s.skipped,
            100.0 * retained,
            s.worst
                .as_ref()
                .map(|(n, r)| format!("; worst {n} ({:.2}%)", 100.0 * r))
                .unwrap_or_default()
        );
    }
    print_not_extracted(&report);
    println!("wrote {}", args.output.display());
    Ok(0)
}

/// One line per kind of changed tensor the LoRA leaves out, with the flag that would take it in.
fn print_not_extracted(report: &ExtractReport) {
    for n in &report.not_extracted {
        let hint = match n.kind {
            Unextracted::Conv | Unextracted::ResnetLinear => "; add --conv-rank",
            Unextracted::BelowMinDiff => "; lower --min-diff",
            _ => "",
        };
        println!(
            "{} changed {} not extracted ({} of the difference){hint}",
            n.count,
            n.kind.describe(),
            percent(report.share(n.energy))
        );
    }
    if report.unpaired > 0 {
        println!(
            "{} tensors are in only one of the checkpoints or differ in shape (not compared)",
            report.unpaired
        );
    }
}

fn percent(share: f64) -> String {
    if share > 0.0 && share < 0.0005 {
        "<0.1%".into()
    } else {
        format!("{:.1}%", 100.0 * share)
    }
}
