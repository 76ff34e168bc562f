//! `loratool inspect`: what a LoRA file is, read from its header (and, on request, its tensors).

use super::inspect_model::{inspect_model_file, inspect_pipeline, ModelReport};
use crate::adapter::keys::classify;
use crate::adapter::{delta, Adapter, AdapterModule, ModuleKind, ModuleTensors};
use crate::family::layout;
use crate::family::Component;
use crate::family::{self, BaseModel, Detection};
use crate::library::sidecar::A1111Card;
use crate::tensors::hash::{hash_file, FileHashes};
use crate::tensors::{Container, TensorFile, TensorSource};
use crate::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, Default)]
pub struct InspectOptions {
    /// Read the factors and report each module's ‖ΔW‖ (and zero / non-finite checks).
    pub norms: bool,
    /// Hash the file (sha256, AutoV2, addnet/AutoV3).
    pub hash: bool,
}

/// Layer types used to summarise what a LoRA targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    Attention,
    FeedForward,
    Conv,
    Projection,
    Norm,
    Other,
}

impl LayerType {
    pub fn name(self) -> &'static str {
        match self {
            LayerType::Attention => "attention",
            LayerType::FeedForward => "feed_forward",
            LayerType::Conv => "conv",
            LayerType::Projection => "projection",
            LayerType::Norm => "norm",
            LayerType::Other => "other",
        }
    }

    pub fn of(m: &AdapterModule) -> LayerType {
        if m.kind == ModuleKind::Norm {
            return LayerType::Norm;
        }
        if m.is_spatial_conv() {
            return LayerType::Conv;
        }
        let p = m.path.as_str();
        let any = |names: &[&str]| names.iter().any(|n| p.contains(n));
        if any(&[
            "ff_net",
            "ff.net",
            "ff_context",
            "ff.",
            "ff_",
            "mlp",
            "fc1",
            "fc2",
            "linear1",
            "linear2",
            "proj_mlp",
            "DenseReluDense",
        ]) {
            LayerType::FeedForward
        } else if any(&[
            "attn",
            "to_q",
            "to_k",
            "to_v",
            "to_out",
            "q_proj",
            "k_proj",
            "v_proj",
            "out_proj",
            "qkv",
            "SelfAttention",
            "EncDecAttention",
        ]) {
            LayerType::Attention
        } else if any(&[
            "proj_in",
            "proj_out",
            "time_emb",
            "emb_layers",
            "skip_connection",
            "conv_shortcut",
            "modulation",
            "_mod",
            ".mod",
            "norm1",
            "norm_out",
            "embed",
            "_in",
            "conv",
            "in_layers",
            "out_layers",
        ]) {
            LayerType::Projection
        } else {
            LayerType::Other
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub name: String,
    pub component: Component,
    pub kind: ModuleKind,
    pub layer_type: LayerType,
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    pub scale: f32,
    pub dora: bool,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// ‖ΔW‖_F with scale, when `--norms` was asked for and the kind allows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TagCount {
    pub tag: String,
    pub count: u64,
}

/// Everything `inspect` reports about one file. Field names are the stable JSON schema
/// (docs/INSPECT_JSON.md).
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub path: String,
    /// Always `"lora"`; other files get a `ModelReport` with their own kind.
    pub kind: &'static str,
    pub container: Container,
    pub format: &'static str,
    pub network: &'static str,
    pub base_model: BaseModel,
    pub base_model_metadata: Option<BaseModel>,
    pub base_model_keys: Option<BaseModel>,
    pub rank: Option<usize>,
    pub rank_min: Option<usize>,
    pub alpha: Option<f32>,
    pub dtype: String,
    pub file_size: u64,
    pub tensor_count: usize,
    pub module_count: usize,
    pub modules_by_component: BTreeMap<&'static str, usize>,
    pub modules_by_layer_type: BTreeMap<&'static str, usize>,
    pub trigger_words: Vec<String>,
    pub top_tags: Vec<TagCount>,
    pub training: BTreeMap<&'static str, String>,
    pub warnings: Vec<String>,
    pub hashes: Option<FileHashes>,
    pub modules: Vec<ModuleReport>,
    pub metadata: BTreeMap<String, String>,
    pub sidecar: Option<serde_json::Value>,
    #[serde(skip)]
    pub detection: Option<Detection>,
}

/// The file-level network kind (see docs/INSPECT_JSON.md for the rules).
pub fn network_kind(modules: &[AdapterModule]) -> &'static str {
    let kinds: BTreeSet<&'static str> = modules
        .iter()
        .filter(|m| m.kind != ModuleKind::Norm)
        .map(|m| m.kind.name())
        .collect();
    if kinds.is_empty() {
        return "norm";
    }
    if kinds.len() > 1 {
        return "mixed";
    }
    if modules.iter().any(|m| m.dora) {
        return "dora";
    }
    match modules
        .iter()
        .find(|m| m.kind != ModuleKind::Norm)
        .map(|m| m.kind)
    {
        Some(ModuleKind::Lora) if modules.iter().any(|m| m.is_spatial_conv()) => "locon",
        Some(k) => k.name(),
        None => "norm",
    }
}

/// What `--norms` learns about one module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleNorm {
    /// ‖ΔW‖_F with scale; `None` for kinds whose delta depends on the base weight.
    pub norm: Option<f64>,
    /// Some tensor of the module holds NaN or Inf.
    pub non_finite: bool,
}

/// The norm and the NaN/Inf check of one module from a single read of each of its tensors
/// (factors can be large; reading them once per check doubled `--norms`' I/O and decoding).
pub fn module_norm(m: &AdapterModule, source: &dyn TensorSource) -> Result<ModuleNorm> {
    let tensors = ModuleTensors::read(m, source)?;
    Ok(ModuleNorm {
        norm: delta::delta_norm(m, &tensors)?,
        non_finite: tensors.has_non_finite(),
    })
}

/// What `inspect` says about one argument: a LoRA report, or the report of a checkpoint, VAE,
/// text encoder, embedding or unknown tensor file (serialized as it is, with its `kind`).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Report {
    Lora(Box<InspectReport>),
    Model(Box<ModelReport>),
}

/// Inspects many files in parallel; each gets its own result, in input order.
pub fn inspect_many(paths: &[PathBuf], opts: InspectOptions) -> Vec<Result<Report>> {
    paths.par_iter().map(|p| inspect(p, opts)).collect()
}

/// Inspects any argument: a LoRA, a model file, or a diffusers pipeline folder. What a file is
/// comes from its content: a file with adapter tensors is a LoRA; one without is what
/// `family::layout::detect` finds in it (or `unknown`). A file with adapter-like keys that yields
/// no adapter module but holds model weights is reported as the model it is.
pub fn inspect(path: &Path, opts: InspectOptions) -> Result<Report> {
    if path.is_dir() {
        return Ok(Report::Model(Box::new(inspect_pipeline(path, opts.hash)?)));
    }
    let file = TensorFile::open(path)?;
    let content = layout::detect(file.tensors());
    if file.tensors().iter().any(|t| classify(&t.name).is_some()) {
        match Adapter::from_file(file) {
            Ok(adapter) => {
                return Ok(Report::Lora(Box::new(report_adapter(path, adapter, opts)?)));
            }
            Err(Error::NotAnAdapter { .. }) if content.is_some() => {}
            Err(e) => return Err(e),
        }
        let file = TensorFile::open(path)?;
        return Ok(Report::Model(Box::new(inspect_model_file(
            path, file, content, opts.hash,
        )?)));
    }
    Ok(Report::Model(Box::new(inspect_model_file(
        path, file, content, opts.hash,
    )?)))
}

/// Inspects a LoRA file; any other file is an error ("not a LoRA: …").
pub fn inspect_file(path: &Path, opts: InspectOptions) -> Result<InspectReport> {
    report_adapter(path, Adapter::open(path)?, opts)
}

fn report_adapter(path: &Path, adapter: Adapter, opts: InspectOptions) -> Result<InspectReport> {
    let file = &adapter.file;
    let meta = file.metadata().clone();
    let modules = &adapter.modules;
    let detection = family::detect(&meta, modules);

    let ranks: BTreeSet<usize> = modules.iter().filter_map(|m| m.rank).collect();
    let alphas: Vec<Option<f32>> = modules.iter().map(|m| m.alpha).collect();
    let alpha = match alphas.first() {
        Some(Some(a)) if alphas.iter().all(|x| *x == Some(*a)) => Some(*a),
        _ => None,
    };
    let dtypes: BTreeSet<String> = modules.iter().map(|m| m.dtype.to_string()).collect();
    let dtype = if dtypes.len() == 1 {
        dtypes.iter().next().cloned().unwrap_or_default()
    } else {
        "mixed".into()
    };

    let mut by_component = BTreeMap::new();
    let mut by_layer = BTreeMap::new();
    for m in modules {
        *by_component.entry(m.component.name()).or_insert(0) += 1;
        *by_layer.entry(LayerType::of(m).name()).or_insert(0) += 1;
    }

    let checked: Vec<ModuleNorm> = if opts.norms {
        modules
            .par_iter()
            .map(|m| module_norm(m, file))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let norms: Vec<Option<f64>> = if opts.norms {
        checked.iter().map(|c| c.norm).collect()
    } else {
        vec![None; modules.len()]
    };

    let mut warnings = adapter.warnings.clone();
    if !adapter.unrecognized.is_empty() {
        warnings.push(format!(
            "{} tensors belong to no adapter module (first: '{}')",
            adapter.unrecognized.len(),
            adapter.unrecognized[0]
        ));
    }
    if detection.conflict() {
        warnings.push(format!(
            "metadata says {} but the keys say {} ({})",
            detection.from_metadata.map(|b| b.name()).unwrap_or("?"),
            detection.from_keys.map(|b| b.name()).unwrap_or("?"),
            detection.key_reason.clone().unwrap_or_default()
        ));
    }
    if ranks.len() > 1 {
        let list: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
        warnings.push(format!("mixed ranks: {}", list.join(", ")));
    }
    let over: Vec<&AdapterModule> = modules
        .iter()
        .filter(|m| matches!((m.alpha, m.rank), (Some(a), Some(r)) if a > r as f32))
        .collect();
    if let Some(first) = over.first() {
        warnings.push(format!(
            "{} modules have alpha > rank (first: {} alpha {} rank {})",
            over.len(),
            first.name,
            first.alpha.unwrap_or_default(),
            first.rank.unwrap_or_default()
        ));
    }
    if opts.norms {
        let bad: Vec<&str> = modules
            .iter()
            .zip(&checked)
            .filter(|(_, c)| c.non_finite)
            .map(|(m, _)| m.name.as_str())
            .collect();
        if let Some(first) = bad.first() {
            warnings.push(format!(
                "{} modules contain NaN or Inf values (first: {first})",
                bad.len()
            ));
        }
        let zero: Vec<&str> = modules
            .iter()
            .zip(&norms)
            .filter(|(_, n)| **n == Some(0.0))
            .map(|(m, _)| m.name.as_str())
            .collect();
        if let Some(first) = zero.first() {
            warnings.push(format!(
                "{} modules have an all-zero delta (untrained?) (first: {first})",
                zero.len()
            ));
        }
    }

    let sidecar = read_sidecar(path);
    let trigger_words = trigger_words(&meta, sidecar.as_ref());
    let top_tags = top_tags(&meta, 10);
    let hashes = if opts.hash {
        Some(hash_file(
            path,
            file.as_safetensors().map(|s| s.data_start()),
        )?)
    } else {
        None
    };
    let file_size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();

    let module_reports = modules
        .iter()
        .zip(norms)
        .map(|(m, norm)| ModuleReport {
            name: m.name.clone(),
            component: m.component,
            kind: m.kind,
            layer_type: LayerType::of(m),
            rank: m.rank,
            alpha: m.alpha,
            scale: m.scale,
            dora: m.dora,
            shape: m.shape.clone(),
            dtype: m.dtype.to_string(),
            norm,
        })
        .collect();

    Ok(InspectReport {
        path: path.display().to_string(),
        kind: "lora",
        container: file.container(),
        format: adapter.format.name(),
        network: network_kind(modules),
        base_model: detection.base_model,
        base_model_metadata: detection.from_metadata,
        base_model_keys: detection.from_keys,
        rank: ranks.iter().next_back().copied(),
        rank_min: ranks.iter().next().copied(),
        alpha,
        dtype,
        file_size,
        tensor_count: file.tensors().len(),
        module_count: modules.len(),
        modules_by_component: by_component,
        modules_by_layer_type: by_layer,
        trigger_words,
        top_tags,
        training: training_summary(&meta),
        warnings,
        hashes,
        modules: module_reports,
        metadata: meta,
        sidecar,
        detection: Some(detection),
    })
}

/// A1111's per-file user metadata: `<stem>.json` beside the LoRA.
fn read_sidecar(path: &Path) -> Option<serde_json::Value> {
    crate::library::sidecar::read_user_metadata(path).map(serde_json::Value::Object)
}

fn trigger_words(
    meta: &BTreeMap<String, String>,
    sidecar: Option<&serde_json::Value>,
) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut add = |text: &str| {
        for w in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if !words.iter().any(|x| x == w) {
                words.push(w.to_string());
            }
        }
    };
    let card = sidecar.and_then(|s| s.as_object()).map(A1111Card::of);
    if let Some(t) = card.and_then(|c| c.activation_text) {
        add(&t);
    }
    if let Some(t) = meta.get("modelspec.trigger_phrase") {
        add(t);
    }
    words
}

/// Most frequent training tags over all dataset folders of `ss_tag_frequency`.
pub fn top_tags(meta: &BTreeMap<String, String>, n: usize) -> Vec<TagCount> {
    let Some(text) = meta.get("ss_tag_frequency") else {
        return Vec::new();
    };
    let Ok(serde_json::Value::Object(dirs)) = serde_json::from_str(text) else {
        return Vec::new();
    };
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for tags in dirs.values() {
        if let Some(tags) = tags.as_object() {
            for (tag, c) in tags {
                let c = c
                    .as_u64()
                    .or_else(|| c.as_f64().map(|f| f as u64))
                    .unwrap_or(0);
                *counts.entry(tag.trim().to_string()).or_insert(0) += c;
            }
        }
    }
    let mut list: Vec<TagCount> = counts
        .into_iter()
        .map(|(tag, count)| TagCount { tag, count })
        .collect();
    list.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.tag.cmp(&b.tag)));
    list.truncate(n);
    list
}

pub(crate) fn training_summary(meta: &BTreeMap<String, String>) -> BTreeMap<&'static str, String> {
    let fields: &[(&str, &[&str])] = &[
        ("base_model_name", &["ss_sd_model_name"]),
        ("output_name", &["ss_output_name", "modelspec.title"]),
        ("resolution", &["ss_resolution", "modelspec.resolution"]),
        ("epochs", &["ss_epoch", "ss_num_epochs"]),
        ("steps", &["ss_steps", "ss_max_train_steps"]),
        ("network_module", &["ss_network_module"]),
        ("network_dim", &["ss_network_dim"]),
        ("network_alpha", &["ss_network_alpha"]),
        ("network_args", &["ss_network_args"]),
        ("learning_rate", &["ss_learning_rate"]),
        ("unet_lr", &["ss_unet_lr"]),
        ("text_encoder_lr", &["ss_text_encoder_lr"]),
        ("optimizer", &["ss_optimizer"]),
        ("train_images", &["ss_num_train_images"]),
        (
            "batch_size",
            &["ss_total_batch_size", "ss_batch_size_per_device"],
        ),
        ("clip_skip", &["ss_clip_skip"]),
        ("trained_at", &["ss_training_finished_at", "modelspec.date"]),
    ];
    let mut out = BTreeMap::new();
    for (field, keys) in fields {
        if let Some(v) = keys
            .iter()
            .filter_map(|k| meta.get(*k))
            .find(|v| !v.is_empty() && *v != "None")
        {
            out.insert(*field, v.clone());
        }
    }
    out
}
