//! Own f32 CPU kernels for the sampler's hot spots, behind the layer types of [`super::layers`]:
//! the 3×3 and 1×1 convolutions as im2col + gemm ([`conv`]), fused attention with an online
//! softmax ([`attention`]), single-pass group and layer norms with the SiLU fused in ([`norm`]),
//! the GEGLU gate ([`activation`]), and linear layers with the bias in the gemm ([`linear`]).
//!
//! Candle stays the currency: every kernel takes and returns [`Tensor`]s and answers `None` when
//! the tensor is not f32 on the CPU (f16, CUDA, Metal), so the layer falls back to candle's ops.
//!
//! Results are bit-identical whatever the number of rayon threads: work is split only into
//! blocks of a fixed size (tiles of pixels, blocks of queries, norm groups, rows), each computed
//! by one thread in a fixed order, and gemm splits its output, never its reduction.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod norm;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use std::sync::OnceLock;

/// Whether the layers use these kernels; `LORATOOL_CANDLE_KERNELS=1` turns them off (candle's
/// own ops everywhere), a switch for benchmarking and for bisecting a numerical difference.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::env::var("LORATOOL_CANDLE_KERNELS").map_or(true, |v| v.is_empty() || v == "0")
    })
}

/// The kernel's answer when the kernels are on and it takes the tensors (`Some`), otherwise
/// candle's.
pub fn own_or_candle(
    kernel: impl FnOnce() -> candle_core::Result<Option<Tensor>>,
    candle: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    if enabled() {
        if let Some(t) = kernel()? {
            return Ok(t);
        }
    }
    candle()
}

/// Whether a kernel can take `t`: f32 on the CPU.
fn applies(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu)
}

/// Calls `f` with the contiguous f32 data of a CPU tensor; `None` when it has other data or is
/// not contiguous.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&data[start..end]))
}

/// `f` on `t`'s f32 data, made contiguous first if it is not (candle's `contiguous` is a
/// cheap clone when it already is).
fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    with_data(&t, f).ok_or_else(|| candle_core::Error::Msg("kernel: not f32 on the CPU".into()))
}

/// A new CPU tensor that owns `data`.
fn tensor(data: Vec<f32>, dims: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// A read-only matrix in `data`: element `(i, j)` at `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// A writable matrix, laid out as [`Mat`].
pub(crate) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// The number of elements a `rows × cols` view with these strides reaches.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    match rows == 0 || cols == 0 {
        true => 0,
        false => (rows - 1) * rs + (cols - 1) * cs + 1,
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate` (a bias or a running sum already in
/// `dst`), through gemm, on the current rayon pool when `parallel`. gemm parallelises over blocks
/// of the output only, so the result does not depend on the number of threads.
pub(crate) fn matmul(dst: MatMut, lhs: Mat, rhs: Mat, accumulate: bool, parallel: bool) {
    assert!(
        dst.rows == lhs.rows && dst.cols == rhs.cols && lhs.cols == rhs.rows,
        "matmul: [{}×{}] = [{}×{}] · [{}×{}]",
        dst.rows,
        dst.cols,
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    assert!(extent(dst.rows, dst.cols, dst.rs, dst.cs) <= dst.data.len());
    assert!(extent(lhs.rows, lhs.cols, lhs.rs, lhs.cs) <= lhs.data.len());
    assert!(extent(rhs.rows, rhs.cols, rhs.rs, rhs.cs) <= rhs.data.len());
    let threads = rayon::current_num_threads();
    let parallelism = match parallel && threads > 1 {
        true => gemm::Parallelism::Rayon(threads),
        false => gemm::Parallelism::None,
    };
    // SAFETY: the asserts above keep every element gemm addresses (row < rows, col < cols, at
    // row·rs + col·cs) inside its slice, and `dst` is borrowed mutably, so it aliases neither
    // operand.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A linear layer, `x · weight_t + bias` over `x`'s last axis (`weight_t` is `[in, out]`): one
/// gemm into an output that already holds the bias, so there is no zero fill and no second pass.
pub fn linear(
    x: &Tensor,
    weight_t: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) || !applies(weight_t) || bias.is_some_and(|b| !applies(b)) {
        return Ok(None);
    }
    let (k, n) = weight_t.dims2()?;
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        return Ok(None);
    }
    let rows = dims[..dims.len() - 1].iter().product::<usize>();
    let mut out = match bias {
        Some(b) => read(b, |b| b.repeat(rows))?,
        None => vec![0f32; rows * n],
    };
    if out.len() != rows * n {
        return Ok(None);
    }
    read(x, |x| {
        read(weight_t, |w| {
            matmul(
                MatMut {
                    data: &mut out,
                    rows,
                    cols: n,
                    rs: n,
                    cs: 1,
                },
                Mat {
                    data: x,
                    rows,
                    cols: k,
                    rs: k,
                    cs: 1,
                },
                Mat {
                    data: w,
                    rows: k,
                    cols: n,
                    rs: n,
                    cs: 1,
                },
                bias.is_some(),
                true,
            )
        })
    })??;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank ≥ 1") = n;
    tensor(out, &out_dims).map(Some)
}

/// Lanes for the reductions below: partial results in a fixed order, so that the loops vectorise
/// and give the same sum on every run.
pub(crate) const LANES: usize = 8;

/// The sum of `x`, [`LANES`] partial sums combined at the end.
pub(crate) fn sum_of(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// `Σ a·b`, [`LANES`] partial sums combined at the end.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.chunks_exact(LANES).zip(b.chunks_exact(LANES));
    for (x, y) in chunks {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let done = a.len() / LANES * LANES;
    let tail = a[done..].iter().zip(&b[done..]).map(|(x, y)| x * y);
    acc.iter().sum::<f32>() + tail.sum::<f32>()
}

/// The largest value of `x` (−∞ when empty).
pub(crate) fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.max(*v);
        }
    }
    acc.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, b| a.max(*b))
}

/// Cephes' exp2f coefficients for `2^f − 1 = f·P(f)`, |f| ≤ ½, highest power first.
const EXP2_P: [f64; 6] = [
    1.5353361883195e-4,
    1.339887440266574e-3,
    9.61843735767464e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.93147202855042e-1,
];

/// Eigen's erf numerator (odd, `x·P(x²)`) and denominator (`Q(x²)`), highest power first.
const ERF_P: [f64; 7] = [
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
];
const ERF_Q: [f64; 5] = [
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
];

/// Branch-free `2^x` (Cephes' exp2f polynomial on the fraction, the integer part put into the
/// exponent bits), written so that loops over slices vectorise; relative error ≈ 2e-7, 0 below
/// −126, at most 2^127.
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    match x < -126.0 {
        true => 0.0,
        false => exp2_in_range(x.min(127.0)),
    }
}

/// [`exp2`] for `x ≤ 127` without its underflow to 0: below −126 it gives 2^−126 (≈ 1e−38), which
/// a softmax's sum of at least 1 cannot tell from 0.
#[inline(always)]
pub(crate) fn exp2_in_range(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds to the nearest integer, which then sits in the low mantissa bits
    // (integer arithmetic on the bits vectorises; a float-to-int `as` cast does not).
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-126.0);
    let shifted = x + ROUND;
    let f = x - (shifted - ROUND);
    let mut p = EXP2_P[0] as f32;
    for c in &EXP2_P[1..] {
        p = p * f + *c as f32;
    }
    let frac = p * f + 1.0;
    let n_plus_bias = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    frac * f32::from_bits(n_plus_bias << 23)
}

/// `p[j] = 2^(x[j] − shift)` (each `x[j] ≤ shift`, as a softmax row against its maximum), and
/// their sum in [`LANES`] partial sums.
pub(crate) fn exp2_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp2_in_range(*v - shift);
            *a += *v;
        }
    }
    let mut total = 0f32;
    for v in chunks.into_remainder() {
        *v = exp2_in_range(*v - shift);
        total += *v;
    }
    acc.iter().sum::<f32>() + total
}

/// `e^x` through [`exp2`].
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp2(x * std::f32::consts::LOG2_E)
}

/// `x·σ(x)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `erf(x)`: the rational approximation Eigen and XLA use for f32 (x clamped to ±4, where erf is
/// ±1 in f32), absolute error below 2e-7; no branches, so it vectorises.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = ERF_P[0] as f32;
    for c in &ERF_P[1..] {
        p = p * x2 + *c as f32;
    }
    let mut q = ERF_Q[0] as f32;
    for c in &ERF_Q[1..] {
        q = q * x2 + *c as f32;
    }
    x * p / q
}

/// GELU with the exact (erf) form, as diffusers' GEGLU and LDM's `F.gelu`.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_is_close_to_std() {
        let mut worst = 0f32;
        for i in -130_000..127_000 {
            let x = i as f32 / 1000.0;
            let want = x.exp2();
            let got = exp2(x);
            if x >= -126.0 {
                worst = worst.max((got - want).abs() / want);
            } else {
                assert_eq!(got, 0.0);
            }
        }
        assert!(worst < 5e-7, "{worst}");
    }

    #[test]
    fn erf_is_close_to_std() {
        let mut worst = 0f64;
        for i in -6000..6000 {
            let x = i as f64 / 1000.0;
            let want = libm_erf(x);
            worst = worst.max((erf(x as f32) as f64 - want).abs());
        }
        assert!(worst < 5e-7, "{worst}");
    }

    /// erf by its series (|x| < 3) and continued fraction, in f64: a reference for the test.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let mut term = x;
            let mut sum = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let a = x.abs();
            let mut f = 0.0;
            for n in (1..60).rev() {
                f = n as f64 / 2.0 / (a + f);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
            (1.0 - erfc).copysign(x)
        }
    }
}
