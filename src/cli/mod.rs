//! The command layer: clap definitions, turning flags into library options, and rendering.
//! Nothing below this module knows clap exists.

mod convert;
mod extract;
mod fetch;
mod identify;
mod inspect;
mod library;
mod merge;
mod meta;
mod preview;
mod progress;
mod resize;
mod values;

use clap::{Parser, Subcommand};
use loratool::Error;

#[derive(Parser, Debug)]
#[command(
    name = "loratool",
    version,
    about = "Inspect, merge, convert, extract and resize Stable Diffusion LoRA files"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Report format, network kind, base model, rank, alpha, targets, trigger words and metadata.
    Inspect(inspect::InspectArgs),
    /// Bake weighted LoRAs into a checkpoint: W' = W + Σ wᵢ·ΔWᵢ, streamed, computed in f32.
    Merge(merge::MergeArgs),
    /// Convert a LoRA between kohya and peft/diffusers dialects, or a pickle to safetensors.
    Convert(convert::ConvertArgs),
    /// Lower a LoRA's rank exactly from its factors (fixed or per-module dynamic rank).
    Resize(resize::ResizeArgs),
    /// Make a LoRA from the difference between a fine-tuned checkpoint and its base, by SVD.
    Extract(extract::ExtractArgs),
    /// Print or edit a safetensors file's metadata (--set, --unset, --strip-training); tensors
    /// and data are copied unchanged.
    Meta(meta::MetaArgs),
    /// Index a LoRA and checkpoint collection (SQLite): scan, list, search, show, dupes, verify.
    Library(library::LibraryArgs),
    /// Download LoRAs from Civitai and Hugging Face (verified, resumable, indexed), or identify
    /// local files on Civitai (--identify).
    Fetch(fetch::FetchArgs),
    /// Render an image as A1111 would (same seed, same sampler) with LoRAs applied at load time:
    /// SD1 and SD2 checkpoints.
    Preview(preview::PreviewArgs),
}

/// Runs a command and returns the process exit code.
pub fn run(cli: Cli) -> loratool::Result<i32> {
    // Only merge's --force accepts a LoRA of another family; elsewhere --force means overwrite.
    let force_accepts_any_family = matches!(cli.command, Command::Merge(_));
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Resize(args) => resize::run(args),
        Command::Extract(args) => extract::run(args),
        Command::Meta(args) => meta::run(args),
        Command::Library(args) => library::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Preview(args) => preview::run(args),
    };
    result.map_err(|e| with_flag_hints(e, force_accepts_any_family))
}

/// Names the flag that overrides a refusal the user may override; the library knows no flags.
fn with_flag_hints(e: Error, force_accepts_any_family: bool) -> Error {
    match e {
        Error::OutputExists { path, appeared } => Error::Invalid(format!(
            "{}: already exists ({}use --force to overwrite)",
            path.display(),
            if appeared {
                "it appeared while this output was being written; "
            } else {
                ""
            }
        )),
        Error::FamilyMismatch { .. } if force_accepts_any_family => {
            Error::Invalid(format!("{e} (use --force to merge anyway)"))
        }
        e => e,
    }
}
