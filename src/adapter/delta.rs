//! The delta math of every adapter kind, in one place.
//!
//! Conventions (see docs/DELTA_MATH.md for sources and where peers disagree):
//! - A module's delta ΔW already includes its scale (alpha/rank, alpha/√rank for rsLoRA, 1 when
//!   alpha is absent or 0, 1 for LoKr with two full factors); the user multiplier is applied on top.
//! - LoHa/LoKr apply alpha/rank once, as their forward pass (and A1111/ComfyUI) do — not twice as
//!   LyCORIS's `get_diff_weight` merge path does.
//! - Weights are viewed as `[out, in·kh·kw]` matrices; conv deltas are reshaped back at the end.

use super::keys::Role;
use super::{AdapterModule, Format, ModuleKind};
use crate::linalg;
use crate::tensors::{Tensor, TensorSource};
use crate::{Error, Result};
use std::collections::BTreeMap;

/// The effective scale of a module (before the user multiplier).
pub fn scale_for(
    kind: ModuleKind,
    rank: Option<usize>,
    alpha: Option<f32>,
    rslora: bool,
    tensors: &BTreeMap<Role, String>,
) -> f32 {
    let ratio = |r: usize| {
        let a = match alpha {
            Some(a) if a != 0.0 => a,
            _ => return if rslora { (r as f32).sqrt() } else { 1.0 },
        };
        if rslora {
            a / (r as f32).sqrt()
        } else {
            a / r as f32
        }
    };
    match (kind, rank) {
        (ModuleKind::Lora | ModuleKind::Loha | ModuleKind::Glora, Some(r)) => ratio(r),
        (ModuleKind::Lokr, Some(r)) => {
            let both_full =
                tensors.contains_key(&Role::LokrW1) && tensors.contains_key(&Role::LokrW2);
            if both_full {
                1.0
            } else {
                ratio(r)
            }
        }
        _ => 1.0,
    }
}

/// A factor read as a row-major matrix `[rows, cols]` where cols folds every trailing dim.
struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Matrix {
    fn read(file: &dyn TensorSource, key: &str) -> Result<Matrix> {
        let t = file.read_f32(key)?;
        Ok(Matrix {
            rows: t.rows(),
            cols: t.cols(),
            data: t.data,
        })
    }

    fn transposed(&self) -> Matrix {
        Matrix {
            rows: self.cols,
            cols: self.rows,
            data: linalg::transpose(&self.data, self.rows, self.cols),
        }
    }

    fn matmul(&self, rhs: &Matrix) -> Matrix {
        Matrix {
            rows: self.rows,
            cols: rhs.cols,
            data: linalg::matmul(&self.data, self.rows, self.cols, &rhs.data, rhs.cols),
        }
    }

    fn frobenius_sq(&self) -> f64 {
        self.data.iter().map(|v| (*v as f64) * (*v as f64)).sum()
    }
}

fn key(m: &AdapterModule, role: Role) -> Result<&str> {
    m.tensor(role)
        .ok_or_else(|| Error::Invalid(format!("module '{}' has no {role:?} tensor", m.name)))
}

/// Tucker rebuild `ΔW[o, i, s] = Σ_ab up[o,a] · core[a,b,s] · down[b,i]` as `[out, in·S]`
/// (LoCon `lora_mid`, LoHa `hada_t*`, LoKr `lokr_t2`).
fn tucker(up: &Matrix, core: &Tensor, down: &Matrix) -> Matrix {
    let (r1, r2) = (core.shape[0], core.shape[1]);
    let spatial = core.numel() / (r1 * r2);
    let (out, inp) = (up.rows, down.cols);
    // up · core: [out, r2·S]
    let uc = linalg::matmul(&up.data, out, r1, &core.data, r2 * spatial);
    // reorder to [out·S, r2] so one product with down gives [out·S, in]
    let mut ucs = vec![0f32; out * spatial * r2];
    for o in 0..out {
        for b in 0..r2 {
            for s in 0..spatial {
                ucs[(o * spatial + s) * r2 + b] = uc[o * r2 * spatial + b * spatial + s];
            }
        }
    }
    let w = linalg::matmul(&ucs, out * spatial, r2, &down.data, inp);
    // [out, S, in] → [out, in, S]
    let mut data = vec![0f32; out * inp * spatial];
    for o in 0..out {
        for s in 0..spatial {
            for i in 0..inp {
                data[(o * inp + i) * spatial + s] = w[(o * spatial + s) * inp + i];
            }
        }
    }
    Matrix {
        rows: out,
        cols: inp * spatial,
        data,
    }
}

/// Product of a LoRA-family factor pair, with a Tucker core when present.
fn low_rank_product(
    file: &dyn TensorSource,
    up_key: &str,
    down_key: &str,
    core_key: Option<&str>,
    up_is_transposed: bool,
) -> Result<Matrix> {
    let up = Matrix::read(file, up_key)?;
    let down = Matrix::read(file, down_key)?;
    match core_key {
        Some(ck) => {
            let core = file.read_f32(ck)?;
            // Tucker stores both factors rank-first: w_a [r, out], w_b [r, in]. A LoCon mid keeps
            // up as [out, r] and down as [r, in, 1, 1].
            let up = if up_is_transposed {
                up.transposed()
            } else {
                up
            };
            check_inner(file, up_key, up.cols, core.shape[0])?;
            check_inner(file, down_key, core.shape[1], down.rows)?;
            Ok(tucker(&up, &core, &down))
        }
        None => {
            check_inner(file, down_key, up.cols, down.rows)?;
            Ok(up.matmul(&down))
        }
    }
}

fn check_inner(file: &dyn TensorSource, key: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::bad_tensor(
            file.path(),
            key,
            format!("factor shapes do not chain (inner sizes {a} and {b})"),
        ));
    }
    Ok(())
}

/// The two LoKr factors as matrices `[a, c]` and `[b, rest]`.
fn lokr_factors(m: &AdapterModule, file: &dyn TensorSource) -> Result<(Matrix, Matrix)> {
    let w1 = match m.tensor(Role::LokrW1) {
        Some(k) => Matrix::read(file, k)?,
        None => low_rank_product(
            file,
            key(m, Role::LokrW1A)?,
            key(m, Role::LokrW1B)?,
            None,
            false,
        )?,
    };
    let w2 = match m.tensor(Role::LokrW2) {
        Some(k) => Matrix::read(file, k)?,
        None => low_rank_product(
            file,
            key(m, Role::LokrW2A)?,
            key(m, Role::LokrW2B)?,
            m.tensor(Role::LokrT2),
            true,
        )?,
    };
    Ok((w1, w2))
}

fn loha_factors(m: &AdapterModule, file: &dyn TensorSource) -> Result<(Matrix, Matrix)> {
    let tucker = m.tensor(Role::HadaT1).is_some();
    let w1 = low_rank_product(
        file,
        key(m, Role::HadaW1A)?,
        key(m, Role::HadaW1B)?,
        m.tensor(Role::HadaT1),
        tucker,
    )?;
    let w2 = low_rank_product(
        file,
        key(m, Role::HadaW2A)?,
        key(m, Role::HadaW2B)?,
        m.tensor(Role::HadaT2),
        tucker,
    )?;
    if (w1.rows, w1.cols) != (w2.rows, w2.cols) {
        return Err(Error::bad_tensor(
            file.path(),
            key(m, Role::HadaW2A)?,
            "the two LoHa products have different shapes",
        ));
    }
    Ok((w1, w2))
}

/// ΔW of a module that adds to the base weight independently of it (LoRA/LoCon, LoHa, LoKr, full
/// diff, norm), scale included, shaped as [`AdapterModule::shape`]. DoRA modules return their
/// directional delta (before the magnitude is applied). Kinds that need the base weight refuse.
pub fn delta(m: &AdapterModule, file: &dyn TensorSource) -> Result<Tensor> {
    let mat = match m.kind {
        ModuleKind::Lora => low_rank_product(
            file,
            key(m, Role::Up)?,
            key(m, Role::Down)?,
            m.tensor(Role::Mid),
            false,
        )?,
        ModuleKind::Loha => {
            let (mut w1, w2) = loha_factors(m, file)?;
            w1.data.iter_mut().zip(&w2.data).for_each(|(a, b)| *a *= b);
            w1
        }
        ModuleKind::Lokr => {
            let (w1, w2) = lokr_factors(m, file)?;
            Matrix {
                rows: w1.rows * w2.rows,
                cols: w1.cols * w2.cols,
                data: linalg::kron(&w1.data, w1.rows, w1.cols, &w2.data, w2.rows, w2.cols),
            }
        }
        ModuleKind::Full => Matrix::read(file, key(m, Role::Diff)?)?,
        ModuleKind::Norm => Matrix::read(file, key(m, Role::NormWeight)?)?,
        ModuleKind::Ia3 | ModuleKind::Oft | ModuleKind::Boft | ModuleKind::Glora => {
            return Err(Error::Invalid(format!(
                "module '{}': a {} module has no delta independent of the base weight",
                m.name,
                m.kind.name()
            )))
        }
    };
    let numel: usize = m.shape.iter().product();
    if mat.data.len() != numel {
        return Err(Error::bad_tensor(
            file.path(),
            &m.name,
            format!(
                "factors give {} values but the module shape {:?} needs {numel}",
                mat.data.len(),
                m.shape
            ),
        ));
    }
    Ok(Tensor::new(m.shape.clone(), mat.data).scale(m.scale))
}

/// The bias delta a module carries (`diff_b` of full modules, `b_norm` of norm modules), if any.
pub fn bias_delta(m: &AdapterModule, file: &dyn TensorSource) -> Result<Option<Tensor>> {
    let role = match m.kind {
        ModuleKind::Full => Role::DiffBias,
        ModuleKind::Norm => Role::NormBias,
        _ => return Ok(None),
    };
    m.tensor(role).map(|k| file.read_f32(k)).transpose()
}

/// The merged weight `W'` for base weight `base` at user multiplier `multiplier`, for every kind.
/// The result has the base's shape; a delta with a different element count is an error.
pub fn apply(
    m: &AdapterModule,
    file: &dyn TensorSource,
    base: &Tensor,
    multiplier: f32,
) -> Result<Tensor> {
    let shape_error = |got: &[usize]| {
        Error::Invalid(format!(
            "module '{}' of {} has shape {:?}, which does not fit the weight's shape {:?}",
            m.name,
            file.path().display(),
            got,
            base.shape
        ))
    };
    match m.kind {
        ModuleKind::Ia3 => {
            let w = file.read_f32(key(m, Role::Ia3Weight)?)?;
            let on_input = match m.tensor(Role::Ia3OnInput) {
                Some(k) => file.read_scalar(k)? != 0.0,
                None => false,
            };
            let (rows, cols) = (base.rows(), base.cols());
            let mut out = base.clone();
            if !on_input && w.numel() == rows {
                for (r, row) in out.data.chunks_mut(cols).enumerate() {
                    let f = 1.0 + multiplier * w.data[r];
                    row.iter_mut().for_each(|v| *v *= f);
                }
            } else if on_input && base.shape.len() >= 2 && w.numel() == base.shape[1] {
                let spatial = cols / base.shape[1];
                for row in out.data.chunks_mut(cols) {
                    for (c, v) in row.iter_mut().enumerate() {
                        *v *= 1.0 + multiplier * w.data[c / spatial];
                    }
                }
            } else {
                return Err(shape_error(&w.shape));
            }
            Ok(out)
        }
        ModuleKind::Oft | ModuleKind::Boft => apply_oft(m, file, base, multiplier),
        ModuleKind::Glora => Err(Error::Invalid(format!(
            "module '{}' of {}: merging {} modules is not supported yet",
            m.name,
            file.path().display(),
            m.kind.name()
        ))),
        _ => {
            let d = delta(m, file)?;
            if d.numel() != base.numel() {
                return Err(shape_error(&d.shape));
            }
            if m.dora {
                return apply_dora(m, file, base, &d, multiplier);
            }
            let mut out = base.clone();
            out.data
                .iter_mut()
                .zip(&d.data)
                .for_each(|(w, dw)| *w += multiplier * dw);
            Ok(out)
        }
    }
}

/// Cayley rotations of LyCORIS OFT blocks: `Q = B − Bᵀ` per `n×n` block, the whole `Q` scaled
/// down to norm `constraint` when larger (constraint 0 = none), `R = (I+Q)(I−Q)⁻¹`, then
/// interpolated towards identity by the multiplier: `m·R + (1−m)·I`.
fn oft_rotations(
    file: &dyn TensorSource,
    blocks_key: &str,
    blocks: &[f32],
    n: usize,
    constraint: f64,
    multiplier: f32,
) -> Result<Vec<f64>> {
    let count = blocks.len() / (n * n);
    let mut q: Vec<f64> = vec![0.0; blocks.len()];
    for b in 0..count {
        for i in 0..n {
            for j in 0..n {
                let at = |i: usize, j: usize| blocks[(b * n + i) * n + j] as f64;
                q[(b * n + i) * n + j] = at(i, j) - at(j, i);
            }
        }
    }
    let q_norm = q.iter().map(|v| v * v).sum::<f64>().sqrt() + 1e-8;
    if constraint > 0.0 && q_norm > constraint {
        q.iter_mut().for_each(|v| *v *= constraint / q_norm);
    }
    let eye = |i: usize, j: usize| if i == j { 1.0 } else { 0.0 };
    let m = multiplier as f64;
    let mut out = vec![0f64; q.len()];
    for b in 0..count {
        let qb = &q[b * n * n..(b + 1) * n * n];
        let plus: Vec<f64> = (0..n * n).map(|x| eye(x / n, x % n) + qb[x]).collect();
        let minus: Vec<f64> = (0..n * n).map(|x| eye(x / n, x % n) - qb[x]).collect();
        let inv = invert(&minus, n).ok_or_else(|| {
            Error::bad_tensor(file.path(), blocks_key, "an OFT block (I − Q) is singular")
        })?;
        for i in 0..n {
            for j in 0..n {
                let r: f64 = (0..n).map(|t| plus[i * n + t] * inv[t * n + j]).sum();
                out[(b * n + i) * n + j] = m * r + (1.0 - m) * eye(i, j);
            }
        }
    }
    Ok(out)
}

/// OFT and BOFT (LyCORIS `DiagOFTModule`, `ButterflyOFTModule`): rotate the weight's output rows.
/// Diag-OFT splits rows into `k` blocks of `n` and sets `W'_k = R_kᵀ W_k`. BOFT applies `s`
/// butterfly stages; stage `i` regroups rows so that block `d` mixes rows `2^i·n/2` apart, applies
/// `R_{i,d}` (not transposed, as LyCORIS does), and restores the order. Optional `rescale`
/// multiplies rows; alpha is the norm constraint per output row.
fn apply_oft(
    m: &AdapterModule,
    file: &dyn TensorSource,
    base: &Tensor,
    multiplier: f32,
) -> Result<Tensor> {
    let blocks_key = key(m, Role::OftBlocks)?;
    let blocks = file.read_f32(blocks_key)?;
    let dims = blocks.shape.len();
    let (stages, count, n) = match dims {
        3 => (1, blocks.shape[0], blocks.shape[1]),
        4 => (blocks.shape[0], blocks.shape[1], blocks.shape[2]),
        _ => (0, 0, 0),
    };
    let rows = base.rows();
    if stages == 0 || blocks.shape[dims - 1] != n || count * n != rows || (dims == 4 && n % 2 != 0)
    {
        return Err(Error::bad_tensor(
            file.path(),
            blocks_key,
            format!(
                "OFT blocks {:?} do not fit a weight of {rows} rows",
                blocks.shape
            ),
        ));
    }
    let constraint = match m.tensor(Role::Alpha) {
        Some(a) => file.read_scalar(a)? as f64 * rows as f64,
        None => 0.0,
    };
    let rot = oft_rotations(file, blocks_key, &blocks.data, n, constraint, multiplier)?;
    let cols = base.cols();
    let mut w = base.data.clone();
    for stage in 0..stages {
        // Row permutation of this stage: position p of the regrouped order holds row perm[p].
        let perm: Vec<usize> = if dims == 3 {
            (0..rows).collect()
        } else {
            let k = (1usize << stage) * (n / 2);
            if !rows.is_multiple_of(2 * k) {
                return Err(Error::bad_tensor(
                    file.path(),
                    blocks_key,
                    format!("BOFT stage {stage} does not divide {rows} rows"),
                ));
            }
            (0..rows)
                .map(|p| {
                    let (c, rest) = (p / (2 * k), p % (2 * k));
                    c * 2 * k + (rest % 2) * k + rest / 2
                })
                .collect()
        };
        let mut next = vec![0f32; w.len()];
        for d in 0..count {
            let r = &rot[(stage * count + d) * n * n..(stage * count + d + 1) * n * n];
            for i in 0..n {
                let dst_row = perm[d * n + i];
                let dst = &mut next[dst_row * cols..(dst_row + 1) * cols];
                for j in 0..n {
                    // Diag-OFT uses Rᵀ, BOFT uses R.
                    let f = if dims == 3 {
                        r[j * n + i]
                    } else {
                        r[i * n + j]
                    } as f32;
                    if f == 0.0 {
                        continue;
                    }
                    let src_row = perm[d * n + j];
                    let src = &w[src_row * cols..(src_row + 1) * cols];
                    dst.iter_mut().zip(src).for_each(|(a, b)| *a += f * b);
                }
            }
        }
        w = next;
    }
    if let Some(rk) = m.tensor(Role::OftRescale) {
        let rescale = file.read_f32(rk)?;
        if rescale.numel() != rows {
            return Err(Error::bad_tensor(
                file.path(),
                rk,
                "rescale does not match the weight's rows",
            ));
        }
        for (row, s) in w.chunks_mut(cols).zip(&rescale.data) {
            row.iter_mut().for_each(|v| *v *= s);
        }
    }
    Ok(Tensor::new(base.shape.clone(), w))
}

/// Inverse of a small dense `n×n` matrix by Gauss-Jordan elimination with partial pivoting, in
/// f64 (OFT blocks are a few dozen rows; a dependency would buy nothing here).
fn invert(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut m = a.to_vec();
    let mut inv: Vec<f64> = (0..n * n)
        .map(|x| if x / n == x % n { 1.0 } else { 0.0 })
        .collect();
    for col in 0..n {
        let pivot =
            (col..n).max_by(|&x, &y| m[x * n + col].abs().total_cmp(&m[y * n + col].abs()))?;
        if m[pivot * n + col].abs() < 1e-12 {
            return None;
        }
        for j in 0..n {
            m.swap(col * n + j, pivot * n + j);
            inv.swap(col * n + j, pivot * n + j);
        }
        let p = m[col * n + col];
        for j in 0..n {
            m[col * n + j] /= p;
            inv[col * n + j] /= p;
        }
        for row in 0..n {
            if row != col {
                let f = m[row * n + col];
                if f != 0.0 {
                    for j in 0..n {
                        m[row * n + j] -= f * m[col * n + j];
                        inv[row * n + j] -= f * inv[col * n + j];
                    }
                }
            }
        }
    }
    Some(inv)
}

/// DoRA: the weight's magnitude is replaced by the stored one. Two peers, two conventions:
/// - LyCORIS/kohya `dora_scale` (ComfyUI agrees at multiplier 1): `W'' = (W+ΔW)·s/‖W+ΔW‖`, and a
///   multiplier m interpolates the magnitude factor: `W' = (W+ΔW)·(m·(s/‖W+ΔW‖ − 1) + 1)`.
/// - peft `lora_magnitude_vector`: the multiplier scales ΔW, then `W' = s·(W+mΔW)/‖W+mΔW‖`.
///
/// Norms are per output row when the magnitude has one value per row, else per input channel.
fn apply_dora(
    m: &AdapterModule,
    file: &dyn TensorSource,
    base: &Tensor,
    d: &Tensor,
    multiplier: f32,
) -> Result<Tensor> {
    let mag = file.read_f32(key(m, Role::DoraScale)?)?;
    let peft = m.format != Format::Kohya;
    let dm = if peft { multiplier } else { 1.0 };
    let mut w: Vec<f32> = base
        .data
        .iter()
        .zip(&d.data)
        .map(|(a, b)| a + dm * b)
        .collect();
    let (rows, cols) = (base.rows(), base.cols());
    let eps = if peft { 0.0 } else { f32::EPSILON };
    let factor = |s: f32, norm: f64| -> f32 {
        let ratio = s / (norm as f32 + eps);
        if peft {
            ratio
        } else {
            multiplier * (ratio - 1.0) + 1.0
        }
    };
    if mag.numel() == rows {
        for (r, row) in w.chunks_mut(cols).enumerate() {
            let norm = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            let f = factor(mag.data[r], norm);
            row.iter_mut().for_each(|v| *v *= f);
        }
    } else if base.shape.len() >= 2 && mag.numel() == base.shape[1] {
        let inch = base.shape[1];
        let spatial = cols / inch;
        let mut norms = vec![0f64; inch];
        for row in w.chunks(cols) {
            for (c, v) in row.iter().enumerate() {
                norms[c / spatial] += (*v as f64).powi(2);
            }
        }
        let f: Vec<f32> = norms
            .iter()
            .enumerate()
            .map(|(i, n)| factor(mag.data[i], n.sqrt()))
            .collect();
        for row in w.chunks_mut(cols) {
            for (c, v) in row.iter_mut().enumerate() {
                *v *= f[c / spatial];
            }
        }
    } else {
        return Err(Error::bad_tensor(
            file.path(),
            key(m, Role::DoraScale)?,
            format!(
                "DoRA magnitude of {} values fits neither the rows nor the input channels of {:?}",
                mag.numel(),
                base.shape
            ),
        ));
    }
    Ok(Tensor::new(base.shape.clone(), w))
}

/// Frobenius norm of the module's delta (scale included), computed from the factors through
/// small Gram products where the kind allows, never forming an `out×in` matrix for plain LoRA,
/// LoHa or LoKr. `None` for kinds whose delta depends on the base weight (IA3, OFT, GLoRA).
pub fn delta_norm(m: &AdapterModule, file: &dyn TensorSource) -> Result<Option<f64>> {
    let s = m.scale.abs() as f64;
    let low_rank_sq = |up_key: &str, down_key: &str| -> Result<f64> {
        let up = Matrix::read(file, up_key)?;
        let down = Matrix::read(file, down_key)?;
        check_inner(file, down_key, up.cols, down.rows)?;
        let r = up.cols;
        let gu = linalg::gram_of_columns(&up.data, up.rows, r);
        let gd = linalg::gram_of_rows(&down.data, r, down.cols);
        Ok(linalg::trace_of_product(&gu, &gd, r).max(0.0))
    };
    let sq = match m.kind {
        ModuleKind::Lora if m.tensor(Role::Mid).is_none() => {
            low_rank_sq(key(m, Role::Up)?, key(m, Role::Down)?)?
        }
        ModuleKind::Loha if m.tensor(Role::HadaT1).is_none() => {
            // (A1 B1) ⊙ (A2 B2) = P Q with P[o,(a,b)] = A1[o,a]·A2[o,b], Q[(a,b),i] = B1[a,i]·B2[b,i].
            let a1 = Matrix::read(file, key(m, Role::HadaW1A)?)?;
            let b1 = Matrix::read(file, key(m, Role::HadaW1B)?)?;
            let a2 = Matrix::read(file, key(m, Role::HadaW2A)?)?;
            let b2 = Matrix::read(file, key(m, Role::HadaW2B)?)?;
            let (r1, r2) = (a1.cols, a2.cols);
            if b1.rows != r1 || b2.rows != r2 || a1.rows != a2.rows || b1.cols != b2.cols {
                return Err(Error::bad_tensor(
                    file.path(),
                    &m.name,
                    "LoHa factor shapes do not chain",
                ));
            }
            let k = r1 * r2;
            let mut p = vec![0f32; a1.rows * k];
            for o in 0..a1.rows {
                for a in 0..r1 {
                    for b in 0..r2 {
                        p[o * k + a * r2 + b] = a1.data[o * r1 + a] * a2.data[o * r2 + b];
                    }
                }
            }
            let n = b1.cols;
            let mut q = vec![0f32; k * n];
            for a in 0..r1 {
                for b in 0..r2 {
                    for i in 0..n {
                        q[(a * r2 + b) * n + i] = b1.data[a * n + i] * b2.data[b * n + i];
                    }
                }
            }
            let gp = linalg::gram_of_columns(&p, a1.rows, k);
            let gq = linalg::gram_of_rows(&q, k, n);
            linalg::trace_of_product(&gp, &gq, k).max(0.0)
        }
        ModuleKind::Lokr => {
            // ‖kron(W1, W2)‖ = ‖W1‖·‖W2‖, each from its own factors.
            let part = |full: Role, a: Role, b: Role| -> Result<f64> {
                match m.tensor(full) {
                    Some(k) => Ok(Matrix::read(file, k)?.frobenius_sq()),
                    None => low_rank_sq(key(m, a)?, key(m, b)?),
                }
            };
            let n1 = part(Role::LokrW1, Role::LokrW1A, Role::LokrW1B)?;
            let n2 = if m.tensor(Role::LokrT2).is_some() {
                lokr_factors(m, file)?.1.frobenius_sq()
            } else {
                part(Role::LokrW2, Role::LokrW2A, Role::LokrW2B)?
            };
            n1 * n2
        }
        ModuleKind::Ia3 | ModuleKind::Oft | ModuleKind::Boft | ModuleKind::Glora => {
            return Ok(None)
        }
        // Tucker cores are small conv kernels; the dense delta is cheap there.
        _ => return Ok(Some(delta(m, file)?.frobenius_norm())),
    };
    Ok(Some(s * sq.sqrt()))
}
