//! `loratool resize`: flags and report.

use super::values::DtypeArg;
use clap::Args;
use loratool::ops::resize::{resize_lora, RankRule, ResizeOptions};
use loratool::{Error, Result};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// The LoRA to resize (any dialect; written as kohya).
    pub input: PathBuf,
    /// Output .safetensors file.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// New rank (with --dynamic: the largest rank any module may get).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Choose each module's rank from its singular values: sv_ratio:X, sv_fro:X or sv_cumulative:X.
    #[arg(long)]
    pub dynamic: Option<String>,
    /// Store tensors as f32, f16 or bf16 (default: as the input).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Print the retained Frobenius norm of every module.
    #[arg(long)]
    pub verbose: bool,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ResizeArgs) -> Result<i32> {
    let (rule, max_rank) = match (&args.dynamic, args.rank) {
        (Some(d), cap) => (RankRule::parse_dynamic(d)?, cap),
        (None, Some(r)) => (RankRule::Fixed(r), None),
        (None, None) => {
            return Err(Error::Invalid(
                "resize needs --rank R or --dynamic METHOD:X".into(),
            ))
        }
    };
    let (bar, progress) = super::progress::count_bar("resizing", "modules");
    let opts = ResizeOptions {
        rule,
        max_rank,
        dtype: args.dtype.map(DtypeArg::uniform).transpose()?,
        force: args.force,
        progress,
    };
    let report = resize_lora(&args.input, &args.output, &opts);
    bar.finish_and_clear();
    let report = report?;
    if args.verbose {
        for m in &report.modules {
            println!(
                "{}: rank {} → {}, retained {:.2}%",
                m.name,
                m.old_rank.map(|r| r.to_string()).unwrap_or("full".into()),
                m.new_rank,
                100.0 * m.retained_fro
            );
        }
    }
    let (lo, hi) = report.modules.iter().fold((usize::MAX, 0), |(lo, hi), m| {
        (lo.min(m.new_rank), hi.max(m.new_rank))
    });
    println!(
        "resized {} modules (new rank {}), {} copied unchanged, average Frobenius norm retained {:.2}%: {}",
        report.modules.len(),
        if lo == hi { hi.to_string() } else { format!("{lo}–{hi}") },
        report.copied,
        100.0 * report.mean_retained(),
        args.output.display()
    );
    Ok(0)
}
