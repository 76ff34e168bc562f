//! The preview's own CPU kernels against candle's ops on SD1.5's shapes (docs/BENCHMARKS.md,
//! "Preview kernels").
//!
//! Usage: `preview_kernels_bench [ops] [RUNS]`: each op, candle's way and the kernel's, the median
//! of RUNS (default 5) after one warm-up, in milliseconds. Whole models (a UNet step, a VAE
//! decode) are timed by `preview_step_bench`, with and without `LORATOOL_CANDLE_KERNELS=1`.

use candle_core::{Device, Module, Tensor, D};
use loratool::preview::kernels::{self, activation, attention, conv, norm};
use std::time::Instant;

fn random(dims: &[usize], seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).expect("tensor")
}

/// The median wall time of `runs` calls after one warm-up, in milliseconds.
fn median_ms(runs: usize, mut f: impl FnMut() -> Tensor) -> f64 {
    drop(f());
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let out = f();
            let t = start.elapsed().as_secs_f64() * 1e3;
            drop(out);
            t
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn row(name: &str, runs: usize, candle: impl FnMut() -> Tensor, own: impl FnMut() -> Tensor) {
    let c = median_ms(runs, candle);
    let o = median_ms(runs, own);
    println!("| {name} | {c:.1} | {o:.1} | {:.2} |", c / o);
}

fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
    let run = || -> candle_core::Result<Tensor> {
        let (b, n, inner) = q.dims3()?;
        let m = k.dim(1)?;
        let d = inner / heads;
        let split =
            |t: &Tensor, len: usize| t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous();
        let q = (split(q, n)? * (1.0 / (d as f64).sqrt()))?;
        let k = split(k, m)?;
        let v = split(v, m)?;
        let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, inner))
    };
    run().expect("candle attention")
}

fn ops(runs: usize) {
    println!("| op | candle ms | own ms | candle/own |");
    println!("|---|---|---|---|");
    let convs: &[(&str, [usize; 4], usize, usize, usize)] = &[
        ("conv3×3 320→320 64² b2", [2, 320, 64, 64], 320, 3, 1),
        ("conv3×3 640→640 32² b2", [2, 640, 32, 32], 640, 3, 1),
        ("conv3×3 1280→1280 16² b2", [2, 1280, 16, 16], 1280, 3, 1),
        ("conv3×3 1280→1280 8² b2", [2, 1280, 8, 8], 1280, 3, 1),
        ("conv3×3 s2 320→320 64² b2", [2, 320, 64, 64], 320, 3, 2),
        ("conv1×1 640→320 64² b2", [2, 640, 64, 64], 320, 1, 1),
        ("VAE conv3×3 512→512 64² b1", [1, 512, 64, 64], 512, 3, 1),
        ("VAE conv3×3 128→128 512² b1", [1, 128, 512, 512], 128, 3, 1),
    ];
    for (i, &(name, dims, cout, k, stride)) in convs.iter().enumerate() {
        let x = random(&dims, i as u64);
        let w = (random(&[cout, dims[1], k, k], 100 + i as u64) * 0.05).expect("w");
        let b = random(&[cout], 200 + i as u64);
        let layer = candle_nn::Conv2d::new(
            w.clone(),
            Some(b.clone()),
            candle_nn::Conv2dConfig {
                padding: k / 2,
                stride,
                dilation: 1,
                groups: 1,
                cudnn_fwd_algo: None,
            },
        );
        let runs = if dims[2] >= 512 { runs.min(3) } else { runs };
        row(
            name,
            runs,
            || layer.forward(&x).expect("candle conv"),
            || {
                conv::conv2d(&x, &w, Some(&b), stride)
                    .expect("conv")
                    .expect("f32")
            },
        );
    }
    let attentions: &[(&str, usize, usize, usize, usize)] = &[
        ("attention [16,4096,40] self", 4096, 4096, 8, 40),
        ("attention [16,1024,80] self", 1024, 1024, 8, 80),
        ("attention [16,256,160] self", 256, 256, 8, 160),
        ("attention [16,4096,40] × 77 cross", 4096, 77, 8, 40),
    ];
    for (i, &(name, n, m, heads, d)) in attentions.iter().enumerate() {
        let q = random(&[2, n, heads * d], 300 + i as u64);
        let k = random(&[2, m, heads * d], 400 + i as u64);
        let v = random(&[2, m, heads * d], 500 + i as u64);
        row(
            name,
            runs,
            || candle_attention(&q, &k, &v, heads),
            || {
                attention::multi_head_attention(&q, &k, &v, heads)
                    .expect("attention")
                    .expect("f32")
            },
        );
    }
    {
        let x = random(&[2, 320, 64, 64], 600);
        let w = random(&[320], 601);
        let b = random(&[320], 602);
        let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), 320, 32, 1e-5).expect("gn");
        row(
            "GroupNorm(32)+SiLU [2,320,64,64]",
            runs,
            || gn.forward(&x).and_then(|t| t.silu()).expect("candle gn"),
            || {
                norm::group_norm(&x, &w, &b, 32, 1e-5, true)
                    .expect("gn")
                    .expect("f32")
            },
        );
        let x = random(&[2, 4096, 320], 603);
        row(
            "LayerNorm [2,4096,320]",
            runs,
            || candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).expect("candle ln"),
            || {
                norm::layer_norm(&x, &w, &b, 1e-5)
                    .expect("ln")
                    .expect("f32")
            },
        );
    }
    {
        let ff = random(&[2, 4096, 2560], 700);
        row(
            "GEGLU gate [2,4096,2560]",
            runs,
            || {
                let a = ff.narrow(D::Minus1, 0, 1280).expect("narrow");
                let g = ff.narrow(D::Minus1, 1280, 1280).expect("narrow");
                (a * g.gelu_erf().expect("gelu")).expect("mul")
            },
            || activation::geglu(&ff).expect("geglu").expect("f32"),
        );
    }
    {
        let x = random(&[2, 4096, 320], 800);
        let wt = random(&[320, 1280], 801);
        let b = random(&[1280], 802);
        row(
            "linear [8192,320]×[320,1280]+b",
            runs,
            || {
                x.broadcast_matmul(&wt)
                    .and_then(|y| y.broadcast_add(&b))
                    .expect("candle linear")
            },
            || {
                kernels::linear(&x, &wt, Some(&b))
                    .expect("linear")
                    .expect("f32")
            },
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ops") => ops(args.get(1).and_then(|r| r.parse().ok()).unwrap_or(5)),
        _ => ops(5),
    }
}
