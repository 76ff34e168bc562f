//! Dense f32 linear algebra on row-major slices, backed by faer. The delta math and (later) the
//! factor-space SVD of merge/extract/resize call these instead of touching faer directly.

pub mod low_rank_add;

use faer::linalg::matmul::matmul as faer_matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// Parallelism for one product: tiny products, and any product computed on a rayon worker (the
/// caller already runs modules in parallel), stay on the calling thread; large ones from outside
/// the pool use it. A worker waiting on a parallel product would steal and start further modules
/// of its caller, each with its own working memory, so memory would no longer be bounded by the
/// number of threads.
fn par_for(flops: usize) -> Par {
    if flops >= 1 << 24 && rayon::current_thread_index().is_none() {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// `A (m×k) · B (k×n)`, all row-major.
pub fn matmul(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(a.len(), m * k, "lhs size");
    assert_eq!(b.len(), k * n, "rhs size");
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let lhs = MatRef::from_row_major_slice(a, m, k);
    let rhs = MatRef::from_row_major_slice(b, k, n);
    let dst = MatMut::from_row_major_slice_mut(&mut out, m, n);
    faer_matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par_for(m * n * k));
    out
}

/// `Aᵀ · B` for row-major `A (m×k)` and `B (m×n)`: a `k×n` product read through a transposed
/// view of `A`, so no transposed copy of a large matrix is made.
pub fn matmul_transposed(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(a.len(), m * k, "lhs size");
    assert_eq!(b.len(), m * n, "rhs size");
    let mut out = vec![0f32; k * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let lhs = MatRef::from_row_major_slice(a, m, k).transpose();
    let rhs = MatRef::from_row_major_slice(b, m, n);
    let dst = MatMut::from_row_major_slice_mut(&mut out, k, n);
    faer_matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par_for(m * n * k));
    out
}

/// `C += alpha · A (m×k) · B (k×n)` in place, all row-major, on the calling thread (streaming
/// callers run many of these in parallel on cache-sized row blocks).
pub fn add_matmul(c: &mut [f32], a: &[f32], m: usize, k: usize, b: &[f32], n: usize, alpha: f32) {
    assert_eq!(a.len(), m * k, "lhs size");
    assert_eq!(b.len(), k * n, "rhs size");
    assert_eq!(c.len(), m * n, "dst size");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let lhs = MatRef::from_row_major_slice(a, m, k);
    let rhs = MatRef::from_row_major_slice(b, k, n);
    let dst = MatMut::from_row_major_slice_mut(c, m, n);
    faer_matmul(dst, Accum::Add, lhs, rhs, alpha, Par::Seq);
}

/// `Aᵀ A` for a row-major `m×k` matrix: the `k×k` Gram matrix of its columns.
pub fn gram_of_columns(a: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; k * k];
    if m == 0 || k == 0 {
        return out;
    }
    let at = MatRef::from_row_major_slice(a, m, k);
    let dst = MatMut::from_row_major_slice_mut(&mut out, k, k);
    faer_matmul(
        dst,
        Accum::Replace,
        at.transpose(),
        at,
        1.0f32,
        par_for(m * k * k),
    );
    out
}

/// `B Bᵀ` for a row-major `k×n` matrix: the `k×k` Gram matrix of its rows.
pub fn gram_of_rows(b: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; k * k];
    if n == 0 || k == 0 {
        return out;
    }
    let bm = MatRef::from_row_major_slice(b, k, n);
    let dst = MatMut::from_row_major_slice_mut(&mut out, k, k);
    faer_matmul(
        dst,
        Accum::Replace,
        bm,
        bm.transpose(),
        1.0f32,
        par_for(n * k * k),
    );
    out
}

/// `trace(X Y)` for square `k×k` row-major matrices, accumulated in f64.
pub fn trace_of_product(x: &[f32], y: &[f32], k: usize) -> f64 {
    let mut t = 0f64;
    for i in 0..k {
        for j in 0..k {
            t += x[i * k + j] as f64 * y[j * k + i] as f64;
        }
    }
    t
}

/// Kronecker product of row-major `a (p×q)` and `b (r×s)`: a `(p·r)×(q·s)` matrix.
pub fn kron(a: &[f32], p: usize, q: usize, b: &[f32], r: usize, s: usize) -> Vec<f32> {
    let cols = q * s;
    let mut out = vec![0f32; p * r * cols];
    for i in 0..p {
        for j in 0..q {
            let x = a[i * q + j];
            for k in 0..r {
                let row = (i * r + k) * cols + j * s;
                let src = &b[k * s..(k + 1) * s];
                for (o, v) in out[row..row + s].iter_mut().zip(src) {
                    *o = x * v;
                }
            }
        }
    }
    out
}

/// Transpose of a row-major `m×n` matrix.
pub fn transpose(a: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[j * m + i] = a[i * n + j];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_small() {
        // [1 2; 3 4] · [5; 6] = [17; 39]
        assert_eq!(
            matmul(&[1., 2., 3., 4.], 2, 2, &[5., 6.], 1),
            vec![17., 39.]
        );
    }

    #[test]
    fn gram_trace_equals_frobenius_of_product() {
        let u = [1., 2., 3., 4., 5., 6.]; // 3×2
        let d = [1., 0., -1., 2., 1., 0.5]; // 2×3
        let p = matmul(&u, 3, 2, &d, 3);
        let direct: f64 = p.iter().map(|v| (*v as f64).powi(2)).sum();
        let t = trace_of_product(&gram_of_columns(&u, 3, 2), &gram_of_rows(&d, 2, 3), 2);
        assert!((t - direct).abs() < 1e-9 * direct);
    }

    #[test]
    fn kron_layout() {
        let k = kron(&[1., 2.], 1, 2, &[1., 10., 100., 1000.], 2, 2);
        assert_eq!(k, vec![1., 10., 2., 20., 100., 1000., 200., 2000.]);
    }
}

/// A rank-k factorization `up (m×k) · down (k×n)` and the singular values it was cut from.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    /// `m×k`, singular values folded in.
    pub up: Vec<f32>,
    /// `k×n`, orthonormal rows.
    pub down: Vec<f32>,
    /// Every singular value of the factorized matrix, descending.
    pub singular_values: Vec<f64>,
}

impl LowRank {
    /// The first `k` components (all of them when `k` ≥ the rank).
    pub fn keep(self, k: usize) -> LowRank {
        if k >= self.rank {
            return self;
        }
        let mut up = vec![0f32; self.rows * k];
        for i in 0..self.rows {
            up[i * k..(i + 1) * k].copy_from_slice(&self.up[i * self.rank..i * self.rank + k]);
        }
        LowRank {
            up,
            down: self.down[..k * self.cols].to_vec(),
            rank: k,
            ..self
        }
    }
}

fn to_mat(a: &[f32], m: usize, n: usize) -> faer::Mat<f64> {
    faer::Mat::from_fn(m, n, |i, j| a[i * n + j] as f64)
}

/// Rank-`k` truncation from thin SVD factors `U S Vᵀ` (f64), `k` clamped to the available rank.
fn truncate_svd(u: faer::MatRef<f64>, s: &[f64], v: faer::MatRef<f64>, k: usize) -> LowRank {
    let (m, n) = (u.nrows(), v.nrows());
    let k = k.min(s.len());
    let mut up = vec![0f32; m * k];
    for i in 0..m {
        for j in 0..k {
            up[i * k + j] = (u[(i, j)] * s[j]) as f32;
        }
    }
    let mut down = vec![0f32; k * n];
    for j in 0..k {
        for c in 0..n {
            down[j * n + c] = v[(c, j)] as f32;
        }
    }
    LowRank {
        rows: m,
        cols: n,
        rank: k,
        up,
        down,
        singular_values: s.to_vec(),
    }
}

/// Best rank-`k` approximation (Eckart–Young) of a dense row-major `m×n` matrix.
pub fn truncate_dense(a: &[f32], m: usize, n: usize, k: usize) -> Result<LowRank, String> {
    let svd = to_mat(a, m, n)
        .thin_svd()
        .map_err(|e| format!("SVD did not converge: {e:?}"))?;
    let s: Vec<f64> = (0..m.min(n)).map(|i| svd.S()[i]).collect();
    Ok(truncate_svd(svd.U(), &s, svd.V(), k))
}

/// Best rank-`k` approximation of the product `U (m×r) · D (r×n)`, exact, from the factors:
/// thin QR of `U` and `Dᵀ`, SVD of the small `r×r` core `R_u R_dᵀ`, rotated back. Costs
/// O((m+n)·r²); the `m×n` product is never formed.
pub fn truncate_product(
    u: &[f32],
    m: usize,
    r: usize,
    d: &[f32],
    n: usize,
    k: usize,
) -> Result<LowRank, String> {
    let qr_u = to_mat(u, m, r).qr();
    let qr_d = to_mat(&transpose(d, r, n), n, r).qr();
    let (qu, ru) = (qr_u.compute_thin_Q(), qr_u.thin_R());
    let (qd, rd) = (qr_d.compute_thin_Q(), qr_d.thin_R());
    let core = ru * rd.transpose();
    let svd = core
        .thin_svd()
        .map_err(|e| format!("SVD did not converge: {e:?}"))?;
    let s: Vec<f64> = (0..core.nrows().min(core.ncols()))
        .map(|i| svd.S()[i])
        .collect();
    let left = &qu * svd.U();
    let right = &qd * svd.V();
    Ok(truncate_svd(left.as_ref(), &s, right.as_ref(), k))
}

#[cfg(test)]
mod svd_tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn factor_truncation_equals_dense_truncation() {
        let (m, r, n, k) = (40, 6, 30, 3);
        let u = pseudo_random(m * r, 1);
        let d = pseudo_random(r * n, 2);
        let dense = matmul(&u, m, r, &d, n);
        let a = truncate_product(&u, m, r, &d, n, k).unwrap();
        let b = truncate_dense(&dense, m, n, k).unwrap();
        for i in 0..r {
            assert!((a.singular_values[i] - b.singular_values[i]).abs() < 1e-5);
        }
        let pa = matmul(&a.up, m, k, &a.down, n);
        let pb = matmul(&b.up, m, k, &b.down, n);
        let diff: f64 = pa
            .iter()
            .zip(&pb)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        assert!(diff.sqrt() < 1e-4, "{diff}");
        // Full rank reproduces the product.
        let full = truncate_product(&u, m, r, &d, n, r).unwrap();
        let p = matmul(&full.up, m, r, &full.down, n);
        let err: f64 = p
            .iter()
            .zip(&dense)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        assert!(err.sqrt() < 1e-4);
    }
}

/// Randomized truncated SVD (Halko–Martinsson–Tropp range finder) of a dense row-major `m×n`
/// matrix: `Y = A Ω` with `k + oversample` Gaussian-like probe columns, `power_iterations` rounds of
/// `Y ← A (Aᵀ Y)` with re-orthonormalization, `Q = qr(Y)`, then the exact SVD of the small
/// `Qᵀ A`. The big products run in f32 through faer; the small factorizations in f64.
/// `singular_values` holds the `k + oversample` values found (not the whole spectrum).
pub fn truncate_randomized(
    a: &[f32],
    m: usize,
    n: usize,
    k: usize,
    oversample: usize,
    power_iterations: usize,
    seed: u64,
) -> Result<LowRank, String> {
    let l = (k + oversample).min(m.min(n));
    // Deterministic pseudo-Gaussian probes (sum of uniforms), so runs are reproducible.
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let omega: Vec<f32> = (0..n * l)
        .map(|_| (0..4).map(|_| next()).sum::<f32>() - 2.0)
        .collect();
    let orthonormal = |y: &[f32], rows: usize| -> Vec<f32> {
        let q = to_mat(y, rows, l).qr().compute_thin_Q();
        let cols = q.ncols();
        let mut out = vec![0f32; rows * l];
        for i in 0..rows {
            for j in 0..cols.min(l) {
                out[i * l + j] = q[(i, j)] as f32;
            }
        }
        out
    };
    // Aᵀ is only ever read through a transposed view: no second m×n copy.
    let mut q = orthonormal(&matmul(a, m, n, &omega, l), m);
    for _ in 0..power_iterations {
        let z = orthonormal(&matmul_transposed(a, m, n, &q, l), n);
        q = orthonormal(&matmul(a, m, n, &z, l), m);
    }
    // B = Qᵀ A (l×n), small.
    let b = matmul_transposed(&q, m, l, a, n);
    let svd = to_mat(&b, l, n)
        .thin_svd()
        .map_err(|e| format!("SVD did not converge: {e:?}"))?;
    let s: Vec<f64> = (0..l.min(n)).map(|i| svd.S()[i]).collect();
    let left = to_mat(&q, m, l) * svd.U();
    Ok(truncate_svd(left.as_ref(), &s, svd.V(), k))
}

#[cfg(test)]
mod randomized_tests {
    use super::*;

    #[test]
    fn randomized_matches_full_svd_on_low_rank_plus_noise() {
        let (m, n, r) = (300, 200, 8);
        let mut x = 7u64;
        let mut rnd = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let u: Vec<f32> = (0..m * r).map(|_| rnd()).collect();
        let d: Vec<f32> = (0..r * n).map(|_| rnd()).collect();
        let mut a = matmul(&u, m, r, &d, n);
        a.iter_mut().for_each(|v| *v += 0.01 * rnd());
        let k = 8;
        let exact = truncate_dense(&a, m, n, k).unwrap();
        let approx = truncate_randomized(&a, m, n, k, 10, 2, 1).unwrap();
        let err = |lr: &LowRank| -> f64 {
            let p = matmul(&lr.up, m, lr.rank, &lr.down, n);
            p.iter()
                .zip(&a)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let (e_exact, e_approx) = (err(&exact), err(&approx));
        assert!(e_approx <= 1.01 * e_exact, "{e_approx} vs {e_exact}");
    }
}

/// `A (m×k) · B (k×n)` in f64, all row-major: the small products of similarity (factor Grams,
/// sketches), where f32 accumulation over thousands of rows would cost digits.
pub fn matmul_f64(a: &[f64], m: usize, k: usize, b: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(a.len(), m * k, "lhs size");
    assert_eq!(b.len(), k * n, "rhs size");
    let mut out = vec![0f64; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let lhs = MatRef::from_row_major_slice(a, m, k);
    let rhs = MatRef::from_row_major_slice(b, k, n);
    let dst = MatMut::from_row_major_slice_mut(&mut out, m, n);
    faer_matmul(dst, Accum::Replace, lhs, rhs, 1.0f64, par_for(m * n * k));
    out
}

/// `⟨U₁V₁, U₂V₂⟩_F` of two low-rank products of the same `m×n` shape (`Uᵢ` is `m×rᵢ`, `Vᵢ` is
/// `rᵢ×n`, row-major, f64), from the factors: `trace((U₁ᵀU₂)(V₂V₁ᵀ))` = the sum of the elementwise
/// product of the cross Grams `U₁ᵀU₂` and `V₁V₂ᵀ` (both `r₁×r₂`). O((m+n)·r₁·r₂); the `m×n`
/// products are never formed. With `U₂ = U₁`, `V₂ = V₁` it is `‖U₁V₁‖²`.
#[allow(clippy::too_many_arguments)]
pub fn inner_of_products(
    u1: &[f64],
    r1: usize,
    v1: &[f64],
    u2: &[f64],
    r2: usize,
    v2: &[f64],
    m: usize,
    n: usize,
) -> f64 {
    assert_eq!(u1.len(), m * r1, "u1 size");
    assert_eq!(v1.len(), r1 * n, "v1 size");
    assert_eq!(u2.len(), m * r2, "u2 size");
    assert_eq!(v2.len(), r2 * n, "v2 size");
    if m == 0 || n == 0 || r1 == 0 || r2 == 0 {
        return 0.0;
    }
    let mut gu = vec![0f64; r1 * r2];
    let mut gv = vec![0f64; r1 * r2];
    let (u1, u2) = (
        MatRef::from_row_major_slice(u1, m, r1),
        MatRef::from_row_major_slice(u2, m, r2),
    );
    let (v1, v2) = (
        MatRef::from_row_major_slice(v1, r1, n),
        MatRef::from_row_major_slice(v2, r2, n),
    );
    faer_matmul(
        MatMut::from_row_major_slice_mut(&mut gu, r1, r2),
        Accum::Replace,
        u1.transpose(),
        u2,
        1.0f64,
        par_for(m * r1 * r2),
    );
    faer_matmul(
        MatMut::from_row_major_slice_mut(&mut gv, r1, r2),
        Accum::Replace,
        v1,
        v2.transpose(),
        1.0f64,
        par_for(n * r1 * r2),
    );
    gu.iter().zip(&gv).map(|(a, b)| a * b).sum()
}

#[cfg(test)]
mod inner_tests {
    use super::*;

    #[test]
    fn inner_of_products_equals_the_dense_inner_product() {
        let (m, n, r1, r2) = (7, 5, 3, 2);
        let f = |len: usize, seed: f64| -> Vec<f64> {
            (0..len).map(|i| ((i as f64 + seed) * 0.7).sin()).collect()
        };
        let (u1, v1, u2, v2) = (
            f(m * r1, 1.0),
            f(r1 * n, 2.0),
            f(m * r2, 3.0),
            f(r2 * n, 4.0),
        );
        let p1 = matmul_f64(&u1, m, r1, &v1, n);
        let p2 = matmul_f64(&u2, m, r2, &v2, n);
        let dense: f64 = p1.iter().zip(&p2).map(|(a, b)| a * b).sum();
        let got = inner_of_products(&u1, r1, &v1, &u2, r2, &v2, m, n);
        assert!(
            (got - dense).abs() < 1e-12 * dense.abs().max(1.0),
            "{got} vs {dense}"
        );
        let norm: f64 = p1.iter().map(|a| a * a).sum();
        let got = inner_of_products(&u1, r1, &v1, &u1, r1, &v1, m, n);
        assert!((got - norm).abs() < 1e-12 * norm);
    }
}
