//! The preview's own CPU kernels (src/preview/kernels) against candle's ops on random inputs:
//! real shapes scaled down and awkward ones (odd channels, H ≠ W, tiles and blocks that do not
//! divide, tiny head widths), and bit-identical results on 1, 2 and 3 rayon threads.

mod common;
use common::max_rel_error;

use candle_core::{Device, Module, Tensor, D};
use loratool::preview::kernels::{self, activation, attention, conv, norm};

/// splitmix64 → uniform values in [-1, 1), plus `offset`.
fn random(dims: &[usize], seed: u64, offset: f32) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0 + offset
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_close(got: &Tensor, want: &Tensor, tolerance: f32, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let err = max_rel_error(&values(got), &values(want));
    assert!(err <= tolerance, "{what}: relative error {err}");
}

fn own_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize) -> Tensor {
    conv::conv2d(x, w, b, stride)
        .unwrap()
        .expect("the kernel takes f32 CPU tensors")
}

/// The conv with im2col tiles of `pixels` output pixels (a multiple of 16), whatever the channels.
fn tiled_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, pixels: usize) -> Tensor {
    let k = w.dim(1).unwrap() * 9;
    conv::conv2d_tiled(x, w, b, stride, k * pixels)
        .unwrap()
        .expect("the kernel takes f32 CPU tensors")
}

fn candle_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize) -> Tensor {
    let k = w.dim(3).unwrap();
    let y = x.conv2d(w, k / 2, stride, 1, 1).unwrap();
    match b {
        Some(b) => y
            .broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
            .unwrap(),
        None => y,
    }
}

/// (batch, Cin, Cout, H, W, kernel, stride).
const CONVS: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
    (1, 3, 5, 7, 9, 3, 1),
    (2, 4, 6, 8, 8, 3, 2),
    (1, 5, 3, 7, 5, 3, 2),
    (2, 1, 1, 1, 1, 3, 1),
    (1, 2, 3, 1, 6, 3, 2),
    (1, 6, 4, 2, 2, 3, 2),
    (2, 16, 24, 16, 16, 3, 1),
    (2, 32, 32, 9, 13, 3, 2),
    (1, 7, 9, 5, 3, 1, 1),
    (2, 40, 24, 16, 16, 1, 1),
    (1, 300, 20, 37, 45, 3, 1),
    (1, 64, 8, 75, 61, 3, 2),
];

#[test]
fn conv2d_matches_candle() {
    for (i, &(b, cin, cout, h, w, k, stride)) in CONVS.iter().enumerate() {
        let seed = i as u64 * 10;
        let x = random(&[b, cin, h, w], seed, 0.0);
        let wt = random(&[cout, cin, k, k], seed + 1, 0.0);
        let bias = random(&[cout], seed + 2, 0.5);
        let what = format!("conv {:?}", CONVS[i]);
        assert_close(
            &own_conv(&x, &wt, Some(&bias), stride),
            &candle_conv(&x, &wt, Some(&bias), stride),
            1e-5,
            &what,
        );
        assert_close(
            &own_conv(&x, &wt, None, stride),
            &candle_conv(&x, &wt, None, stride),
            1e-5,
            &format!("{what} without bias"),
        );
        // Tiles of 16 and 48 pixels: tiles start and end inside output rows, the last partial.
        for pixels in [16, 48] {
            assert_close(
                &tiled_conv(&x, &wt, Some(&bias), stride, pixels),
                &candle_conv(&x, &wt, Some(&bias), stride),
                1e-5,
                &format!("{what} in tiles of {pixels}"),
            );
        }
    }
    // The real budget: a 128-channel 512² image takes 37 tiles of 7,280 pixels (32 MiB each).
    assert_eq!(
        conv::tile_pixels(9 * 128, 512 * 512, conv::TILE_FLOATS),
        7280
    );
    assert_eq!(conv::tile_pixels(9 * 320, 32 * 32, conv::TILE_FLOATS), 1024);
}

#[test]
fn conv2d_takes_a_non_contiguous_input_and_declines_other_dtypes() {
    let x = random(&[1, 6, 9, 4], 1, 0.0).transpose(2, 3).unwrap();
    let w = random(&[5, 6, 3, 3], 2, 0.0);
    assert_close(
        &own_conv(&x, &w, None, 1),
        &candle_conv(&x, &w, None, 1),
        1e-5,
        "transposed input",
    );
    let half = x.to_dtype(candle_core::DType::F16).unwrap();
    let half_w = w.to_dtype(candle_core::DType::F16).unwrap();
    assert!(conv::conv2d(&half, &half_w, None, 1).unwrap().is_none());
    let five = random(&[5, 6, 5, 5], 3, 0.0);
    assert!(conv::conv2d(&x, &five, None, 1).unwrap().is_none());
}

/// candle's attention, as the layers computed it before the kernel.
fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
    let (b, n, inner) = q.dims3().unwrap();
    let m = k.dim(1).unwrap();
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| {
        t.reshape((b, len, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let q = (split(q, n) * (1.0 / (d as f64).sqrt())).unwrap();
    let (k, v) = (split(k, m), split(v, m));
    let scores = q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
    probs
        .matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, n, inner))
        .unwrap()
}

/// (batch, queries, keys, heads, head width).
const ATTENTIONS: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 1),
    (1, 5, 5, 1, 1),
    (2, 70, 70, 2, 3),
    (1, 9, 77, 3, 2),
    (2, 130, 77, 8, 40),
    (2, 64, 64, 8, 80),
    (1, 64, 64, 2, 160),
    (2, 256, 256, 2, 64),
    // More keys than a key block: the online softmax rescales twice, the last block partial.
    (1, 600, 1100, 2, 8),
    (2, 65, 513, 1, 5),
];

#[test]
fn multi_head_attention_matches_candle() {
    for (i, &(b, n, m, heads, d)) in ATTENTIONS.iter().enumerate() {
        let seed = 100 + i as u64 * 10;
        // Large values make the softmax peaked, which the online rescaling must survive.
        let q = (random(&[b, n, heads * d], seed, 0.0) * 3.0).unwrap();
        let k = (random(&[b, m, heads * d], seed + 1, 0.0) * 3.0).unwrap();
        let v = random(&[b, m, heads * d], seed + 2, 0.2);
        let got = attention::multi_head_attention(&q, &k, &v, heads)
            .unwrap()
            .unwrap();
        assert_close(
            &got,
            &candle_attention(&q, &k, &v, heads),
            1e-5,
            &format!("attention {:?}", ATTENTIONS[i]),
        );
    }
}

#[test]
fn spatial_attention_matches_candle() {
    for (i, &(b, c, n)) in [(1, 1, 1), (1, 5, 70), (2, 32, 600), (1, 24, 64)]
        .iter()
        .enumerate()
    {
        let seed = 200 + i as u64 * 10;
        let q = random(&[b, c, n], seed, 0.0);
        let k = random(&[b, c, n], seed + 1, 0.0);
        let v = random(&[b, c, n], seed + 2, 0.0);
        let got = attention::spatial_attention(&q, &k, &v).unwrap().unwrap();
        // The spatial layout is single-head attention over tokens `[b, n, c]`.
        let tokens = |t: &Tensor| t.transpose(1, 2).unwrap().contiguous().unwrap();
        let want = candle_attention(&tokens(&q), &tokens(&k), &tokens(&v), 1);
        assert_close(&got, &want, 1e-5, &format!("spatial attention {i}"));
    }
}

/// (dims, groups, offset added to the input).
fn group_norm_cases() -> Vec<(Vec<usize>, usize, f32)> {
    vec![
        (vec![2, 8, 5, 7], 4, 0.0),
        (vec![1, 12, 3, 3], 3, 0.0),
        (vec![2, 6, 10], 6, 0.0),
        (vec![1, 3, 1, 1], 1, 0.0),
        // Groups longer than a run of partial sums, and a mean far from zero.
        (vec![1, 4, 40, 40], 2, 0.0),
        (vec![2, 32, 16, 16], 8, 20.0),
    ]
}

#[test]
fn group_norm_matches_candle() {
    for (i, (dims, groups, offset)) in group_norm_cases().into_iter().enumerate() {
        let c = dims[1];
        let x = random(&dims, 300 + i as u64, offset);
        let w = random(&[c], 400 + i as u64, 1.0);
        let b = random(&[c], 500 + i as u64, 0.0);
        let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, 1e-5)
            .unwrap()
            .forward(&x)
            .unwrap();
        for silu in [false, true] {
            let got = norm::group_norm(&x, &w, &b, groups, 1e-5, silu)
                .unwrap()
                .unwrap();
            let want = match silu {
                true => reference.silu().unwrap(),
                false => reference.clone(),
            };
            assert_close(
                &got,
                &want,
                1e-5,
                &format!("group norm {dims:?} silu {silu}"),
            );
        }
    }
}

#[test]
fn layer_norm_matches_candle() {
    for (i, dims) in [vec![2, 7, 13], vec![3, 320], vec![1, 200, 64], vec![1, 1]]
        .into_iter()
        .enumerate()
    {
        let c = *dims.last().unwrap();
        let x = random(&dims, 600 + i as u64, 0.3);
        let w = random(&[c], 700 + i as u64, 1.0);
        let b = random(&[c], 800 + i as u64, 0.0);
        let got = norm::layer_norm(&x, &w, &b, 1e-5).unwrap().unwrap();
        let want = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert_close(&got, &want, 1e-5, &format!("layer norm {dims:?}"));
    }
}

#[test]
fn geglu_matches_candle() {
    for (i, dims) in [
        vec![2, 5, 6],
        vec![1, 3, 2],
        vec![2, 70, 40],
        vec![1, 4, 2560],
    ]
    .into_iter()
    .enumerate()
    {
        let ff = (random(&dims, 900 + i as u64, 0.0) * 5.0).unwrap();
        let half = dims[dims.len() - 1] / 2;
        let want = (ff.narrow(D::Minus1, 0, half).unwrap()
            * ff.narrow(D::Minus1, half, half)
                .unwrap()
                .gelu_erf()
                .unwrap())
        .unwrap();
        let got = activation::geglu(&ff).unwrap().unwrap();
        assert_close(&got, &want, 1e-5, &format!("geglu {dims:?}"));
    }
}

#[test]
fn linear_matches_candle() {
    for (i, (rows, k, n)) in [(vec![2, 7], 13, 5), (vec![3], 320, 64), (vec![1, 1], 1, 1)]
        .into_iter()
        .enumerate()
    {
        let mut dims = rows.clone();
        dims.push(k);
        let x = random(&dims, 1000 + i as u64, 0.0);
        let wt = random(&[k, n], 1100 + i as u64, 0.0);
        let b = random(&[n], 1200 + i as u64, 0.0);
        let plain = x.broadcast_matmul(&wt).unwrap();
        let got = kernels::linear(&x, &wt, Some(&b)).unwrap().unwrap();
        assert_close(&got, &plain.broadcast_add(&b).unwrap(), 1e-5, "linear");
        let got = kernels::linear(&x, &wt, None).unwrap().unwrap();
        assert_close(&got, &plain, 1e-5, "linear without bias");
    }
}

/// Every kernel on shapes that split into several work items, as bytes.
fn all_kernels() -> Vec<Vec<f32>> {
    let x = random(&[2, 64, 30, 34], 1, 0.0);
    let w = random(&[48, 64, 3, 3], 2, 0.0);
    let b = random(&[48], 3, 0.0);
    let big = random(&[1, 30, 37, 45], 4, 0.0);
    let big_w = random(&[20, 30, 3, 3], 5, 0.0);
    let q = random(&[2, 700, 64], 6, 0.0);
    let k = random(&[2, 1100, 64], 7, 0.0);
    let v = random(&[2, 1100, 64], 8, 0.0);
    let gw = random(&[64], 9, 1.0);
    let ln_w = random(&[34], 10, 1.0);
    let ln_b = random(&[34], 11, 0.0);
    let lin_w = random(&[34, 40], 12, 0.0);
    let lin_b = random(&[40], 13, 0.0);
    vec![
        values(&own_conv(&x, &w, Some(&b), 1)),
        values(&own_conv(&x, &w, Some(&b), 2)),
        values(&tiled_conv(&big, &big_w, None, 1, 112)),
        values(&tiled_conv(&big, &big_w, None, 2, 32)),
        values(&own_conv(&x, &random(&[16, 64, 1, 1], 14, 0.0), None, 1)),
        values(
            &attention::multi_head_attention(&q, &k, &v, 4)
                .unwrap()
                .unwrap(),
        ),
        values(&attention::spatial_attention(&q, &q, &q).unwrap().unwrap()),
        values(
            &norm::group_norm(&x, &gw, &gw, 8, 1e-6, true)
                .unwrap()
                .unwrap(),
        ),
        values(&norm::layer_norm(&x, &ln_w, &ln_b, 1e-5).unwrap().unwrap()),
        values(&activation::geglu(&x).unwrap().unwrap()),
        values(&kernels::linear(&x, &lin_w, Some(&lin_b)).unwrap().unwrap()),
    ]
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(all_kernels)
    };
    let one = on(1);
    for threads in [2, 3] {
        let many = on(threads);
        for (i, (a, b)) in one.iter().zip(&many).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "kernel {i} differs between 1 and {threads} threads");
        }
    }
}

/// The tiny SD1 UNet (every layer: kernels and candle's elementwise ops between them) on 1, 2
/// and 3 threads.
#[test]
fn a_unet_forward_does_not_depend_on_the_thread_count() {
    use loratool::family::layout::Checkpoint;
    use loratool::ops::patch_plan::{PatchPlan, PlanOptions};
    use loratool::preview::unet::{Heads, Unet, UnetConfig};
    use loratool::preview::weights::Weights;

    let checkpoint = Checkpoint::open(&common::fixture("models/sd1_ldm.safetensors")).unwrap();
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan);
    let config = UnetConfig {
        heads: Some(Heads::Count(2)),
        groups: 4,
    };
    let unet = Unet::load(&weights, &config).unwrap();
    let x = random(&[2, 4, 8, 8], 1, 0.0);
    let context = random(&[2, 77, 16], 2, 0.0);
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| values(&unet.forward(&x, &[500.0, 20.5], &context).unwrap()))
    };
    let one = on(1);
    for threads in [2, 3] {
        let many = on(threads);
        let same = one
            .iter()
            .zip(&many)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "the UNet differs between 1 and {threads} threads");
    }
}
