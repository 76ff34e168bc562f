//! Scaled dot-product attention without the `[queries × keys]` score matrix: blocks of
//! [`QUERY_BLOCK`] queries against blocks of [`KEY_BLOCK`] keys with an online softmax (the running
//! row maximum and sum rescale what was accumulated so far), the two products through gemm.
//!
//! The softmax scale and `log2 e` are folded into the copy of the query block, so the
//! exponentials are `2^(s − max)`. One work item is a batch item's query block over every head; it
//! owns those output rows, so items run in parallel and each value is computed by one thread in a
//! fixed order.

use super::{applies, exp2, exp2_shifted_sum, matmul, max_of, read, tensor, Mat, MatMut};
use candle_core::Tensor;
use rayon::prelude::*;

/// Queries per block: 128 rows of scores for [`KEY_BLOCK`] keys (128 KiB) stay in the L2 cache;
/// gemm ran these block products at 85–90 GF/s on one core against 65–80 for 64 × 512.
pub const QUERY_BLOCK: usize = 128;
/// Keys per block: SD's cross-attention (77 tokens) and the 16² self-attention fit one block; the
/// online rescaling runs from 32² (1,024 tokens) up.
pub const KEY_BLOCK: usize = 256;

/// Where one of q, k, v keeps its values: token `t`, channel `c` of head `h` in batch item `b` at
/// `b·batch + h·head + t·token + c·channel`.
#[derive(Clone, Copy)]
struct Layout<'a> {
    data: &'a [f32],
    batch: usize,
    head: usize,
    token: usize,
    channel: usize,
}

impl<'a> Layout<'a> {
    /// The `[tokens, d]` matrix of head `h` in batch item `b`, from token `from`.
    fn head(&self, b: usize, h: usize, d: usize, from: usize, tokens: usize) -> Mat<'a> {
        let offset = b * self.batch + h * self.head + from * self.token;
        Mat {
            data: &self.data[offset..],
            rows: tokens,
            cols: d,
            rs: self.token,
            cs: self.channel,
        }
    }
}

/// Multi-head attention of `q` `[batch, n, heads·d]` over `k`/`v` `[batch, m, heads·d]`, out
/// `[batch, n, heads·d]`; `None` when they are not f32 on the CPU.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(q) || !applies(k) || !applies(v) {
        return Ok(None);
    }
    let (batch, n, inner) = q.dims3()?;
    let (kb, m, k_inner) = k.dims3()?;
    if k.dims() != v.dims() || kb != batch || k_inner != inner || heads == 0 || inner % heads != 0 {
        return Ok(None);
    }
    let d = inner / heads;
    let out = read(q, |q| {
        read(k, |k| {
            read(v, |v| {
                let at = |data| Layout {
                    data,
                    batch: 0,
                    head: d,
                    token: inner,
                    channel: 1,
                };
                let shape = Shape {
                    batch,
                    n,
                    m,
                    heads,
                    d,
                };
                attend(
                    Layout {
                        batch: n * inner,
                        ..at(q)
                    },
                    Layout {
                        batch: m * inner,
                        ..at(k)
                    },
                    Layout {
                        batch: m * inner,
                        ..at(v)
                    },
                    &shape,
                )
            })
        })
    })???;
    tensor(out, &[batch, n, inner]).map(Some)
}

/// Single-head attention over the positions of `q`, `k`, `v` `[batch, c, positions]` (LDM's
/// `AttnBlock`: 1×1 convolutions' outputs as they are), out `[batch, positions, c]`; `None` when
/// they are not f32 on the CPU.
pub fn spatial_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(q) || !applies(k) || !applies(v) {
        return Ok(None);
    }
    let (batch, c, n) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        return Ok(None);
    }
    let out = read(q, |q| {
        read(k, |k| {
            read(v, |v| {
                let at = |data| Layout {
                    data,
                    batch: c * n,
                    head: 0,
                    token: 1,
                    channel: n,
                };
                let shape = Shape {
                    batch,
                    n,
                    m: n,
                    heads: 1,
                    d: c,
                };
                attend(at(q), at(k), at(v), &shape)
            })
        })
    })???;
    tensor(out, &[batch, n, c]).map(Some)
}

struct Shape {
    batch: usize,
    /// Queries.
    n: usize,
    /// Keys.
    m: usize,
    heads: usize,
    /// Channels per head.
    d: usize,
}

/// Per-thread buffers of one work item.
struct Scratch {
    /// The scaled query block, `[QUERY_BLOCK, d]`.
    q: Vec<f32>,
    /// Scores, then probabilities, `[QUERY_BLOCK, KEY_BLOCK]` (each query's keys in a row).
    s: Vec<f32>,
    /// The running `probabilities · v`, `[QUERY_BLOCK, d]`.
    acc: Vec<f32>,
    /// Each row's running maximum and sum of exponentials.
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// The attention of every head, `[batch, n, heads·d]`.
fn attend(q: Layout, k: Layout, v: Layout, s: &Shape) -> Vec<f32> {
    let inner = s.heads * s.d;
    let mut out = vec![0f32; s.batch * s.n * inner];
    if out.is_empty() {
        return out;
    }
    // Each head's keys and values contiguous, `[b, h, m, d]`: every query block streams them
    // all, and gemm packs contiguous rows faster than rows `heads·d` apart.
    let (k_heads, v_heads) = (head_major(k, s), head_major(v, s));
    let contiguous = |data| Layout {
        data,
        batch: s.heads * s.m * s.d,
        head: s.m * s.d,
        token: s.d,
        channel: 1,
    };
    let (k, v) = (contiguous(&k_heads), contiguous(&v_heads));
    // Softmax(q·kᵀ/√d) = 2^(q·kᵀ·log2(e)/√d) / Σ.
    let scale = std::f32::consts::LOG2_E / (s.d as f32).sqrt();
    let mut items: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (b, rows) in out.chunks_mut(s.n * inner).enumerate() {
        for (block, rows) in rows.chunks_mut(QUERY_BLOCK * inner).enumerate() {
            items.push((b, block * QUERY_BLOCK, rows));
        }
    }
    items.into_par_iter().for_each_init(
        || Scratch {
            q: vec![0.0; QUERY_BLOCK * s.d],
            s: vec![0.0; QUERY_BLOCK * KEY_BLOCK.min(s.m)],
            acc: vec![0.0; QUERY_BLOCK * s.d],
            max: vec![0.0; QUERY_BLOCK],
            sum: vec![0.0; QUERY_BLOCK],
        },
        |scratch, (b, from, rows)| {
            let nq = rows.len() / inner;
            for h in 0..s.heads {
                let head_out = MatMut {
                    data: &mut rows[h * s.d..],
                    rows: nq,
                    cols: s.d,
                    rs: inner,
                    cs: 1,
                };
                let qh = q.head(b, h, s.d, from, nq);
                block(
                    scratch,
                    qh,
                    |from, len| (k.head(b, h, s.d, from, len), v.head(b, h, s.d, from, len)),
                    s.m,
                    scale,
                    head_out,
                );
            }
        },
    );
    out
}

/// The `m` keys (or values) of `x` as `[batch, heads, m, d]`.
fn head_major(x: Layout, s: &Shape) -> Vec<f32> {
    let mut out = vec![0f32; s.batch * s.heads * s.m * s.d];
    out.par_chunks_mut(s.m * s.d)
        .enumerate()
        .for_each(|(bh, out)| {
            let head = x.head(bh / s.heads, bh % s.heads, s.d, 0, s.m);
            for (j, row) in out.chunks_exact_mut(s.d).enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    *v = head.data[j * head.rs + c * head.cs];
                }
            }
        });
    out
}

/// One query block of one head: `out = softmax(q·kᵀ·scale, base 2) · v`, keys `KEY_BLOCK` at a
/// time. `kv(from, len)` gives the keys' and values' `[len, d]` matrices. Both products are set
/// up with the output column-major, as gemm's kernels write it: `sᵀ = k · qᵀ` and
/// `accᵀ = vᵀ · pᵀ`, where `s` and `acc` are row-major `[queries, …]`.
fn block<'a>(
    sc: &mut Scratch,
    q: Mat,
    kv: impl Fn(usize, usize) -> (Mat<'a>, Mat<'a>),
    m: usize,
    scale: f32,
    out: MatMut,
) {
    let (nq, d) = (q.rows, q.cols);
    let qs = &mut sc.q[..nq * d];
    for (i, row) in qs.chunks_exact_mut(d).enumerate() {
        for (c, x) in row.iter_mut().enumerate() {
            *x = q.data[i * q.rs + c * q.cs] * scale;
        }
    }
    let acc = &mut sc.acc[..nq * d];
    let max = &mut sc.max[..nq];
    let sum = &mut sc.sum[..nq];
    max.fill(f32::NEG_INFINITY);
    sum.fill(0.0);
    let mut from = 0;
    while from < m {
        let len = KEY_BLOCK.min(m - from);
        let (kb, vb) = kv(from, len);
        let s = &mut sc.s[..nq * len];
        matmul(
            MatMut {
                data: s,
                rows: len,
                cols: nq,
                rs: 1,
                cs: len,
            },
            kb,
            Mat {
                data: qs,
                rows: d,
                cols: nq,
                rs: 1,
                cs: d,
            },
            false,
            false,
        );
        for (i, row) in s.chunks_exact_mut(len).enumerate() {
            let new_max = max[i].max(max_of(row));
            let total = exp2_shifted_sum(row, new_max);
            // What was accumulated under the old maximum shrinks by 2^(old − new).
            if from > 0 {
                let shrink = exp2(max[i] - new_max);
                sum[i] *= shrink;
                for a in &mut acc[i * d..(i + 1) * d] {
                    *a *= shrink;
                }
            }
            sum[i] += total;
            max[i] = new_max;
        }
        matmul(
            MatMut {
                data: acc,
                rows: d,
                cols: nq,
                rs: 1,
                cs: d,
            },
            Mat {
                data: vb.data,
                rows: d,
                cols: len,
                rs: vb.cs,
                cs: vb.rs,
            },
            Mat {
                data: s,
                rows: len,
                cols: nq,
                rs: 1,
                cs: len,
            },
            from > 0,
            false,
        );
        from += len;
    }
    let MatMut { data, rs, .. } = out;
    for i in 0..nq {
        let inv = 1.0 / sum[i];
        let dst = &mut data[i * rs..][..d];
        for (o, a) in dst.iter_mut().zip(&acc[i * d..(i + 1) * d]) {
            *o = a * inv;
        }
    }
}
