//! One txt2img render as A1111 runs it: the sampler drives the UNet (prompt and negative prompt in
//! one batch, as A1111's `CFGDenoiser`; SDXL's vector input beside the text states), then the VAE
//! decodes `latent / scaling_factor` (the family's) and A1111's pixel rule makes the image.

use super::png::{ChannelLayout, RgbImage};
use super::sampling::{
    sample, Latent, ModelOutput, NoisePredictor, NoiseSchedule, Prediction, SamplerSettings,
    StepObserver,
};
use super::unet::Unet;
use super::vae::VaeDecoder;
use super::weights::candle_error;
use crate::family::BaseModel;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// SD1/SD2's latent scaling factor.
pub const SD_SCALING_FACTOR: f32 = 0.18215;
/// SDXL's latent scaling factor (its VAE's `scaling_factor`; sgm's `scale_factor`).
pub const SDXL_SCALING_FACTOR: f32 = 0.13025;

/// The latent scaling factor of a checkpoint family.
pub fn scaling_factor(family: BaseModel) -> f32 {
    match family {
        BaseModel::Sdxl => SDXL_SCALING_FACTOR,
        _ => SD_SCALING_FACTOR,
    }
}

/// What the UNet is conditioned on for one prompt: its text states (`[1, tokens, width]`) and,
/// for SDXL, the vector input `y` (`[1, vector width]`: the pooled text embedding and the size
/// embeddings, `sdxl::vector`).
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub context: Tensor,
    pub vector: Option<Tensor>,
}

impl From<Tensor> for Conditioning {
    /// Text states alone (SD1, SD2).
    fn from(context: Tensor) -> Self {
        Conditioning {
            context,
            vector: None,
        }
    }
}

/// The UNet as the sampler's [`NoisePredictor`]: the prompt's conditioning and, with CFG, the
/// negative prompt's. With the same token count both run in one batch (A1111's `CFGDenoiser`);
/// with different counts (a prompt of more 75-token windows than its negative, or fewer) each runs
/// on its own, as A1111 does by default (its "Pad prompt/negative prompt" option off).
pub struct UnetPredictor<'a> {
    unet: &'a Unet,
    /// One entry per UNet call: the conditioning batched for it, and how many images it holds.
    calls: Vec<(Tensor, Option<Tensor>, usize)>,
    guided: bool,
}

impl<'a> UnetPredictor<'a> {
    pub fn new(unet: &'a Unet, cond: &Conditioning, uncond: Option<&Conditioning>) -> Result<Self> {
        if let Some(u) = uncond {
            if cond.vector.is_some() != u.vector.is_some() {
                return Err(Error::Invalid(
                    "the prompt and the negative prompt differ in having a vector input".into(),
                ));
            }
        }
        let tokens =
            |c: &Conditioning| c.context.dim(1).map_err(|e| candle_error("text states", e));
        let calls = match uncond {
            Some(u) if tokens(u)? == tokens(cond)? => {
                let cat = |a: &Tensor, b: &Tensor, what: &str| {
                    Tensor::cat(&[a, b], 0).map_err(|e| candle_error(what, e))
                };
                let context = cat(
                    &cond.context,
                    &u.context,
                    "the prompt's and the negative prompt's text states",
                )?;
                let vector = match (&cond.vector, &u.vector) {
                    (Some(c), Some(v)) => Some(cat(c, v, "the vector inputs")?),
                    _ => None,
                };
                vec![(context, vector, 2)]
            }
            Some(u) => vec![
                (cond.context.clone(), cond.vector.clone(), 1),
                (u.context.clone(), u.vector.clone(), 1),
            ],
            None => vec![(cond.context.clone(), cond.vector.clone(), 1)],
        };
        Ok(UnetPredictor {
            unet,
            calls,
            guided: uncond.is_some(),
        })
    }
}

impl NoisePredictor for UnetPredictor<'_> {
    fn predict(&mut self, input: &Latent, timestep: f32) -> Result<ModelOutput> {
        let mut shape = vec![1];
        shape.extend_from_slice(input.shape());
        let x = Tensor::from_vec(input.values().to_vec(), shape, &Device::Cpu)
            .map_err(|e| candle_error("latent", e))?;
        let mut values = Vec::with_capacity(input.values().len() * 2);
        for (context, vector, batch) in &self.calls {
            let x = match batch {
                2 => Tensor::cat(&[&x, &x], 0).map_err(|e| candle_error("latent", e))?,
                _ => x.clone(),
            };
            let out = self.unet.forward_with_vector(
                &x,
                &vec![timestep; *batch],
                context,
                vector.as_ref(),
            )?;
            values.extend(
                out.flatten_all()
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| candle_error("UNet output", e))?,
            );
        }
        let n = input.values().len();
        Ok(match self.guided {
            true => ModelOutput {
                uncond: Some(values[n..].to_vec()),
                cond: {
                    values.truncate(n);
                    values
                },
            },
            false => ModelOutput {
                cond: values,
                uncond: None,
            },
        })
    }
}

/// What a render needs besides the models.
pub struct RenderSettings {
    pub sampler: SamplerSettings,
    pub width: u32,
    pub height: u32,
    pub prediction: Prediction,
    pub scaling_factor: f32,
}

/// Samples and decodes one image. Sizes must be multiples of 8 (the latent is 1/8 of the image).
pub fn render(
    unet: &Unet,
    vae: &VaeDecoder,
    schedule: &NoiseSchedule,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    settings: &RenderSettings,
    on_step: &mut StepObserver,
) -> Result<(Latent, RgbImage)> {
    let latent = sample_latent(unet, schedule, cond, uncond, settings, on_step)?;
    let image = decode_latent(vae, &latent, settings)?;
    Ok((latent, image))
}

/// The sampling half of [`render`]: the final latent, before the VAE. Kept apart so a caller can
/// drop the UNet before it loads the VAE (peak memory is the larger model, not both).
pub fn sample_latent(
    unet: &Unet,
    schedule: &NoiseSchedule,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    settings: &RenderSettings,
    on_step: &mut StepObserver,
) -> Result<Latent> {
    let (w, h) = (settings.width, settings.height);
    if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 {
        return Err(Error::Invalid(format!(
            "size {w}x{h}: width and height must be positive multiples of 8"
        )));
    }
    let shape = [4, (h / 8) as usize, (w / 8) as usize];
    let mut model = UnetPredictor::new(unet, cond, uncond)?;
    sample(
        &settings.sampler,
        schedule,
        settings.prediction,
        &shape,
        &mut model,
        on_step,
    )
}

/// The decoding half of [`render`]: `vae.decode(latent / scaling_factor)` and A1111's pixel rule.
pub fn decode_latent(
    vae: &VaeDecoder,
    latent: &Latent,
    settings: &RenderSettings,
) -> Result<RgbImage> {
    let shape = latent.shape();
    let scaled: Vec<f32> = latent
        .values()
        .iter()
        .map(|v| v / settings.scaling_factor)
        .collect();
    let z = Tensor::from_vec(scaled, (1, shape[0], shape[1], shape[2]), &Device::Cpu)
        .map_err(|e| candle_error("latent", e))?;
    let decoded = vae
        .decode(&z)?
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| candle_error("decoded image", e))?;
    RgbImage::from_decoded(
        &decoded,
        settings.width,
        settings.height,
        ChannelLayout::Chw,
    )
}
