//! `loratool convert`: flags and summary.

use crate::cli::merge::parse_dtype;
use clap::Args;
use loratool::ops::convert::{convert_adapter, convert_container, ConvertOptions, TargetFormat};
use loratool::Result;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Input: a LoRA (any dialect) or, without --to, any tensor file (.ckpt/.pt/.bin/.safetensors).
    pub input: PathBuf,
    /// Output .safetensors file.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// LoRA dialect to write: kohya (A1111/ComfyUI/kohya) or peft/diffusers (`save_lora_weights`
    /// layout). Without it, the file's tensors are copied as they are into safetensors.
    #[arg(long, value_parser = ["kohya", "peft", "diffusers"])]
    pub to: Option<String>,
    /// Store float tensors as f32, f16 or bf16 (default: as the input).
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    pub dtype: Option<String>,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ConvertArgs) -> Result<i32> {
    let opts = ConvertOptions {
        dtype: args.dtype.as_deref().map(parse_dtype),
        force: args.force,
    };
    match args.to.as_deref() {
        None => {
            let n = convert_container(&args.input, &args.output, &opts)?;
            println!("wrote {} tensors to {}", n, args.output.display());
        }
        Some(to) => {
            let target = if to == "kohya" {
                TargetFormat::Kohya
            } else {
                TargetFormat::Peft
            };
            let n = convert_adapter(&args.input, &args.output, target, &opts)?;
            println!("converted {} modules to {to}: {}", n, args.output.display());
        }
    }
    Ok(0)
}
