//! The CLIP text encoders of SD1 (CLIP-L), SD2 (OpenCLIP-H) and SDXL (CLIP-L and OpenCLIP-bigG),
//! HF CLIP names, on candle tensors: token and position embeddings, pre-norm causal self-attention
//! layers, MLPs (quick GELU for CLIP-L, GELU for OpenCLIP), the final layer norm, the hidden state
//! A1111 conditions on (clip skip for SD1's CLIP-L; the penultimate layer for OpenCLIP and for
//! SDXL, whatever the clip-skip setting), and SDXL's pooled, projected embedding.
//!
//! Written here rather than taken from candle-transformers: the preview needs the hidden states of
//! any layer (clip skip), token embeddings it can replace (textual inversion), and the same
//! module for OpenCLIP checkpoints whose weights come in another shape (the weights map them to
//! HF names); the model is small next to the UNet, so candle's own matmul and softmax are enough.

use super::layers::{multi_head_attention, LayerNorm, Linear};
use super::tokenizer::{ClipPadding, PromptChunk};
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
    /// Which of the checkpoint's text encoders.
    pub part: Part,
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
    /// Whether the states a prompt is conditioned on pass through the final layer norm: yes for
    /// SD1 and SD2; SDXL's embedders hand over the penultimate layer's states as they are (sgm's
    /// `FrozenCLIPEmbedder(layer="hidden", layer_idx=11)`, `FrozenOpenCLIPEmbedder2(layer=
    /// "penultimate", legacy=False)`).
    pub final_layer_norm: bool,
}

impl ClipConfig {
    /// From the checkpoint's shapes and kind. `heads` is the family's rule (64-wide heads: CLIP-L
    /// has 12, OpenCLIP-H 16) unless given (tiny and non-standard models come with a config). The
    /// encoder is OpenCLIP when the single file stores it under OpenCLIP's names (SD2's
    /// `cond_stage_model.model.`), when the checkpoint is SD2 (a pipeline's UNet with linear
    /// projections) or when the width is OpenCLIP-H's 1024; else CLIP-L.
    pub fn infer(weights: &Weights, heads: Option<usize>) -> Result<ClipConfig> {
        Self::infer_part(weights, Part::ClipTextEncoder, heads)
    }

    /// [`ClipConfig::infer`] for one of the checkpoint's text encoders. An SDXL checkpoint's
    /// encoders condition on their penultimate layer's states without the final layer norm,
    /// whatever the clip-skip setting (A1111's `sdxl_clip_l_skip` is off by default); its second
    /// encoder is OpenCLIP-bigG.
    pub fn infer_part(weights: &Weights, part: Part, heads: Option<usize>) -> Result<ClipConfig> {
        let which = match part {
            Part::ClipTextEncoder2 => "second CLIP text encoder",
            _ => "CLIP text encoder",
        };
        let missing = |what: &str| {
            Error::bad_file(
                &weights.checkpoint().root,
                format!("no {which} ({what} missing)"),
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
            part,
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
            final_layer_norm: true,
        };
        if weights.checkpoint().family() == BaseModel::Sdxl {
            let config = match part {
                Part::ClipTextEncoder2 => config.openclip(),
                _ => config,
            };
            return Ok(ClipConfig {
                fixed_clip_skip: Some(2),
                final_layer_norm: false,
                ..config
            });
        }
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

/// A1111's "Original" emphasis (`EmphasisOriginal.after_transformers`) on one window's states
/// `z` (`[1, positions, width]`): each token's states times its multiplier, then rescaled so that
/// their mean is the unweighted states' mean again. In f32, as A1111 (torch promotes its list of
/// floats' product with half-precision states).
fn original_emphasis(z: &Tensor, multipliers: &[f64]) -> candle_core::Result<Tensor> {
    let z = z.to_dtype(DType::F32)?;
    let m: Vec<f32> = multipliers.iter().map(|m| *m as f32).collect();
    let m = Tensor::from_vec(m, (1, multipliers.len(), 1), z.device())?;
    let original_mean = z.mean_all()?;
    let weighted = z.broadcast_mul(&m)?;
    let new_mean = weighted.mean_all()?;
    weighted.broadcast_mul(&(original_mean / new_mean)?)
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
    /// SDXL's OpenCLIP `text_projection` (a linear layer without bias, HF's layout): what the
    /// pooled embedding goes through.
    projection: Option<Linear>,
    /// `[positions, positions]`: 0 on and below the diagonal, −∞ above (causal attention).
    causal_mask: Tensor,
}

impl ClipTextEncoder {
    pub fn load(w: &Weights, config: ClipConfig) -> Result<ClipTextEncoder> {
        let part = config.part;
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
            projection: match part == Part::ClipTextEncoder2 {
                true => Some(Linear::load(w, part, "text_projection")?),
                false => None,
            },
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

    /// One window's token embeddings (`[1, positions, hidden]`) with textual-inversion vectors at
    /// their slots, cut at the window's end (A1111's `EmbeddingsWithFixes`): `tables[i]` holds this
    /// encoder's vectors of the window's embedding `i` (`EmbeddingSlot::embedding`).
    pub fn embed_chunk(&self, chunk: &PromptChunk, tables: &[&[Vec<f32>]]) -> Result<Tensor> {
        let table = self.embed_tokens(std::slice::from_ref(&chunk.tokens))?;
        if chunk.embeddings.is_empty() {
            return Ok(table);
        }
        let (_, positions, width) = table.dims3().map_err(|e| candle_error("tokens", e))?;
        let mut rows = table
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| candle_error("tokens", e))?;
        for slot in &chunk.embeddings {
            for (k, v) in tables[slot.embedding].iter().enumerate() {
                let at = slot.position + k;
                if at < positions && v.len() == width {
                    rows[at * width..(at + 1) * width].copy_from_slice(v);
                }
            }
        }
        Tensor::from_vec(rows, (1, positions, width), &Device::Cpu)
            .map_err(|e| candle_error("tokens", e))
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
        original_emphasis(&z, multipliers).map_err(|e| candle_error("emphasis", e))
    }

    /// One window as SDXL's second embedder hands it over: the states with A1111's emphasis (as
    /// [`ClipTextEncoder::encode_weighted_embeddings`]) and the pooled embedding `[1, embed]`,
    /// unweighted: the final layer norm of the last layer's output at the window's first
    /// end-of-text token (sgm's `pool`: the argmax of the ids), times `text_projection`.
    /// `tokens` are the window's ids (where textual inversion replaced embeddings, 0).
    pub fn encode_weighted_pooled(
        &self,
        embeddings: &Tensor,
        tokens: &[u32],
        multipliers: &[f64],
        clip_skip: usize,
    ) -> Result<(Tensor, Tensor)> {
        let projection = self.projection.as_ref().ok_or_else(|| {
            Error::Invalid("this text encoder has no text projection (no pooled output)".into())
        })?;
        let positions = embeddings
            .dim(1)
            .map_err(|e| candle_error("embeddings", e))?;
        if multipliers.len() != positions || tokens.len() != positions {
            return Err(Error::Invalid(format!(
                "{} emphasis multipliers and {} tokens for {positions} embeddings",
                multipliers.len(),
                tokens.len()
            )));
        }
        let keep = self.layers_for(clip_skip)?;
        let run = || -> candle_core::Result<(Tensor, Tensor)> {
            let (kept, last) = self.hidden_states(embeddings, keep, true)?;
            let z = self.conditioning_states(kept)?;
            let last = last.expect("asked for the last layer");
            // The first position holding the largest id (torch's argmax).
            let eot = (0..tokens.len())
                .fold(0, |best, i| if tokens[i] > tokens[best] { i } else { best });
            let pooled = projection.forward(&self.final_norm.forward(&last.narrow(1, eot, 1)?)?)?;
            let width = pooled.dim(2)?;
            Ok((
                original_emphasis(&z, multipliers)?,
                pooled.reshape((1, width))?.to_dtype(DType::F32)?,
            ))
        };
        run().map_err(|e| candle_error("text encoder", e))
    }

    /// [`ClipTextEncoder::encode`] from token embeddings.
    pub fn encode_embeddings(&self, embeddings: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let keep = self.layers_for(clip_skip)?;
        self.hidden_states(embeddings, keep, false)
            .and_then(|(kept, _)| self.conditioning_states(kept))
            .map_err(|e| candle_error("text encoder", e))
    }

    /// How many layers run for A1111's clip skip.
    fn layers_for(&self, clip_skip: usize) -> Result<usize> {
        if clip_skip == 0 || clip_skip > self.config.layers {
            return Err(Error::Invalid(format!(
                "clip skip {clip_skip}: this text encoder has {} layers (1 to {} allowed)",
                self.config.layers, self.config.layers
            )));
        }
        Ok(self.config.layers + 1 - clip_skip)
    }

    /// The states conditioned on from the hidden states kept: through the final layer norm or not.
    fn conditioning_states(&self, kept: Tensor) -> candle_core::Result<Tensor> {
        match self.config.final_layer_norm {
            true => self.final_norm.forward(&kept),
            false => Ok(kept),
        }
    }

    /// The hidden states after `keep` layers (`[batch, positions, hidden]`, no final norm) and,
    /// when `to_last`, the last layer's output as well.
    fn hidden_states(
        &self,
        embeddings: &Tensor,
        keep: usize,
        to_last: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
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
        let run = match to_last {
            true => self.layers.len(),
            false => keep,
        };
        let mut kept = None;
        for (i, layer) in self.layers[..run].iter().enumerate() {
            if i == keep {
                kept = Some(x.clone());
            }
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
        let last = tokens(x)?;
        match kept {
            Some(k) => Ok((tokens(k)?, Some(last))),
            None => Ok((last.clone(), to_last.then_some(last))),
        }
    }
}
