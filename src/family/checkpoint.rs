//! Base checkpoints: which family a checkpoint is, and the key map that tells, for every weight it
//! holds, the name each LoRA dialect gives that weight's module.
//!
//! Matching works by enumerating the checkpoint's modules and computing their LoRA names (kohya's
//! `lora_unet_…` in both the LDM and the diffusers spelling, `lora_te*_…`, and the dotted
//! `component:path` names of peft/diffusers files), never by splitting a LoRA name on `_`.
//! Fused weights (OpenCLIP `in_proj_weight`, Flux `qkv` / `linear1`) map q/k/v (and mlp) modules
//! to row slices.

use super::kohya_names::{flat, kohya_name, prefixes_for};
use super::layout::Layout;
use super::unet_names::{diffusers_to_ldm, ldm_to_diffusers};
use super::BaseModel;
use super::Component;
use crate::adapter::{AdapterModule, Format};
use crate::tensors::TensorInfo;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

/// Where a LoRA module lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Weight tensor key in the checkpoint.
    pub weight: String,
    /// Bias tensor key, if the module has one.
    pub bias: Option<String>,
    /// Row slice of a fused weight (q/k/v of `in_proj_weight`, Flux `qkv`/`linear1`).
    pub rows: Option<Range<usize>>,
    pub component: Component,
}

/// A module of the checkpoint under the name loratool writes for it (kohya's own spelling for the
/// family) and its dotted path (diffusers / HF CLIP / BFL names), used to decide what to extract.
#[derive(Debug, Clone)]
pub struct CheckpointModule {
    pub kohya_name: String,
    pub path: String,
    pub target: Target,
}

#[derive(Debug, Default)]
pub struct KeyMap {
    by_name: HashMap<String, Target>,
    modules: Vec<CheckpointModule>,
}

/// The family of a checkpoint, from the keys only it has.
pub fn checkpoint_family(tensors: &[TensorInfo], layout: Layout) -> BaseModel {
    let has = |p: &str| tensors.iter().any(|t| t.name.starts_with(p));
    let shape = |k: &str| {
        tensors
            .iter()
            .find(|t| t.name == k)
            .map(|t| t.shape.clone())
    };
    match layout {
        Layout::SingleFile => {
            if has("double_blocks.") || has("model.diffusion_model.double_blocks.") {
                BaseModel::Flux
            } else if has("model.diffusion_model.joint_blocks.") || has("joint_blocks.") {
                BaseModel::Sd3
            } else if has("conditioner.embedders.1.") || has("model.diffusion_model.label_emb.") {
                BaseModel::Sdxl
            } else if has("cond_stage_model.model.") {
                BaseModel::Sd2
            } else if has("cond_stage_model.transformer.") {
                BaseModel::Sd1
            } else if has("model.diffusion_model.") {
                // A UNet without text encoder: SD2 uses linear proj_in, SD1 a 1×1 conv.
                match shape("model.diffusion_model.input_blocks.1.1.proj_in.weight") {
                    Some(s) if s.len() == 2 => BaseModel::Sd2,
                    Some(_) => BaseModel::Sd1,
                    None => BaseModel::Unknown,
                }
            } else {
                BaseModel::Unknown
            }
        }
        Layout::DiffusersComponent(Component::Unet) => {
            if has("add_embedding.") {
                BaseModel::Sdxl
            } else {
                match shape("down_blocks.0.attentions.0.proj_in.weight") {
                    Some(s) if s.len() == 2 => BaseModel::Sd2,
                    Some(_) => BaseModel::Sd1,
                    None => BaseModel::Unknown,
                }
            }
        }
        Layout::DiffusersComponent(Component::Transformer) => {
            if has("single_transformer_blocks.") {
                BaseModel::Flux
            } else {
                BaseModel::Unknown
            }
        }
        Layout::DiffusersComponent(Component::TextEncoder2) => BaseModel::Sdxl,
        Layout::DiffusersComponent(_) => BaseModel::Unknown,
    }
}

/// A checkpoint's family as curators name it: the `BaseModel` LoRAs are matched against, refined
/// where the file tells more (SD2 768-v, the SDXL refiner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Sd1,
    Sd2,
    /// SD2 with v-prediction (the 768-v models), known only from what the file says.
    Sd2V,
    Sdxl,
    SdxlRefiner,
    Sd3,
    Flux,
    Unknown,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Sd1 => "sd1",
            Variant::Sd2 => "sd2",
            Variant::Sd2V => "sd2-v",
            Variant::Sdxl => "sdxl",
            Variant::SdxlRefiner => "sdxl-refiner",
            Variant::Sd3 => "sd3",
            Variant::Flux => "flux",
            Variant::Unknown => "unknown",
        }
    }

    /// The family LoRAs of this checkpoint are made for.
    pub fn base(self) -> BaseModel {
        match self {
            Variant::Sd1 => BaseModel::Sd1,
            Variant::Sd2 | Variant::Sd2V => BaseModel::Sd2,
            Variant::Sdxl | Variant::SdxlRefiner => BaseModel::Sdxl,
            Variant::Sd3 => BaseModel::Sd3,
            Variant::Flux => BaseModel::Flux,
            Variant::Unknown => BaseModel::Unknown,
        }
    }

    /// The variant of a family; `refiner` and `prediction` refine it where they apply.
    pub fn of(family: BaseModel, refiner: bool, prediction: Option<Prediction>) -> Variant {
        match family {
            BaseModel::Sd1 => Variant::Sd1,
            BaseModel::Sd2 if prediction == Some(Prediction::V) => Variant::Sd2V,
            BaseModel::Sd2 => Variant::Sd2,
            BaseModel::Sdxl if refiner => Variant::SdxlRefiner,
            BaseModel::Sdxl => Variant::Sdxl,
            BaseModel::Sd3 => Variant::Sd3,
            BaseModel::Flux => Variant::Flux,
            BaseModel::Unknown => Variant::Unknown,
        }
    }
}

/// What a diffusion model is trained to predict (for the families that differ in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    V,
}

/// The prediction target a file declares, and the metadata key or tensor that declares it. The
/// weights alone do not tell: A1111 runs the SD2 UNet on a probe input to find out and ComfyUI
/// thresholds a weight statistic, both reading tensor data and both guesses; loratool reports
/// only what the file says. In order: `modelspec.prediction_type` (SAI model spec, kohya),
/// `modelspec.predict_key` (ComfyUI's checkpoint save), `ss_v_parameterization` (kohya training
/// flag), a `modelspec.architecture` ending in `-v` (`stable-diffusion-v2-768-v`), then ComfyUI's
/// marker tensors `v_pred` / `edm_vpred.sigma_max`.
pub fn prediction(
    meta: &BTreeMap<String, String>,
    tensors: &[TensorInfo],
) -> Option<(Prediction, String)> {
    let said = |v: &str| match v.trim().to_ascii_lowercase().as_str() {
        "v" | "v_prediction" | "v-prediction" | "v_pred" | "velocity" => Some(Prediction::V),
        "epsilon" | "eps" | "noise" => Some(Prediction::Epsilon),
        _ => None,
    };
    for key in ["modelspec.prediction_type", "modelspec.predict_key"] {
        if let Some(p) = meta.get(key).and_then(|v| said(v)) {
            return Some((p, key.to_string()));
        }
    }
    let key = "ss_v_parameterization";
    match meta
        .get(key)
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("true") => return Some((Prediction::V, key.into())),
        Some("false") => return Some((Prediction::Epsilon, key.into())),
        _ => {}
    }
    let key = "modelspec.architecture";
    if let Some(arch) = meta.get(key) {
        let arch = arch.split('/').next().unwrap_or_default();
        if arch.starts_with("stable-diffusion") && arch.ends_with("-v") {
            return Some((Prediction::V, key.into()));
        }
    }
    tensors
        .iter()
        .find(|t| t.name == "v_pred" || t.name == "edm_vpred.sigma_max")
        .map(|t| (Prediction::V, format!("tensor {}", t.name)))
}

/// Whether an SDXL-family file is the refiner: its only text encoder is OpenCLIP-bigG in the
/// first conditioner slot, its UNet's class embedding takes 2560 inputs (the base's 2816), or its
/// cross-attention reads 1280-wide text (the base's 2048).
pub fn is_sdxl_refiner(tensors: &[TensorInfo], layout: Layout) -> bool {
    let has = |p: &str| tensors.iter().any(|t| t.name.starts_with(p));
    let in_width = |k: &str| {
        tensors
            .iter()
            .find(|t| t.name == k)
            .and_then(|t| t.shape.get(1).copied())
    };
    let cross_attention_1280 = tensors
        .iter()
        .find(|t| t.name.ends_with("attn2.to_k.weight"))
        .and_then(|t| t.shape.get(1).copied())
        == Some(1280);
    match layout {
        Layout::SingleFile => {
            (has("conditioner.embedders.0.model.") && !has("conditioner.embedders.1."))
                || in_width("model.diffusion_model.label_emb.0.0.weight") == Some(2560)
                || cross_attention_1280
        }
        Layout::DiffusersComponent(Component::Unet) => {
            in_width("add_embedding.linear_1.weight") == Some(2560) || cross_attention_1280
        }
        Layout::DiffusersComponent(_) => false,
    }
}

/// OpenCLIP (SD2 text encoder, SDXL text encoder 2) module path → HF CLIP path, with the row slice
/// index for fused q/k/v (`Some(0..3)` chunk index) when the weight is `attn.in_proj`.
fn openclip_to_hf(path: &str) -> Vec<(String, Option<usize>)> {
    if path == "ln_final" {
        return vec![("text_model.final_layer_norm".into(), None)];
    }
    let Some(rest) = path.strip_prefix("transformer.resblocks.") else {
        return vec![];
    };
    let Some((n, sub)) = rest.split_once('.') else {
        return vec![];
    };
    let layer = format!("text_model.encoder.layers.{n}");
    match sub {
        "attn.in_proj" => ["q_proj", "k_proj", "v_proj"]
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("{layer}.self_attn.{p}"), Some(i)))
            .collect(),
        "attn.out_proj" => vec![(format!("{layer}.self_attn.out_proj"), None)],
        "mlp.c_fc" => vec![(format!("{layer}.mlp.fc1"), None)],
        "mlp.c_proj" => vec![(format!("{layer}.mlp.fc2"), None)],
        "ln_1" => vec![(format!("{layer}.layer_norm1"), None)],
        "ln_2" => vec![(format!("{layer}.layer_norm2"), None)],
        _ => vec![],
    }
}

/// The rows of q, k or v (`chunk` 0, 1, 2) in a fused OpenCLIP `attn.in_proj_weight` /
/// `in_proj_bias` of `rows` rows.
fn fused_third(chunk: usize, rows: usize) -> Range<usize> {
    chunk * rows / 3..(chunk + 1) * rows / 3
}

/// The prefix of SD2's OpenCLIP text encoder in a single-file checkpoint.
pub const SD2_OPENCLIP: &str = "cond_stage_model.model.";
/// The prefix of SDXL's first text encoder (CLIP-L, HF CLIP names) in an SGM single file.
pub const SDXL_CLIP_L: &str = "conditioner.embedders.0.transformer.";
/// The prefix of SDXL's second text encoder (OpenCLIP-bigG, OpenCLIP names) in an SGM single file.
pub const SDXL_OPENCLIP: &str = "conditioner.embedders.1.model.";

/// OpenCLIP's `text_projection` (`[width, embed]`, applied as `x @ P`) and the HF tensor that holds
/// it in `CLIPTextModelWithProjection`: a linear layer's weight (`[embed, width]`), its transpose.
/// SDXL's pooled text embedding goes through it; SD2 never reads it.
pub const OPENCLIP_TEXT_PROJECTION: (&str, &str) = ("text_projection", "text_projection.weight");

/// An OpenCLIP text-encoder tensor (its name after the slot's `model.` prefix, `rows` its first
/// dimension) → the HF CLIP tensors it holds, each with its rows when the tensor is fused (the
/// q, k, v thirds of `attn.in_proj_*`). The same map as [`KeyMap`]'s module names, plus the
/// embedding tables; `text_projection` (stored transposed), `logit_scale` and `attn_mask` have no
/// HF CLIP text-model twin here.
pub fn openclip_tensor_to_hf(name: &str, rows: usize) -> Vec<(String, Option<Range<usize>>)> {
    match name {
        "token_embedding.weight" => {
            return vec![("text_model.embeddings.token_embedding.weight".into(), None)]
        }
        "positional_embedding" => {
            return vec![(
                "text_model.embeddings.position_embedding.weight".into(),
                None,
            )]
        }
        _ => {}
    }
    let split = ["weight", "bias"].into_iter().find_map(|leaf| {
        name.strip_suffix(&format!(".{leaf}"))
            .or_else(|| name.strip_suffix(&format!("_{leaf}")))
            .map(|module| (module, leaf))
    });
    let Some((module, leaf)) = split else {
        return vec![];
    };
    openclip_to_hf(module)
        .into_iter()
        .map(|(hf, chunk)| (format!("{hf}.{leaf}"), chunk.map(|c| fused_third(c, rows))))
        .collect()
}

/// Flux: diffusers module paths that land on a BFL module path, with their row slices, given the
/// hidden size `h` and the single-block MLP width `mlp`.
fn flux_diffusers_names(bfl: &str, h: usize, mlp: usize) -> Vec<(String, Option<Range<usize>>)> {
    let parts: Vec<&str> = bfl.split('.').collect();
    let mut out = Vec::new();
    match parts.as_slice() {
        ["double_blocks", n, rest @ ..] => {
            let b = format!("transformer_blocks.{n}");
            let one = |p: &str| (format!("{b}.{p}"), None);
            match rest.join(".").as_str() {
                "img_attn.qkv" => {
                    for (i, p) in ["attn.to_q", "attn.to_k", "attn.to_v"].iter().enumerate() {
                        out.push((format!("{b}.{p}"), Some(i * h..(i + 1) * h)));
                    }
                }
                "txt_attn.qkv" => {
                    for (i, p) in ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
                        .iter()
                        .enumerate()
                    {
                        out.push((format!("{b}.{p}"), Some(i * h..(i + 1) * h)));
                    }
                }
                "img_attn.proj" => out.push(one("attn.to_out.0")),
                "txt_attn.proj" => out.push(one("attn.to_add_out")),
                "img_mlp.0" => out.push(one("ff.net.0.proj")),
                "img_mlp.2" => out.push(one("ff.net.2")),
                "txt_mlp.0" => out.push(one("ff_context.net.0.proj")),
                "txt_mlp.2" => out.push(one("ff_context.net.2")),
                "img_mod.lin" => out.push(one("norm1.linear")),
                "txt_mod.lin" => out.push(one("norm1_context.linear")),
                _ => {}
            }
        }
        ["single_blocks", n, rest @ ..] => {
            let b = format!("single_transformer_blocks.{n}");
            match rest.join(".").as_str() {
                "linear1" => {
                    for (i, p) in ["attn.to_q", "attn.to_k", "attn.to_v"].iter().enumerate() {
                        out.push((format!("{b}.{p}"), Some(i * h..(i + 1) * h)));
                    }
                    out.push((format!("{b}.proj_mlp"), Some(3 * h..3 * h + mlp)));
                }
                "linear2" => out.push((format!("{b}.proj_out"), None)),
                "modulation.lin" => out.push((format!("{b}.norm.linear"), None)),
                _ => {}
            }
        }
        ["img_in"] => out.push(("x_embedder".into(), None)),
        ["txt_in"] => out.push(("context_embedder".into(), None)),
        ["final_layer", "linear"] => out.push(("proj_out".into(), None)),
        _ => {}
    }
    out
}

impl KeyMap {
    /// Builds the map for one checkpoint file of the given layout, part of a checkpoint of
    /// `family` (a component file alone may not tell: a text encoder is the same in SD1 and SDXL,
    /// but kohya names it `lora_te_` in one and `lora_te1_` in the other).
    pub fn build(tensors: &[TensorInfo], layout: Layout, family: BaseModel) -> KeyMap {
        let mut map = KeyMap::default();
        let names: HashSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        let up_attn: HashSet<usize> = tensors
            .iter()
            .filter_map(|t| {
                let key = t
                    .name
                    .strip_prefix("model.diffusion_model.")
                    .unwrap_or(&t.name);
                let rest = key.strip_prefix("up_blocks.")?;
                let (i, rest) = rest.split_once('.')?;
                rest.starts_with("attentions.").then(|| i.parse().ok())?
            })
            .collect();
        // Flux sizes, for the diffusers names of fused weights.
        let flux_dims = tensors
            .iter()
            .find(|t| t.name.ends_with("single_blocks.0.linear2.weight"))
            .map(|t| (t.shape[0], t.shape[1].saturating_sub(t.shape[0])));

        for t in tensors {
            let Some(module_key) = t
                .name
                .strip_suffix(".weight")
                .or_else(|| t.name.strip_suffix("_weight"))
            else {
                continue;
            };
            let bias_key = if t.name.ends_with("_weight") {
                format!("{module_key}_bias")
            } else {
                format!("{module_key}.bias")
            };
            let bias = names.contains(bias_key.as_str()).then_some(bias_key);
            let rows = t.shape.first().copied().unwrap_or(0);
            // The checkpoint's modules under their dotted paths, named the kohya way below.
            let mut primary: Vec<(String, Component, Option<Range<usize>>)> = Vec::new();
            let mut add = |name: String, component: Component, slice: Option<Range<usize>>| {
                map.by_name.entry(name).or_insert(Target {
                    weight: t.name.clone(),
                    bias: bias.clone(),
                    rows: slice,
                    component,
                });
            };

            match layout {
                Layout::SingleFile => {
                    let flux_key = module_key
                        .strip_prefix("model.diffusion_model.")
                        .unwrap_or(module_key);
                    if family == BaseModel::Flux {
                        for prefix in prefixes_for(Component::Transformer) {
                            add(
                                format!("{prefix}{}", flat(flux_key)),
                                Component::Transformer,
                                None,
                            );
                        }
                        add(
                            format!("transformer:{flux_key}"),
                            Component::Transformer,
                            None,
                        );
                        if let Some((h, mlp)) = flux_dims {
                            for (p, slice) in flux_diffusers_names(flux_key, h, mlp) {
                                add(format!("transformer:{p}"), Component::Transformer, slice);
                            }
                        }
                    } else if let Some(p) = module_key.strip_prefix("model.diffusion_model.") {
                        let diff = ldm_to_diffusers(p);
                        register_unet(&mut add, p, diff.as_deref());
                        let path = diff.unwrap_or_else(|| p.to_string());
                        primary.push((path, Component::Unet, None));
                    } else if let Some(p) = module_key
                        .strip_prefix("cond_stage_model.transformer.")
                        .or_else(|| module_key.strip_prefix(SDXL_CLIP_L))
                    {
                        let p = if p.starts_with("text_model.") {
                            p.to_string()
                        } else {
                            format!("text_model.{p}")
                        };
                        register_text_encoder(&mut add, &p, Component::TextEncoder, None);
                        primary.push((p, Component::TextEncoder, None));
                    } else if let Some((p, component)) = module_key
                        .strip_prefix(SD2_OPENCLIP)
                        .map(|p| (p, Component::TextEncoder))
                        .or_else(|| {
                            module_key
                                .strip_prefix(SDXL_OPENCLIP)
                                .map(|p| (p, Component::TextEncoder2))
                        })
                    {
                        for (hf, chunk) in openclip_to_hf(p) {
                            let slice = chunk.map(|c| fused_third(c, rows));
                            register_text_encoder(&mut add, &hf, component, slice.clone());
                            primary.push((hf, component, slice));
                        }
                    }
                }
                Layout::DiffusersComponent(Component::Unet) => {
                    let ldm = diffusers_to_ldm(module_key, |i| up_attn.contains(&i));
                    register_unet(&mut add, ldm.as_deref().unwrap_or(""), Some(module_key));
                    primary.push((module_key.to_string(), Component::Unet, None));
                }
                Layout::DiffusersComponent(Component::Transformer) => {
                    add(
                        format!("transformer:{module_key}"),
                        Component::Transformer,
                        None,
                    );
                    add(
                        kohya_name(Component::Transformer, module_key, family),
                        Component::Transformer,
                        None,
                    );
                }
                Layout::DiffusersComponent(c) => {
                    register_text_encoder(&mut add, module_key, c, None);
                    primary.push((module_key.to_string(), c, None));
                }
            }
            for (path, component, slice) in primary {
                map.modules.push(CheckpointModule {
                    kohya_name: kohya_name(component, &path, family),
                    path,
                    target: Target {
                        weight: t.name.clone(),
                        bias: bias.clone(),
                        rows: slice,
                        component,
                    },
                });
            }
        }
        map
    }

    /// The target of an adapter module, if the checkpoint has it.
    pub fn lookup(&self, m: &AdapterModule) -> Option<&Target> {
        let key = match m.format {
            Format::Kohya => m.name.clone(),
            Format::Peft | Format::DiffusersOld => format!("{}:{}", m.component.name(), m.path),
        };
        self.by_name.get(&key)
    }

    /// Every module of the checkpoint, in file order, under the names loratool writes.
    pub fn modules(&self) -> &[CheckpointModule] {
        &self.modules
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

fn register_unet(
    add: &mut impl FnMut(String, Component, Option<Range<usize>>),
    ldm: &str,
    diffusers: Option<&str>,
) {
    if !ldm.is_empty() {
        add(format!("lora_unet_{}", flat(ldm)), Component::Unet, None);
    }
    if let Some(d) = diffusers {
        add(format!("lora_unet_{}", flat(d)), Component::Unet, None);
        add(format!("unet:{d}"), Component::Unet, None);
    }
}

fn register_text_encoder(
    add: &mut impl FnMut(String, Component, Option<Range<usize>>),
    hf_path: &str,
    component: Component,
    slice: Option<Range<usize>>,
) {
    let flat = flat(hf_path);
    for p in prefixes_for(component) {
        add(format!("{p}{flat}"), component, slice.clone());
    }
    add(format!("{}:{hf_path}", component.name()), component, slice);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openclip_tensors_name_their_hf_twins_and_rows() {
        let q = "text_model.encoder.layers.3.self_attn.q_proj";
        assert_eq!(
            openclip_tensor_to_hf("transformer.resblocks.3.attn.in_proj_weight", 24),
            vec![
                (format!("{q}.weight"), Some(0..8)),
                (q.replace("q_proj", "k_proj") + ".weight", Some(8..16)),
                (q.replace("q_proj", "v_proj") + ".weight", Some(16..24)),
            ]
        );
        assert_eq!(
            openclip_tensor_to_hf("transformer.resblocks.3.attn.in_proj_bias", 24)[2],
            (q.replace("q_proj", "v_proj") + ".bias", Some(16..24))
        );
        for (openclip, hf) in [
            (
                "positional_embedding",
                "text_model.embeddings.position_embedding.weight",
            ),
            (
                "token_embedding.weight",
                "text_model.embeddings.token_embedding.weight",
            ),
            ("ln_final.bias", "text_model.final_layer_norm.bias"),
            (
                "transformer.resblocks.0.mlp.c_proj.weight",
                "text_model.encoder.layers.0.mlp.fc2.weight",
            ),
        ] {
            assert_eq!(
                openclip_tensor_to_hf(openclip, 77),
                vec![(hf.to_string(), None)]
            );
        }
        for unmapped in ["text_projection", "logit_scale", "attn_mask"] {
            assert!(openclip_tensor_to_hf(unmapped, 8).is_empty(), "{unmapped}");
        }
    }
}
