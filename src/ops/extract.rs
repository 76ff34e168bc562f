//! `loratool extract`: a LoRA from the difference between a fine-tuned checkpoint and its base.
//!
//! Per target module (what kohya targets: transformer linears and proj_in/out, text-encoder
//! attention and MLP, and with a conv rank the resnet/sampler convolutions), `D = tuned − base` in
//! f32, then a truncated SVD: randomized (oversampling 10, 2 power iterations) when the rank is
//! small against the matrix, a full thin SVD otherwise. `up = U_k Σ_k`, `down = V_kᵀ`,
//! alpha = k (scale 1). Modules are processed in parallel, one pair of tensors at a time per
//! worker, so neither checkpoint is ever held in f32.

use super::convert::{write_converted, TargetFormat};
use super::resize::RankRule;
use crate::adapter::kohya_metadata::{self, NetworkShape};
use crate::adapter::Adapter;
use crate::family::checkpoint::{CheckpointModule, KeyMap};
use crate::family::layout::Checkpoint;
use crate::family::BaseModel;
use crate::linalg::{self, LowRank};
use crate::ops::progress::ProgressSink;
use crate::tensors::hash::hash_file;
use crate::tensors::writer::{build_header, write_all, TensorSpec, WriteOptions};
use crate::tensors::{Dtype, Tensor, TensorFile};
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct ExtractOptions {
    pub rank: usize,
    /// Rank for k×k convolutions; `None` leaves them out (as kohya does without `--conv_dim`).
    pub conv_rank: Option<usize>,
    /// Rank for text-encoder modules (default: `rank`).
    pub te_rank: Option<usize>,
    /// Modules whose largest |D| is at most this are skipped.
    pub min_diff: f32,
    /// Per-module rank from the spectrum (capped by the ranks above).
    pub dynamic: Option<RankRule>,
    /// kohya's quantile clamp of the factors (off by default: it loses quality).
    pub clamp_quantile: Option<f64>,
    pub dtype: Dtype,
    /// The dialect written (kohya, or peft converted from it in memory).
    pub format: TargetFormat,
    pub force: bool,
    pub allow_empty: bool,
    /// Told the number of modules to factorize, then each one as it is done.
    pub progress: ProgressSink,
}

#[derive(Debug, Clone, Default)]
pub struct ComponentStats {
    pub extracted: usize,
    pub skipped: usize,
    /// Σ kept S² / Σ ‖D‖² over extracted modules.
    pub kept_energy: f64,
    pub total_energy: f64,
    /// Module with the lowest retained fraction: (name, retained Frobenius fraction).
    pub worst: Option<(String, f64)>,
}

#[derive(Debug, Clone, Default)]
pub struct ExtractReport {
    pub family: Option<BaseModel>,
    pub components: BTreeMap<&'static str, ComponentStats>,
}

/// Whether kohya's LoRA network targets a module, and with which rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Transformer linears, proj_in/out, DiT block linears: the linear rank.
    Linear,
    /// Linears and 1×1 convs inside resnets (time_emb_proj, conv_shortcut): the linear rank, but
    /// only targeted when a conv rank is given (kohya adds the resnet blocks with conv_dim).
    ResnetLinear,
    /// k×k convolutions (resnet conv1/conv2, down/upsamplers): the conv rank.
    Conv,
    TextEncoder,
}

fn classify(m: &CheckpointModule, shape: &[usize]) -> Option<Class> {
    use crate::family::Component::*;
    let p = m.path.as_str();
    let ends = |s: &str| p.ends_with(s);
    let spatial = shape.len() == 4 && shape[2] * shape[3] > 1;
    match m.target.component {
        TextEncoder | TextEncoder2 | TextEncoder3 => [
            "q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2",
        ]
        .iter()
        .any(|s| ends(s))
        .then_some(Class::TextEncoder),
        Unet => {
            if p.contains("attentions.") {
                let hit = [
                    "to_q",
                    "to_k",
                    "to_v",
                    "to_out.0",
                    "ff.net.0.proj",
                    "ff.net.2",
                    "proj_in",
                    "proj_out",
                ]
                .iter()
                .any(|s| ends(s));
                return hit.then_some(Class::Linear);
            }
            let in_block = p.contains(".resnets.") || p.contains("samplers.0.conv");
            if !in_block || ends("norm1") || ends("norm2") {
                return None;
            }
            Some(if spatial {
                Class::Conv
            } else {
                Class::ResnetLinear
            })
        }
        Transformer => {
            let block = p.starts_with("double_blocks") || p.starts_with("single_blocks");
            (block && !p.contains("norm")).then_some(Class::Linear)
        }
    }
}

/// One checkpoint file of the base and its counterpart in the fine-tune.
struct Pair {
    base: TensorFile,
    tuned: TensorFile,
    base_map: KeyMap,
    tuned_map: KeyMap,
}

/// Pairs the weight files of two checkpoints of the same layout: two single files, two
/// component files of the same kind, or two diffusers pipeline folders (by component file).
/// Returns the pairs and the family.
fn open_pairs(base: &Path, tuned: &Path) -> Result<(Vec<Pair>, BaseModel)> {
    let (b, t) = (Checkpoint::open(base)?, Checkpoint::open(tuned)?);
    if b.pipeline != t.pipeline {
        return Err(Error::Invalid(format!(
            "{} and {} must both be files or both be diffusers folders",
            base.display(),
            tuned.display()
        )));
    }
    let (fb, ft) = (b.family(), t.family());
    let mut tuned_files = t.files;
    let mut pairs = Vec::new();
    for bf in b.files {
        let Some(at) = tuned_files
            .iter()
            .position(|tf| tf.relative == bf.relative && tf.layout == bf.layout)
        else {
            let what = if b.pipeline {
                tuned.join(&bf.relative).display().to_string()
            } else {
                format!("{} ({})", tuned.display(), bf.layout.name())
            };
            return Err(Error::Invalid(format!(
                "{} and {} are different parts of a model: no counterpart of {} in {what}",
                base.display(),
                tuned.display(),
                bf.file.path().display()
            )));
        };
        let tf = tuned_files.swap_remove(at);
        if fb != ft {
            return Err(Error::Invalid(format!(
                "{} is a {} checkpoint but {} is a {} checkpoint",
                base.display(),
                fb.name(),
                tuned.display(),
                ft.name()
            )));
        }
        pairs.push(Pair {
            base_map: KeyMap::build(bf.file.tensors(), bf.layout, fb),
            tuned_map: KeyMap::build(tf.file.tensors(), tf.layout, fb),
            base: bf.file,
            tuned: tf.file,
        });
    }
    Ok((pairs, fb))
}

/// The rows of a weight that a module covers (fused q/k/v slices), as an f32 tensor.
fn read_slice(file: &TensorFile, m: &CheckpointModule) -> Result<Tensor> {
    let t = match &m.target.rows {
        None => file.read_f32(&m.target.weight)?,
        Some(r) => file.read_f32_rows(&m.target.weight, r.clone())?,
    };
    if t.has_non_finite() {
        return Err(Error::bad_tensor(
            file.path(),
            &m.target.weight,
            "contains NaN or Inf values",
        ));
    }
    Ok(t)
}

/// kohya's clamp: both factors limited to ± the q-quantile of their concatenated values.
fn clamp_quantile(up: &mut [f32], down: &mut [f32], q: f64) {
    let mut all: Vec<f32> = up.iter().chain(down.iter()).copied().collect();
    if all.is_empty() {
        return;
    }
    let idx = ((all.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    let (_, hi, _) = all.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    let hi = hi.abs();
    up.iter_mut()
        .chain(down.iter_mut())
        .for_each(|v| *v = v.clamp(-hi, hi));
}

struct Extracted {
    name: String,
    component: &'static str,
    /// None when skipped (difference below min_diff).
    factors: Option<(LowRank, Vec<usize>)>,
    energy: f64,
}

fn truncated_svd(d: &Tensor, rank: usize, dynamic: Option<RankRule>, seed: u64) -> Result<LowRank> {
    let (m, n) = (d.rows(), d.cols());
    let full = m.min(n);
    let k = rank.min(full);
    // Dynamic rules need the whole spectrum; small matrices are cheap to decompose fully.
    let lr = if dynamic.is_none() && k + 10 < full / 2 {
        linalg::truncate_randomized(&d.data, m, n, k, 10, 2, seed)
    } else {
        linalg::truncate_dense(&d.data, m, n, full)
    }
    .map_err(Error::Invalid)?;
    let keep = match dynamic {
        Some(rule) => rule.rank_for(&lr.singular_values).min(k),
        None => k,
    };
    Ok(lr.keep(keep.max(1)))
}

pub fn extract_lora(
    base_path: &Path,
    tuned_path: &Path,
    out: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport> {
    if opts.rank == 0 || opts.conv_rank == Some(0) || opts.te_rank == Some(0) {
        return Err(Error::Invalid("ranks must be at least 1".into()));
    }
    let write_opts = WriteOptions::checked(
        out,
        opts.force,
        vec![base_path.to_path_buf(), tuned_path.to_path_buf()],
    )?;
    let (pairs, fb) = open_pairs(base_path, tuned_path)?;

    // Targets and their ranks; shapes checked up front.
    let mut jobs: Vec<(usize, &CheckpointModule, &CheckpointModule, usize)> = Vec::new();
    let mut largest_min_dim = 0;
    for (pi, p) in pairs.iter().enumerate() {
        let tuned_targets: BTreeMap<&str, &CheckpointModule> = p
            .tuned_map
            .modules()
            .iter()
            .map(|m| (m.kohya_name.as_str(), m))
            .collect();
        for m in p.base_map.modules() {
            let info = p.base.get(&m.target.weight).expect("module of this file");
            let Some(class) = classify(m, &info.shape) else {
                continue;
            };
            let rank = match class {
                Class::Linear => Some(opts.rank),
                Class::ResnetLinear => opts.conv_rank.map(|_| opts.rank),
                Class::Conv => opts.conv_rank,
                Class::TextEncoder => Some(opts.te_rank.unwrap_or(opts.rank)),
            };
            let Some(rank) = rank else { continue };
            let Some(tm) = tuned_targets.get(m.kohya_name.as_str()) else {
                return Err(Error::Invalid(format!(
                    "{}: has no '{}' (the checkpoints differ in structure)",
                    p.tuned.path().display(),
                    m.target.weight
                )));
            };
            let tinfo = p.tuned.get(&tm.target.weight).expect("module of this file");
            if tinfo.shape != info.shape || tm.target.rows != m.target.rows {
                return Err(Error::Invalid(format!(
                    "'{}' has shape {:?} in {} but {:?} in {}",
                    m.target.weight,
                    info.shape,
                    p.base.path().display(),
                    tinfo.shape,
                    p.tuned.path().display()
                )));
            }
            let rows = m.target.rows.as_ref().map_or(info.shape[0], |r| r.len());
            largest_min_dim = largest_min_dim.max(rows.min(info.numel() / info.shape[0]));
            jobs.push((pi, m, *tm, rank));
        }
    }
    if jobs.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no module a LoRA can target",
            base_path.display()
        )));
    }
    if opts.rank > largest_min_dim {
        return Err(Error::Invalid(format!(
            "--rank {} is larger than any target matrix allows (at most {largest_min_dim})",
            opts.rank
        )));
    }

    // Windows of modules: parallel inside a window, mapped input pages released after each, so
    // resident memory stays near one window's tensors instead of growing to both checkpoints.
    let mut results: Vec<Extracted> = Vec::with_capacity(jobs.len());
    opts.progress.start(jobs.len() as u64);
    for (w, window) in jobs.chunks(16).enumerate() {
        let part: Vec<Extracted> = window
            .par_iter()
            .enumerate()
            .map(|(j, (pi, m, tm, rank))| -> Result<Extracted> {
                let i = w * 16 + j;
                let b = read_slice(&pairs[*pi].base, m)?;
                let t = read_slice(&pairs[*pi].tuned, tm)?;
                let d: Vec<f32> = t.data.iter().zip(&b.data).map(|(x, y)| x - y).collect();
                let max = d.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = Tensor::new(b.shape.clone(), d);
                let energy = d.data.iter().map(|v| (*v as f64).powi(2)).sum();
                let component = m.target.component.name();
                if max <= opts.min_diff {
                    opts.progress.advance(1);
                    return Ok(Extracted {
                        name: m.kohya_name.clone(),
                        component,
                        factors: None,
                        energy,
                    });
                }
                let mut lr = truncated_svd(&d, *rank, opts.dynamic, i as u64)?;
                if let Some(q) = opts.clamp_quantile {
                    let (up, down) = (&mut lr.up, &mut lr.down);
                    clamp_quantile(up, down, q);
                }
                opts.progress.advance(1);
                Ok(Extracted {
                    name: m.kohya_name.clone(),
                    component,
                    factors: Some((lr, d.shape.clone())),
                    energy,
                })
            })
            .collect::<Result<_>>()?;
        results.extend(part);
        for p in &pairs {
            p.base.release_pages();
            p.tuned.release_pages();
        }
    }

    let mut report = ExtractReport {
        family: Some(fb),
        ..Default::default()
    };
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    let dtype = opts.dtype;
    let mut push = |name: String, t: Tensor| tensors.push(TensorSpec::encode(name, &t, dtype));
    let mut conv_used = None;
    for e in results {
        let stats = report.components.entry(e.component).or_default();
        let Some((lr, shape)) = e.factors else {
            stats.skipped += 1;
            continue;
        };
        let k = lr.rank;
        // Energy kept by the stored factors (after any clamping).
        let p = linalg::matmul(&lr.up, lr.rows, k, &lr.down, lr.cols);
        let kept: f64 = p.iter().map(|v| (*v as f64).powi(2)).sum();
        let retained = if e.energy > 0.0 {
            (kept.min(e.energy) / e.energy).sqrt()
        } else {
            1.0
        };
        stats.extracted += 1;
        stats.kept_energy += kept.min(e.energy);
        stats.total_energy += e.energy;
        if stats.worst.as_ref().is_none_or(|w| retained < w.1) {
            stats.worst = Some((e.name.clone(), retained));
        }
        let (up_shape, down_shape) = crate::adapter::lora_factor_shapes(&shape, k);
        if shape.len() == 4 && shape[2] * shape[3] > 1 {
            conv_used = Some(k);
        }
        push(
            format!("{}.alpha", e.name),
            Tensor::new(vec![], vec![k as f32]),
        );
        push(
            format!("{}.lora_down.weight", e.name),
            Tensor::new(down_shape, lr.down),
        );
        push(
            format!("{}.lora_up.weight", e.name),
            Tensor::new(up_shape, lr.up),
        );
    }
    if tensors.is_empty() && !opts.allow_empty {
        return Err(Error::Invalid(format!(
            "{} and {} do not differ in any targeted module (above --min-diff {}); no LoRA written (use --allow-empty to write one anyway)",
            base_path.display(),
            tuned_path.display(),
            opts.min_diff
        )));
    }

    let mut meta = BTreeMap::new();
    kohya_metadata::set_family(&mut meta, fb);
    // kohya's extract records the linear rank it was asked for as the network's dim.
    kohya_metadata::set_network(
        &mut meta,
        &NetworkShape {
            ranks: vec![opts.rank],
            conv_rank: conv_used.map(|c| opts.conv_rank.unwrap_or(c)),
            dynamic: opts.dynamic.is_some(),
        },
    );
    let mut record = serde_json::Map::new();
    for (role, path, file) in [
        ("base", base_path, &pairs[0].base),
        ("tuned", tuned_path, &pairs[0].tuned),
    ] {
        // A pipeline folder is identified by its first weight file (the UNet's, when present).
        let (path, file) = if path.is_dir() {
            (file.path(), file)
        } else {
            (path, file)
        };
        let h = hash_file(path, file.as_safetensors().map(|s| s.data_start()))?;
        record.insert(
            role.into(),
            serde_json::json!({"file": path.file_name().map(|n| n.to_string_lossy().into_owned()), "sha256": h.sha256, "autov2": h.autov2}),
        );
    }
    meta.insert(
        "loratool.extracted_from".into(),
        serde_json::Value::Object(record).to_string(),
    );
    kohya_metadata::seal(&mut meta, &tensors);
    match opts.format {
        TargetFormat::Kohya => {
            write_all(out, &meta, &tensors, &write_opts)?;
        }
        TargetFormat::Peft => {
            // Converted in memory and written once, through the same atomic writer.
            let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
            let header = build_header(&meta, &specs);
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&header);
            for (_, data) in &tensors {
                bytes.extend_from_slice(data);
            }
            drop(tensors);
            let kohya = Adapter::from_file(TensorFile::from_safetensors_bytes(out, bytes)?)?;
            write_converted(&kohya, out, TargetFormat::Peft, None, &write_opts)?;
        }
    }
    Ok(report)
}
