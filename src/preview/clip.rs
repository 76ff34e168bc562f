//! The CLIP text encoders of SD1 (CLIP-L) and SD2 (OpenCLIP-H), HF CLIP names, on candle
//! tensors: token and position embeddings, pre-norm causal self-attention layers, MLPs (quick
//! GELU for CLIP-L, GELU for OpenCLIP), the final layer norm, and the hidden state A1111 conditions
//! on (clip skip for CLIP-L; OpenCLIP's penultimate layer, whatever the clip-skip setting).
//!
//! Written here rather than taken from candle-transformers: the preview needs the hidden states of
//! any layer (clip skip), token embeddings it can replace (textual inversion), and the same
//! module for OpenCLIP checkpoints whose weights come in another shape (the weights map them to
//! HF names); the model is small next to the UNet, so candle's own matmul and softmax are enough.

use super::layers::{multi_head_attention, LayerNorm, Linear};
use super::tokenizer::ClipPadding;
use super::weights::{candle_error, Part, Weights};
use crate::family::parts::{clip_encoder_of_width, Encoder};
use crate::family::BaseModel;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(1.702·x)`, as OpenAI's CLIP-L was trained (HF `quick_gelu`).
    QuickGelu,
    /// GELU with erf, as OpenCLIP's towers use it (HF `gelu`).
    Gelu,
}

/// The text encoder's size and the A1111 conventions of its kind; the sizes but the head count are
/// read from the weights' shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub positions: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    /// What A1111 pads a window with after its end token (`id_pad`): the end token for CLIP-L, 0
    /// for OpenCLIP (`sd_hijack_open_clip`; `process_tokens` zeroes everything after the first
    /// end token).
    pub padding: ClipPadding,
    /// The clip skip A1111 uses whatever its setting, when it ignores the setting: SD2's OpenCLIP
    /// (`sd_hijack_open_clip.encode_with_transformers` never reads `CLIP_stop_at_last_layers`;
    /// LDM's `FrozenOpenCLIPEmbedder` stops at the penultimate layer, then `ln_final`). 2 for a
    /// single file's full 24-layer tower; 1 for a pipeline's 23-layer text encoder, whose last
    /// layer diffusers' converter dropped. `None`: the setting applies (CLIP-L).
    pub fixed_clip_skip: Option<usize>,
}

impl ClipConfig {
    /// From the checkpoint's shapes and kind. `heads` is the family's rule (64-wide heads: CLIP-L
    /// has 12, OpenCLIP-H 16) unless given (tiny and non-standard models come with a config). The
    /// encoder is OpenCLIP when the single file stores it under OpenCLIP's names (SD2's
    /// `cond_stage_model.model.`), when the checkpoint is SD2 (a pipeline's UNet with linear
    /// projections) or when the width is OpenCLIP-H's 1024; else CLIP-L.
    pub fn infer(weights: &Weights, heads: Option<usize>) -> Result<ClipConfig> {
        let part = Part::ClipTextEncoder;
        let missing = |what: &str| {
            Error::bad_file(
                &weights.checkpoint().root,
                format!("no CLIP text encoder ({what} missing)"),
            )
        };
        let tok = weights
            .shape(part, "text_model.embeddings.token_embedding.weight")
            .ok_or_else(|| missing("token embedding"))?;
        let pos = weights
            .shape(part, "text_model.embeddings.position_embedding.weight")
            .ok_or_else(|| missing("position embedding"))?;
        let fc1 = weights
            .shape(part, "text_model.encoder.layers.0.mlp.fc1.weight")
            .ok_or_else(|| missing("layer 0"))?;
        let layers = (0..)
            .take_while(|i| {
                weights.has(
                    part,
                    &format!("text_model.encoder.layers.{i}.self_attn.q_proj.weight"),
                )
            })
            .count();
        let hidden = tok[1];
        let heads = heads.unwrap_or(hidden / 64).max(1);
        if hidden % heads != 0 {
            return Err(Error::bad_file(
                &weights.checkpoint().root,
                format!("text encoder width {hidden} does not split into {heads} heads"),
            ));
        }
        let config = ClipConfig {
            vocab: tok[0],
            hidden,
            intermediate: fc1[0],
            layers,
            heads,
            positions: pos[0],
            layer_norm_eps: 1e-5,
            activation: Activation::QuickGelu,
            padding: ClipPadding::EndOfText,
            fixed_clip_skip: None,
        };
        if weights.text_encoder_is_openclip() {
            return Ok(ClipConfig {
                fixed_clip_skip: Some(2),
                ..config.openclip()
            });
        }
        let openclip = weights.checkpoint().family() == BaseModel::Sd2
            || clip_encoder_of_width(hidden) == Some(Encoder::OpenclipH);
        Ok(match openclip {
            true => config.openclip(),
            false => config,
        })
    }

    /// The same sizes as an OpenCLIP encoder under HF names, SD2's (GELU, padded with 0, the
    /// encoder's last layer whatever the clip-skip setting): what a pipeline's text encoder is when
    /// its config says `hidden_act: gelu` and its width cannot tell.
    pub fn openclip(self) -> ClipConfig {
        ClipConfig {
            activation: Activation::Gelu,
            padding: ClipPadding::Zero,
            fixed_clip_skip: self.fixed_clip_skip.or(Some(1)),
            ..self
        }
    }

    /// The clip skip A1111 conditions on for its setting `requested`.
    pub fn a1111_clip_skip(&self, requested: usize) -> usize {
        self.fixed_clip_skip.unwrap_or(requested)
    }
}

struct Layer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipTextEncoder {
    config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    /// `[positions, positions]`: 0 on and below the diagonal, −∞ above (causal attention).
    causal_mask: Tensor,
}

impl ClipTextEncoder {
    pub fn load(w: &Weights, config: ClipConfig) -> Result<ClipTextEncoder> {
        let part = Part::ClipTextEncoder;
        let eps = config.layer_norm_eps;
        let layers = (0..config.layers)
            .map(|i| {
                let p = format!("text_model.encoder.layers.{i}");
                let linear = |n: &str| Linear::load(w, part, &format!("{p}.{n}"));
                Ok(Layer {
                    norm1: LayerNorm::load(w, part, &format!("{p}.layer_norm1"), eps)?,
                    q: linear("self_attn.q_proj")?,
                    k: linear("self_attn.k_proj")?,
                    v: linear("self_attn.v_proj")?,
                    out: linear("self_attn.out_proj")?,
                    norm2: LayerNorm::load(w, part, &format!("{p}.layer_norm2"), eps)?,
                    fc1: linear("mlp.fc1")?,
                    fc2: linear("mlp.fc2")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n = config.positions;
        let mask: Vec<f32> = (0..n * n)
            .map(|i| match i % n > i / n {
                true => f32::NEG_INFINITY,
                false => 0.0,
            })
            .collect();
        Ok(ClipTextEncoder {
            token_embedding: w.get(part, "text_model.embeddings.token_embedding.weight")?,
            position_embedding: w.get(part, "text_model.embeddings.position_embedding.weight")?,
            final_norm: LayerNorm::load(w, part, "text_model.final_layer_norm", eps)?,
            causal_mask: Tensor::from_vec(mask, (n, n), &Device::Cpu)
                .and_then(|m| w.placement().place(&m))
                .map_err(|e| candle_error("causal mask", e))?,
            layers,
            config,
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The token embeddings of `tokens` (`[sequences][positions]`), `[batch, positions, hidden]`:
    /// what textual-inversion vectors replace before [`ClipTextEncoder::encode_embeddings`].
    pub fn embed_tokens(&self, tokens: &[Vec<u32>]) -> Result<Tensor> {
        let positions = tokens.first().map_or(0, Vec::len);
        if let Some(bad) = tokens
            .iter()
            .flatten()
            .find(|t| **t as usize >= self.config.vocab)
        {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the text encoder's vocabulary of {}",
                self.config.vocab
            )));
        }
        if positions == 0
            || positions > self.config.positions
            || tokens.iter().any(|t| t.len() != positions)
        {
            return Err(Error::Invalid(format!(
                "token sequences must all have the same length, 1 to {}",
                self.config.positions
            )));
        }
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, tokens.len() * positions, &Device::Cpu)
            .and_then(|ids| ids.to_device(self.token_embedding.device()))
            .map_err(|e| candle_error("tokens", e))?;
        self.token_embedding
            .index_select(&ids, 0)
            .and_then(|e| e.reshape((tokens.len(), positions, self.config.hidden)))
            .map_err(|e| candle_error("token embedding", e))
    }

    /// Hidden states for `tokens` with A1111's clip skip (1 = the last layer's output, 2 = the
    /// one before, each through the final layer norm), `[batch, positions, hidden]`.
    pub fn encode(&self, tokens: &[Vec<u32>], clip_skip: usize) -> Result<Tensor> {
        let embeddings = self.embed_tokens(tokens)?;
        self.encode_embeddings(&embeddings, clip_skip)
    }

    /// One 77-token window of a prompt with A1111's "Original" emphasis: the hidden states times
    /// each token's multiplier, then rescaled so that their mean is the unweighted states' mean
    /// again (`sd_hijack_clip.process_tokens`). `[1, positions, hidden]`.
    pub fn encode_weighted(
        &self,
        tokens: &[u32],
        multipliers: &[f64],
        clip_skip: usize,
    ) -> Result<Tensor> {
        if multipliers.len() != tokens.len() {
            return Err(Error::Invalid(format!(
                "{} emphasis multipliers for {} tokens",
                multipliers.len(),
                tokens.len()
            )));
        }
        let embeddings = self.embed_tokens(&[tokens.to_vec()])?;
        self.encode_weighted_embeddings(&embeddings, multipliers, clip_skip)
    }

    /// [`ClipTextEncoder::encode_weighted`] from token embeddings (`[1, positions, hidden]`), where
    /// textual-inversion vectors may have replaced some.
    pub fn encode_weighted_embeddings(
        &self,
        embeddings: &Tensor,
        multipliers: &[f64],
        clip_skip: usize,
    ) -> Result<Tensor> {
        let positions = embeddings
            .dim(1)
            .map_err(|e| candle_error("embeddings", e))?;
        if multipliers.len() != positions {
            return Err(Error::Invalid(format!(
                "{} emphasis multipliers for {positions} tokens",
                multipliers.len()
            )));
        }
        let z = self.encode_embeddings(embeddings, clip_skip)?;
        let weigh = || -> candle_core::Result<Tensor> {
            // A1111 multiplies in float32 (torch's default dtype for its list of floats, which
            // promotes half-precision states too).
            let z = z.to_dtype(DType::F32)?;
            let m: Vec<f32> = multipliers.iter().map(|m| *m as f32).collect();
            let m = Tensor::from_vec(m, (1, positions, 1), z.device())?;
            let original_mean = z.mean_all()?;
            let weighted = z.broadcast_mul(&m)?;
            let new_mean = weighted.mean_all()?;
            weighted.broadcast_mul(&(original_mean / new_mean)?)
        };
        weigh().map_err(|e| candle_error("emphasis", e))
    }

    /// [`ClipTextEncoder::encode`] from token embeddings.
    pub fn encode_embeddings(&self, embeddings: &Tensor, clip_skip: usize) -> Result<Tensor> {
        if clip_skip == 0 || clip_skip > self.config.layers {
            return Err(Error::Invalid(format!(
                "clip skip {clip_skip}: this text encoder has {} layers (1 to {} allowed)",
                self.config.layers, self.config.layers
            )));
        }
        self.run(embeddings, self.config.layers + 1 - clip_skip)
            .map_err(|e| candle_error("text encoder", e))
    }

    fn run(&self, embeddings: &Tensor, layers: usize) -> candle_core::Result<Tensor> {
        let (batch, positions, hidden) = embeddings.dims3()?;
        let pos = self.position_embedding.narrow(0, 0, positions)?;
        let mut x = embeddings
            .to_dtype(pos.dtype())?
            .to_device(pos.device())?
            .broadcast_add(&pos)?
            .reshape((batch * positions, hidden))?;
        let mask = self
            .causal_mask
            .narrow(0, 0, positions)?
            .narrow(1, 0, positions)?;
        let tokens = |t: Tensor| t.reshape((batch, positions, hidden));
        for layer in &self.layers[..layers] {
            let h = layer.norm1.forward(&x)?;
            let attended = multi_head_attention(
                &tokens(layer.q.forward(&h)?)?,
                &tokens(layer.k.forward(&h)?)?,
                &tokens(layer.v.forward(&h)?)?,
                self.config.heads,
                Some(&mask),
            )?
            .reshape((batch * positions, hidden))?;
            x = (x + layer.out.forward(&attended)?)?;
            let h = layer.norm2.forward(&x)?;
            let h = layer.fc1.forward(&h)?;
            let h = match self.config.activation {
                Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
                Activation::Gelu => h.gelu_erf()?,
            };
            x = (x + layer.fc2.forward(&h)?)?;
        }
        self.final_norm
            .forward(&x)?
            .reshape((batch, positions, hidden))
    }
}
