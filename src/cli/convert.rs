//! `loratool convert`: flags and summary.

use super::values::{DtypeArg, LoraFormatArg};
use clap::Args;
use clap::ValueEnum;
use loratool::ops::convert::{convert_adapter, convert_container, ConvertOptions};
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
    #[arg(long, value_enum)]
    pub to: Option<LoraFormatArg>,
    /// Store float tensors as f32, f16 or bf16 (default: as the input).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ConvertArgs) -> Result<i32> {
    let opts = ConvertOptions {
        dtype: args.dtype.map(DtypeArg::uniform).transpose()?,
        force: args.force,
    };
    match args.to {
        None => {
            let n = convert_container(&args.input, &args.output, &opts)?;
            println!("wrote {} tensors to {}", n, args.output.display());
        }
        Some(to) => {
            let n = convert_adapter(&args.input, &args.output, to.into(), &opts)?;
            let name = to.to_possible_value().expect("a named value");
            println!(
                "converted {} modules to {}: {}",
                n,
                name.get_name(),
                args.output.display()
            );
        }
    }
    Ok(0)
}
