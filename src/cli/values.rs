//! Flag values shared by several commands, parsed once into the library's types: the `--dtype`
//! choices and the `--lora PATH[:W…]` argument.

use clap::ValueEnum;
use loratool::family::block_weight::BlockWeightSpec;
use loratool::ops::convert::TargetFormat;
use loratool::ops::patch_plan::LoraWeight;
use loratool::tensors::Dtype;
use loratool::{Error, Result};
use std::path::{Path, PathBuf};

/// Storage dtypes a command can write float tensors as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
    /// float8_e4m3fn (F8_E4M3), for checkpoints: only the denoiser's block matrices take it.
    Fp8,
}

impl From<DtypeArg> for Dtype {
    fn from(d: DtypeArg) -> Dtype {
        match d {
            DtypeArg::F32 => Dtype::F32,
            DtypeArg::F16 => Dtype::F16,
            DtypeArg::Bf16 => Dtype::BF16,
            DtypeArg::Fp8 => Dtype::F8E4M3,
        }
    }
}

impl DtypeArg {
    /// The dtype of an output whose float tensors are all stored alike (LoRAs, conversions):
    /// fp8 is a checkpoint storage, chosen per tensor by `merge --base`, and refused here.
    pub fn uniform(self) -> Result<Dtype> {
        if self == DtypeArg::Fp8 {
            return Err(Error::Invalid(
                "--dtype fp8 applies to merges into a checkpoint (merge --base); use f32, f16 or bf16 here"
                    .into(),
            ));
        }
        Ok(self.into())
    }
}

/// LoRA dialects a command can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoraFormatArg {
    /// `lora_unet_…` / `lora_te…_` names, `.lora_down/.lora_up/.alpha` (A1111, ComfyUI, kohya).
    Kohya,
    /// diffusers `save_lora_weights` layout (`unet.…lora_A.weight` + `lora_adapter_metadata`).
    #[value(alias = "diffusers")]
    Peft,
}

impl From<LoraFormatArg> for TargetFormat {
    fn from(f: LoraFormatArg) -> TargetFormat {
        match f {
            LoraFormatArg::Kohya => TargetFormat::Kohya,
            LoraFormatArg::Peft => TargetFormat::Peft,
        }
    }
}

/// Parses `PATH`, `PATH:W` or `PATH:TE_W:UNET_W` (A1111's order), each optionally followed by
/// `:lbw=SPEC` (block weights: a preset or comma-separated numbers). Weights are split off at the
/// last `:` whose suffix parses as a number, so paths containing `:` keep working; an argument
/// that names an existing file as a whole is that file, even when its name ends in `:<number>`.
pub fn parse_lora(arg: &str) -> Result<LoraWeight> {
    if Path::new(arg).is_file() {
        return Ok(LoraWeight::new(arg));
    }
    if let Some((rest, spec)) = arg.rsplit_once(":lbw=") {
        let block_weights = BlockWeightSpec::parse(spec)
            .map_err(|e| Error::Invalid(format!("--lora '{arg}': {e}")))?;
        return Ok(LoraWeight {
            block_weights: Some(block_weights),
            ..parse_lora(rest)?
        });
    }
    let number =
        |s: &str| -> Option<f32> { s.trim().parse::<f32>().ok().filter(|v| v.is_finite()) };
    let mut weights = Vec::new();
    let mut path = arg;
    while weights.len() < 2 && !Path::new(path).is_file() {
        match path.rsplit_once(':') {
            Some((head, tail)) if !head.is_empty() => match number(tail) {
                Some(w) => {
                    weights.insert(0, w);
                    path = head;
                }
                None => break,
            },
            _ => break,
        }
    }
    if path.is_empty() || path.starts_with(':') {
        return Err(Error::Invalid(format!("--lora '{arg}': no file name")));
    }
    // A trailing ':something' that is not a number, after an existing path, is a typo.
    if weights.is_empty() {
        if let Some((head, tail)) = arg.rsplit_once(':') {
            if Path::new(head).exists() {
                return Err(Error::Invalid(format!(
                    "--lora '{arg}': weight '{tail}' is not a number"
                )));
            }
        }
    }
    let (te, unet) = match weights.as_slice() {
        [] => (1.0, 1.0),
        [w] => (*w, *w),
        [te, unet] => (*te, *unet),
        _ => unreachable!("at most two weights"),
    };
    Ok(LoraWeight {
        text_encoder: te,
        unet,
        ..LoraWeight::new(PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_weights_parse_like_a1111() {
        let p = |s: &str| parse_lora(s).unwrap();
        assert_eq!(p("a.safetensors"), LoraWeight::new("a.safetensors"));
        assert_eq!(p("a.safetensors:0.7").unet, 0.7);
        assert_eq!(p("a.safetensors:-0.5").text_encoder, -0.5);
        let both = p("a.safetensors:0.2:0.9");
        assert_eq!((both.text_encoder, both.unet), (0.2, 0.9));
        // Colons inside the path stay in the path.
        let c = p("C:/loras/x.safetensors:0.5");
        assert_eq!(c.path, PathBuf::from("C:/loras/x.safetensors"));
        assert_eq!(c.unet, 0.5);
        assert_eq!(
            p("dir:with:colons/x.safetensors").path,
            PathBuf::from("dir:with:colons/x.safetensors")
        );
        assert!(parse_lora(":0.5").is_err());
    }

    #[test]
    fn block_weights_follow_the_weights() {
        let l = parse_lora("a.safetensors:0.8:lbw=OUTALL").unwrap();
        assert_eq!(l.unet, 0.8);
        assert_eq!(
            l.block_weights,
            Some(BlockWeightSpec::Preset("OUTALL".into()))
        );
        let l = parse_lora("a.safetensors:0.5:1:lbw=1,0,0,0,1,1,1,0,0,0,1,1,1,1,1,1,1").unwrap();
        assert_eq!((l.text_encoder, l.unet), (0.5, 1.0));
        assert!(matches!(l.block_weights, Some(BlockWeightSpec::Values(v)) if v.len() == 17));
        assert_eq!(
            parse_lora("a.safetensors:lbw=ALL").unwrap().block_weights,
            Some(BlockWeightSpec::Preset("ALL".into()))
        );
        let err = parse_lora("a.safetensors:1:lbw=1,R,0")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--lora 'a.safetensors:1:lbw=1,R,0': lbw=1,R,0:"),
            "{err}"
        );
    }

    #[test]
    fn an_existing_file_named_like_a_weight_is_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("style:0.5");
        std::fs::write(&file, b"x").unwrap();
        let arg = file.display().to_string();
        assert_eq!(parse_lora(&arg).unwrap(), LoraWeight::new(&arg));
        let weighted = parse_lora(&format!("{arg}:0.8")).unwrap();
        assert_eq!((weighted.path, weighted.unet), (file, 0.8));
    }
}
