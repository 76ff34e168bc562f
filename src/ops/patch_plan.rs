//! Which checkpoint tensors weighted LoRAs patch, and the patched tensors themselves: the seam
//! that `merge` (which streams every tensor to a new file) and the preview sampler (which asks for
//! patched tensors by name) share, so that both apply LoRAs the same way.
//!
//! Building a plan parses every LoRA, refuses non-finite factors, checks each LoRA's family against
//! the checkpoint's, looks every module up in the checkpoint's key map (fused q/k/v weights give row
//! slices), checks that each delta fits its target, and records the multiplier each patch applies:
//! the user's weight for the module's component times its block weight. That product is made here
//! and nowhere else. Nothing is read beyond headers, alphas and the finiteness check until a
//! patched tensor is asked for.

use crate::adapter::keys::Role;
use crate::adapter::{delta, Adapter, AdapterModule, ModuleKind};
use crate::family::block_weight::{BlockWeightSpec, BlockWeights};
use crate::family::checkpoint::{KeyMap, Target};
use crate::family::layout::Checkpoint;
use crate::family::{self, BaseModel, Component};
use crate::tensors::{Tensor, TensorFile};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

/// One LoRA and the weights it is applied with (A1111's `<lora:name:te:unet>`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeight {
    pub path: PathBuf,
    /// Multiplier for text-encoder modules.
    pub text_encoder: f32,
    /// Multiplier for UNet / transformer modules.
    pub unet: f32,
    /// Per-block multipliers on top (the LoRA Block Weight convention, `lbw=`).
    pub block_weights: Option<BlockWeightSpec>,
}

impl LoraWeight {
    /// A LoRA at full strength.
    pub fn new(path: impl Into<PathBuf>) -> LoraWeight {
        LoraWeight {
            path: path.into(),
            text_encoder: 1.0,
            unet: 1.0,
            block_weights: None,
        }
    }

    /// A LoRA at one weight for every component (`PATH:W`).
    pub fn weighted(path: impl Into<PathBuf>, weight: f32) -> LoraWeight {
        LoraWeight {
            text_encoder: weight,
            unet: weight,
            ..LoraWeight::new(path)
        }
    }

    /// The user's weight for a module of `component`.
    pub fn component_weight(&self, component: Component) -> f32 {
        if component.is_text_encoder() {
            self.text_encoder
        } else {
            self.unet
        }
    }

    /// The block weights for a model of `family`, checked against it (an `lbw=` list of the wrong
    /// length is an error naming this LoRA).
    pub fn block_weights_for(&self, family: BaseModel) -> Result<Option<BlockWeights>> {
        self.block_weights
            .as_ref()
            .map(|spec| {
                spec.resolve(family)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", self.path.display())))
            })
            .transpose()
    }

    /// What one module of this LoRA is multiplied by, besides its own scale: the weight of its
    /// component times its block's weight. Every caller takes it from here.
    pub fn multiplier(&self, m: &AdapterModule, blocks: Option<&BlockWeights>) -> f32 {
        self.component_weight(m.component) * blocks.map_or(1.0, |b| b.weight_for(m))
    }
}

#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// A LoRA module that matches nothing, or whose metadata and keys name different families,
    /// is an error.
    pub strict: bool,
    /// Accept a LoRA of another family than the checkpoint's.
    pub any_family: bool,
}

/// One module of one LoRA applied to one tensor (or a row slice of it).
#[derive(Debug, Clone)]
pub struct Patch {
    /// Index into [`PatchPlan::adapters`].
    pub lora: usize,
    /// Index into that adapter's modules.
    pub module: usize,
    /// Row slice of a fused weight (q/k/v of `in_proj_weight`, Flux `qkv`/`linear1`).
    pub rows: Option<Range<usize>>,
    /// Everything the delta is multiplied by besides the module's own scale.
    pub multiplier: f32,
    /// The patch changes the target's bias, not its weight.
    pub bias: bool,
}

/// How well one LoRA matched the checkpoint.
#[derive(Debug, Clone)]
pub struct LoraMatch {
    pub path: PathBuf,
    pub matched: usize,
    /// Names of the modules that have no target in the checkpoint.
    pub unmatched: Vec<String>,
}

/// The patches of one checkpoint file, by tensor name.
pub type FilePatches = BTreeMap<String, Vec<Patch>>;

pub struct PatchPlan<'c> {
    pub checkpoint: &'c Checkpoint,
    pub family: BaseModel,
    pub loras: Vec<LoraWeight>,
    pub adapters: Vec<Adapter>,
    /// Per checkpoint file (same order as `checkpoint.files`).
    pub files: Vec<FilePatches>,
    pub matches: Vec<LoraMatch>,
}

impl<'c> PatchPlan<'c> {
    /// Opens every LoRA and plans where each of its modules lands in `checkpoint`.
    pub fn build(
        checkpoint: &'c Checkpoint,
        loras: &[LoraWeight],
        opts: &PlanOptions,
    ) -> Result<PatchPlan<'c>> {
        let adapters: Vec<Adapter> = loras
            .iter()
            .map(|l| Adapter::open(&l.path))
            .collect::<Result<_>>()?;
        for a in &adapters {
            a.check_finite()?;
            a.file.release_pages(); // parsing and the finiteness check touched the whole file
        }
        Self::from_adapters(checkpoint, loras, adapters, opts)
    }

    /// Plans already-parsed adapters (one per entry of `loras`).
    pub fn from_adapters(
        checkpoint: &'c Checkpoint,
        loras: &[LoraWeight],
        adapters: Vec<Adapter>,
        opts: &PlanOptions,
    ) -> Result<PatchPlan<'c>> {
        let family = checkpoint.family();
        for (adapter, lw) in adapters.iter().zip(loras) {
            let detected = family::detect(adapter.file.metadata(), &adapter.modules);
            if let (true, Some(metadata), Some(keys)) =
                (opts.strict, detected.from_metadata, detected.from_keys)
            {
                if metadata != keys {
                    return Err(Error::FamilyConflict {
                        lora: lw.path.clone(),
                        metadata: metadata.name(),
                        keys: keys.name(),
                    });
                }
            }
            let fam = detected.base_model;
            let differs =
                fam != BaseModel::Unknown && family != BaseModel::Unknown && fam != family;
            if differs && !opts.any_family {
                return Err(Error::FamilyMismatch {
                    lora: lw.path.clone(),
                    lora_family: fam.name(),
                    other: format!(
                        "{} is a {} checkpoint",
                        checkpoint.root.display(),
                        family.name()
                    ),
                });
            }
        }

        // Block weights follow the checkpoint's layout; a LoRA's own family decides only when
        // the checkpoint does not tell.
        let blocks: Vec<Option<BlockWeights>> = adapters
            .iter()
            .zip(loras)
            .map(|(a, lw)| {
                let fam = match family {
                    BaseModel::Unknown => family::detect(a.file.metadata(), &a.modules).base_model,
                    f => f,
                };
                lw.block_weights_for(fam)
            })
            .collect::<Result<_>>()?;
        let mut matched: Vec<Vec<bool>> = adapters
            .iter()
            .map(|a| vec![false; a.modules.len()])
            .collect();
        let mut files = Vec::with_capacity(checkpoint.files.len());
        for cf in &checkpoint.files {
            let base = &cf.file;
            let keymap = KeyMap::build(base.tensors(), cf.layout, family);
            let mut patches = FilePatches::new();
            for (li, (adapter, lw)) in adapters.iter().zip(loras).enumerate() {
                for (mi, m) in adapter.modules.iter().enumerate() {
                    if cf.layout.component().is_some_and(|c| c != m.component) {
                        continue;
                    }
                    let Some(target) = keymap.lookup(m) else {
                        continue;
                    };
                    check_fits(base, target, m, adapter)?;
                    matched[li][mi] = true;
                    let multiplier = lw.multiplier(m, blocks[li].as_ref());
                    if multiplier == 0.0 {
                        // Matched, but it changes nothing: the tensor keeps its exact bits.
                        continue;
                    }
                    let patch = |bias| Patch {
                        lora: li,
                        module: mi,
                        rows: target.rows.clone(),
                        multiplier,
                        bias,
                    };
                    patches
                        .entry(target.weight.clone())
                        .or_default()
                        .push(patch(false));
                    let changes_bias =
                        m.tensor(Role::DiffBias).is_some() || m.tensor(Role::NormBias).is_some();
                    if changes_bias {
                        let Some(bias) = &target.bias else {
                            return Err(Error::Invalid(format!(
                                "{}: module '{}' changes a bias, but '{}' has none in {}",
                                adapter.file.path().display(),
                                m.name,
                                target.weight,
                                base.path().display()
                            )));
                        };
                        patches.entry(bias.clone()).or_default().push(patch(true));
                    }
                }
            }
            files.push(patches);
        }

        let mut matches = Vec::with_capacity(adapters.len());
        for (li, (adapter, lw)) in adapters.iter().zip(loras).enumerate() {
            let unmatched: Vec<String> = adapter
                .modules
                .iter()
                .zip(&matched[li])
                .filter(|(_, hit)| !**hit)
                .map(|(m, _)| m.name.clone())
                .collect();
            let hits = adapter.modules.len() - unmatched.len();
            if hits == 0 {
                return Err(Error::NothingMatched {
                    lora: lw.path.clone(),
                    modules: adapter.modules.len(),
                    base: checkpoint.root.clone(),
                });
            }
            if opts.strict && !unmatched.is_empty() {
                return Err(Error::Unmatched {
                    lora: lw.path.clone(),
                    modules: adapter.modules.len(),
                    unmatched,
                    base: checkpoint.root.clone(),
                });
            }
            matches.push(LoraMatch {
                path: lw.path.clone(),
                matched: hits,
                unmatched,
            });
        }
        Ok(PatchPlan {
            checkpoint,
            family,
            loras: loras.to_vec(),
            adapters,
            files,
            matches,
        })
    }

    /// The adapter and module a patch applies.
    pub fn module(&self, p: &Patch) -> (&Adapter, &AdapterModule) {
        let adapter = &self.adapters[p.lora];
        (adapter, &adapter.modules[p.module])
    }

    /// True when the patch is a plain low-rank product `up · down` on a weight (no Tucker core,
    /// no DoRA magnitude): what merge's row-block kernels apply without a dense delta.
    pub fn is_plain_low_rank(&self, p: &Patch) -> bool {
        let (_, m) = self.module(p);
        !p.bias && !m.dora && m.plain_factors().is_some()
    }

    /// The checkpoint file holding a tensor, with its patches (the first file that has it).
    pub fn find(&self, name: &str) -> Option<(&'c TensorFile, Option<&[Patch]>)> {
        self.checkpoint
            .files
            .iter()
            .zip(&self.files)
            .find(|(cf, _)| cf.file.get(name).is_some())
            .map(|(cf, patches)| (&cf.file, patches.get(name).map(Vec::as_slice)))
    }

    /// A tensor of the checkpoint in f32 with every LoRA applied, for any adapter kind.
    pub fn patched_tensor(&self, name: &str) -> Result<Tensor> {
        let (file, patches) = self.find(name).ok_or_else(|| {
            Error::bad_tensor(
                &self.checkpoint.root,
                name,
                "no such tensor in the checkpoint",
            )
        })?;
        self.apply(file, name, patches.unwrap_or(&[]))
    }

    /// `name` from `file`, decoded to f32, with `patches` applied in order.
    /// Plain LoRAs are decoded and added in one parallel pass by merge's row-block kernels (no
    /// dense delta), the rest by [`PatchPlan::apply_dense`].
    pub fn apply(&self, file: &TensorFile, name: &str, patches: &[Patch]) -> Result<Tensor> {
        match super::merge::patched_f32_blocks(self, file, name, patches) {
            Some(w) => w,
            None => self.apply_dense(file, name, patches),
        }
    }

    /// [`PatchPlan::apply`] through each patch's dense delta, for every adapter kind.
    pub fn apply_dense(&self, file: &TensorFile, name: &str, patches: &[Patch]) -> Result<Tensor> {
        let mut w = file.read_f32(name)?;
        for p in patches {
            let (adapter, m) = self.module(p);
            apply_patch(&mut w, 0, p, m, adapter)?;
        }
        Ok(w)
    }

    /// Rows `rows` of `name` from `file` (a range [`patched_rows`] gave), decoded to f32, with the
    /// patches whose row slices lie inside it applied in order; patches elsewhere are skipped. The
    /// rows equal the same rows of [`PatchPlan::apply`]'s result.
    pub fn apply_rows(
        &self,
        file: &TensorFile,
        name: &str,
        rows: Range<usize>,
        patches: &[Patch],
    ) -> Result<Tensor> {
        let mut w = file.read_f32_rows(name, rows.clone())?;
        for p in patches {
            let inside = match &p.rows {
                Some(r) if rows.start <= r.start && r.end <= rows.end => true,
                Some(r) if r.end <= rows.start || rows.end <= r.start => false,
                _ => {
                    return Err(Error::Invalid(format!(
                        "'{name}': a patch of rows {:?} is not inside rows {rows:?}",
                        p.rows
                    )))
                }
            };
            if inside {
                let (adapter, m) = self.module(p);
                apply_patch(&mut w, rows.start, p, m, adapter)?;
            }
        }
        Ok(w)
    }
}

/// The rows of a tensor that `patches` change, as sorted, disjoint ranges (overlapping or
/// adjacent slices joined); `None` when a patch covers the whole tensor. A LoRA on q of a fused
/// `in_proj_weight` gives the first third: the other rows need not be decoded at all.
pub fn patched_rows(patches: &[Patch]) -> Option<Vec<Range<usize>>> {
    let mut ranges: Vec<Range<usize>> = patches
        .iter()
        .map(|p| p.rows.clone())
        .collect::<Option<_>>()?;
    ranges.retain(|r| !r.is_empty());
    ranges.sort_by_key(|r| r.start);
    let mut joined: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match joined.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => joined.push(r),
        }
    }
    Some(joined)
}

/// Applies one patch to `w`, which holds the target's rows from `first_row` on.
fn apply_patch(
    w: &mut Tensor,
    first_row: usize,
    p: &Patch,
    m: &AdapterModule,
    adapter: &Adapter,
) -> Result<()> {
    let file = &adapter.file;
    let cols = w.cols();
    let rows = match &p.rows {
        Some(r) => r.start - first_row..r.end - first_row,
        None => 0..w.rows(),
    };
    let slice_shape = {
        let mut s = w.shape.clone();
        if !s.is_empty() {
            s[0] = rows.len();
        }
        s
    };
    let range = rows.start * cols..rows.end * cols;
    if p.bias {
        let d = delta::bias_delta(m, file)?
            .ok_or_else(|| Error::Invalid(format!("module '{}' has no bias delta", m.name)))?;
        if d.numel() != range.len() {
            return Err(Error::Invalid(format!(
                "{}: bias delta of '{}' has {} values, the bias {}",
                file.path().display(),
                m.name,
                d.numel(),
                range.len()
            )));
        }
        for (x, dx) in w.data[range].iter_mut().zip(&d.data) {
            *x += p.multiplier * dx;
        }
        return Ok(());
    }
    // Kinds that only add to the weight are applied in place, without copying the weight.
    let additive = matches!(
        m.kind,
        ModuleKind::Lora
            | ModuleKind::Loha
            | ModuleKind::Lokr
            | ModuleKind::Full
            | ModuleKind::Norm
    ) && !m.dora;
    if additive {
        let d = delta::delta(m, file)?;
        if d.numel() != range.len() {
            return Err(Error::Invalid(format!(
                "module '{}' of {} has shape {:?}, which does not fit the weight's shape {:?}",
                m.name,
                file.path().display(),
                d.shape,
                slice_shape
            )));
        }
        for (x, dx) in w.data[range].iter_mut().zip(&d.data) {
            *x += p.multiplier * dx;
        }
        return Ok(());
    }
    let slice = Tensor::new(slice_shape, w.data[range.clone()].to_vec());
    let merged = delta::apply(m, file, &slice, p.multiplier)?;
    w.data[range].copy_from_slice(&merged.data);
    Ok(())
}

/// Refuses a module whose delta cannot land on its target.
fn check_fits(base: &TensorFile, target: &Target, m: &AdapterModule, lora: &Adapter) -> Result<()> {
    let info = base
        .get(&target.weight)
        .expect("key map only names tensors of the checkpoint");
    let rows = target
        .rows
        .as_ref()
        .map(|r| r.len())
        .unwrap_or(info.shape[0]);
    let per_row = info.numel() / info.shape[0].max(1);
    let numel = rows * per_row;
    let fits = match m.kind {
        ModuleKind::Ia3 => {
            let n: usize = m.shape.iter().product();
            n == rows || info.shape.get(1) == Some(&n)
        }
        ModuleKind::Oft | ModuleKind::Boft => m.shape[0] == rows,
        _ => m.shape.iter().product::<usize>() == numel,
    };
    if !fits {
        let mut target_shape = info.shape.clone();
        target_shape[0] = rows;
        return Err(Error::Invalid(format!(
            "{}: module '{}' has shape {:?}, which does not fit '{}' {:?} in {}",
            lora.file.path().display(),
            m.name,
            m.shape,
            target.weight,
            target_shape,
            base.path().display()
        )));
    }
    Ok(())
}
