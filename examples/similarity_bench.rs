//! The benchmark of `bench/similarity.sh`: one LoRA against a 1,000-file collection.
//!
//! Writes `COUNT` (default 1000) kohya LoRAs with the SD1 module layout of the fixture
//! `sd1_kohya_lora` (264 modules, the count of a real kohya SD1 LoRA; fixture widths), ranks 8–32,
//! into DIR: random ones, and a few relatives of the query (resized, converted to peft, re-saved
//! as bf16, alpha halved). Then:
//! - index: open each file, compute its sketch, serialize it (what a library scan stores);
//! - query (the timed target): sketches read back from bytes, ranked against the query's, the top
//!   10 compared exactly from the files;
//! - accuracy: the exact cosine of every file against the estimate, and whether every file the exact
//!   cosine calls similar (≥ 0.5) is in the re-ranked top 10;
//! - real widths: sketch and exact pair time per module of rank-32 LoRAs on the modules of
//!   `real_sd1_kohya` and `real_sdxl_kohya`.
//!
//! Usage: `similarity_bench DIR [COUNT]` (DIR is created and must be empty or absent).

use loratool::adapter::{lora_factor_shapes, Adapter};
use loratool::library::similarity::{exact_similarity, rank_by_estimate, Sketch};
use loratool::ops::convert::{convert_adapter, ConvertOptions, TargetFormat};
use loratool::ops::resize::{resize_lora, RankRule, ResizeOptions};
use loratool::tensors::writer::{write_all, TensorSpec, WriteOptions};
use loratool::tensors::{Dtype, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// Random rank-`rank` factors on `template`'s modules, component i scaled by 0.8^i, stored f16.
fn write_random_lora(path: &Path, template: &Adapter, rank: usize, seed: u64, alpha: f32) {
    let mut tensors = Vec::new();
    for (n, m) in template.modules.iter().enumerate() {
        let (up_shape, down_shape) = lora_factor_shapes(&m.shape, rank);
        let cols: usize = down_shape[1..].iter().product();
        let mut up = pseudo_random(up_shape[0] * rank, seed * 1_000_003 + 2 * n as u64);
        for (i, v) in up.iter_mut().enumerate() {
            *v *= 0.8f32.powi((i % rank) as i32);
        }
        let down = pseudo_random(rank * cols, seed * 1_000_003 + 2 * n as u64 + 1);
        for (suffix, shape, data) in [
            ("lora_up.weight", up_shape, up),
            ("lora_down.weight", down_shape, down),
            ("alpha", vec![], vec![alpha]),
        ] {
            tensors.push(TensorSpec::encode(
                format!("{}.{suffix}", m.name),
                &Tensor::new(shape, data),
                Dtype::F16,
            ));
        }
    }
    write_all(
        path,
        template.file.metadata(),
        &tensors,
        &WriteOptions::default(),
    )
    .expect("write LoRA");
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).expect("usage: similarity_bench DIR [COUNT]"));
    let count: usize = args.get(2).map_or(1000, |c| c.parse().expect("COUNT"));
    std::fs::create_dir_all(&dir).expect("create DIR");
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/loras");
    let template = Adapter::open(&fixtures.join("sd1_kohya_lora.safetensors")).expect("fixture");

    // The collection: the query's relatives first, then random LoRAs.
    let t = Instant::now();
    let query = dir.join("query.safetensors");
    write_random_lora(&query, &template, 32, 0, 16.0);
    let mut files = Vec::new();
    let resize = |rank: usize, name: &str| {
        let out = dir.join(name);
        let opts = ResizeOptions {
            rule: RankRule::Fixed(rank),
            max_rank: None,
            dtype: Some(Dtype::F16),
            force: false,
            progress: Default::default(),
        };
        resize_lora(&query, &out, &opts).expect("resize");
        out
    };
    files.push(resize(16, "rel_resized16.safetensors"));
    files.push(resize(8, "rel_resized8.safetensors"));
    files.push(resize(4, "rel_resized4.safetensors"));
    files.push(resize(2, "rel_resized2.safetensors"));
    let peft = dir.join("rel_peft.safetensors");
    convert_adapter(
        &query,
        &peft,
        TargetFormat::Peft,
        &ConvertOptions::default(),
    )
    .expect("peft");
    files.push(peft);
    let bf16 = dir.join("rel_bf16.safetensors");
    let opts = ConvertOptions {
        dtype: Some(Dtype::BF16),
        force: false,
    };
    convert_adapter(&query, &bf16, TargetFormat::Kohya, &opts).expect("bf16");
    files.push(bf16);
    let half = dir.join("rel_alpha_half.safetensors");
    write_random_lora(&half, &template, 32, 0, 8.0);
    files.push(half);
    let relatives = files.len();
    for i in files.len()..count {
        let path = dir.join(format!("random_{i:04}.safetensors"));
        write_random_lora(&path, &template, 8 + (i * 7) % 25, 1 + i as u64, 4.0);
        files.push(path);
    }
    let bytes_on_disk: u64 = files
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    println!(
        "generated {} files ({relatives} relatives of the query), {:.0} MB, in {:.1} s",
        files.len(),
        bytes_on_disk as f64 / 1e6,
        secs(t)
    );

    // Index: sketch bytes per file, as a library scan stores them.
    let t = Instant::now();
    let blobs: Vec<Vec<u8>> = files
        .iter()
        .map(|p| {
            Sketch::of(&Adapter::open(p).expect("open"))
                .expect("sketch")
                .to_bytes()
        })
        .collect();
    let index_s = secs(t);
    let blob_bytes: usize = blobs.iter().map(Vec::len).sum();
    println!(
        "index: {} sketches in {index_s:.2} s ({:.2} ms/file), {} bytes each, {:.1} MB in all",
        blobs.len(),
        1e3 * index_s / blobs.len() as f64,
        blobs[0].len(),
        blob_bytes as f64 / 1e6
    );

    // Query: load the sketches from bytes, rank, re-rank the top 10 exactly.
    let t = Instant::now();
    let q = Adapter::open(&query).expect("query");
    let q_sketch = Sketch::of(&q).expect("sketch");
    let t_load = Instant::now();
    let sketches: Vec<Sketch> = blobs
        .iter()
        .map(|b| Sketch::from_bytes(b).expect("from_bytes"))
        .collect();
    let load_s = secs(t_load);
    let t_rank = Instant::now();
    let top = rank_by_estimate(&q_sketch, &sketches, 10);
    let rank_s = secs(t_rank);
    let t_exact = Instant::now();
    let mut reranked: Vec<(usize, f64)> = top
        .iter()
        .map(|(i, _)| {
            let c = Adapter::open(&files[*i]).expect("open");
            (*i, exact_similarity(&q, &c).expect("exact").cosine)
        })
        .collect();
    reranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let exact_s = secs(t_exact);
    let query_s = secs(t);
    println!(
        "query: {query_s:.3} s in all (from_bytes {load_s:.3} s, rank {rank_s:.4} s, exact top 10 {exact_s:.3} s)"
    );
    for (i, c) in &reranked {
        let est = top.iter().find(|x| x.0 == *i).unwrap().1;
        println!(
            "  {:<28} exact {c:+.4}  estimate {est:+.4}",
            files[*i].file_name().unwrap().to_string_lossy()
        );
    }

    // Accuracy: exact against every file.
    let t = Instant::now();
    let exact: Vec<f64> = files
        .iter()
        .map(|p| {
            exact_similarity(&q, &Adapter::open(p).expect("open"))
                .expect("exact")
                .cosine
        })
        .collect();
    let exact_all_s = secs(t);
    let errs: Vec<f64> = exact
        .iter()
        .zip(&sketches)
        .map(|(e, s)| (q_sketch.estimate(s) - e).abs())
        .collect();
    let rms = (errs.iter().map(|e| e * e).sum::<f64>() / errs.len() as f64).sqrt();
    let max = errs.iter().cloned().fold(0.0, f64::max);
    let max_rel = errs[..relatives].iter().cloned().fold(0.0, f64::max);
    // Every file the exact cosine calls similar must be among the ten re-ranked.
    let got: Vec<usize> = reranked.iter().map(|x| x.0).collect();
    let similar: Vec<usize> = (0..files.len()).filter(|i| exact[*i] >= 0.5).collect();
    println!(
        "exact against all {} files: {exact_all_s:.2} s; |estimate − exact|: rms {rms:.4}, max {max:.4} (relatives: max {max_rel:.4}); all {} files with exact cosine ≥ 0.5 in the re-ranked top 10: {}",
        files.len(),
        similar.len(),
        similar.iter().all(|i| got.contains(i))
    );

    // Real widths: rank-32 LoRAs on the modules of the real-width fixtures (SD1: attn2 to_k
    // in=768, TE 768; SDXL: attn2 to_k in=2048, TE 768/1280), per module.
    for fixture in ["real_sd1_kohya", "real_sdxl_kohya"] {
        let real =
            Adapter::open(&fixtures.join(format!("{fixture}.safetensors"))).expect("fixture");
        let path = dir.join(format!("{fixture}_r32.safetensors"));
        write_random_lora(&path, &real, 32, 7, 16.0);
        let t = Instant::now();
        let a = Adapter::open(&path).expect("open");
        let s = Sketch::of(&a).expect("sketch");
        let sketch_s = secs(t);
        let t = Instant::now();
        let b = Adapter::open(&path).expect("open");
        let e = exact_similarity(&a, &b).expect("exact");
        let pair_s = secs(t);
        let n = a.modules.len() as f64;
        println!(
            "{fixture} widths, rank 32, {n} modules: sketch {:.3} ms/module, exact pair {:.3} ms/module (cosine {:.6}, estimate {:.6})",
            1e3 * sketch_s / n,
            1e3 * pair_s / n,
            e.cosine,
            s.estimate(&s)
        );
    }
}
