//! Group norm in one read for the statistics and one pass that normalises, applies the affine
//! map and, for the ResNet blocks, the SiLU that follows; layer norm row by row. Groups and rows
//! are the units of parallel work, so each statistic is summed by one thread in a fixed order.

use super::{applies, dot, read, silu, sum_of, tensor, LANES};
use candle_core::Tensor;
use rayon::prelude::*;

/// Elements per f32 partial sum before it is added into the f64 total: short enough that the
/// f32 sums stay accurate, long enough to vectorise.
const RUN: usize = 1024;

/// `GroupNorm(groups)` over `x` `[batch, channels, …]` with per-channel `weight` and `bias`,
/// followed by SiLU when `then_silu`; `None` when the tensors are not f32 on the CPU.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f32,
    then_silu: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) || !applies(weight) || !applies(bias) || x.rank() < 3 {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let channels = dims[1];
    let spatial: usize = dims[2..].iter().product();
    if groups == 0 || !channels.is_multiple_of(groups) || weight.elem_count() != channels {
        return Ok(None);
    }
    let per_group = channels / groups;
    let group_len = per_group * spatial;
    let gamma = read(weight, |w| w.to_vec())?;
    let beta = read(bias, |b| b.to_vec())?;
    if beta.len() != channels || group_len == 0 {
        return Ok(None);
    }
    let mut out = vec![0f32; x.elem_count()];
    read(x, |x| {
        out.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(i, (out, x))| {
                let (mean, var) = moments(x);
                let rstd = 1.0 / (var + eps).sqrt();
                let first = (i % groups) * per_group;
                for (c, (out, x)) in out.chunks_mut(spatial).zip(x.chunks(spatial)).enumerate() {
                    let a = gamma[first + c] * rstd;
                    let b = beta[first + c];
                    match then_silu {
                        true => out
                            .iter_mut()
                            .zip(x)
                            .for_each(|(o, x)| *o = silu((x - mean) * a + b)),
                        false => out
                            .iter_mut()
                            .zip(x)
                            .for_each(|(o, x)| *o = (x - mean) * a + b),
                    }
                }
            })
    })?;
    tensor(out, &dims).map(Some)
}

/// Mean and (biased) variance of `x` in one read: sums of `x − x[0]` and its square (the shift
/// keeps the square's sum from cancelling when the mean is large), f32 in [`LANES`] lanes over
/// runs of [`RUN`] values, the runs added in f64.
fn moments(x: &[f32]) -> (f32, f32) {
    let shift = x[0];
    let (mut s1, mut s2) = (0f64, 0f64);
    for run in x.chunks(RUN) {
        let mut a1 = [0f32; LANES];
        let mut a2 = [0f32; LANES];
        let chunks = run.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                let v = c[l] - shift;
                a1[l] += v;
                a2[l] += v * v;
            }
        }
        for v in tail {
            let v = v - shift;
            a1[0] += v;
            a2[0] += v * v;
        }
        s1 += a1.iter().map(|v| *v as f64).sum::<f64>();
        s2 += a2.iter().map(|v| *v as f64).sum::<f64>();
    }
    let n = x.len() as f64;
    let m = s1 / n;
    let var = (s2 / n - m * m).max(0.0);
    ((shift as f64 + m) as f32, var as f32)
}

/// Rows per parallel work item of the layer norm.
const ROWS_PER_ITEM: usize = 64;

/// `LayerNorm` over the last axis of `x`; `None` when the tensors are not f32 on the CPU.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) || !applies(weight) || !applies(bias) || x.rank() == 0 {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let c = dims[dims.len() - 1];
    if c == 0 || weight.elem_count() != c || bias.elem_count() != c {
        return Ok(None);
    }
    let mut out = vec![0f32; x.elem_count()];
    read(x, |x| {
        read(weight, |w| {
            read(bias, |b| {
                out.par_chunks_mut(c * ROWS_PER_ITEM)
                    .zip(x.par_chunks(c * ROWS_PER_ITEM))
                    .for_each(|(out, x)| {
                        for (out, x) in out.chunks_mut(c).zip(x.chunks(c)) {
                            let mean = sum_of(x) / c as f32;
                            for (o, v) in out.iter_mut().zip(x) {
                                *o = v - mean;
                            }
                            let var = dot(out, out);
                            let rstd = 1.0 / (var / c as f32 + eps).sqrt();
                            for ((o, w), b) in out.iter_mut().zip(w).zip(b) {
                                *o = *o * rstd * w + b;
                            }
                        }
                    })
            })
        })
    })???;
    tensor(out, &dims).map(Some)
}
