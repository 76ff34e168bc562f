//! The parts of a model file as a curator counts them — denoiser, text encoders (and which encoder
//! each is), VAE, EMA copy — told from key prefixes and shapes. Wider than `Component`, which
//! lists only the parts LoRAs patch.

use super::layout::{Content, Layout, LDM_DENOISER, LDM_VAE};
use super::Component;
use crate::tensors::TensorInfo;
use serde::Serialize;

/// A part of a model file. Text encoders are named as diffusers names them by encoder: CLIP-L and
/// OpenCLIP-H are `text_encoder`, OpenCLIP-bigG `text_encoder_2`, T5 `text_encoder_3` (SD3's
/// order); inside a pipeline folder the folder names the part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Unet,
    Transformer,
    TextEncoder,
    #[serde(rename = "text_encoder_2")]
    TextEncoder2,
    #[serde(rename = "text_encoder_3")]
    TextEncoder3,
    Vae,
    Embedding,
    /// The LDM trainer's EMA copy of the UNet (`model_ema.`).
    Ema,
    /// Tensors of no part: noise-schedule buffers (`alphas_cumprod`, …), markers (`v_pred`).
    Other,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Unet => "unet",
            Part::Transformer => "transformer",
            Part::TextEncoder => "text_encoder",
            Part::TextEncoder2 => "text_encoder_2",
            Part::TextEncoder3 => "text_encoder_3",
            Part::Vae => "vae",
            Part::Embedding => "embedding",
            Part::Ema => "ema",
            Part::Other => "other",
        }
    }

    pub fn is_denoiser(self) -> bool {
        matches!(self, Part::Unet | Part::Transformer)
    }

    pub fn is_text_encoder(self) -> bool {
        matches!(
            self,
            Part::TextEncoder | Part::TextEncoder2 | Part::TextEncoder3
        )
    }
}

impl From<Component> for Part {
    fn from(c: Component) -> Part {
        match c {
            Component::Unet => Part::Unet,
            Component::Transformer => Part::Transformer,
            Component::TextEncoder => Part::TextEncoder,
            Component::TextEncoder2 => Part::TextEncoder2,
            Component::TextEncoder3 => Part::TextEncoder3,
        }
    }
}

/// Which text encoder a text-encoder part is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoder {
    /// OpenAI CLIP ViT-L/14 (SD1, SDXL's first, SD3's and Flux's CLIP), width 768.
    ClipL,
    /// OpenCLIP ViT-H/14 (SD2), width 1024.
    OpenclipH,
    /// OpenCLIP ViT-bigG/14 (SDXL's second, the refiner's only one, SD3's `clip_g`), width 1280.
    OpenclipBigg,
    /// T5 v1.1 XXL encoder (SD3, Flux).
    T5,
}

impl Encoder {
    pub fn name(self) -> &'static str {
        match self {
            Encoder::ClipL => "clip_l",
            Encoder::OpenclipH => "openclip_h",
            Encoder::OpenclipBigg => "openclip_bigg",
            Encoder::T5 => "t5",
        }
    }

    /// As people write it.
    pub fn describe(self) -> &'static str {
        match self {
            Encoder::ClipL => "CLIP-L",
            Encoder::OpenclipH => "OpenCLIP-H",
            Encoder::OpenclipBigg => "OpenCLIP-bigG",
            Encoder::T5 => "T5",
        }
    }

    /// The part a single file's text encoder is, named by encoder.
    fn part(self) -> Part {
        match self {
            Encoder::ClipL | Encoder::OpenclipH => Part::TextEncoder,
            Encoder::OpenclipBigg => Part::TextEncoder2,
            Encoder::T5 => Part::TextEncoder3,
        }
    }
}

/// One part of a model file and the indices (into the file's tensor list) of its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePart {
    pub part: Part,
    pub encoder: Option<Encoder>,
    pub tensors: Vec<usize>,
}

/// The prefix of the EMA copy that LDM/SGM trainers save beside the weights.
pub const LDM_EMA: &str = "model_ema.";

/// Text-encoder slots of single files: SD1/SD2 `cond_stage_model.`, SGM
/// `conditioner.embedders.N.`, ComfyUI's SD3/Flux `text_encoders.<name>.`.
fn text_encoder_slot(name: &str) -> Option<&str> {
    if name.starts_with("cond_stage_model.") {
        return Some("cond_stage_model.");
    }
    for root in ["conditioner.embedders.", "text_encoders."] {
        if let Some(rest) = name.strip_prefix(root) {
            let end = root.len() + rest.find('.')? + 1;
            return Some(&name[..end]);
        }
    }
    None
}

/// Tensors some tools add beside the weights to mark how the model is sampled.
fn is_marker(name: &str) -> bool {
    matches!(name, "v_pred" | "ztsnr" | "edm_mean" | "edm_std") || name.starts_with("edm_vpred.")
}

/// Splits a file's tensors into its parts, ordered by part; `content` is what
/// `layout::detect` found (a file it found nothing in is one `Other` part).
pub fn parts(tensors: &[TensorInfo], content: Option<Content>) -> Vec<FilePart> {
    let whole = |part: Part, encoder: Option<Encoder>| {
        vec![FilePart {
            part,
            encoder,
            tensors: (0..tensors.len()).collect(),
        }]
    };
    match content {
        None => return whole(Part::Other, None),
        Some(Content::Vae) => return whole(Part::Vae, None),
        Some(Content::Embedding) => return whole(Part::Embedding, None),
        Some(Content::Model(Layout::DiffusersComponent(c))) => {
            let encoder = c.is_text_encoder().then(|| {
                hf_encoder(tensors.iter(), "").unwrap_or(match c {
                    Component::TextEncoder2 => Encoder::OpenclipBigg,
                    Component::TextEncoder3 => Encoder::T5,
                    _ => Encoder::ClipL,
                })
            });
            return whole(c.into(), encoder);
        }
        Some(Content::Model(Layout::SingleFile)) => {}
    }

    let mut out: Vec<(Part, Vec<usize>)> = Vec::new();
    let mut push = |part: Part, i: usize| match out.iter_mut().find(|(p, _)| *p == part) {
        Some(entry) => entry.1.push(i),
        None => out.push((part, vec![i])),
    };

    let has = |p: &str| tensors.iter().any(|t| t.name.starts_with(p));
    let dit = ["double_blocks.", "joint_blocks."]
        .iter()
        .any(|b| has(&format!("{LDM_DENOISER}{b}")));
    let denoiser = if dit { Part::Transformer } else { Part::Unet };
    // BFL Flux and MMDiT files keep the transformer at the top level, without a prefix (the
    // same test as `layout::detect`'s).
    let top_level_dit = !has(LDM_DENOISER)
        && ((has("double_blocks.") && has("single_blocks.")) || has("joint_blocks."));
    // Text-encoder slots, kept apart until their encoder is known.
    let mut slots: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let name = t.name.as_str();
        if name.starts_with(LDM_EMA) {
            push(Part::Ema, i);
        } else if name.starts_with(LDM_DENOISER) {
            push(denoiser, i);
        } else if let Some(slot) = text_encoder_slot(name) {
            match slots.iter_mut().find(|(s, _)| s == slot) {
                Some(s) => s.1.push(i),
                None => slots.push((slot.to_string(), vec![i])),
            }
        } else if name.starts_with(LDM_VAE) {
            push(Part::Vae, i);
        } else if top_level_dit && !is_marker(name) {
            push(Part::Transformer, i);
        } else {
            push(Part::Other, i);
        }
    }
    let mut parts: Vec<FilePart> = out
        .into_iter()
        .map(|(part, tensors)| FilePart {
            part,
            encoder: None,
            tensors,
        })
        .collect();
    for (slot, indices) in slots {
        let slot_tensors: Vec<&TensorInfo> = indices.iter().map(|&i| &tensors[i]).collect();
        let encoder = slot_encoder(&slot, &slot_tensors);
        parts.push(FilePart {
            part: encoder.part(),
            encoder: Some(encoder),
            tensors: indices,
        });
    }
    parts.sort_by_key(|p| p.part);
    parts
}

/// The encoder a single file's text-encoder slot holds: from the text width where it is a real
/// one (768, 1024, 1280), else from how the slot is written (OpenCLIP under `cond_stage_model.`
/// is SD2's H, under `conditioner.embedders.` SDXL's bigG).
fn slot_encoder(slot: &str, tensors: &[&TensorInfo]) -> Encoder {
    let names = || tensors.iter().map(|t| &t.name[slot.len()..]);
    if names().any(|n| n.contains("encoder.block.")) {
        return Encoder::T5;
    }
    let openclip =
        names().any(|n| n.starts_with("model.") || n.starts_with("transformer.resblocks."));
    if openclip {
        let width = tensors
            .iter()
            .find(|t| t.name.ends_with("ln_final.weight"))
            .and_then(|t| t.shape.first().copied());
        return match width {
            Some(1024) => Encoder::OpenclipH,
            Some(1280) => Encoder::OpenclipBigg,
            _ if slot == "cond_stage_model." => Encoder::OpenclipH,
            _ => Encoder::OpenclipBigg,
        };
    }
    match hf_encoder(tensors.iter().copied(), slot) {
        Some(e) => e,
        None if slot.ends_with("clip_g.") => Encoder::OpenclipBigg,
        None => Encoder::ClipL,
    }
}

/// The encoder of HF-named (transformers) text-encoder tensors under `prefix`, when the keys or
/// the width tell: T5 blocks, or a CLIP of a known width.
fn hf_encoder<'a>(
    tensors: impl Iterator<Item = &'a TensorInfo> + Clone,
    prefix: &str,
) -> Option<Encoder> {
    let rest = |t: &'a TensorInfo| t.name.get(prefix.len()..).unwrap_or("");
    if tensors
        .clone()
        .any(|t| rest(t).starts_with("encoder.block."))
    {
        return Some(Encoder::T5);
    }
    tensors
        .into_iter()
        .find(|t| rest(t).ends_with("text_model.final_layer_norm.weight"))
        .and_then(|t| t.shape.first().copied())
        .and_then(clip_encoder_of_width)
}

/// The CLIP text encoder of a real width: 768 CLIP-L, 1024 OpenCLIP-H, 1280 OpenCLIP-bigG.
pub fn clip_encoder_of_width(width: usize) -> Option<Encoder> {
    match width {
        768 => Some(Encoder::ClipL),
        1024 => Some(Encoder::OpenclipH),
        1280 => Some(Encoder::OpenclipBigg),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::layout::tests::infos;

    fn summary(keys: &[(&str, &[usize])], content: Content) -> Vec<(Part, Option<Encoder>, usize)> {
        parts(&infos(keys), Some(content))
            .into_iter()
            .map(|p| (p.part, p.encoder, p.tensors.len()))
            .collect()
    }

    #[test]
    fn single_file_parts_and_encoders() {
        let single = Content::Model(Layout::SingleFile);
        assert_eq!(
            summary(
                &[
                    ("model.diffusion_model.out.2.weight", &[4]),
                    (
                        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                        &[16]
                    ),
                    ("first_stage_model.decoder.conv_in.weight", &[4]),
                    ("model_ema.decay", &[]),
                    ("alphas_cumprod", &[1000]),
                ],
                single
            ),
            vec![
                (Part::Unet, None, 1),
                (Part::TextEncoder, Some(Encoder::ClipL), 1),
                (Part::Vae, None, 1),
                (Part::Ema, None, 1),
                (Part::Other, None, 1),
            ]
        );
        // A text encoder alone: its buffers are no transformer.
        assert_eq!(
            summary(
                &[
                    (
                        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                        &[16]
                    ),
                    ("alphas_cumprod", &[1000]),
                ],
                single
            ),
            vec![
                (Part::TextEncoder, Some(Encoder::ClipL), 1),
                (Part::Other, None, 1),
            ]
        );
        // SD2: OpenCLIP under cond_stage_model is H even when the width is not a real one.
        assert_eq!(
            summary(&[("cond_stage_model.model.ln_final.weight", &[16])], single),
            vec![(Part::TextEncoder, Some(Encoder::OpenclipH), 1)]
        );
        // SDXL: CLIP-L and bigG; the refiner has bigG alone in slot 0.
        assert_eq!(
            summary(
                &[
                    (
                        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                        &[8]
                    ),
                    ("conditioner.embedders.1.model.ln_final.weight", &[16]),
                ],
                single
            ),
            vec![
                (Part::TextEncoder, Some(Encoder::ClipL), 1),
                (Part::TextEncoder2, Some(Encoder::OpenclipBigg), 1),
            ]
        );
        assert_eq!(
            summary(
                &[("conditioner.embedders.0.model.ln_final.weight", &[1280])],
                single
            ),
            vec![(Part::TextEncoder2, Some(Encoder::OpenclipBigg), 1)]
        );
        // BFL Flux: the transformer at the top level; a marker is not part of it.
        assert_eq!(
            summary(
                &[
                    ("double_blocks.0.img_attn.qkv.weight", &[4]),
                    ("single_blocks.0.linear1.weight", &[4]),
                    ("img_in.weight", &[4]),
                    ("v_pred", &[0]),
                ],
                single
            ),
            vec![(Part::Transformer, None, 3), (Part::Other, None, 1)]
        );
        // SD3 single file with ComfyUI's text_encoders.
        assert_eq!(
            summary(
                &[
                    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", &[4]),
                    ("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight", &[4]),
                    ("text_encoders.clip_g.transformer.text_model.final_layer_norm.weight", &[4]),
                    ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", &[4]),
                ],
                single
            ),
            vec![
                (Part::Transformer, None, 1),
                (Part::TextEncoder, Some(Encoder::ClipL), 1),
                (Part::TextEncoder2, Some(Encoder::OpenclipBigg), 1),
                (Part::TextEncoder3, Some(Encoder::T5), 1),
            ]
        );
    }

    #[test]
    fn json_names_are_the_names() {
        for p in [
            Part::Unet,
            Part::Transformer,
            Part::TextEncoder,
            Part::TextEncoder2,
            Part::TextEncoder3,
            Part::Vae,
            Part::Embedding,
            Part::Ema,
            Part::Other,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
        for e in [
            Encoder::ClipL,
            Encoder::OpenclipH,
            Encoder::OpenclipBigg,
            Encoder::T5,
        ] {
            assert_eq!(serde_json::to_value(e).unwrap(), e.name());
        }
    }

    #[test]
    fn component_files_are_their_component() {
        let te = |c| Content::Model(Layout::DiffusersComponent(c));
        assert_eq!(
            summary(
                &[("text_model.final_layer_norm.weight", &[1024])],
                te(Component::TextEncoder)
            ),
            vec![(Part::TextEncoder, Some(Encoder::OpenclipH), 1)]
        );
        // A Flux pipeline's text_encoder_2 is T5: the content says which encoder.
        assert_eq!(
            summary(
                &[("encoder.block.0.layer.0.SelfAttention.q.weight", &[4])],
                te(Component::TextEncoder2)
            ),
            vec![(Part::TextEncoder2, Some(Encoder::T5), 1)]
        );
        assert_eq!(
            summary(&[("conv_in.weight", &[4])], te(Component::Unet)),
            vec![(Part::Unet, None, 1)]
        );
        assert_eq!(
            summary(
                &[("encoder.down.0.block.0.conv1.weight", &[4])],
                Content::Vae
            ),
            vec![(Part::Vae, None, 1)]
        );
    }
}
