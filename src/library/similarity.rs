//! How alike two LoRAs' effects are: the cosine of their ΔW over the modules both adapt, with each
//! side's norm taken over all its modules (docs/DELTA_MATH.md, "Similarity of two LoRAs").
//!
//! [`exact_similarity`] reads both files' factors and never forms a dense ΔW for low-rank modules:
//! `⟨U₁V₁, U₂V₂⟩` is a trace of two small cross Grams. A [`Sketch`] is a compact per-file summary
//! (a few dozen bytes per module) that estimates the same cosine without the factors, so that one
//! LoRA can be ranked against a whole collection; the pairs a caller shows are then compared
//! exactly.

use crate::adapter::keys::Role;
use crate::adapter::{delta, Adapter, AdapterModule, ModuleKind};
use crate::family::kohya_names::module_kohya_name;
use crate::family::{self, BaseModel};
use crate::linalg;
use crate::tensors::{Dtype, Tensor, TensorFile};
use crate::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;

/// How alike two LoRAs are.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Similarity {
    /// `Σ_shared ⟨ΔW_a, ΔW_b⟩ / (‖ΔW_a‖·‖ΔW_b‖)`, the norms over all modules of each LoRA; in
    /// [−1, 1]. 0 when the families differ, nothing is shared, or either delta is zero.
    pub cosine: f64,
    /// Weights both LoRAs change (same kohya name, same shape).
    pub shared_modules: usize,
    /// Weights each LoRA changes with a delta independent of the base weight.
    pub modules_a: usize,
    pub modules_b: usize,
    /// Fraction of each LoRA's `‖ΔW‖²` that lies in the shared weights. By Cauchy–Schwarz,
    /// `|cosine| ≤ √(shared_energy_a · shared_energy_b)`.
    pub shared_energy_a: f64,
    pub shared_energy_b: f64,
    /// Modules left out because what they do depends on the base weight (IA3, OFT, BOFT, GLoRA).
    pub ignored_a: usize,
    pub ignored_b: usize,
}

/// The weight a module changes: its kohya name (the one spelling of every dialect) and the shape
/// of that weight as a matrix `[out, in·kh·kw]`. Modules of two files with equal targets change the
/// same weight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    name: String,
    rows: usize,
    cols: usize,
}

impl Target {
    /// 64-bit FNV-1a of name, rows and cols: the key a sketch stores, and the seed of the
    /// module's random test matrices (so two files project a shared weight the same way).
    fn key(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let bytes = self
            .name
            .bytes()
            .chain([0u8])
            .chain((self.rows as u64).to_le_bytes())
            .chain((self.cols as u64).to_le_bytes());
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// An adapter's modules grouped by the weight they change (a file may hold two modules for one
/// weight; their deltas add).
struct Targets<'a> {
    family: BaseModel,
    groups: BTreeMap<Target, Vec<&'a AdapterModule>>,
    ignored: usize,
}

fn has_own_delta(kind: ModuleKind) -> bool {
    matches!(
        kind,
        ModuleKind::Lora
            | ModuleKind::Loha
            | ModuleKind::Lokr
            | ModuleKind::Full
            | ModuleKind::Norm
    )
}

fn targets(adapter: &Adapter) -> Targets<'_> {
    let family = family::detect(adapter.file.metadata(), &adapter.modules).base_model;
    let mut groups: BTreeMap<Target, Vec<&AdapterModule>> = BTreeMap::new();
    let mut ignored = 0;
    for m in &adapter.modules {
        if !has_own_delta(m.kind) {
            ignored += 1;
            continue;
        }
        let rows = m.shape.first().copied().unwrap_or(1);
        let cols = m.shape.iter().skip(1).product::<usize>();
        let target = Target {
            name: module_kohya_name(m, family),
            rows,
            cols,
        };
        groups.entry(target).or_default().push(m);
    }
    Targets {
        family,
        groups,
        ignored,
    }
}

/// One module's ΔW as a `rows × cols` matrix, scale included, in the cheapest exact form.
enum Delta {
    /// `up (rows×rank) · down (rank×cols)`, f64.
    LowRank {
        up: Vec<f64>,
        down: Vec<f64>,
        rank: usize,
    },
    /// The dense delta as `delta::delta` computes it (f32; products accumulate in f64).
    Dense(Vec<f32>),
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| *x as f64).collect()
}

/// Reads a module's delta: plain LoRA/LoCon factors as they are, LoHa without Tucker cores as the
/// rank-r₁r₂ factorization `P·Q` of its Hadamard product (when that is smaller than the dense
/// matrix), everything else (Tucker cores, LoKr, full and norm deltas) dense.
fn read_delta(m: &AdapterModule, file: &TensorFile, target: &Target) -> Result<Delta> {
    let (rows, cols) = (target.rows, target.cols);
    let s = m.scale as f64;
    let bad = |what: &str| Error::bad_tensor(file.path(), m.name.as_str(), what.to_string());
    if let Some(f) = m.plain_factors() {
        let up = file.read_f32(f.up)?;
        let down = file.read_f32(f.down)?;
        let rank = up.cols();
        if up.rows() != rows || down.rows() != rank || down.cols() != cols {
            return Err(bad("LoRA factor shapes do not chain to the module's shape"));
        }
        let up = up.data.iter().map(|x| *x as f64 * s).collect();
        return Ok(Delta::LowRank {
            up,
            down: to_f64(&down.data),
            rank,
        });
    }
    if m.kind == ModuleKind::Loha && m.tensor(Role::HadaT1).is_none() {
        let read = |role: Role| -> Result<Tensor> {
            let key = m
                .tensor(role)
                .ok_or_else(|| bad(&format!("LoHa module has no {role:?} tensor")))?;
            file.read_f32(key)
        };
        let (a1, b1, a2, b2) = (
            read(Role::HadaW1A)?,
            read(Role::HadaW1B)?,
            read(Role::HadaW2A)?,
            read(Role::HadaW2B)?,
        );
        let (r1, r2) = (a1.cols(), a2.cols());
        let k = r1 * r2;
        if k * (rows + cols) <= rows * cols {
            if a1.rows() != rows
                || a2.rows() != rows
                || b1.rows() != r1
                || b2.rows() != r2
                || b1.cols() != cols
                || b2.cols() != cols
            {
                return Err(bad("LoHa factor shapes do not chain"));
            }
            // (A1 B1) ⊙ (A2 B2) = P Q, P[o,(a,b)] = A1[o,a]·A2[o,b], Q[(a,b),i] = B1[a,i]·B2[b,i].
            let mut p = vec![0f64; rows * k];
            for o in 0..rows {
                for a in 0..r1 {
                    for b in 0..r2 {
                        p[o * k + a * r2 + b] =
                            s * a1.data[o * r1 + a] as f64 * a2.data[o * r2 + b] as f64;
                    }
                }
            }
            let mut q = vec![0f64; k * cols];
            for a in 0..r1 {
                for b in 0..r2 {
                    for i in 0..cols {
                        q[(a * r2 + b) * cols + i] =
                            b1.data[a * cols + i] as f64 * b2.data[b * cols + i] as f64;
                    }
                }
            }
            return Ok(Delta::LowRank {
                up: p,
                down: q,
                rank: k,
            });
        }
    }
    let d = delta::delta(m, file)?;
    if d.numel() != rows * cols {
        return Err(bad("the delta does not have the module's shape"));
    }
    Ok(Delta::Dense(d.data))
}

/// `⟨X, Y⟩_F` of two deltas of the same `rows × cols` shape, accumulated in f64.
fn inner(x: &Delta, y: &Delta, rows: usize, cols: usize) -> f64 {
    match (x, y) {
        (
            Delta::LowRank {
                up: u1,
                down: v1,
                rank: r1,
            },
            Delta::LowRank {
                up: u2,
                down: v2,
                rank: r2,
            },
        ) => linalg::inner_of_products(u1, *r1, v1, u2, *r2, v2, rows, cols),
        (Delta::LowRank { up, down, rank }, Delta::Dense(d))
        | (Delta::Dense(d), Delta::LowRank { up, down, rank }) => {
            // Σ_i Σ_a U[i,a] · (D Vᵀ)[i,a], one row of D at a time.
            let r = *rank;
            let mut total = 0f64;
            for i in 0..rows {
                let row = &d[i * cols..(i + 1) * cols];
                for a in 0..r {
                    let v = &down[a * cols..(a + 1) * cols];
                    let dv: f64 = row.iter().zip(v).map(|(x, y)| *x as f64 * y).sum();
                    total += up[i * r + a] * dv;
                }
            }
            total
        }
        (Delta::Dense(a), Delta::Dense(b)) => {
            a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
        }
    }
}

/// `‖Σ xᵢ‖²` of a weight's deltas (cross terms included when a file has two modules for it).
fn norm_sq(deltas: &[Delta], rows: usize, cols: usize) -> f64 {
    let mut total = 0.0;
    for (i, x) in deltas.iter().enumerate() {
        total += inner(x, x, rows, cols);
        for y in &deltas[i + 1..] {
            total += 2.0 * inner(x, y, rows, cols);
        }
    }
    total
}

fn cross(xs: &[Delta], ys: &[Delta], rows: usize, cols: usize) -> f64 {
    xs.iter()
        .flat_map(|x| ys.iter().map(move |y| inner(x, y, rows, cols)))
        .sum()
}

fn read_group(mods: &[&AdapterModule], file: &TensorFile, target: &Target) -> Result<Vec<Delta>> {
    mods.iter().map(|m| read_delta(m, file, target)).collect()
}

/// A total that came out NaN or Inf means non-finite factors: name the tensor.
fn check_finite_total(total: f64, adapter: &Adapter) -> Result<()> {
    if total.is_finite() {
        return Ok(());
    }
    adapter.check_finite()?;
    Err(Error::bad_file(
        adapter.file.path(),
        "its delta's norm is not finite (factors too large for f64?)",
    ))
}

/// The exact similarity of two LoRAs, from their factors (docs/DELTA_MATH.md, "Similarity of two
/// LoRAs"). Each module's factors are read once; weights are compared in parallel.
pub fn exact_similarity(a: &Adapter, b: &Adapter) -> Result<Similarity> {
    let ta = targets(a);
    let tb = targets(b);
    let mut sim = Similarity {
        cosine: 0.0,
        shared_modules: 0,
        modules_a: ta.groups.len(),
        modules_b: tb.groups.len(),
        shared_energy_a: 0.0,
        shared_energy_b: 0.0,
        ignored_a: ta.ignored,
        ignored_b: tb.ignored,
    };
    if ta.family != tb.family {
        return Ok(sim);
    }
    // One job per weight of either side: (target, a's modules, b's modules).
    let empty: Vec<&AdapterModule> = Vec::new();
    let mut jobs: Vec<(&Target, &[&AdapterModule], &[&AdapterModule])> = Vec::new();
    for (t, ma) in &ta.groups {
        let mb = tb.groups.get(t).unwrap_or(&empty);
        jobs.push((t, ma, mb));
    }
    for (t, mb) in &tb.groups {
        if !ta.groups.contains_key(t) {
            jobs.push((t, &empty, mb));
        }
    }
    // (‖a‖², ‖b‖², ⟨a, b⟩, shared)
    let parts = jobs
        .par_iter()
        .map(|(t, ma, mb)| -> Result<(f64, f64, f64, bool)> {
            let da = read_group(ma, &a.file, t)?;
            let db = read_group(mb, &b.file, t)?;
            let (na, nb) = (norm_sq(&da, t.rows, t.cols), norm_sq(&db, t.rows, t.cols));
            let shared = !ma.is_empty() && !mb.is_empty();
            let c = if shared {
                cross(&da, &db, t.rows, t.cols)
            } else {
                0.0
            };
            Ok((na, nb, c, shared))
        })
        .collect::<Result<Vec<_>>>()?;
    let (mut na, mut nb, mut sa, mut sb, mut c) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (pa, pb, pc, shared) in parts {
        na += pa;
        nb += pb;
        c += pc;
        if shared {
            sim.shared_modules += 1;
            sa += pa;
            sb += pb;
        }
    }
    check_finite_total(na, a)?;
    check_finite_total(nb, b)?;
    if na > 0.0 {
        sim.shared_energy_a = sa / na;
    }
    if nb > 0.0 {
        sim.shared_energy_b = sb / nb;
    }
    if na > 0.0 && nb > 0.0 {
        sim.cosine = (c / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0);
    }
    Ok(sim)
}

/// Rows and columns of each module's sketch: `d×d` numbers per weight. With 8, a module costs 140
/// bytes and the cosine of two real LoRAs is estimated within a few hundredths (DELTA_MATH.md).
pub const SKETCH_DIM: usize = 8;

/// The version byte that starts [`Sketch::to_bytes`]; a stored sketch of another version is
/// refused by [`Sketch::from_bytes`] (the caller recomputes it).
pub const SKETCH_VERSION: u8 = 1;

/// A compact summary of a LoRA that estimates [`exact_similarity`]'s cosine without the factors.
///
/// Per weight `t`: `Y_t = Ψ_t ΔW_t Ω_t` (`d×d`), where `Ψ_t` (`d×rows`) and `Ω_t` (`cols×d`) are
/// random sign matrices seeded by the weight's kohya name and shape — the same in every file — and
/// computed from the factors as `(Ψ U)(V Ω)`. Since `E[ΩΩᵀ] ∝ I`, `⟨Y₁, Y₂⟩` estimates
/// `⟨ΔW₁, ΔW₂⟩` up to a constant; the sketch keeps `Y_t/‖Y_t‖` (the per-weight cosine estimate is
/// the dot of two such vectors, exactly 1 for a copy and −1 for a negated one) and the exact share
/// `w_t = ‖ΔW_t‖/‖ΔW‖` of the weight in the LoRA's norm. The estimate is `Σ_shared w_a w_b ⟨ŷ_a, ŷ_b⟩`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    family: BaseModel,
    dim: usize,
    /// Weight keys ([`Target::key`]), ascending.
    keys: Vec<u64>,
    /// `‖ΔW_t‖ / ‖ΔW‖`, per key.
    weights: Vec<f32>,
    /// `d²` numbers per key: the unit-norm sketch.
    units: Vec<f32>,
}

/// splitmix64: the stream of random signs of the test matrices (platform independent).
struct Signs(u64);

impl Signs {
    fn fill(&mut self, n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            for bit in 0..64.min(n - out.len()) {
                out.push(if z >> bit & 1 == 1 { 1.0 } else { -1.0 });
            }
        }
        out
    }
}

/// `Ψ ΔW Ω` of one weight (`d×d`), from its deltas.
fn sketch_of(deltas: &[Delta], target: &Target, dim: usize) -> Vec<f64> {
    let (rows, cols) = (target.rows, target.cols);
    let key = target.key();
    let psi = Signs(key).fill(dim * rows); // d×rows
    let omega = Signs(key ^ 0xA5A5_5A5A_C3C3_3C3C).fill(cols * dim); // cols×d
    let mut y = vec![0f64; dim * dim];
    for d in deltas {
        let part = match d {
            Delta::LowRank { up, down, rank } => {
                let pu = linalg::matmul_f64(&psi, dim, rows, up, *rank);
                let vo = linalg::matmul_f64(down, *rank, cols, &omega, dim);
                linalg::matmul_f64(&pu, dim, *rank, &vo, dim)
            }
            Delta::Dense(m) => {
                let mut pd = vec![0f64; dim * cols];
                for i in 0..rows {
                    let row = &m[i * cols..(i + 1) * cols];
                    for j in 0..dim {
                        let s = psi[j * rows + i];
                        let dst = &mut pd[j * cols..(j + 1) * cols];
                        dst.iter_mut()
                            .zip(row)
                            .for_each(|(o, v)| *o += s * *v as f64);
                    }
                }
                linalg::matmul_f64(&pd, dim, cols, &omega, dim)
            }
        };
        y.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
    y
}

fn family_code(f: BaseModel) -> u8 {
    match f {
        BaseModel::Unknown => 0,
        BaseModel::Sd1 => 1,
        BaseModel::Sd2 => 2,
        BaseModel::Sdxl => 3,
        BaseModel::Sd3 => 4,
        BaseModel::Flux => 5,
    }
}

fn family_from_code(c: u8) -> Option<BaseModel> {
    Some(match c {
        0 => BaseModel::Unknown,
        1 => BaseModel::Sd1,
        2 => BaseModel::Sd2,
        3 => BaseModel::Sdxl,
        4 => BaseModel::Sd3,
        5 => BaseModel::Flux,
        _ => return None,
    })
}

/// Bytes before the modules: version, family, dim, a zero byte, module count (u32 LE).
const HEADER_LEN: usize = 8;

impl Sketch {
    /// The sketch of a LoRA (reads every module's factors once).
    pub fn of(adapter: &Adapter) -> Result<Sketch> {
        Sketch::with_dim(adapter, SKETCH_DIM)
    }

    /// The sketch with `dim×dim` numbers per weight (what [`SKETCH_DIM`] was chosen from).
    pub fn with_dim(adapter: &Adapter, dim: usize) -> Result<Sketch> {
        if dim == 0 || dim > u8::MAX as usize {
            return Err(Error::Invalid(format!(
                "sketch dimension {dim} out of range"
            )));
        }
        let t = targets(adapter);
        let groups: Vec<_> = t.groups.iter().collect();
        let parts = groups
            .par_iter()
            .map(|(target, mods)| -> Result<(u64, f64, Vec<f64>)> {
                let deltas = read_group(mods, &adapter.file, target)?;
                let n = norm_sq(&deltas, target.rows, target.cols);
                Ok((target.key(), n, sketch_of(&deltas, target, dim)))
            })
            .collect::<Result<Vec<_>>>()?;
        let total: f64 = parts.iter().map(|p| p.1).sum();
        check_finite_total(total, adapter)?;
        let mut parts = parts;
        parts.sort_by_key(|p| p.0);
        let mut sketch = Sketch {
            family: t.family,
            dim,
            keys: Vec::with_capacity(parts.len()),
            weights: Vec::with_capacity(parts.len()),
            units: Vec::with_capacity(parts.len() * dim * dim),
        };
        for (key, n, y) in parts {
            if sketch.keys.last() == Some(&key) {
                // Two weights with one 64-bit key: keep the first (a chance of ~n²/2⁶⁵).
                continue;
            }
            let weight = if total > 0.0 {
                (n.max(0.0) / total).sqrt()
            } else {
                0.0
            };
            let len = y.iter().map(|v| v * v).sum::<f64>().sqrt();
            sketch.keys.push(key);
            sketch.weights.push(weight as f32);
            sketch.units.extend(
                y.iter()
                    .map(|v| if len > 0.0 { (v / len) as f32 } else { 0.0 }),
            );
        }
        Ok(sketch)
    }

    pub fn family(&self) -> BaseModel {
        self.family
    }

    /// Weights in the sketch.
    pub fn modules(&self) -> usize {
        self.keys.len()
    }

    /// The estimated cosine of [`exact_similarity`]: 0 across families. Typical error a few
    /// hundredths for LoRAs of hundreds of modules (DELTA_MATH.md); exactly ±1 for a copy or a
    /// negated copy, and never above `√(shared energy of both)` in magnitude.
    pub fn estimate(&self, other: &Sketch) -> f64 {
        if self.family != other.family || self.dim != other.dim {
            return 0.0;
        }
        let d2 = self.dim * self.dim;
        let (mut i, mut j) = (0, 0);
        let mut total = 0f64;
        while i < self.keys.len() && j < other.keys.len() {
            match self.keys[i].cmp(&other.keys[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    let a = &self.units[i * d2..(i + 1) * d2];
                    let b = &other.units[j * d2..(j + 1) * d2];
                    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                    total += self.weights[i] as f64 * other.weights[j] as f64 * dot as f64;
                    i += 1;
                    j += 1;
                }
            }
        }
        total.clamp(-1.0, 1.0)
    }

    /// Bytes for storage (a BLOB): `[version, family, dim, 0, count: u32 LE]`, then per weight its
    /// key (u64 LE), weight (f32 LE) and `dim²` unit-sketch values (f16 LE).
    pub fn to_bytes(&self) -> Vec<u8> {
        let d2 = self.dim * self.dim;
        let mut out = Vec::with_capacity(HEADER_LEN + self.keys.len() * (12 + 2 * d2));
        out.extend([SKETCH_VERSION, family_code(self.family), self.dim as u8, 0]);
        out.extend((self.keys.len() as u32).to_le_bytes());
        for (i, key) in self.keys.iter().enumerate() {
            out.extend(key.to_le_bytes());
            out.extend(self.weights[i].to_le_bytes());
            let unit = Dtype::F16
                .encode_f32(&self.units[i * d2..(i + 1) * d2])
                .expect("f16 encodes");
            out.extend(unit);
        }
        out
    }

    /// Reads [`Sketch::to_bytes`]' output, validated in full (version, family, sizes, key order,
    /// finite values). Unit sketches are renormalized after their f16 rounding.
    pub fn from_bytes(bytes: &[u8]) -> Result<Sketch> {
        let bad = |why: String| Error::Invalid(format!("similarity sketch: {why}"));
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!(
                "{} bytes, shorter than its header",
                bytes.len()
            )));
        }
        if bytes[0] != SKETCH_VERSION {
            return Err(bad(format!(
                "version {} (this build reads version {SKETCH_VERSION}); recompute it",
                bytes[0]
            )));
        }
        let family = family_from_code(bytes[1])
            .ok_or_else(|| bad(format!("unknown family {}", bytes[1])))?;
        let dim = bytes[2] as usize;
        if dim == 0 || bytes[3] != 0 {
            return Err(bad("bad header".into()));
        }
        let count = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        let d2 = dim * dim;
        let per = 12 + 2 * d2;
        if Some(bytes.len()) != count.checked_mul(per).map(|n| n + HEADER_LEN) {
            return Err(bad(format!(
                "{} bytes, but {count} modules of dimension {dim} need {}",
                bytes.len(),
                HEADER_LEN as u128 + count as u128 * per as u128
            )));
        }
        let mut sketch = Sketch {
            family,
            dim,
            keys: Vec::with_capacity(count),
            weights: Vec::with_capacity(count),
            units: Vec::with_capacity(count * d2),
        };
        for rec in bytes[HEADER_LEN..].chunks_exact(per) {
            let key = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            let weight = f32::from_le_bytes(rec[8..12].try_into().expect("4 bytes"));
            if sketch.keys.last().is_some_and(|last| *last >= key) {
                return Err(bad("module keys out of order".into()));
            }
            if !(weight.is_finite() && (0.0..=1.0 + 1e-3).contains(&weight)) {
                return Err(bad(format!("module weight {weight} out of range")));
            }
            let mut unit = Dtype::F16.decode_f32(&rec[12..]).expect("f16 decodes");
            if unit.iter().any(|v| !v.is_finite()) {
                return Err(bad("non-finite sketch value".into()));
            }
            let len = unit.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            if len > 0.0 {
                unit.iter_mut().for_each(|v| *v = (*v as f64 / len) as f32);
            }
            sketch.keys.push(key);
            sketch.weights.push(weight);
            sketch.units.extend(unit);
        }
        Ok(sketch)
    }
}

/// The `top` candidates most similar to `query` by sketch estimate, best first: `(index, estimate)`.
/// Callers compare the ones they show exactly ([`exact_similarity`]).
pub fn rank_by_estimate(query: &Sketch, candidates: &[Sketch], top: usize) -> Vec<(usize, f64)> {
    let mut scored: Vec<(usize, f64)> = candidates
        .par_iter()
        .map(|c| query.estimate(c))
        .enumerate()
        .collect();
    let by_score = |x: &(usize, f64), y: &(usize, f64)| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0));
    if top < scored.len() {
        scored.select_nth_unstable_by(top, by_score);
        scored.truncate(top);
    }
    scored.sort_by(by_score);
    scored
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Adapter {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("fixtures/loras/{name}.safetensors"));
        Adapter::open(&p).unwrap()
    }

    #[test]
    fn self_similarity_is_one_exactly_and_by_sketch() {
        for name in [
            "sd1_kohya_lora",
            "sd1_locon",
            "sd1_loha",
            "sd1_lokr_full",
            "sd1_full",
        ] {
            let a = fixture(name);
            let s = exact_similarity(&a, &a).unwrap();
            assert!((s.cosine - 1.0).abs() < 1e-12, "{name}: {}", s.cosine);
            assert_eq!(s.shared_modules, s.modules_a);
            assert!((s.shared_energy_a - 1.0).abs() < 1e-12);
            let k = Sketch::of(&a).unwrap();
            assert!(
                (k.estimate(&k) - 1.0).abs() < 1e-5,
                "{name}: {}",
                k.estimate(&k)
            );
        }
    }

    #[test]
    fn sketch_bytes_round_trip_and_validation() {
        let a = fixture("sd1_locon");
        let k = Sketch::of(&a).unwrap();
        let bytes = k.to_bytes();
        assert_eq!(
            bytes.len(),
            8 + k.modules() * (12 + 2 * SKETCH_DIM * SKETCH_DIM)
        );
        let back = Sketch::from_bytes(&bytes).unwrap();
        assert_eq!(back.keys, k.keys);
        assert_eq!(back.weights, k.weights);
        assert_eq!(back.family, k.family);
        let err = back
            .units
            .iter()
            .zip(&k.units)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-3, "{err}");
        assert!((back.estimate(&k) - 1.0).abs() < 1e-4);
        assert_eq!(
            Sketch::from_bytes(&back.to_bytes()).unwrap().to_bytes(),
            back.to_bytes()
        );

        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert!(Sketch::from_bytes(&v2)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        assert!(Sketch::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(Sketch::from_bytes(&bytes[..5]).is_err());
        let mut fam = bytes.clone();
        fam[1] = 200;
        assert!(Sketch::from_bytes(&fam).is_err());
        let mut nan = bytes.clone();
        nan[8 + 12..8 + 14].copy_from_slice(&[0x00, 0x7e]); // f16 NaN
        assert!(Sketch::from_bytes(&nan).is_err());
    }

    #[test]
    fn different_families_share_nothing() {
        let a = fixture("sd1_kohya_lora");
        let b = fixture("sdxl_kohya_lora");
        let s = exact_similarity(&a, &b).unwrap();
        assert_eq!((s.cosine, s.shared_modules), (0.0, 0));
        assert!(s.modules_a > 0 && s.modules_b > 0);
        assert_eq!(
            Sketch::of(&a).unwrap().estimate(&Sketch::of(&b).unwrap()),
            0.0
        );
    }

    #[test]
    fn base_dependent_kinds_are_counted_as_ignored() {
        let a = fixture("sd1_ia3");
        let s = exact_similarity(&a, &a).unwrap();
        assert_eq!(
            (s.modules_a, s.ignored_a, s.cosine),
            (0, a.modules.len(), 0.0)
        );
    }

    #[test]
    fn ranking_puts_the_best_first() {
        let a = Sketch::of(&fixture("sd1_kohya_lora")).unwrap();
        let b = Sketch::of(&fixture("sd1_peft")).unwrap();
        let r = rank_by_estimate(&a, &[b.clone(), a.clone(), b], 2);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, 1);
        assert!((r[0].1 - 1.0).abs() < 1e-5);
    }
}
