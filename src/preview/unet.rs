//! The SD1/SD2/SDXL denoising UNet (LDM names; `openaimodel.UNetModel`): time embedding, SDXL's
//! class embedding of its vector input (`label_emb`), ResNet blocks, spatial transformers with
//! self- and cross-attention, skip connections. Its depth, widths, transformer depths and which
//! levels attend are read from the weights; the head count and norm groups follow the family's
//! rule unless given.

use super::layers::{
    geglu, multi_head_attention, Conv2d, GroupNorm, LayerNorm, Linear, ResnetBlock, ResnetNames,
};
use super::sampling::Prediction;
use super::weights::{candle_error, Part, Placement, Weights};
use crate::family::BaseModel;
use crate::{Error, Result};
use candle_core::{Device, Tensor};

const PART: Part = Part::Unet;

/// LDM's UNet ResNet block names.
const UNET_RESNET: ResnetNames = ResnetNames {
    norm1: "in_layers.0",
    conv1: "in_layers.2",
    norm2: "out_layers.0",
    conv2: "out_layers.3",
    shortcut: "skip_connection",
};

/// How many attention heads a transformer of a given width has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Heads {
    /// SD1: 8 heads whatever the width.
    Count(usize),
    /// SD2: heads of 64 channels.
    Width(usize),
}

impl Heads {
    fn of(self, channels: usize) -> usize {
        match self {
            Heads::Count(n) => n,
            Heads::Width(w) => (channels / w).max(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnetConfig {
    /// `None`: SD1's 8 heads when the transformers project with 1×1 convolutions, SD2's 64-wide
    /// heads when they project with linear layers.
    pub heads: Option<Heads>,
    pub groups: usize,
}

impl Default for UnetConfig {
    fn default() -> Self {
        UnetConfig {
            heads: None,
            groups: 32,
        }
    }
}

struct UnetResBlock {
    block: ResnetBlock,
    emb: Linear,
}

impl UnetResBlock {
    fn load(w: &Weights, prefix: &str, groups: usize) -> Result<UnetResBlock> {
        Ok(UnetResBlock {
            block: ResnetBlock::load(w, PART, prefix, &UNET_RESNET, groups, 1e-5)?,
            emb: Linear::load(w, PART, &format!("{prefix}.emb_layers.1"))?,
        })
    }

    fn forward(&self, x: &Tensor, emb: &Tensor) -> candle_core::Result<Tensor> {
        let t = self.emb.forward(&emb.silu()?)?;
        self.block.forward(x, Some(&t))
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, heads: usize) -> Result<Attention> {
        let l = |n: &str| Linear::load(w, PART, &format!("{prefix}.{n}"));
        Ok(Attention {
            q: l("to_q")?,
            k: l("to_k")?,
            v: l("to_v")?,
            out: l("to_out.0")?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let attended = multi_head_attention(
            &self.q.forward(x)?,
            &self.k.forward(context)?,
            &self.v.forward(context)?,
            self.heads,
            None,
        )?;
        self.out.forward(&attended)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (x + self.attn1.forward(&h, &h)?)?;
        let x = (&x + self.attn2.forward(&self.norm2.forward(&x)?, context)?)?;
        let ff = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        x + self.ff_out.forward(&geglu(&ff)?)?
    }
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    fn load(w: &Weights, prefix: &str, config: &UnetConfig) -> Result<SpatialTransformer> {
        let p = |n: &str| format!("{prefix}.{n}");
        let shape = w.shape(PART, &p("proj_in.weight")).ok_or_else(|| {
            Error::bad_tensor(&w.checkpoint().root, p("proj_in.weight"), "missing")
        })?;
        let conv = shape.len() == 4;
        let inner = shape[0];
        let heads = config
            .heads
            .unwrap_or(match conv {
                true => Heads::Count(8),
                false => Heads::Width(64),
            })
            .of(inner);
        let projection = |n: &str| -> Result<Projection> {
            Ok(match conv {
                true => Projection::Conv(Conv2d::load(w, PART, &p(n), 1)?),
                false => Projection::Linear(Linear::load(w, PART, &p(n))?),
            })
        };
        let blocks = (0..)
            .take_while(|j| w.has(PART, &p(&format!("transformer_blocks.{j}.norm1.weight"))))
            .map(|j| {
                let b = p(&format!("transformer_blocks.{j}"));
                let ln = |n: &str| LayerNorm::load(w, PART, &format!("{b}.{n}"), 1e-5);
                Ok(TransformerBlock {
                    norm1: ln("norm1")?,
                    attn1: Attention::load(w, &format!("{b}.attn1"), heads)?,
                    norm2: ln("norm2")?,
                    attn2: Attention::load(w, &format!("{b}.attn2"), heads)?,
                    norm3: ln("norm3")?,
                    ff_in: Linear::load(w, PART, &format!("{b}.ff.net.0.proj"))?,
                    ff_out: Linear::load(w, PART, &format!("{b}.ff.net.2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SpatialTransformer {
            norm: GroupNorm::load(w, PART, &p("norm"), config.groups, 1e-6)?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        // To tokens `[b, h·w, inner]`, through the projection where it sits in each variant.
        let mut t = match &self.proj_in {
            Projection::Conv(conv) => {
                let y = conv.forward(&n)?;
                let inner = y.dim(1)?;
                y.reshape((b, inner, h * w))?
                    .transpose(1, 2)?
                    .contiguous()?
            }
            Projection::Linear(l) => {
                l.forward(&n.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?)?
            }
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let back = |t: Tensor| -> candle_core::Result<Tensor> {
            let inner = t.dim(2)?;
            t.transpose(1, 2)?.contiguous()?.reshape((b, inner, h, w))
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&back(t)?)?,
            Projection::Linear(l) => back(l.forward(&t)?)?,
        };
        x + out
    }
}

/// One element of an input, middle or output block.
enum Layer {
    Res(UnetResBlock),
    Attention(SpatialTransformer),
    Down(Conv2d),
    Up(Conv2d),
}

impl Layer {
    fn forward(&self, x: &Tensor, emb: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Layer::Res(r) => r.forward(x, emb),
            Layer::Attention(a) => a.forward(x, context),
            Layer::Down(c) => c.forward(x),
            Layer::Up(c) => {
                let (_, _, h, w) = x.dims4()?;
                c.forward(&x.upsample_nearest2d(h * 2, w * 2)?)
            }
        }
    }
}

pub struct Unet {
    placement: Placement,
    model_channels: usize,
    /// The width of the text states the cross-attention reads (SD1 768, SD2 1024).
    context_width: usize,
    time_1: Linear,
    time_2: Linear,
    /// SDXL's `label_emb.0.0` / `label_emb.0.2` (diffusers' `add_embedding.linear_1/2`): the
    /// vector input `y` through linear, SiLU, linear, added to the time embedding.
    label_emb: Option<(Linear, Linear)>,
    conv_in: Conv2d,
    input_blocks: Vec<Vec<Layer>>,
    middle: Vec<Layer>,
    output_blocks: Vec<Vec<Layer>>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Unet {
    pub fn load(w: &Weights, config: &UnetConfig) -> Result<Unet> {
        let time_shape = w.shape(PART, "time_embed.0.weight").ok_or_else(|| {
            Error::bad_file(
                &w.checkpoint().root,
                "no UNet (model.diffusion_model.time_embed missing)",
            )
        })?;
        let block = |prefix: String| -> Result<Vec<Layer>> {
            let mut layers = Vec::new();
            // An LDM block holds at most a ResNet block, a transformer and a resampler.
            for k in 0..3 {
                let p = format!("{prefix}.{k}");
                let has = |n: &str| w.has(PART, &format!("{p}.{n}"));
                let layer = if has("in_layers.0.weight") {
                    Layer::Res(UnetResBlock::load(w, &p, config.groups)?)
                } else if has("proj_in.weight") {
                    Layer::Attention(SpatialTransformer::load(w, &p, config)?)
                } else if has("op.weight") {
                    Layer::Down(Conv2d::load(w, PART, &format!("{p}.op"), 2)?)
                } else if has("conv.weight") {
                    Layer::Up(Conv2d::load(w, PART, &format!("{p}.conv"), 1)?)
                } else {
                    break;
                };
                layers.push(layer);
            }
            Ok(layers)
        };
        let blocks = |name: &str, from: usize| -> Result<Vec<Vec<Layer>>> {
            let mut out = Vec::new();
            for i in from.. {
                let layers = block(format!("{name}.{i}"))?;
                if layers.is_empty() {
                    break;
                }
                out.push(layers);
            }
            Ok(out)
        };
        let middle = {
            let mut layers = Vec::new();
            for k in 0..3 {
                let p = format!("middle_block.{k}");
                layers.push(match k {
                    1 => Layer::Attention(SpatialTransformer::load(w, &p, config)?),
                    _ => Layer::Res(UnetResBlock::load(w, &p, config.groups)?),
                });
            }
            layers
        };
        let label_emb = match vector_width_of(w)? {
            Some(_) => Some((
                Linear::load(w, PART, "label_emb.0.0")?,
                Linear::load(w, PART, "label_emb.0.2")?,
            )),
            None => None,
        };
        let to_k = "middle_block.1.transformer_blocks.0.attn2.to_k.weight";
        let context_width = w
            .shape(PART, to_k)
            .and_then(|s| s.get(1).copied())
            .ok_or_else(|| Error::bad_tensor(&w.checkpoint().root, to_k, "missing"))?;
        Ok(Unet {
            placement: w.placement().clone(),
            model_channels: time_shape[1],
            context_width,
            time_1: Linear::load(w, PART, "time_embed.0")?,
            time_2: Linear::load(w, PART, "time_embed.2")?,
            label_emb,
            conv_in: Conv2d::load(w, PART, "input_blocks.0.0", 1)?,
            input_blocks: blocks("input_blocks", 1)?,
            middle,
            output_blocks: blocks("output_blocks", 0)?,
            norm_out: GroupNorm::load(w, PART, "out.0", config.groups, 1e-5)?,
            conv_out: Conv2d::load(w, PART, "out.2", 1)?,
        })
    }

    /// The model's output (ε or v) for latents `x` `[batch, 4, h, w]` at (fractional) timesteps
    /// `t` (one per batch item), attending to `context` `[batch, tokens, width]`.
    pub fn forward(&self, x: &Tensor, t: &[f32], context: &Tensor) -> Result<Tensor> {
        self.forward_with_vector(x, t, context, None)
    }

    /// [`Unet::forward`] with SDXL's vector input `y` (`[batch, vector_width]`), which a UNet with
    /// a class embedding needs and one without refuses.
    pub fn forward_with_vector(
        &self,
        x: &Tensor,
        t: &[f32],
        context: &Tensor,
        vector: Option<&Tensor>,
    ) -> Result<Tensor> {
        match (&self.label_emb, vector) {
            (Some(_), None) => Err(Error::Invalid(
                "the UNet has a class embedding (SDXL) and needs its vector input".into(),
            )),
            (None, Some(_)) => Err(Error::Invalid(
                "the UNet has no class embedding for a vector input".into(),
            )),
            _ => self
                .run(x, t, context, vector)
                .map_err(|e| candle_error("UNet", e)),
        }
    }

    pub fn context_width(&self) -> usize {
        self.context_width
    }

    /// The width of the vector input `y` the class embedding reads (SDXL: 2816); `None` without one.
    pub fn vector_width(&self) -> Option<usize> {
        self.label_emb.as_ref().map(|(l1, _)| l1.in_features())
    }

    /// A1111's test for a v-prediction SD2 UNet (`sd_models_config.is_using_v_parameterization_for_sd2`,
    /// run when it loads an SD2 checkpoint without a config beside it): the mean of
    /// `unet(x, 999, c) − x` for `x` = 0.5 everywhere (`[1, 4, 8, 8]`) and `c` = 0.5 everywhere
    /// (`[1, 2, width]`). [`prediction_from_probe`] turns it into A1111's decision.
    pub fn a1111_v_probe(&self) -> Result<f32> {
        let probe = || -> candle_core::Result<f32> {
            let x = Tensor::full(0.5f32, (1, 4, 8, 8), &Device::Cpu)?;
            let context = Tensor::full(0.5f32, (1, 2, self.context_width), &Device::Cpu)?;
            let out = self
                .run(&x, &[999.0], &context, None)?
                .to_dtype(candle_core::DType::F32)?
                .to_device(&Device::Cpu)?;
            (out - x)?.mean_all()?.to_scalar::<f32>()
        };
        probe().map_err(|e| candle_error("UNet (v-prediction probe)", e))
    }

    fn run(
        &self,
        x: &Tensor,
        t: &[f32],
        context: &Tensor,
        vector: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (x, context) = (self.placement.place(x)?, self.placement.place(context)?);
        let context = &context;
        let t_emb = Tensor::from_vec(
            timestep_embedding(t, self.model_channels),
            (t.len(), self.model_channels / 2 * 2),
            &Device::Cpu,
        )?;
        let t_emb = self.placement.place(&t_emb)?;
        let mut emb = self.time_2.forward(&self.time_1.forward(&t_emb)?.silu()?)?;
        if let (Some((l1, l2)), Some(y)) = (&self.label_emb, vector) {
            let y = self.placement.place(y)?;
            emb = (emb + l2.forward(&l1.forward(&y)?.silu()?)?)?;
        }
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for layers in &self.input_blocks {
            for layer in layers {
                h = layer.forward(&h, &emb, context)?;
            }
            skips.push(h.clone());
        }
        for layer in &self.middle {
            h = layer.forward(&h, &emb, context)?;
        }
        for layers in &self.output_blocks {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("more output than input blocks".into()))?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            for layer in layers {
                h = layer.forward(&h, &emb, context)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// The width of the UNet's vector input (SDXL's `y`, read by `label_emb.0.0`), from the weights
/// alone; `None` for a UNet without one (SD1, SD2). An SDXL checkpoint without it is refused
/// rather than rendered without its pooled text and size conditioning.
pub fn vector_width_of(w: &Weights) -> Result<Option<usize>> {
    match w.shape(PART, "label_emb.0.0.weight") {
        Some(shape) if shape.len() == 2 => Ok(Some(shape[1])),
        Some(shape) => Err(Error::bad_tensor(
            &w.checkpoint().root,
            "model.diffusion_model.label_emb.0.0.weight",
            format!("shape {shape:?}, not a linear layer's"),
        )),
        None if w.checkpoint().family() == BaseModel::Sdxl => Err(Error::bad_file(
            &w.checkpoint().root,
            "an SDXL checkpoint whose UNet has no class embedding (model.diffusion_model.label_emb.0.0 missing)",
        )),
        None => Ok(None),
    }
}

/// LDM's (and sgm's) `timestep_embedding` of each value, `dim` wide: `[cos(v·f), sin(v·f)]` with
/// `f_i = 10000^(−i/half)`, in f32 as torch computes it. The UNet embeds its timestep with it and
/// SDXL each of its size and crop numbers (256 wide).
pub fn timestep_embedding(values: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f32).ln() * i as f32 / half as f32).exp())
        .collect();
    let mut emb = Vec::with_capacity(values.len() * half * 2);
    for &v in values {
        emb.extend(freqs.iter().map(|f| (v * f).cos()));
        emb.extend(freqs.iter().map(|f| (v * f).sin()));
    }
    emb
}

/// A1111's decision from [`Unet::a1111_v_probe`]: v-prediction when the mean is below −1.
pub fn prediction_from_probe(probe: f32) -> Prediction {
    match probe < -1.0 {
        true => Prediction::V,
        false => Prediction::Epsilon,
    }
}
