//! 2-D convolution, NCHW in and out: 3×3 (padding 1, stride 1 or 2) as im2col + gemm over tiles
//! of output pixels, 1×1 as one gemm per image.
//!
//! Per image the product is `[Cout, 9·Cin] · [9·Cin, pixels]`, which lands in the NCHW output's
//! rows as they are (no transpose). The im2col buffer holds one tile of at most [`TILE_FLOATS`]
//! values whatever the image size (the VAE's 128-channel conv at 512² would need 1.2 GB in one
//! piece). The output starts as the bias, and gemm adds the product to it.

use super::{applies, matmul, read, tensor, Mat, MatMut};
use candle_core::Tensor;
use rayon::prelude::*;

/// The im2col tile's size in f32 values (32 MiB): a whole image up to 640 channels at 32², two to
/// four tiles at SD1.5's 64² level. gemm packs the weights again for every tile, and smaller tiles
/// measured the same or slower (docs/DECISIONS.md).
pub const TILE_FLOATS: usize = 8 << 20;

/// How many output pixels an im2col tile of `tile_floats` values holds for a reduction of `k`
/// (= 9·Cin) values: a multiple of 16 (gemm's register tile width), at least 16, at most the
/// image. It depends on the shapes alone, never on the thread count.
pub fn tile_pixels(k: usize, pixels: usize, tile_floats: usize) -> usize {
    let fit = (tile_floats / k.max(1)) / 16 * 16;
    fit.max(16).min(pixels)
}

/// `conv2d(x, weight) + bias` with `x` `[batch, Cin, H, W]` and `weight` `[Cout, Cin, k, k]`,
/// padding `k/2`; `None` for what this kernel does not take (not f32 on the CPU, or a kernel size
/// or stride other than 3×3 stride 1 or 2 and 1×1 stride 1): candle's conv then.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
) -> candle_core::Result<Option<Tensor>> {
    conv2d_tiled(x, weight, bias, stride, TILE_FLOATS)
}

/// [`conv2d`] with im2col tiles of `tile_floats` values (tests split small images into many).
pub fn conv2d_tiled(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    tile_floats: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !applies(x) || !applies(weight) || bias.is_some_and(|b| !applies(b)) {
        return Ok(None);
    }
    let (batch, cin, h, w) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    let supported = matches!((kh, stride), (1, 1) | (3, 1) | (3, 2));
    if wcin != cin || kh != kw || !supported || h == 0 || w == 0 {
        return Ok(None);
    }
    let pad = kh / 2;
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (w + 2 * pad - kw) / stride + 1;
    let pixels = ho * wo;
    let mut out = match bias {
        Some(b) => {
            let b = read(b, |b| b.to_vec())?;
            if b.len() != cout {
                return Ok(None);
            }
            let mut out = Vec::with_capacity(batch * cout * pixels);
            for _ in 0..batch {
                for v in &b {
                    out.extend(std::iter::repeat_n(*v, pixels));
                }
            }
            out
        }
        None => vec![0f32; batch * cout * pixels],
    };
    let geometry = Geometry {
        tile_floats,
        cin,
        h,
        w,
        wo,
        stride,
    };
    read(x, |x| {
        read(weight, |wt| {
            for (img, out) in out.chunks_mut(cout * pixels).enumerate() {
                let x = &x[img * cin * h * w..][..cin * h * w];
                match kh {
                    1 => conv1x1(out, x, wt, cout, cin, pixels, bias.is_some()),
                    _ => conv3x3(out, x, wt, cout, &geometry, pixels, bias.is_some()),
                }
            }
        })
    })??;
    tensor(out, &[batch, cout, ho, wo]).map(Some)
}

/// One image's 1×1 convolution: `[Cout, Cin] · [Cin, pixels]`.
fn conv1x1(
    out: &mut [f32],
    x: &[f32],
    weight: &[f32],
    cout: usize,
    cin: usize,
    pixels: usize,
    accumulate: bool,
) {
    matmul(
        MatMut {
            data: out,
            rows: cout,
            cols: pixels,
            rs: pixels,
            cs: 1,
        },
        Mat {
            data: weight,
            rows: cout,
            cols: cin,
            rs: cin,
            cs: 1,
        },
        Mat {
            data: x,
            rows: cin,
            cols: pixels,
            rs: pixels,
            cs: 1,
        },
        accumulate,
        true,
    );
}

/// The input's size and how the 3×3 window walks over it.
struct Geometry {
    tile_floats: usize,
    cin: usize,
    h: usize,
    w: usize,
    /// The output's width.
    wo: usize,
    stride: usize,
}

/// One image's 3×3 convolution, tile by tile.
fn conv3x3(
    out: &mut [f32],
    x: &[f32],
    weight: &[f32],
    cout: usize,
    g: &Geometry,
    pixels: usize,
    accumulate: bool,
) {
    let k = g.cin * 9;
    let tile = tile_pixels(k, pixels, g.tile_floats);
    let mut col = vec![0f32; k * tile];
    let mut start = 0;
    while start < pixels {
        let n = tile.min(pixels - start);
        let col = &mut col[..k * n];
        im2col(col, x, g, start, n);
        matmul(
            MatMut {
                data: &mut out[start..],
                rows: cout,
                cols: n,
                rs: pixels,
                cs: 1,
            },
            Mat {
                data: weight,
                rows: cout,
                cols: k,
                rs: k,
                cs: 1,
            },
            Mat {
                data: col,
                rows: k,
                cols: n,
                rs: n,
                cs: 1,
            },
            accumulate,
            true,
        );
        start += n;
    }
}

/// The 3×3 windows of output pixels `start..start + n` as `[Cin·9, n]` (row `ci·9 + ky·3 + kx`,
/// the weights' order), zeros where a window reaches into the padding. Channels in parallel.
fn im2col(col: &mut [f32], x: &[f32], g: &Geometry, start: usize, n: usize) {
    let plane = g.h * g.w;
    col.par_chunks_mut(9 * n)
        .zip(x.par_chunks(plane))
        .with_min_len(8)
        .for_each(|(rows, x)| {
            for (tap, row) in rows.chunks_mut(n).enumerate() {
                let (ky, kx) = (tap / 3, tap % 3);
                let mut j = 0;
                while j < n {
                    let p = start + j;
                    let (oy, ox) = (p / g.wo, p % g.wo);
                    let len = (g.wo - ox).min(n - j);
                    let iy = (oy * g.stride + ky) as isize - 1;
                    let dst = &mut row[j..j + len];
                    match iy >= 0 && (iy as usize) < g.h {
                        true => {
                            let src = &x[iy as usize * g.w..][..g.w];
                            gather(dst, src, ox * g.stride + kx, g.stride);
                        }
                        false => dst.fill(0.0),
                    }
                    j += len;
                }
            }
        });
}

/// `dst[j] = src[first + j·stride − 1]`, 0 outside `src` (the one-pixel padding).
fn gather(dst: &mut [f32], src: &[f32], first: usize, stride: usize) {
    let w = src.len();
    // The first j whose column is inside (column 0 is `first − 1`, maybe −1).
    let lo = match first {
        0 => 1usize.div_ceil(stride),
        _ => 0,
    }
    .min(dst.len());
    // One past the last j whose column `first + j·stride − 1` is < w.
    let hi = match first <= w {
        true => ((w - first) / stride + 1).min(dst.len()),
        false => 0,
    }
    .max(lo);
    dst[..lo].fill(0.0);
    dst[hi..].fill(0.0);
    let from = first + lo * stride - 1;
    match stride {
        1 => dst[lo..hi].copy_from_slice(&src[from..from + (hi - lo)]),
        _ => {
            for (d, s) in dst[lo..hi]
                .iter_mut()
                .zip(src[from..].iter().step_by(stride))
            {
                *d = *s;
            }
        }
    }
}
