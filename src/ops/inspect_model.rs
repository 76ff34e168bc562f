//! `inspect` of files that are not LoRAs: checkpoints (one file, or a diffusers pipeline folder)
//! and the VAEs, text encoders and embeddings people keep beside them. Everything but the hashes
//! comes from the headers; no tensor data is read.

use super::inspect::training_summary;
use crate::family::checkpoint::{prediction, Prediction, Variant};
use crate::family::layout::{self, Checkpoint, Content, Layout};
use crate::family::parts::{parts, Encoder, Part};
use crate::family::{self, BaseModel};
use crate::tensors::hash::{hash_file, FileHashes};
use crate::tensors::{Container, TensorFile};
use crate::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// What a non-LoRA file is, for the `kind` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// A denoiser (UNet or transformer), alone or with text encoders and VAE.
    Checkpoint,
    Vae,
    TextEncoder,
    Embedding,
    /// A readable tensor file that is no LoRA and no model file loratool knows.
    Unknown,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Checkpoint => "checkpoint",
            ModelKind::Vae => "vae",
            ModelKind::TextEncoder => "text_encoder",
            ModelKind::Embedding => "embedding",
            ModelKind::Unknown => "unknown",
        }
    }
}

/// One part of the model (docs/INSPECT_JSON.md, "Non-LoRA files").
#[derive(Debug, Clone, Serialize)]
pub struct PartReport {
    pub name: Part,
    pub encoder: Option<Encoder>,
    /// The weight file that holds it, relative to the pipeline folder; null in a single file.
    pub file: Option<String>,
    pub tensor_count: usize,
    pub parameters: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DtypeCount {
    pub tensors: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct EmaReport {
    pub tensor_count: usize,
    pub parameters: u64,
}

/// One weight file of a pipeline folder.
#[derive(Debug, Clone, Serialize)]
pub struct WeightFile {
    /// Relative to the folder.
    pub path: String,
    pub part: Part,
    pub file_size: u64,
    pub hashes: Option<FileHashes>,
}

/// Everything `inspect` reports about a file that is not a LoRA. Field names are the stable JSON
/// schema (docs/INSPECT_JSON.md).
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub path: String,
    pub kind: ModelKind,
    /// `safetensors`, `pickle`, or `folder` for a pipeline.
    pub container: &'static str,
    pub layout: Option<&'static str>,
    /// `Variant::name`: `sd2-v`, `sdxl-refiner` where the file tells, else the base family.
    pub family: &'static str,
    pub base_model: BaseModel,
    pub prediction: Option<Prediction>,
    pub prediction_source: Option<String>,
    pub components: Vec<PartReport>,
    pub has_vae: bool,
    pub ema: Option<EmaReport>,
    pub dtype: String,
    pub dtypes: BTreeMap<&'static str, DtypeCount>,
    pub parameters: u64,
    pub tensor_count: usize,
    pub file_size: u64,
    pub embedding_vectors: Option<usize>,
    pub modelspec: BTreeMap<String, String>,
    pub training: BTreeMap<&'static str, String>,
    pub warnings: Vec<String>,
    pub hashes: Option<FileHashes>,
    pub files: Option<Vec<WeightFile>>,
    pub metadata: BTreeMap<String, String>,
}

/// Reports a file that is not a LoRA; `content` is what `layout::detect` found in it.
pub fn inspect_model_file(
    path: &Path,
    file: TensorFile,
    content: Option<Content>,
    hash: bool,
) -> Result<ModelReport> {
    let container = match file.container() {
        Container::Safetensors => "safetensors",
        Container::Pickle => "pickle",
    };
    let mut report = summarize(path, container, [(None, content, &file)].into_iter())?;
    let tensors = file.tensors();
    let denoiser = report.components.iter().any(|c| c.name.is_denoiser());
    let text_encoder = report.components.iter().any(|c| c.name.is_text_encoder());
    report.kind = match content {
        None => ModelKind::Unknown,
        Some(Content::Vae) => ModelKind::Vae,
        Some(Content::Embedding) => ModelKind::Embedding,
        Some(Content::Model(_)) if !denoiser && text_encoder => ModelKind::TextEncoder,
        Some(Content::Model(_)) => ModelKind::Checkpoint,
    };
    report.layout = match content {
        Some(Content::Model(l)) => Some(l.name()),
        Some(Content::Vae) => Some(match layout::vae_naming(tensors) {
            "diffusers" => "diffusers_vae",
            _ => "ldm_vae",
        }),
        _ => None,
    };
    match content {
        Some(Content::Embedding) => {
            let (fam, vectors) = layout::embedding_facts(tensors);
            report.base_model = fam;
            report.family = Variant::of(fam, false, None).name();
            report.embedding_vectors = vectors;
        }
        None => {
            let first = tensors.first().map(|t| format!(" (first: '{}')", t.name));
            report.warnings.push(format!(
                "none of its {} tensors belongs to a LoRA or to a model part loratool knows{}",
                tensors.len(),
                first.unwrap_or_default()
            ));
        }
        _ => {}
    }
    if hash {
        let data_start = file.as_safetensors().map(|s| s.data_start());
        report.hashes = Some(hash_file(path, data_start)?);
    }
    if let Some(Content::Model(layout)) = content {
        let checkpoint = Checkpoint::single(path, layout, file);
        decide_family(&mut report, &checkpoint);
    }
    Ok(report)
}

/// Reports a diffusers pipeline folder: its patchable components (`Checkpoint::open`) and its
/// `vae/`. With `hash`, each weight file is hashed on its own (`files[].hashes`): a folder has no
/// one-file hash that A1111 or Civitai would show.
pub fn inspect_pipeline(root: &Path, hash: bool) -> Result<ModelReport> {
    let checkpoint = Checkpoint::open(root)?;
    let vae = layout::pipeline_vae(root)?;
    let members: Vec<(&Path, Content, &TensorFile)> = checkpoint
        .files
        .iter()
        .map(|f| (f.relative.as_path(), Content::Model(f.layout), &f.file))
        .chain(vae.iter().map(|(r, f)| (r.as_path(), Content::Vae, f)))
        .collect();
    let mut report = summarize(
        root,
        "folder",
        members.iter().map(|(r, c, f)| (Some(*r), Some(*c), *f)),
    )?;
    report.kind = ModelKind::Checkpoint;
    report.layout = Some("diffusers_pipeline");
    decide_family(&mut report, &checkpoint);
    let files = members
        .par_iter()
        .map(|(relative, content, file)| {
            let part = match content {
                Content::Model(Layout::DiffusersComponent(c)) => Part::from(*c),
                _ => Part::Vae,
            };
            let hashes = if hash {
                let data_start = file.as_safetensors().map(|s| s.data_start());
                Some(hash_file(file.path(), data_start)?)
            } else {
                None
            };
            Ok(WeightFile {
                path: relative.display().to_string(),
                part,
                file_size: file_size(file.path())?,
                hashes,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    report.files = Some(files);
    Ok(report)
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len())
}

/// The part of the report every kind shares: parts, dtypes, counts, sizes, metadata. Kind,
/// layout and family are filled in by the caller.
fn summarize<'a>(
    path: &Path,
    container: &'static str,
    members: impl Iterator<Item = (Option<&'a Path>, Option<Content>, &'a TensorFile)>,
) -> Result<ModelReport> {
    let mut components = Vec::new();
    let mut ema: Option<EmaReport> = None;
    let mut dtypes: BTreeMap<&'static str, DtypeCount> = BTreeMap::new();
    let mut float_dtypes: Vec<&'static str> = Vec::new();
    let mut parameters = 0u64;
    let mut tensor_count = 0usize;
    let mut file_size_sum = 0u64;
    let mut metadata: BTreeMap<String, String> = BTreeMap::new();
    for (relative, content, file) in members {
        let tensors = file.tensors();
        let bytes_of = |i: usize| -> u64 {
            let t = &tensors[i];
            match file.as_safetensors().and_then(|s| s.tensor_location(i)) {
                Some((_, _, len)) => len as u64,
                None => (t.numel() * t.dtype.size().unwrap_or(0)) as u64,
            }
        };
        for (i, t) in tensors.iter().enumerate() {
            let d = dtypes.entry(t.dtype.name()).or_default();
            d.tensors += 1;
            d.bytes += bytes_of(i);
            if t.dtype.is_float() && !float_dtypes.contains(&t.dtype.name()) {
                float_dtypes.push(t.dtype.name());
            }
        }
        tensor_count += tensors.len();
        file_size_sum += file_size(file.path())?;
        for (k, v) in file.metadata() {
            metadata.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for part in parts(tensors, content) {
            let params: u64 = part
                .tensors
                .iter()
                .map(|&i| tensors[i].numel() as u64)
                .sum();
            parameters += params;
            if part.part == Part::Ema {
                let e = ema.get_or_insert(EmaReport {
                    tensor_count: 0,
                    parameters: 0,
                });
                e.tensor_count += part.tensors.len();
                e.parameters += params;
                continue;
            }
            components.push(PartReport {
                name: part.part,
                encoder: part.encoder,
                file: relative.map(|r| r.display().to_string()),
                tensor_count: part.tensors.len(),
                parameters: params,
                bytes: part.tensors.iter().map(|&i| bytes_of(i)).sum(),
            });
        }
    }
    let dtype = match float_dtypes.as_slice() {
        [one] => one.to_string(),
        [] => dtypes
            .keys()
            .next()
            .map(|d| d.to_string())
            .unwrap_or_default(),
        _ => "mixed".into(),
    };
    let modelspec = metadata
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("modelspec.")?.to_string(), v.clone())))
        .collect();
    let has_vae = components.iter().any(|p| p.name == Part::Vae);
    Ok(ModelReport {
        path: path.display().to_string(),
        kind: ModelKind::Unknown,
        container,
        layout: None,
        family: BaseModel::Unknown.name(),
        base_model: BaseModel::Unknown,
        prediction: None,
        prediction_source: None,
        components,
        has_vae,
        ema,
        dtype,
        dtypes,
        parameters,
        tensor_count,
        file_size: file_size_sum,
        embedding_vectors: None,
        modelspec,
        training: training_summary(&metadata),
        warnings: Vec::new(),
        hashes: None,
        files: None,
        metadata,
    })
}

/// Family, variant and prediction of a checkpoint or model component: keys first, the metadata
/// where the keys do not tell, a warning where they disagree.
fn decide_family(report: &mut ModelReport, checkpoint: &Checkpoint) {
    let from_keys = checkpoint.family();
    let from_meta = family::from_metadata(&report.metadata);
    let base = match (from_keys, from_meta) {
        (BaseModel::Unknown, Some(m)) => m,
        (k, Some(m)) if m != k => {
            report.warnings.push(format!(
                "metadata says {} but the keys say {}",
                m.name(),
                k.name()
            ));
            k
        }
        (k, _) => k,
    };
    let pred = checkpoint
        .files
        .iter()
        .find_map(|f| prediction(&report.metadata, f.file.tensors()));
    report.base_model = base;
    report.family = checkpoint.variant(base, pred.as_ref().map(|p| p.0)).name();
    if let Some((p, source)) = pred {
        report.prediction = Some(p);
        report.prediction_source = Some(source);
    }
}
