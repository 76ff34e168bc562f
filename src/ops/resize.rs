//! `loratool resize`: lower a LoRA's rank, exactly from its factors.
//!
//! Per module, `ΔW = scale · up · down` has rank ≤ r, so its SVD comes from a thin QR of `up` and
//! `downᵀ` and the SVD of the small r×r core (`linalg::truncate_product`): exact singular values,
//! O((out+in)·r²), never a dense out×in SVD. The new factors are `up = U_k·Σ_k`, `down = V_kᵀ` and
//! `alpha = scale·k`, so the effective strength is kept. Kinds without low-rank factors (LoHa,
//! LoKr, full, Tucker LoCon) go through their dense delta and come out as LoRA modules. Modules
//! without a rank (IA3, OFT, norm) are copied unchanged; a DoRA module keeps its magnitude.

use crate::adapter::keys::Role;
use crate::adapter::kohya_metadata::{self, NetworkShape};
use crate::adapter::{delta, Adapter, AdapterModule, ModuleKind};
use crate::family::kohya_names::module_kohya_name;
use crate::family::{self, BaseModel};
use crate::linalg::{self, LowRank};
use crate::ops::progress::ProgressSink;
use crate::tensors::writer::{write_all, TensorSpec, WriteOptions};
use crate::tensors::{Dtype, Tensor};
use crate::{Error, Result};
use rayon::prelude::*;
use std::path::Path;

/// How the new rank of each module is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// Exactly this rank (or the module's own, if lower).
    Fixed(usize),
    /// Keep singular values larger than `S₀ / X` (X ≥ 1).
    SvRatio(f64),
    /// Smallest k whose singular values sum to at least X of the total (0 < X ≤ 1).
    SvCumulative(f64),
    /// Smallest k keeping at least X of the Frobenius norm: √(Σ_{i<k} S²/ΣS²) ≥ X (0 < X ≤ 1).
    SvFro(f64),
}

impl RankRule {
    /// Parses `sv_ratio:X`, `sv_fro:X` or `sv_cumulative:X`.
    pub fn parse_dynamic(spec: &str) -> Result<RankRule> {
        let bad = || {
            Error::Invalid(format!(
                "--dynamic '{spec}': expected sv_ratio:X, sv_fro:X or sv_cumulative:X"
            ))
        };
        let (method, value) = spec.split_once(':').ok_or_else(bad)?;
        let x: f64 = value.parse().map_err(|_| bad())?;
        let rule = match method {
            "sv_ratio" if x >= 1.0 => RankRule::SvRatio(x),
            "sv_fro" if x > 0.0 && x <= 1.0 => RankRule::SvFro(x),
            "sv_cumulative" if x > 0.0 && x <= 1.0 => RankRule::SvCumulative(x),
            "sv_ratio" => {
                return Err(Error::Invalid(format!(
                    "--dynamic '{spec}': sv_ratio needs X ≥ 1"
                )))
            }
            "sv_fro" | "sv_cumulative" => {
                return Err(Error::Invalid(format!(
                    "--dynamic '{spec}': X must be in (0, 1]"
                )))
            }
            _ => return Err(bad()),
        };
        Ok(rule)
    }

    /// The rank this rule keeps for singular values `s` (descending), at least 1. Unlike kohya's
    /// resize_lora.py, no extra singular value is kept beyond what the criterion needs.
    pub fn rank_for(&self, s: &[f64]) -> usize {
        let n = s.len();
        if n == 0 || s[0] <= 0.0 {
            return 1;
        }
        let k = match *self {
            RankRule::Fixed(r) => r,
            RankRule::SvRatio(x) => s.iter().filter(|v| **v > s[0] / x).count(),
            RankRule::SvCumulative(x) => {
                let total: f64 = s.iter().sum();
                let mut acc = 0.0;
                s.iter()
                    .position(|v| {
                        acc += v;
                        acc >= x * total - 1e-12 * total
                    })
                    .map_or(n, |i| i + 1)
            }
            RankRule::SvFro(x) => {
                let total: f64 = s.iter().map(|v| v * v).sum();
                let mut acc = 0.0;
                s.iter()
                    .position(|v| {
                        acc += v * v;
                        (acc / total).sqrt() >= x - 1e-12
                    })
                    .map_or(n, |i| i + 1)
            }
        };
        k.clamp(1, n)
    }
}

#[derive(Debug, Clone)]
pub struct ResizeOptions {
    pub rule: RankRule,
    /// Hard cap on every module's rank (with a dynamic rule).
    pub max_rank: Option<usize>,
    pub dtype: Option<Dtype>,
    pub force: bool,
    /// Told the number of modules up front, then each module as it is resized or copied.
    pub progress: ProgressSink,
}

#[derive(Debug, Clone)]
pub struct ModuleResize {
    pub name: String,
    pub old_rank: Option<usize>,
    pub new_rank: usize,
    /// √(Σ_{i<k} S² / Σ S²), as a fraction.
    pub retained_fro: f64,
}

#[derive(Debug, Clone, Default)]
pub struct ResizeReport {
    pub modules: Vec<ModuleResize>,
    pub copied: usize,
}

impl ResizeReport {
    pub fn mean_retained(&self) -> f64 {
        if self.modules.is_empty() {
            return 1.0;
        }
        self.modules.iter().map(|m| m.retained_fro).sum::<f64>() / self.modules.len() as f64
    }
}

/// SVD of one module's delta, from its factors when it has plain LoRA factors.
fn module_svd(m: &AdapterModule, adapter: &Adapter) -> Result<(LowRank, Vec<usize>)> {
    let file = &adapter.file;
    let shape = m.shape.clone();
    let out = shape[0];
    let cols: usize = shape[1..].iter().product();
    let full_rank = out.min(cols);
    if let Some(factors) = m.plain_factors() {
        let up = file.read_f32(factors.up)?;
        let down = file.read_f32(factors.down)?;
        let r = factors.rank;
        let scaled: Vec<f32> = up.data.iter().map(|v| v * m.scale).collect();
        let lr = linalg::truncate_product(&scaled, out, r, &down.data, cols, r)
            .map_err(Error::Invalid)?;
        return Ok((lr, shape));
    }
    let d = delta::delta(m, file)?;
    let lr = linalg::truncate_dense(&d.data, out, cols, full_rank).map_err(Error::Invalid)?;
    Ok((lr, shape))
}

pub fn resize_lora(input: &Path, out: &Path, opts: &ResizeOptions) -> Result<ResizeReport> {
    if let RankRule::Fixed(0) = opts.rule {
        return Err(Error::Invalid("--rank must be at least 1".into()));
    }
    if opts.max_rank == Some(0) {
        return Err(Error::Invalid("--rank must be at least 1".into()));
    }
    let write_opts = WriteOptions::checked(out, opts.force, vec![input.to_path_buf()])?;
    let adapter = Adapter::open(input)?;
    adapter.check_finite()?;
    let fam = family::detect(adapter.file.metadata(), &adapter.modules).base_model;
    let file = &adapter.file;
    // Modules are independent: factorized in parallel, assembled in file order.
    opts.progress.start(adapter.modules.len() as u64);
    let per_module: Vec<ResizedModule> = adapter
        .modules
        .par_iter()
        .map(|m| {
            let resized = resize_module(m, &adapter, fam, opts)?;
            opts.progress.advance(1);
            Ok(resized)
        })
        .collect::<Result<_>>()?;
    let mut report = ResizeReport::default();
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    for (module_tensors, resized) in per_module {
        tensors.extend(module_tensors);
        match resized {
            Some(r) => report.modules.push(r),
            None => report.copied += 1,
        }
    }

    let mut meta = file.metadata().clone();
    let old = meta.get("ss_network_dim").cloned().unwrap_or_else(|| {
        adapter
            .modules
            .iter()
            .filter_map(|m| m.rank)
            .max()
            .map(|r| r.to_string())
            .unwrap_or_default()
    });
    kohya_metadata::set_family(&mut meta, fam);
    kohya_metadata::set_network(
        &mut meta,
        &NetworkShape {
            ranks: report.modules.iter().map(|m| m.new_rank).collect(),
            conv_rank: None,
            dynamic: false,
        },
    );
    let what = match opts.rule {
        RankRule::Fixed(r) => format!("dimension is resized from {old} to {r}"),
        RankRule::SvRatio(x) => format!("dynamic resize with sv_ratio: {x} from {old}"),
        RankRule::SvCumulative(x) => format!("dynamic resize with sv_cumulative: {x} from {old}"),
        RankRule::SvFro(x) => format!("dynamic resize with sv_fro: {x} from {old}"),
    };
    let comment = match meta.get("ss_training_comment") {
        Some(c) if !c.is_empty() && c != "None" => format!("{what}; {c}"),
        _ => what,
    };
    meta.insert("ss_training_comment".into(), comment);
    kohya_metadata::seal(&mut meta, &tensors);
    write_all(out, &meta, &tensors, &write_opts)?;
    Ok(report)
}

/// One module's encoded output tensors, and its resize record (`None`: copied as it is).
type ResizedModule = (Vec<(TensorSpec, Vec<u8>)>, Option<ModuleResize>);

fn resize_module(
    m: &AdapterModule,
    adapter: &Adapter,
    fam: BaseModel,
    opts: &ResizeOptions,
) -> Result<ResizedModule> {
    let file = &adapter.file;
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    let mut push =
        |name: String, t: &Tensor, dtype: Dtype| tensors.push(TensorSpec::encode(name, t, dtype));
    let name = module_kohya_name(m, fam);
    let dtype = opts.dtype.unwrap_or(if m.dtype.is_float() {
        m.dtype
    } else {
        Dtype::F16
    });
    let resizable = matches!(
        m.kind,
        ModuleKind::Lora | ModuleKind::Loha | ModuleKind::Lokr | ModuleKind::Full
    ) && m.shape.len() >= 2;
    if !resizable {
        for (role, key) in &m.tensors {
            let t = file.read_f32(key)?;
            push(format!("{name}.{}", role.kohya_suffix()), &t, dtype);
        }
        return Ok((tensors, None));
    }
    let (lr, shape) = module_svd(m, adapter)?;
    let s = &lr.singular_values;
    let mut k = opts.rule.rank_for(s);
    if let Some(cap) = opts.max_rank {
        k = k.min(cap);
    }
    k = k.min(lr.rank).max(1);
    let total: f64 = s.iter().map(|v| v * v).sum();
    let kept: f64 = s.iter().take(k).map(|v| v * v).sum();
    let retained_fro = if total > 0.0 {
        (kept / total).sqrt()
    } else {
        1.0
    };
    // up = U_k Σ_k (already folded by truncate), down = V_kᵀ; alpha = k keeps scale 1 since
    // the old scale is inside the singular values.
    let lr = lr.keep(k);
    let (up, down) = (lr.up, lr.down);
    let (up_shape, down_shape) = crate::adapter::lora_factor_shapes(&shape, k);
    push(
        format!("{name}.alpha"),
        &Tensor::new(vec![], vec![k as f32]),
        dtype,
    );
    push(
        format!("{name}.lora_down.weight"),
        &Tensor::new(down_shape, down),
        dtype,
    );
    push(
        format!("{name}.lora_up.weight"),
        &Tensor::new(up_shape, up),
        dtype,
    );
    if let Some(key) = m.tensor(Role::DoraScale) {
        let t = file.read_f32(key)?;
        push(format!("{name}.dora_scale"), &t, dtype);
    }
    let record = ModuleResize {
        name: m.name.clone(),
        old_rank: m.rank,
        new_rank: k,
        retained_fro,
    };
    Ok((tensors, Some(record)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_rules_keep_exactly_what_the_criterion_needs() {
        let s = [10.0, 5.0, 2.0, 1.0, 0.5];
        assert_eq!(RankRule::SvRatio(4.0).rank_for(&s), 2); // > 2.5: 10, 5
        assert_eq!(RankRule::SvRatio(10.0).rank_for(&s), 3); // > 1: 10, 5, 2
        assert_eq!(RankRule::SvCumulative(0.8).rank_for(&s), 2); // 15/18.5 = 0.81
        assert_eq!(RankRule::SvCumulative(0.82).rank_for(&s), 3);
        // Frobenius: 100, 125, 129, 130, 130.25 of 130.25
        assert_eq!(RankRule::SvFro(0.97).rank_for(&s), 2); // √(125/130.25) = 0.9797
        assert_eq!(RankRule::SvFro(0.99).rank_for(&s), 3); // √(129/130.25) = 0.9952
        assert_eq!(RankRule::Fixed(9).rank_for(&s), 5);
        assert_eq!(RankRule::SvRatio(2.0).rank_for(&[0.0, 0.0]), 1);
        assert!(RankRule::parse_dynamic("sv_fro:1.5").is_err());
        assert!(RankRule::parse_dynamic("sv_ratio:0.5").is_err());
        assert!(RankRule::parse_dynamic("bogus:1").is_err());
        assert_eq!(
            RankRule::parse_dynamic("sv_cumulative:0.9").unwrap(),
            RankRule::SvCumulative(0.9)
        );
    }
}
