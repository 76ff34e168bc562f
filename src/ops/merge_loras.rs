//! `loratool merge` without `--base`: several LoRAs into one LoRA.
//!
//! - `concat` (exact): per module the weighted deltas are summed by stacking factors,
//!   `ΔW = [w₁s₁·up₁ | w₂s₂·up₂ | …] · [down₁; down₂; …]`, rank = Σ ranks, alpha = rank (scale 1),
//!   so every part keeps its effective strength. (kohya's non-SVD merge sums ups and downs
//!   separately, which adds cross terms; this does not.)
//! - `svd --rank R`: the best rank-R approximation of that sum, computed from the stacked factors
//!   (QR + SVD of the small core), never from a dense `out×in` matrix.
//!
//! Kinds without a low-rank form (LoHa, LoKr, full, norm, Tucker) go through their dense delta:
//! `concat` stores the exact sum as a LyCORIS `diff` module, `svd` truncates it.

use super::patch_plan::LoraWeight;
use super::progress::ProgressSink;
use crate::adapter::kohya_metadata::{self, NetworkShape};
use crate::adapter::{delta, Adapter, AdapterModule, ModuleKind};
use crate::family::kohya_names::module_kohya_name;
use crate::family::{self, BaseModel};
use crate::linalg;
use crate::tensors::writer::{write_all, TensorSpec, WriteOptions};
use crate::tensors::{Dtype, Tensor};
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMergeMethod {
    Concat,
    Svd { rank: usize },
}

#[derive(Debug, Clone)]
pub struct LoraMergeOptions {
    pub method: LoraMergeMethod,
    pub dtype: Option<Dtype>,
    pub force: bool,
    /// Told the number of output modules up front, then each module as it is merged.
    pub progress: ProgressSink,
}

#[derive(Debug, Clone, Default)]
pub struct LoraMergeReport {
    pub family: Option<BaseModel>,
    pub modules: usize,
    pub low_rank_modules: usize,
    pub dense_modules: usize,
    pub ranks: (usize, usize),
}

/// A module part of one input, with its user weight.
struct Part<'a> {
    adapter: &'a Adapter,
    module: &'a AdapterModule,
    weight: f32,
}

/// Output tensors of one merged module.
enum Merged {
    LowRank {
        up: Tensor,
        down: Tensor,
        rank: usize,
    },
    Dense {
        diff: Tensor,
        bias: Option<Tensor>,
    },
}

/// Conv kernels of flattened LoHa/LoKr factors are not recorded; 3×3 is what every SD conv a
/// LoRA targets uses, so a column count divisible by 9 on a conv-named module is read that way.
fn target_shape(parts: &[Part]) -> Vec<usize> {
    if let Some(p) = parts.iter().find(|p| p.module.shape.len() > 2) {
        return p.module.shape.clone();
    }
    let s = parts[0].module.shape.clone();
    let name = &parts[0].module.name;
    let conv_named = [
        "conv",
        "in_layers_2",
        "out_layers_3",
        "_op",
        "downsamplers",
        "upsamplers",
    ]
    .iter()
    .any(|c| name.contains(c));
    if s.len() == 2 && conv_named && s[1].is_multiple_of(9) && !name.contains("conv_shortcut") {
        vec![s[0], s[1] / 9, 3, 3]
    } else {
        s
    }
}

fn merge_module(parts: &[Part], method: LoraMergeMethod) -> Result<Merged> {
    for p in parts {
        if p.module.dora
            || matches!(
                p.module.kind,
                ModuleKind::Ia3 | ModuleKind::Oft | ModuleKind::Boft | ModuleKind::Glora
            )
        {
            return Err(Error::Invalid(format!(
                "{}: module '{}' is {}, whose effect depends on the base weights; merge it into a checkpoint with --base instead",
                p.adapter.file.path().display(),
                p.module.name,
                if p.module.dora { "DoRA".to_string() } else { p.module.kind.name().to_string() }
            )));
        }
    }
    let shape = target_shape(parts);
    let out = shape[0];
    let cols: usize = shape[1..].iter().product();
    for p in parts {
        if p.module.shape.iter().product::<usize>() != out * cols {
            return Err(Error::Invalid(format!(
                "{}: module '{}' has shape {:?} but another input has {:?} for the same module",
                p.adapter.file.path().display(),
                p.module.name,
                p.module.shape,
                shape
            )));
        }
    }
    if parts.iter().all(|p| p.module.plain_factors().is_some()) {
        // Stack weighted ups (scale folded in) and downs.
        let total: usize = parts.iter().map(|p| p.module.rank.unwrap_or(0)).sum();
        let mut up = vec![0f32; out * total];
        let mut down = Vec::with_capacity(total * cols);
        let mut at = 0;
        for p in parts {
            let m = p.module;
            let factors = m.plain_factors().expect("checked above");
            let r = factors.rank;
            let f = &p.adapter.file;
            let u = f.read_f32(factors.up)?;
            let d = f.read_f32(factors.down)?;
            let s = p.weight * m.scale;
            for o in 0..out {
                for j in 0..r {
                    up[o * total + at + j] = s * u.data[o * r + j];
                }
            }
            down.extend_from_slice(&d.data);
            at += r;
        }
        let (up, down, rank) = match method {
            LoraMergeMethod::Concat => (up, down, total),
            LoraMergeMethod::Svd { rank } => {
                let lr = linalg::truncate_product(&up, out, total, &down, cols, rank)
                    .map_err(Error::Invalid)?;
                (lr.up, lr.down, lr.rank)
            }
        };
        return Ok(low_rank_tensors(&shape, up, down, rank));
    }
    // Dense path: Σ w·ΔW.
    let mut sum = vec![0f32; out * cols];
    let mut bias: Option<Vec<f32>> = None;
    for p in parts {
        let d = delta::delta(p.module, &p.adapter.file)?;
        sum.iter_mut()
            .zip(&d.data)
            .for_each(|(a, b)| *a += p.weight * b);
        if let Some(b) = delta::bias_delta(p.module, &p.adapter.file)? {
            let acc = bias.get_or_insert_with(|| vec![0f32; b.numel()]);
            acc.iter_mut()
                .zip(&b.data)
                .for_each(|(a, x)| *a += p.weight * x);
        }
    }
    match method {
        LoraMergeMethod::Concat => Ok(Merged::Dense {
            diff: Tensor::new(shape, sum),
            bias: bias.map(|b| Tensor::new(vec![b.len()], b)),
        }),
        LoraMergeMethod::Svd { rank } => {
            if shape.len() == 1 {
                return Ok(Merged::Dense {
                    diff: Tensor::new(shape, sum),
                    bias: bias.map(|b| Tensor::new(vec![b.len()], b)),
                });
            }
            let lr = linalg::truncate_dense(&sum, out, cols, rank).map_err(Error::Invalid)?;
            Ok(low_rank_tensors(&shape, lr.up, lr.down, lr.rank))
        }
    }
}

fn low_rank_tensors(shape: &[usize], up: Vec<f32>, down: Vec<f32>, rank: usize) -> Merged {
    let (up_shape, down_shape) = crate::adapter::lora_factor_shapes(shape, rank);
    Merged::LowRank {
        up: Tensor::new(up_shape, up),
        down: Tensor::new(down_shape, down),
        rank,
    }
}

/// One merged module as the output's tensors, with what the report needs.
struct EncodedModule {
    tensors: Vec<(TensorSpec, Vec<u8>)>,
    /// The rank of a low-rank result; `None` for a dense `diff`.
    rank: Option<usize>,
    /// A k×k convolution (k > 1) kept low-rank: its rank is the file's conv_dim.
    spatial_conv: bool,
}

fn encode_module(name: &str, merged: Merged, dtype: Dtype) -> EncodedModule {
    let encode =
        |suffix: &str, t: &Tensor| TensorSpec::encode(format!("{name}.{suffix}"), t, dtype);
    match merged {
        Merged::LowRank { up, down, rank } => EncodedModule {
            tensors: vec![
                encode("alpha", &Tensor::new(vec![], vec![rank as f32])),
                encode("lora_down.weight", &down),
                encode("lora_up.weight", &up),
            ],
            rank: Some(rank),
            spatial_conv: down.shape.len() == 4 && down.shape[2] * down.shape[3] > 1,
        },
        Merged::Dense { diff, bias } => {
            let mut tensors = vec![encode("diff", &diff)];
            if let Some(b) = bias {
                tensors.push(encode("diff_b", &b));
            }
            EncodedModule {
                tensors,
                rank: None,
                spatial_conv: false,
            }
        }
    }
}

pub fn merge_loras(
    loras: &[LoraWeight],
    out: &Path,
    opts: &LoraMergeOptions,
) -> Result<LoraMergeReport> {
    if let LoraMergeMethod::Svd { rank: 0 } = opts.method {
        return Err(Error::Invalid("--rank must be at least 1".into()));
    }
    let write_opts = WriteOptions::checked(
        out,
        opts.force,
        loras.iter().map(|l| l.path.clone()).collect(),
    )?;
    let adapters: Vec<Adapter> = loras
        .iter()
        .map(|l| Adapter::open(&l.path))
        .collect::<Result<_>>()?;
    for a in &adapters {
        a.check_finite()?;
    }
    let mut fam = BaseModel::Unknown;
    for (a, lw) in adapters.iter().zip(loras) {
        let f = family::detect(a.file.metadata(), &a.modules).base_model;
        if f == BaseModel::Unknown {
            continue;
        }
        if fam != BaseModel::Unknown && f != fam && !opts.force {
            return Err(Error::FamilyMismatch {
                lora: lw.path.clone(),
                lora_family: f.name(),
                other: format!("the other inputs are {}", fam.name()),
            });
        }
        if fam == BaseModel::Unknown {
            fam = f;
        }
    }

    // Group modules by their output (kohya) name, in first-appearance order.
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<Part>> = HashMap::new();
    for (a, lw) in adapters.iter().zip(loras) {
        let blocks = lw.block_weights_for(fam)?;
        for m in &a.modules {
            let name = module_kohya_name(m, fam);
            let weight = lw.multiplier(m, blocks.as_ref());
            groups
                .entry(name.clone())
                .or_insert_with(|| {
                    order.push(name.clone());
                    Vec::new()
                })
                .push(Part {
                    adapter: a,
                    module: m,
                    weight,
                });
        }
    }

    let dtype = opts
        .dtype
        .or_else(|| {
            adapters
                .iter()
                .flat_map(|a| &a.modules)
                .map(|m| m.dtype)
                .find(|d| d.is_float())
        })
        .unwrap_or(Dtype::F16);
    let mut report = LoraMergeReport {
        family: Some(fam),
        ranks: (usize::MAX, 0),
        ..Default::default()
    };
    let mut conv_rank = None;
    // Modules are independent: merged and encoded in parallel (each f32 result is dropped as soon
    // as it is encoded), written in first-appearance order.
    opts.progress.start(order.len() as u64);
    let merged: Vec<EncodedModule> = order
        .par_iter()
        .map(|name| {
            let merged = merge_module(&groups[name], opts.method)?;
            let encoded = encode_module(name, merged, dtype);
            opts.progress.advance(1);
            Ok(encoded)
        })
        .collect::<Result<_>>()?;
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    let mut ranks = Vec::new();
    for m in merged {
        tensors.extend(m.tensors);
        match m.rank {
            Some(rank) => {
                ranks.push(rank);
                report.low_rank_modules += 1;
                report.ranks = (report.ranks.0.min(rank), report.ranks.1.max(rank));
                if m.spatial_conv {
                    conv_rank = Some(rank);
                }
            }
            None => report.dense_modules += 1,
        }
        report.modules += 1;
    }

    let mut meta: BTreeMap<String, String> = BTreeMap::new();
    kohya_metadata::set_network(
        &mut meta,
        &NetworkShape {
            ranks,
            conv_rank,
            dynamic: false,
        },
    );
    kohya_metadata::set_family(&mut meta, fam);
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    meta.insert("modelspec.title".into(), stem(out));
    meta.insert(
        "modelspec.merged_from".into(),
        loras
            .iter()
            .map(|l| stem(&l.path))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let method = match opts.method {
        LoraMergeMethod::Concat => "concat".to_string(),
        LoraMergeMethod::Svd { rank } => format!("svd rank {rank}"),
    };
    let parts: Vec<String> = loras
        .iter()
        .map(|l| {
            let lbw = l.block_weights.as_ref().map(|b| format!(":lbw={b}"));
            format!(
                "{}:{}:{}{}",
                stem(&l.path),
                l.text_encoder,
                l.unet,
                lbw.unwrap_or_default()
            )
        })
        .collect();
    meta.insert(
        "ss_training_comment".into(),
        format!("merged by loratool ({method}): {}", parts.join(", ")),
    );
    kohya_metadata::seal(&mut meta, &tensors);

    write_all(out, &meta, &tensors, &write_opts)?;
    if report.ranks.0 == usize::MAX {
        report.ranks = (0, 0);
    }
    Ok(report)
}
