//! The VAE decoder of SD1/SD2 (LDM names): latents → images in [-1, 1]. Its depth and widths are
//! read from the weights; the norm group count is the family's 32 unless given.

use super::layers::{Conv2d, GroupNorm, ResnetBlock, SpatialSelfAttention, LDM_RESNET};
use super::weights::{candle_error, Part, Placement, Weights};
use crate::{Error, Result};
use candle_core::Tensor;

/// SD1/SD2 VAEs normalise with 32 groups.
pub const DEFAULT_GROUPS: usize = 32;
const EPS: f64 = 1e-6;

struct UpLevel {
    blocks: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

pub struct VaeDecoder {
    placement: Placement,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block_1: ResnetBlock,
    mid_attn: SpatialSelfAttention,
    mid_block_2: ResnetBlock,
    /// Highest resolution first (LDM's `up.0`); decoding runs them in reverse.
    levels: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    pub fn load(w: &Weights, groups: Option<usize>) -> Result<VaeDecoder> {
        let part = Part::Vae;
        let groups = groups.unwrap_or(DEFAULT_GROUPS);
        if !w.has(part, "decoder.conv_in.weight") {
            return Err(Error::bad_file(
                &w.checkpoint().root,
                "no VAE in this checkpoint (first_stage_model.decoder missing); pass --vae",
            ));
        }
        let count = |prefix: &dyn Fn(usize) -> String| {
            (0..)
                .take_while(|i| w.has(part, &format!("{}.norm1.weight", prefix(*i))))
                .count()
        };
        let levels = (0..)
            .take_while(|i| w.has(part, &format!("decoder.up.{i}.block.0.norm1.weight")))
            .map(|i| {
                let n = count(&|j| format!("decoder.up.{i}.block.{j}"));
                let blocks = (0..n)
                    .map(|j| {
                        let p = format!("decoder.up.{i}.block.{j}");
                        ResnetBlock::load(w, part, &p, &LDM_RESNET, groups, EPS)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let up = format!("decoder.up.{i}.upsample.conv");
                let upsample = match w.has(part, &format!("{up}.weight")) {
                    true => Some(Conv2d::load(w, part, &up, 1)?),
                    false => None,
                };
                Ok(UpLevel { blocks, upsample })
            })
            .collect::<Result<Vec<_>>>()?;
        let post_quant_conv = match w.has(part, "post_quant_conv.weight") {
            true => Some(Conv2d::load(w, part, "post_quant_conv", 1)?),
            false => None,
        };
        Ok(VaeDecoder {
            placement: w.placement_of(Part::Vae),
            post_quant_conv,
            conv_in: Conv2d::load(w, part, "decoder.conv_in", 1)?,
            mid_block_1: ResnetBlock::load(
                w,
                part,
                "decoder.mid.block_1",
                &LDM_RESNET,
                groups,
                EPS,
            )?,
            mid_attn: SpatialSelfAttention::load(w, part, "decoder.mid.attn_1", groups, EPS)?,
            mid_block_2: ResnetBlock::load(
                w,
                part,
                "decoder.mid.block_2",
                &LDM_RESNET,
                groups,
                EPS,
            )?,
            levels,
            norm_out: GroupNorm::load(w, part, "decoder.norm_out", groups, EPS)?,
            conv_out: Conv2d::load(w, part, "decoder.conv_out", 1)?,
        })
    }

    /// `[batch, 4, h, w]` latents (already divided by the scaling factor) → `[batch, 3, 8h, 8w]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.run(latents).map_err(|e| candle_error("VAE decode", e))
    }

    fn run(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.placement.place(z)?;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(&z)?,
            None => z,
        };
        let mut h = self.conv_in.forward(&z)?;
        h = self.mid_block_1.forward(&h, None)?;
        h = self.mid_attn.forward(&h)?;
        h = self.mid_block_2.forward(&h, None)?;
        for level in self.levels.iter().rev() {
            for block in &level.blocks {
                h = block.forward(&h, None)?;
            }
            if let Some(conv) = &level.upsample {
                let (_, _, height, width) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(height * 2, width * 2)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}
