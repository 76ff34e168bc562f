//! SDXL's conditioning as A1111 builds it (`sd_models_xl.get_learned_conditioning` on sgm's
//! `GeneralConditioner`): both text encoders' penultimate states side by side, the pooled and
//! projected embedding of the second encoder, and the size numbers, each embedded like a timestep,
//! in the UNet's vector input `y`.
//!
//! Per 75-token window, each encoder runs on its own ids (CLIP-L padded with the end token,
//! OpenCLIP-bigG with 0 after the first end token) and applies A1111's emphasis to its own states;
//! the two are concatenated along the width (CLIP-L first, sgm's embedder order), the windows
//! along the tokens. The pooled embedding is the first window's, without emphasis
//! (`sd_hijack_clip`'s `zs[0].pooled`).

use super::clip::{ClipConfig, ClipTextEncoder};
use super::embeddings::Embedding;
use super::prompt::{parse_emphasis, PromptPiece};
use super::render::Conditioning;
use super::tokenizer::{ChunkOptions, ClipTokenizer, PromptChunk, TextualInversion};
use super::unet::timestep_embedding;
use super::weights::{candle_error, Part, Weights};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The size and crop numbers an SDXL image is conditioned on, each `(height, width)` /
/// `(top, left)` as sgm's conditioner reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeConditioning {
    pub original: (u32, u32),
    pub crop_top_left: (u32, u32),
    pub target: (u32, u32),
}

impl SizeConditioning {
    /// A1111's: original and target size are the render's own (`height`, `width`), the crop
    /// 0, 0 (its `sdxl_crop_top`/`sdxl_crop_left` settings' defaults). diffusers' pipeline
    /// defaults to the same numbers.
    pub fn of_render(width: u32, height: u32) -> SizeConditioning {
        SizeConditioning {
            original: (height, width),
            crop_top_left: (0, 0),
            target: (height, width),
        }
    }

    /// The six numbers in sgm's embedder order (diffusers' `add_time_ids`): original height and
    /// width, crop top and left, target height and width.
    pub fn time_ids(&self) -> [f32; 6] {
        let (o, c, t) = (self.original, self.crop_top_left, self.target);
        [o.0, o.1, c.0, c.1, t.0, t.1].map(|n| n as f32)
    }
}

/// SDXL's vector input `y` for one prompt (`[1, vector_width]`): the pooled text embedding
/// (`[1, pooled]`), then each of the six size numbers as a [`timestep_embedding`] of
/// `(vector_width − pooled) / 6` values (sgm's `ConcatTimestepEmbedderND`, 256 wide in SDXL;
/// diffusers' `add_time_proj`).
pub fn vector(pooled: &Tensor, sizes: &SizeConditioning, vector_width: usize) -> Result<Tensor> {
    let pooled = pooled
        .to_dtype(DType::F32)
        .and_then(|p| p.to_device(&Device::Cpu))
        .and_then(|p| p.flatten_all())
        .and_then(|p| p.to_vec1::<f32>())
        .map_err(|e| candle_error("pooled text embedding", e))?;
    let rest = vector_width.saturating_sub(pooled.len());
    if rest == 0 || rest % 12 != 0 {
        return Err(Error::Invalid(format!(
            "the UNet's vector input of {vector_width} does not hold a pooled embedding of {} and six even-width size embeddings",
            pooled.len()
        )));
    }
    let mut y = pooled;
    y.extend(timestep_embedding(&sizes.time_ids(), rest / 6));
    Tensor::from_vec(y, (1, vector_width), &Device::Cpu).map_err(|e| candle_error("vector", e))
}

/// SDXL's two text encoders: CLIP-L (`text_encoder`, `conditioner.embedders.0`) and
/// OpenCLIP-bigG (`text_encoder_2`, `conditioner.embedders.1`).
pub struct SdxlTextEncoders {
    pub clip_l: ClipTextEncoder,
    pub clip_g: ClipTextEncoder,
}

/// A prompt's windows for each encoder: the same ids, padded each encoder's way.
pub struct SdxlChunks {
    pub clip_l: Vec<PromptChunk>,
    pub clip_g: Vec<PromptChunk>,
}

impl SdxlTextEncoders {
    /// Both encoders, their sizes from the weights; the head counts the family's rule (64-wide
    /// heads) unless given (tiny models come with configs).
    pub fn load(
        weights: &Weights,
        heads_l: Option<usize>,
        heads_g: Option<usize>,
    ) -> Result<SdxlTextEncoders> {
        let l = ClipConfig::infer_part(weights, Part::ClipTextEncoder, heads_l)?;
        let g = ClipConfig::infer_part(weights, Part::ClipTextEncoder2, heads_g)?;
        Ok(SdxlTextEncoders {
            clip_l: ClipTextEncoder::load(weights, l)?,
            clip_g: ClipTextEncoder::load(weights, g)?,
        })
    }

    /// A1111's windows of a parsed prompt for each encoder (its chunking with each encoder's
    /// padding).
    pub fn chunk(
        &self,
        tokenizer: &ClipTokenizer,
        pieces: &[PromptPiece],
        inversions: &[TextualInversion],
    ) -> Result<SdxlChunks> {
        let chunk = |encoder: &ClipTextEncoder| {
            let options = ChunkOptions::a1111(encoder.config().padding);
            Ok::<_, Error>(tokenizer.chunk(pieces, inversions, &options)?.chunks)
        };
        Ok(SdxlChunks {
            clip_l: chunk(&self.clip_l)?,
            clip_g: chunk(&self.clip_g)?,
        })
    }

    /// A prompt's text states (`[1, 77 · windows, width_l + width_g]`) and pooled embedding
    /// (`[1, pooled]`, the first window's). `tables_l[i]` / `tables_g[i]` are textual-inversion
    /// embedding `i`'s vectors for each encoder (SDXL embeddings' `clip_l` / `clip_g`).
    pub fn encode(
        &self,
        chunks: &SdxlChunks,
        tables_l: &[&[Vec<f32>]],
        tables_g: &[&[Vec<f32>]],
    ) -> Result<(Tensor, Tensor)> {
        if chunks.clip_l.len() != chunks.clip_g.len() || chunks.clip_l.is_empty() {
            return Err(Error::Invalid(format!(
                "{} CLIP-L windows against {} OpenCLIP windows",
                chunks.clip_l.len(),
                chunks.clip_g.len()
            )));
        }
        let skip_l = self.clip_l.config().a1111_clip_skip(2);
        let skip_g = self.clip_g.config().a1111_clip_skip(2);
        let mut windows = Vec::with_capacity(chunks.clip_l.len());
        let mut pooled = None;
        for (l, g) in chunks.clip_l.iter().zip(&chunks.clip_g) {
            let zl = self.clip_l.encode_weighted_embeddings(
                &self.clip_l.embed_chunk(l, tables_l)?,
                &l.multipliers,
                skip_l,
            )?;
            let (zg, p) = self.clip_g.encode_weighted_pooled(
                &self.clip_g.embed_chunk(g, tables_g)?,
                &g.tokens,
                &g.multipliers,
                skip_g,
            )?;
            pooled.get_or_insert(p);
            windows.push(
                Tensor::cat(
                    &[
                        &zl,
                        &zg.to_device(zl.device())
                            .map_err(|e| candle_error("states", e))?,
                    ],
                    2,
                )
                .map_err(|e| candle_error("text states", e))?,
            );
        }
        let states = Tensor::cat(&windows, 1).map_err(|e| candle_error("text states", e))?;
        Ok((states, pooled.expect("at least one window")))
    }
}

impl SdxlTextEncoders {
    /// The width of the textual-inversion embeddings these encoders take: an SDXL embedding's
    /// `clip_l` and `clip_g` widths added (768 + 1280), as A1111 compares them.
    pub fn embedding_width(&self) -> usize {
        self.clip_l.config().hidden + self.clip_g.config().hidden
    }

    /// The prompt's and the negative prompt's conditioning as A1111 hands them to the UNet, and
    /// the indices of the `embeddings` they used (sorted). Each keeps its own window count (the
    /// UNet runs them apart when they differ, A1111's default); an empty negative prompt's
    /// states and pooled embedding are zeroed ([`conditioning`]).
    pub fn condition_pair(
        &self,
        tokenizer: &ClipTokenizer,
        prompt: &str,
        negative: &str,
        embeddings: &[Embedding],
        sizes: &SizeConditioning,
        vector_width: usize,
    ) -> Result<(Conditioning, Conditioning, Vec<usize>)> {
        let inversions: Vec<TextualInversion> =
            embeddings.iter().map(Embedding::inversion).collect();
        let tables_l: Vec<&[Vec<f32>]> = embeddings.iter().map(|e| e.vectors.as_slice()).collect();
        let tables_g: Vec<&[Vec<f32>]> = embeddings
            .iter()
            .map(|e| e.vectors_g.as_deref().unwrap_or(&[]))
            .collect();
        let chunk = |text: &str| self.chunk(tokenizer, &parse_emphasis(text)?, &inversions);
        // Window counts may differ: the UNet then runs the two on their own (A1111's default).
        let cond = chunk(prompt)?;
        let uncond = chunk(negative)?;
        let mut used: Vec<usize> = cond
            .clip_l
            .iter()
            .chain(&uncond.clip_l)
            .flat_map(|c| c.embeddings.iter().map(|s| s.embedding))
            .collect();
        used.sort_unstable();
        used.dedup();
        let (states, pooled) = self.encode(&cond, &tables_l, &tables_g)?;
        let cond = conditioning(states, pooled, sizes, vector_width, false)?;
        let (states, pooled) = self.encode(&uncond, &tables_l, &tables_g)?;
        let uncond = match negative.is_empty() {
            true => {
                let zeroed = states
                    .zeros_like()
                    .map_err(|e| candle_error("text states", e))?;
                let pooled = pooled
                    .zeros_like()
                    .map_err(|e| candle_error("pooled text embedding", e))?;
                conditioning(zeroed, pooled, sizes, vector_width, false)?
            }
            false => conditioning(states, pooled, sizes, vector_width, false)?,
        };
        Ok((cond, uncond, used))
    }
}

/// One prompt's conditioning: its text states and its vector (`vector_width`: the UNet's).
/// `zeroed`: the negative prompt is empty, and A1111 zeroes both text encoders' outputs, the
/// states and the pooled embedding (`force_zero_embeddings=['txt']`), while the size embeddings
/// stay (diffusers zeroes the same parts when no negative prompt is given at all).
pub fn conditioning(
    states: Tensor,
    pooled: Tensor,
    sizes: &SizeConditioning,
    vector_width: usize,
    zeroed: bool,
) -> Result<Conditioning> {
    let zero = |t: Tensor| match zeroed {
        true => t.zeros_like(),
        false => Ok(t),
    };
    let states = zero(states).map_err(|e| candle_error("text states", e))?;
    let pooled = zero(pooled).map_err(|e| candle_error("pooled text embedding", e))?;
    Ok(Conditioning {
        context: states,
        vector: Some(vector(&pooled, sizes, vector_width)?),
    })
}
