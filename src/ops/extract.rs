//! `loratool extract`: a LoRA from the difference between a fine-tuned checkpoint and its base.
//!
//! Per target module (what kohya targets: transformer linears and proj_in/out, text-encoder
//! attention and MLP, and with a conv rank the resnet/sampler convolutions), `D = tuned − base` in
//! f32, then a truncated SVD: randomized (oversampling 10, 2 power iterations) when the rank is
//! small against the matrix, a full thin SVD otherwise. `up = U_k Σ_k`, `down = V_kᵀ`,
//! alpha = k (scale 1).
//!
//! One pass over every tensor of both checkpoints, in parallel, one tensor at a time per worker:
//! a target weight is read once (all the q/k/v slices of a fused one from the same difference),
//! factorized, and its factors encoded to the output dtype at once; every other tensor is compared
//! (stored bytes first, values only when those differ) so the report can say which changed tensors
//! the LoRA leaves out and how much of the difference they hold. Each tensor's mapped pages are
//! released when it is done, so resident memory is a few tensors' worth whatever the checkpoint's
//! size, and neither checkpoint is ever held in f32.

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
use crate::tensors::writer::{build_header, hex, SafetensorsWriter, TensorSpec, WriteOptions};
use crate::tensors::{Dtype, Tensor, TensorFile, TensorInfo};
use crate::{Error, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// What a changed tensor that no extracted module covers is, grouped the way a user thinks of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unextracted {
    /// k×k convolutions of resnets and down/upsamplers: extracted with a conv rank.
    Conv,
    /// Resnets' `time_emb_proj` linears and 1×1 `conv_shortcut`s: extracted with a conv rank.
    ResnetLinear,
    /// Targeted modules whose largest |D| is at most `min_diff`.
    BelowMinDiff,
    /// The UNet's first and last convolution (kohya never targets them).
    ConvInOut,
    /// Timestep (and SDXL label / Flux guidance) embedding layers.
    TimeEmbedding,
    /// Token and position embeddings of the text encoders.
    Embedding,
    /// Weights and biases of group/layer norms.
    Norm,
    /// Biases of all other layers (a LoRA has none).
    Bias,
    /// Position ids and other integer tensors.
    Integer,
    /// The VAE of a single-file checkpoint.
    Vae,
    /// Any other layer no LoRA module targets (text projections, untargeted linears).
    Other,
}

impl Unextracted {
    /// What the tensors of this kind are, as a plural noun.
    pub fn describe(self) -> &'static str {
        match self {
            Unextracted::Conv => "conv 3×3 layers",
            Unextracted::ResnetLinear => "resnet time_emb_proj/conv_shortcut layers",
            Unextracted::BelowMinDiff => "modules at or below --min-diff",
            Unextracted::ConvInOut => "conv_in/conv_out tensors",
            Unextracted::TimeEmbedding => "time embedding tensors",
            Unextracted::Embedding => "token/position embeddings",
            Unextracted::Norm => "norm tensors",
            Unextracted::Bias => "biases",
            Unextracted::Integer => "position id/integer tensors",
            Unextracted::Vae => "VAE tensors",
            Unextracted::Other => "other untargeted tensors",
        }
    }
}

/// Changed tensors of one kind that the LoRA leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct NotExtracted {
    pub kind: Unextracted,
    /// Tensors (modules, for [`Unextracted::BelowMinDiff`]) whose values differ.
    pub count: usize,
    /// Their Σ ‖tuned − base‖².
    pub energy: f64,
}

#[derive(Debug, Clone, Default)]
pub struct ExtractReport {
    pub family: Option<BaseModel>,
    pub components: BTreeMap<&'static str, ComponentStats>,
    /// Σ ‖tuned − base‖² over every float tensor both checkpoints hold: the whole difference.
    pub total_energy: f64,
    /// Changed tensors no extracted module covers, by kind, largest share first.
    pub not_extracted: Vec<NotExtracted>,
    /// Tensors only one checkpoint has, or that differ in shape or type (not compared).
    pub unpaired: usize,
}

impl ExtractReport {
    /// The fraction of the whole difference (`total_energy`) that `energy` is.
    pub fn share(&self, energy: f64) -> f64 {
        if self.total_energy > 0.0 {
            energy / self.total_energy
        } else {
            0.0
        }
    }
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

/// The kind of a tensor no module is extracted from. `module` is the checkpoint module whose
/// weight (or bias, when the flag is set) it is, if any; its dotted path (diffusers, HF CLIP, BFL)
/// names the layer the same way whatever the file's own key spelling.
fn kind_of(info: &TensorInfo, module: Option<(&CheckpointModule, bool)>) -> Unextracted {
    let name = info.name.as_str();
    if name.starts_with("first_stage_model.") {
        return Unextracted::Vae;
    }
    if !info.dtype.is_float() || name.ends_with("position_ids") {
        return Unextracted::Integer;
    }
    match module {
        Some((m, is_bias)) => {
            if !is_bias {
                match classify(m, &info.shape) {
                    Some(Class::Conv) => return Unextracted::Conv,
                    Some(Class::ResnetLinear) => return Unextracted::ResnetLinear,
                    _ => {}
                }
            }
            kind_of_path(&m.path).unwrap_or(if is_bias {
                Unextracted::Bias
            } else {
                Unextracted::Other
            })
        }
        None => {
            kind_of_path(name).unwrap_or(if name.ends_with(".bias") || name.ends_with("_bias") {
                Unextracted::Bias
            } else {
                Unextracted::Other
            })
        }
    }
}

/// The kinds a layer's path tells by itself (by whole path segments: `embedders` is no embedding).
fn kind_of_path(path: &str) -> Option<Unextracted> {
    const TIME: &[&str] = &[
        "time_embedding",
        "time_embed",
        "add_embedding",
        "label_emb",
        "time_in",
        "guidance_in",
        "time_text_embed",
    ];
    let segments = || path.split('.');
    if segments().any(|s| s.contains("norm") || s.starts_with("ln_")) {
        Some(Unextracted::Norm)
    } else if segments().any(|s| TIME.contains(&s)) {
        Some(Unextracted::TimeEmbedding)
    } else if segments().any(|s| s == "conv_in" || s == "conv_out") {
        Some(Unextracted::ConvInOut)
    } else if segments().any(|s| s.ends_with("embedding") || s == "pos_embed") {
        Some(Unextracted::Embedding)
    } else {
        None
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

/// Elements decoded at a time when a tensor is streamed through f32.
const BLOCK: usize = 1 << 18;

/// Decodes a tensor of the base and its counterpart in the tuned file side by side, a block at a
/// time, into `f(offset, base_block, tuned_block)`: no f32 copy of either whole tensor exists.
fn for_each_block(
    files: (&TensorFile, &TensorFile),
    infos: (&TensorInfo, &TensorInfo),
    mut f: impl FnMut(usize, &[f32], &[f32]) -> Result<()>,
) -> Result<()> {
    let (bi, ti) = infos;
    let (bb, tb) = (files.0.raw_bytes(&bi.name)?, files.1.raw_bytes(&ti.name)?);
    let (bs, ts) = match (bi.dtype.size(), ti.dtype.size()) {
        (Some(b), Some(t)) => (b, t),
        _ => {
            return Err(Error::bad_tensor(
                files.0.path(),
                &bi.name,
                "has no f32 view",
            ))
        }
    };
    let n = bi.numel();
    let mut x = vec![0f32; BLOCK.min(n)];
    let mut y = vec![0f32; BLOCK.min(n)];
    let mut at = 0;
    while at < n {
        let len = BLOCK.min(n - at);
        let (x, y) = (&mut x[..len], &mut y[..len]);
        let cannot = |file: &TensorFile, info: &TensorInfo| {
            Error::bad_tensor(
                file.path(),
                &info.name,
                format!("dtype {} cannot be converted to f32", info.dtype),
            )
        };
        bi.dtype
            .decode_into(&bb[at * bs..(at + len) * bs], x)
            .ok_or_else(|| cannot(files.0, bi))?;
        ti.dtype
            .decode_into(&tb[at * ts..(at + len) * ts], y)
            .ok_or_else(|| cannot(files.1, ti))?;
        f(at, x, y)?;
        at += len;
    }
    Ok(())
}

/// `tuned − base` of a whole target weight in f32, refusing NaN or Inf in either file.
fn difference(
    files: (&TensorFile, &TensorFile),
    infos: (&TensorInfo, &TensorInfo),
) -> Result<Vec<f32>> {
    let mut d = vec![0f32; infos.0.numel()];
    for_each_block(files, infos, |at, b, t| {
        for (file, info, v) in [(files.0, infos.0, b), (files.1, infos.1, t)] {
            if v.iter().any(|v| !v.is_finite()) {
                return Err(Error::bad_tensor(
                    file.path(),
                    &info.name,
                    "contains NaN or Inf values",
                ));
            }
        }
        for ((d, t), b) in d[at..at + b.len()].iter_mut().zip(t).zip(b) {
            *d = t - b;
        }
        Ok(())
    })?;
    Ok(d)
}

/// Whether a tensor no module covers changed, and its ‖tuned − base‖² (finite values only; 0 for
/// integer tensors). Equal stored bytes are taken as unchanged without decoding anything.
fn compare(
    files: (&TensorFile, &TensorFile),
    infos: (&TensorInfo, &TensorInfo),
) -> Result<Option<f64>> {
    let (bi, ti) = infos;
    if same_bytes(files, infos)? {
        return Ok(None);
    }
    if !(bi.dtype.is_float() && ti.dtype.is_float()) {
        return Ok(Some(0.0));
    }
    let (mut changed, mut energy) = (false, 0f64);
    for_each_block(files, infos, |_, b, t| {
        for (t, b) in t.iter().zip(b) {
            if t == b || t.is_nan() && b.is_nan() {
                continue;
            }
            changed = true;
            let d = t - b;
            if d.is_finite() {
                energy += (d as f64) * (d as f64);
            }
        }
        Ok(())
    })?;
    Ok(changed.then_some(energy))
}

/// Whether both tensors store the same bytes in the same dtype (equal values, nothing to decode).
fn same_bytes(
    files: (&TensorFile, &TensorFile),
    infos: (&TensorInfo, &TensorInfo),
) -> Result<bool> {
    Ok(infos.0.dtype == infos.1.dtype
        && files.0.raw_bytes(&infos.0.name)? == files.1.raw_bytes(&infos.1.name)?)
}

fn sum_of_squares(v: &[f32]) -> f64 {
    v.iter().map(|v| (*v as f64) * (*v as f64)).sum()
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

/// One module to factorize: its place in the file's module order (the SVD's seed), the module
/// and the rank it gets.
struct Job<'a> {
    seed: usize,
    module: &'a CheckpointModule,
    rank: usize,
}

/// One tensor of the base checkpoint and what extract does with it.
struct Item<'a> {
    pair: usize,
    base: &'a TensorInfo,
    /// Its counterpart in the tuned checkpoint; `None` when that has none of the same shape.
    tuned: Option<&'a TensorInfo>,
    /// The modules cut from it: one, or the row slices of a fused weight (q/k/v of OpenCLIP's
    /// `in_proj_weight`), all from one read. Empty for tensors that are only compared.
    jobs: Vec<Job<'a>>,
    /// What it counts as when it changed and no module is extracted from it.
    kind: Unextracted,
}

/// A module's result: its factors already encoded to the output dtype (alpha, down, up).
struct Extracted {
    name: String,
    component: &'static str,
    /// ‖D‖² of the module's rows.
    energy: f64,
    /// `None` when skipped (difference at most min_diff).
    factors: Option<Factors>,
}

struct Factors {
    rank: usize,
    conv: bool,
    /// ‖up·down‖² of the stored factors (after any clamp).
    kept: f64,
    /// alpha, down, up, and where their bytes are in the [`Spill`].
    tensors: [(TensorSpec, u64); 3],
}

/// Encoded factors of finished modules, in the order they finish, in an unnamed temporary file
/// beside the output. The output is written from it at the end, since its header (which holds
/// kohya's hash of all the data) comes first: so the LoRA being built is never held in memory,
/// which would grow with the model (255 MB for SDXL at rank 32, four times that at rank 128).
struct Spill {
    /// Named in errors: the output the spill is for.
    out: PathBuf,
    file: Mutex<(File, u64)>,
}

impl Spill {
    fn beside(out: &Path) -> Result<Spill> {
        let dir = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let file = tempfile::tempfile_in(dir).map_err(|e| Error::io(out, e))?;
        Ok(Spill {
            out: out.to_path_buf(),
            file: Mutex::new((file, 0)),
        })
    }

    /// Appends `bytes`; returns where they start.
    fn put(&self, bytes: &[u8]) -> Result<u64> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, len) = &mut *guard;
        let at = *len;
        file.write_all(bytes).map_err(|e| Error::io(&self.out, e))?;
        *len += bytes.len() as u64;
        Ok(at)
    }

    /// The file and a reader of byte ranges of it, once every module is done.
    fn finish(self) -> (File, PathBuf) {
        let (file, _) = self.file.into_inner().unwrap_or_else(|e| e.into_inner());
        (file, self.out)
    }
}

fn read_at(file: &File, out: &Path, at: u64, len: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut bytes, at)
        .map_err(|e| Error::io(out, e))?;
    Ok(bytes)
}

/// What one item gave: its modules, and the difference it holds that no module took.
#[derive(Default)]
struct ItemResult {
    energy: f64,
    modules: Vec<Extracted>,
    left: Vec<(Unextracted, f64)>,
}

fn truncated_svd(
    d: &[f32],
    (m, n): (usize, usize),
    rank: usize,
    dynamic: Option<RankRule>,
    seed: u64,
) -> Result<LowRank> {
    let full = m.min(n);
    let k = rank.min(full);
    // Dynamic rules need the whole spectrum; small matrices are cheap to decompose fully.
    let lr = if dynamic.is_none() && k + 10 < full / 2 {
        linalg::truncate_randomized(d, m, n, k, 10, 2, seed)
    } else {
        linalg::truncate_dense(d, m, n, full)
    }
    .map_err(Error::Invalid)?;
    let keep = match dynamic {
        Some(rule) => rule.rank_for(&lr.singular_values).min(k),
        None => k,
    };
    Ok(lr.keep(keep.max(1)))
}

/// Factorizes one module's rows of the difference and encodes the factors.
fn extract_module(
    d: &[f32],
    shape: Vec<usize>,
    job: &Job,
    opts: &ExtractOptions,
    spill: &Spill,
) -> Result<Extracted> {
    let m = job.module;
    let energy = sum_of_squares(d);
    let max = d.iter().fold(0f32, |a, v| a.max(v.abs()));
    let mut out = Extracted {
        name: m.kohya_name.clone(),
        component: m.target.component.name(),
        energy,
        factors: None,
    };
    if max <= opts.min_diff {
        return Ok(out);
    }
    let rows = shape[0];
    let cols = d.len() / rows;
    let mut lr = truncated_svd(d, (rows, cols), job.rank, opts.dynamic, job.seed as u64)?;
    if let Some(q) = opts.clamp_quantile {
        clamp_quantile(&mut lr.up, &mut lr.down, q);
    }
    let k = lr.rank;
    // ‖up·down‖² = tr(upᵀup · down downᵀ): O((m+n)k²), the m×n product is never formed.
    let kept = linalg::trace_of_product(
        &linalg::gram_of_columns(&lr.up, rows, k),
        &linalg::gram_of_rows(&lr.down, k, cols),
        k,
    );
    let (up_shape, down_shape) = crate::adapter::lora_factor_shapes(&shape, k);
    let encode = |suffix: &str, t: Tensor| -> Result<(TensorSpec, u64)> {
        let (spec, bytes) =
            TensorSpec::encode(format!("{}.{suffix}", m.kohya_name), &t, opts.dtype);
        Ok((spec, spill.put(&bytes)?))
    };
    out.factors = Some(Factors {
        rank: k,
        conv: shape.len() == 4 && shape[2] * shape[3] > 1,
        kept,
        tensors: [
            encode("alpha", Tensor::new(vec![], vec![k as f32]))?,
            encode("lora_down.weight", Tensor::new(down_shape, lr.down))?,
            encode("lora_up.weight", Tensor::new(up_shape, lr.up))?,
        ],
    });
    Ok(out)
}

/// One tensor: the difference read once and every module cut from it, or a comparison.
fn process(
    item: &Item,
    pairs: &[Pair],
    opts: &ExtractOptions,
    spill: &Spill,
) -> Result<ItemResult> {
    let p = &pairs[item.pair];
    let Some(tuned) = item.tuned else {
        return Ok(ItemResult::default());
    };
    let files = (&p.base, &p.tuned);
    let infos = (item.base, tuned);
    let mut result = ItemResult::default();
    if item.jobs.is_empty() {
        let changed = compare(files, infos);
        p.base.release_tensor(&item.base.name);
        p.tuned.release_tensor(&tuned.name);
        if let Some(energy) = changed? {
            result.energy = energy;
            result.left.push((item.kind, energy));
        }
        return Ok(result);
    }
    let shape = &item.base.shape;
    let d = match same_bytes(files, infos) {
        // Unchanged: every module is skipped without decoding anything.
        Ok(true) => Ok(None),
        Ok(false) => difference(files, infos).map(Some),
        Err(e) => Err(e),
    };
    p.base.release_tensor(&item.base.name);
    p.tuned.release_tensor(&tuned.name);
    let Some(d) = d? else {
        for job in &item.jobs {
            opts.progress.advance(1);
            result.modules.push(Extracted {
                name: job.module.kohya_name.clone(),
                component: job.module.target.component.name(),
                energy: 0.0,
                factors: None,
            });
        }
        return Ok(result);
    };
    result.energy = sum_of_squares(&d);
    let cols = d.len() / shape[0].max(1);
    let mut covered = 0;
    for job in &item.jobs {
        let rows = job.module.target.rows.clone().unwrap_or(0..shape[0]);
        covered += rows.len();
        let mut slice_shape = shape.clone();
        slice_shape[0] = rows.len();
        let e = extract_module(
            &d[rows.start * cols..rows.end * cols],
            slice_shape,
            job,
            opts,
            spill,
        )?;
        opts.progress.advance(1);
        if e.factors.is_none() && e.energy > 0.0 {
            result.left.push((Unextracted::BelowMinDiff, e.energy));
        }
        result.modules.push(e);
    }
    if covered < shape[0] {
        // Rows of a fused weight that no module slices (none in the families known today).
        let taken: f64 = result.modules.iter().map(|e| e.energy).sum();
        let rest = (result.energy - taken).max(0.0);
        if rest > 0.0 {
            result.left.push((Unextracted::Other, rest));
        }
    }
    Ok(result)
}

/// What extract will do: every tensor of the base, in file order, with the modules extracted from
/// it (ranks and shapes checked up front) or the kind it counts as when it changed.
struct Plan<'a> {
    items: Vec<Item<'a>>,
    /// Modules to factorize.
    modules: usize,
    /// The largest `min(rows, cols)` of any target, the highest useful rank.
    largest_min_dim: usize,
    /// Tensors only one checkpoint has (or with a different shape).
    unpaired: usize,
}

fn plan<'a>(pairs: &'a [Pair], opts: &ExtractOptions) -> Result<Plan<'a>> {
    let mut items: Vec<Item> = Vec::new();
    let mut modules = 0;
    let mut largest_min_dim = 0;
    let mut unpaired = 0;
    for (pi, p) in pairs.iter().enumerate() {
        let tuned_modules: HashMap<&str, &CheckpointModule> = p
            .tuned_map
            .modules()
            .iter()
            .map(|m| (m.kohya_name.as_str(), m))
            .collect();
        // Tensor names of the tuned file by the base's names: a module's weight and bias may be
        // spelled differently (SD1 text encoders with or without `text_model.`).
        let mut tuned_name: HashMap<&str, &str> = HashMap::new();
        let mut module_of: HashMap<&str, (&CheckpointModule, bool)> = HashMap::new();
        let mut jobs: HashMap<&str, Vec<Job>> = HashMap::new();
        for m in p.base_map.modules() {
            let weight = m.target.weight.as_str();
            module_of.entry(weight).or_insert((m, false));
            if let Some(b) = &m.target.bias {
                module_of.entry(b.as_str()).or_insert((m, true));
            }
            let tm = tuned_modules.get(m.kohya_name.as_str());
            if let Some(tm) = tm {
                tuned_name.insert(weight, &tm.target.weight);
                if let (Some(b), Some(tb)) = (&m.target.bias, &tm.target.bias) {
                    tuned_name.insert(b, tb);
                }
            }
            let info = p.base.get(weight).expect("module of this file");
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
            let Some(tm) = tm else {
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
            jobs.entry(weight).or_default().push(Job {
                seed: modules,
                module: m,
                rank,
            });
            modules += 1;
        }
        let mut paired = HashSet::new();
        for info in p.base.tensors() {
            let name = info.name.as_str();
            let tuned = p
                .tuned
                .get(tuned_name.get(name).copied().unwrap_or(name))
                .filter(|t| t.shape == info.shape);
            match tuned {
                Some(t) => {
                    paired.insert(t.name.as_str());
                }
                None => unpaired += 1,
            }
            let jobs = jobs.remove(name).unwrap_or_default();
            items.push(Item {
                pair: pi,
                base: info,
                tuned,
                kind: kind_of(info, module_of.get(name).copied()),
                jobs,
            });
        }
        unpaired += p.tuned.tensors().len() - paired.len();
    }
    Ok(Plan {
        items,
        modules,
        largest_min_dim,
        unpaired,
    })
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

    let Plan {
        items,
        modules,
        largest_min_dim,
        unpaired,
    } = plan(&pairs, opts)?;
    if modules == 0 {
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

    // All tensors in parallel, each read once and its pages released when done; results keep
    // file order, and only the encoded factors outlive their tensor.
    opts.progress.start(modules as u64);
    let spill = Spill::beside(out)?;
    let results: Vec<ItemResult> = items
        .par_iter()
        .map(|item| process(item, &pairs, opts, &spill))
        .collect::<Result<_>>()?;
    let (spill, out_label) = spill.finish();
    drop(items);

    let mut report = ExtractReport {
        family: Some(fb),
        unpaired,
        ..Default::default()
    };
    let mut left: BTreeMap<Unextracted, NotExtracted> = BTreeMap::new();
    let mut tensors: Vec<(TensorSpec, u64)> = Vec::new();
    let mut conv_used = None;
    for r in results {
        report.total_energy += r.energy;
        for (kind, energy) in r.left {
            let entry = left.entry(kind).or_insert(NotExtracted {
                kind,
                count: 0,
                energy: 0.0,
            });
            entry.count += 1;
            entry.energy += energy;
        }
        for e in r.modules {
            let stats = report.components.entry(e.component).or_default();
            let Some(f) = e.factors else {
                stats.skipped += 1;
                continue;
            };
            let kept = f.kept.min(e.energy);
            let retained = if e.energy > 0.0 {
                (kept / e.energy).sqrt()
            } else {
                1.0
            };
            stats.extracted += 1;
            stats.kept_energy += kept;
            stats.total_energy += e.energy;
            if stats.worst.as_ref().is_none_or(|w| retained < w.1) {
                stats.worst = Some((e.name.clone(), retained));
            }
            if f.conv {
                conv_used = Some(f.rank);
            }
            tensors.extend(f.tensors);
        }
    }
    report.not_extracted = left.into_values().collect();
    report
        .not_extracted
        .sort_by(|a, b| b.energy.total_cmp(&a.energy).then(a.kind.cmp(&b.kind)));
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
    match opts.format {
        TargetFormat::Kohya => {
            // kohya's hash of the data in write order, then the data copied from the spill.
            let mut hash = Sha256::new();
            for (spec, at) in &tensors {
                hash.update(read_at(&spill, &out_label, *at, spec.byte_len())?);
            }
            kohya_metadata::seal_with_hash(&mut meta, hex(&hash.finalize()));
            let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
            let mut w = SafetensorsWriter::create(out, &meta, specs, &write_opts)?;
            for (spec, at) in &tensors {
                w.copy_tensor(&spec.name, &spill, *at, spec.byte_len())?;
            }
            w.finish()?;
        }
        TargetFormat::Peft => {
            let tensors = tensors
                .into_iter()
                .map(|(spec, at)| {
                    let bytes = read_at(&spill, &out_label, at, spec.byte_len())?;
                    Ok((spec, bytes))
                })
                .collect::<Result<Vec<_>>>()?;
            kohya_metadata::seal(&mut meta, &tensors);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::writer::write_all;

    fn opts(rank: usize) -> ExtractOptions {
        ExtractOptions {
            rank,
            conv_rank: None,
            te_rank: None,
            min_diff: 0.0,
            dynamic: None,
            clamp_quantile: None,
            dtype: Dtype::F16,
            format: TargetFormat::Kohya,
            force: true,
            allow_empty: false,
            progress: Default::default(),
        }
    }

    /// A fused weight (OpenCLIP `in_proj_weight` of SDXL's second text encoder) is read once per
    /// tensor, and each q/k/v module cut from that one difference gets exactly the bytes that
    /// reading its own rows gives (what extract did before: one `read_f32_rows` per slice).
    #[test]
    fn fused_weight_read_once_equals_slice_by_slice() {
        let base_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/sdxl_ldm.safetensors");
        let base = TensorFile::open(&base_path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tuned_path = dir.path().join("tuned.safetensors");
        let mut x = 99u64;
        let tensors: Vec<(TensorSpec, Vec<u8>)> = base
            .tensors()
            .iter()
            .map(|t| {
                let mut v = base.read_f32(&t.name).unwrap();
                if t.name.ends_with("in_proj_weight") {
                    for e in v.data.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *e += 0.01 * ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5);
                    }
                }
                TensorSpec::encode(t.name.clone(), &v, t.dtype)
            })
            .collect();
        write_all(&tuned_path, base.metadata(), &tensors, &Default::default()).unwrap();

        let (pairs, _) = open_pairs(&base_path, &tuned_path).unwrap();
        let opts = opts(2);
        let plan = plan(&pairs, &opts).unwrap();
        let spill = Spill::beside(&dir.path().join("out.safetensors")).unwrap();
        let fused: Vec<&Item> = plan.items.iter().filter(|i| i.jobs.len() > 1).collect();
        assert!(!fused.is_empty(), "the fixture has fused in_proj weights");
        for item in fused {
            assert!(item.base.name.ends_with("in_proj_weight"));
            let got = process(item, &pairs, &opts, &spill).unwrap();
            assert_eq!(got.modules.len(), 3);
            let p = &pairs[item.pair];
            for (job, e) in item.jobs.iter().zip(&got.modules) {
                let rows = job.module.target.rows.clone().unwrap();
                let w = &job.module.target.weight;
                let (b, t) = (
                    p.base.read_f32_rows(w, rows.clone()).unwrap(),
                    p.tuned.read_f32_rows(w, rows).unwrap(),
                );
                let d: Vec<f32> = t.data.iter().zip(&b.data).map(|(t, b)| t - b).collect();
                let want = extract_module(&d, b.shape.clone(), job, &opts, &spill).unwrap();
                assert_eq!(e.name, want.name);
                assert_eq!(e.energy, want.energy);
                let (f, w) = (e.factors.as_ref().unwrap(), want.factors.unwrap());
                let guard = spill.file.lock().unwrap();
                for ((a, at), (b, bt)) in f.tensors.iter().zip(&w.tensors) {
                    assert_eq!(a, b);
                    let read = |at: u64| read_at(&guard.0, &spill.out, at, a.byte_len()).unwrap();
                    assert_eq!(read(*at), read(*bt), "{}", a.name);
                }
            }
        }
    }

    #[test]
    fn layers_are_grouped_by_their_path() {
        use Unextracted::*;
        for (path, kind) in [
            ("conv_in", Some(ConvInOut)),
            ("down_blocks.0.resnets.0.norm1", Some(Norm)),
            ("text_model.final_layer_norm", Some(Norm)),
            ("transformer.resblocks.0.ln_1", Some(Norm)),
            ("time_embedding.linear_1", Some(TimeEmbedding)),
            ("add_embedding.linear_2", Some(TimeEmbedding)),
            ("text_model.embeddings.token_embedding", Some(Embedding)),
            (
                "conditioner.embedders.1.model.positional_embedding",
                Some(Embedding),
            ),
            ("conditioner.embedders.1.model.text_projection", None),
        ] {
            assert_eq!(kind_of_path(path), kind, "{path}");
        }
    }
}
