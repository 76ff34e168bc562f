//! `extract`: from tuned = base + known low-rank deltas (+ small noise), the extracted LoRA reaches
//! within 1.01× of the optimal rank-R error per module, is exact when the rank suffices, merges
//! back onto the base to reproduce the fine-tune, says which changed tensors it left out and how
//! much of the difference they hold, and bad input is refused.

mod common;

use loratool::adapter::{delta, Adapter};
use loratool::family::checkpoint::{checkpoint_family, KeyMap};
use loratool::family::layout::Layout;
use loratool::linalg;
use loratool::ops::convert::TargetFormat;
use loratool::ops::extract::{extract_lora, ExtractOptions, Unextracted};
use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::patch_plan::LoraWeight;
use loratool::tensors::writer::{write_all, TensorSpec, WriteOptions};
use loratool::tensors::{Dtype, Tensor, TensorFile};
use std::path::{Path, PathBuf};

fn fx(rel: &str) -> PathBuf {
    common::fixtures().join(rel)
}

/// tuned = base + w·ΔW(lora), in f32, plus uniform noise of the given amplitude on every float tensor.
fn make_tuned(base: &Path, lora: &str, w: f32, noise: f32, out: &Path) {
    let merged = out.with_extension("merged.safetensors");
    let opts = MergeOptions {
        dtype: Some(Dtype::F32),
        force: true,
        window_bytes: 1 << 20,
        ..Default::default()
    };
    merge_into_checkpoint(base, &[LoraWeight::weighted(fx(lora), w)], &merged, &opts).unwrap();
    let f = TensorFile::open(&merged).unwrap();
    let mut x = 12345u64;
    let mut tensors = Vec::new();
    for t in f.tensors() {
        let mut v = f.read_f32(&t.name).unwrap();
        if t.dtype.is_float() && noise > 0.0 {
            for e in v.data.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *e += noise * (((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5);
            }
        }
        let dtype = if t.dtype.is_float() {
            Dtype::F32
        } else {
            t.dtype
        };
        let bytes = if t.dtype.is_float() {
            Dtype::F32.encode_f32(&v.data).unwrap()
        } else {
            f.raw_bytes(&t.name).unwrap().to_vec()
        };
        tensors.push((
            TensorSpec {
                name: t.name.clone(),
                dtype,
                shape: t.shape.clone(),
            },
            bytes,
        ));
    }
    write_all(
        out,
        f.metadata(),
        &tensors,
        &WriteOptions {
            force: true,
            inputs: vec![],
        },
    )
    .unwrap();
}

fn opts(rank: usize) -> ExtractOptions {
    ExtractOptions {
        rank,
        conv_rank: None,
        te_rank: None,
        min_diff: 0.0,
        dynamic: None,
        clamp_quantile: None,
        dtype: Dtype::F32,
        format: TargetFormat::Kohya,
        force: true,
        allow_empty: false,
        progress: Default::default(),
    }
}

/// The difference tuned − base on a module's target rows.
fn difference(
    base: &TensorFile,
    tuned: &TensorFile,
    weight: &str,
    rows: &Option<std::ops::Range<usize>>,
) -> Tensor {
    let (b, t) = (
        base.read_f32(weight).unwrap(),
        tuned.read_f32(weight).unwrap(),
    );
    let cols = b.cols();
    let r = rows.clone().unwrap_or(0..b.rows());
    let d: Vec<f32> = t.data[r.start * cols..r.end * cols]
        .iter()
        .zip(&b.data[r.start * cols..r.end * cols])
        .map(|(x, y)| x - y)
        .collect();
    Tensor::new(vec![r.len(), cols], d)
}

#[test]
fn extraction_is_near_optimal_and_exact_when_the_rank_suffices() {
    let dir = tempfile::tempdir().unwrap();
    for (model, lora, rank, noise, exact) in [
        (
            "models/sd1_ldm.safetensors",
            "loras/sd1_kohya_lora.safetensors",
            4,
            0.0,
            true,
        ),
        (
            "models/sd1_ldm.safetensors",
            "loras/sd1_kohya_lora.safetensors",
            2,
            1e-3,
            false,
        ),
        (
            "models/sdxl_ldm.safetensors",
            "loras/sdxl_kohya_lora.safetensors",
            3,
            1e-3,
            false,
        ),
    ] {
        let base_path = fx(model);
        let tuned_path = dir.path().join("tuned.safetensors");
        make_tuned(&base_path, lora, 0.8, noise, &tuned_path);
        let out = dir.path().join("extracted.safetensors");
        let report = extract_lora(&base_path, &tuned_path, &out, &opts(rank)).unwrap();
        assert!(report.components.values().all(|s| s.extracted > 0));
        let extracted = Adapter::open(&out).unwrap();
        let (base, tuned) = (
            TensorFile::open(&base_path).unwrap(),
            TensorFile::open(&tuned_path).unwrap(),
        );
        let family = checkpoint_family(base.tensors(), Layout::SingleFile);
        let map = KeyMap::build(base.tensors(), Layout::SingleFile, family);
        let source = Adapter::open(&fx(lora)).unwrap();
        assert_eq!(
            extracted.modules.len(),
            source.modules.len(),
            "kohya targets the same modules the LoRA had"
        );
        for m in &extracted.modules {
            let target = map
                .lookup(m)
                .unwrap_or_else(|| panic!("{} is not a module of {model}", m.name));
            let d = difference(&base, &tuned, &target.weight, &target.rows);
            let got = delta::delta(m, &extracted.file).unwrap();
            let err = got.relative_error(&d) * d.frobenius_norm();
            if exact {
                assert!(err <= 1e-5 * d.frobenius_norm(), "{}: {err:.2e}", m.name);
            } else {
                let sv = linalg::truncate_dense(&d.data, d.rows(), d.cols(), rank)
                    .unwrap()
                    .singular_values;
                let optimal = sv.iter().skip(rank).map(|s| s * s).sum::<f64>().sqrt();
                assert!(
                    err <= 1.01 * optimal + 1e-6 * d.frobenius_norm(),
                    "{model} {}: {err:.3e} vs optimal {optimal:.3e}",
                    m.name
                );
            }
        }
        // Merged back onto the base, the extracted LoRA reproduces the fine-tune.
        if exact {
            let back = dir.path().join("back.safetensors");
            let mopts = MergeOptions {
                dtype: Some(Dtype::F32),
                strict: true,
                force: true,
                window_bytes: 1 << 20,
                ..Default::default()
            };
            merge_into_checkpoint(
                &base_path,
                &[LoraWeight::weighted(out.clone(), 1.0)],
                &back,
                &mopts,
            )
            .unwrap();
            let back = TensorFile::open(&back).unwrap();
            for t in tuned.tensors() {
                let err = back
                    .read_f32(&t.name)
                    .unwrap()
                    .relative_error(&tuned.read_f32(&t.name).unwrap());
                assert!(err <= 1e-5, "{}: {err:.2e}", t.name);
            }
        }
        let meta = extracted.file.metadata();
        assert_eq!(meta["ss_network_dim"], rank.to_string());
        assert!(meta["loratool.extracted_from"].contains("sha256"));
    }
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let sd1 = fx("models/sd1_ldm.safetensors");
    let err = |base: &Path, tuned: &Path, o: ExtractOptions| {
        extract_lora(base, tuned, &out, &o).unwrap_err().to_string()
    };
    let e = err(&sd1, &sd1, opts(2));
    assert!(e.contains("do not differ in any targeted module"), "{e}");
    assert!(!out.exists());
    extract_lora(
        &sd1,
        &sd1,
        &out,
        &ExtractOptions {
            allow_empty: true,
            ..opts(2)
        },
    )
    .unwrap();
    assert!(out.exists());
    std::fs::remove_file(&out).unwrap();
    assert!(
        err(&sd1, &fx("models/sdxl_ldm.safetensors"), opts(2)).contains("is a sd1 checkpoint but")
    );
    assert!(err(&sd1, &sd1, opts(0)).contains("at least 1"));
    assert!(err(&sd1, &sd1, opts(100_000)).contains("larger than any target matrix"));
    // NaN in the tuned checkpoint names the tensor.
    let f = TensorFile::open(&sd1).unwrap();
    let mut tensors = Vec::new();
    for t in f.tensors() {
        let mut bytes = f.raw_bytes(&t.name).unwrap().to_vec();
        if t.name.ends_with("input_blocks.1.1.proj_in.weight") {
            bytes[0..2].copy_from_slice(&half::f16::NAN.to_le_bytes());
        }
        tensors.push((
            TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            },
            bytes,
        ));
    }
    let nan = dir.path().join("nan.safetensors");
    write_all(&nan, f.metadata(), &tensors, &WriteOptions::default()).unwrap();
    let e = err(&sd1, &nan, opts(2));
    assert!(
        e.contains("input_blocks.1.1.proj_in.weight") && e.contains("NaN"),
        "{e}"
    );
    let e = extract_lora(
        &sd1,
        &nan,
        &sd1,
        &ExtractOptions {
            force: true,
            ..opts(2)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("refusing to write over an input file"), "{e}");
    assert!(!out.exists());
}

#[test]
fn diffusers_pipeline_folders_extract_like_single_files() {
    let dir = tempfile::tempdir().unwrap();
    let lora = LoraWeight::weighted(fx("loras/sd1_kohya_lora.safetensors"), 0.8);
    let mopts = MergeOptions {
        dtype: Some(Dtype::F32),
        force: true,
        window_bytes: 1 << 20,
        ..Default::default()
    };
    let tuned_dir = dir.path().join("tuned_pipeline");
    merge_into_checkpoint(
        &fx("models/sd1_diffusers"),
        std::slice::from_ref(&lora),
        &tuned_dir,
        &mopts,
    )
    .unwrap();
    let tuned_ldm = dir.path().join("tuned.safetensors");
    merge_into_checkpoint(
        &fx("models/sd1_ldm.safetensors"),
        &[lora],
        &tuned_ldm,
        &mopts,
    )
    .unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    extract_lora(&fx("models/sd1_diffusers"), &tuned_dir, &a, &opts(4)).unwrap();
    extract_lora(&fx("models/sd1_ldm.safetensors"), &tuned_ldm, &b, &opts(4)).unwrap();
    let (a, b) = (Adapter::open(&a).unwrap(), Adapter::open(&b).unwrap());
    assert_eq!(a.modules.len(), b.modules.len());
    for m in &b.modules {
        let other = a
            .modules
            .iter()
            .find(|x| x.name == m.name)
            .unwrap_or_else(|| panic!("{} missing", m.name));
        let (x, y) = (
            delta::delta(other, &a.file).unwrap(),
            delta::delta(m, &b.file).unwrap(),
        );
        assert!(x.relative_error(&y) <= 1e-5, "{}", m.name);
    }
    let e = extract_lora(
        &fx("models/sd1_diffusers"),
        &tuned_ldm,
        &dir.path().join("c.safetensors"),
        &opts(4),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("must both be files or both be diffusers folders"),
        "{e}"
    );
}

/// Progress announces every module the extraction considers, extracted or skipped, once each.
#[test]
fn progress_counts_every_module_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = fx("models/sd1_ldm.safetensors");
    let tuned = dir.path().join("tuned.safetensors");
    make_tuned(&base, "loras/sd1_kohya_lora.safetensors", 0.8, 0.0, &tuned);
    // Once with every module factorized, once with every module skipped as unchanged.
    for (min_diff, allow_empty) in [(0.0, false), (f32::MAX, true)] {
        let counted = std::sync::Arc::new(common::Counted::default());
        let report = extract_lora(
            &base,
            &tuned,
            &dir.path().join("out.safetensors"),
            &ExtractOptions {
                progress: loratool::ops::progress::ProgressSink::new(counted.clone()),
                min_diff,
                allow_empty,
                ..opts(2)
            },
        )
        .unwrap();
        let (extracted, skipped) = report
            .components
            .values()
            .fold((0, 0), |(e, k), s| (e + s.extracted, k + s.skipped));
        assert!(if allow_empty {
            extracted == 0
        } else {
            extracted > 0
        });
        let modules = (extracted + skipped) as u64;
        assert!(modules > 0);
        assert_eq!(*counted.starts.lock().unwrap(), vec![modules]);
        assert_eq!(
            counted.done.load(std::sync::atomic::Ordering::Relaxed),
            modules
        );
    }
}

/// A LoCon with 3×3 convs (and conv_in/out, time embedding, resnet linears) merged into SD1:
/// without --conv-rank the report names the conv layers it left out, with the count and the share
/// of ‖tuned − base‖² computed here from the tensors; with --conv-rank they are extracted.
#[test]
fn changed_tensors_left_out_are_reported_with_their_share() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = fx("models/sd1_ldm.safetensors");
    let tuned_path = dir.path().join("tuned.safetensors");
    make_tuned(
        &base_path,
        "loras/sd1_locon.safetensors",
        0.8,
        0.0,
        &tuned_path,
    );
    let (base, tuned) = (
        TensorFile::open(&base_path).unwrap(),
        TensorFile::open(&tuned_path).unwrap(),
    );
    // Independently: every tensor's ‖tuned − base‖², and which changed ones are resnet or
    // sampler 3×3 convs (LDM names: not conv_in `input_blocks.0.0`, not conv_out `out.2`) or
    // resnet time_emb_proj / 1×1 shortcuts.
    let (mut total, mut conv, mut resnet_linear) = (0f64, (0, 0f64), (0, 0f64));
    for t in base.tensors() {
        if !t.dtype.is_float() {
            continue;
        }
        let (b, u) = (
            base.read_f32(&t.name).unwrap(),
            tuned.read_f32(&t.name).unwrap(),
        );
        let e: f64 = u
            .data
            .iter()
            .zip(&b.data)
            .map(|(u, b)| ((u - b) as f64).powi(2))
            .sum();
        total += e;
        if e == 0.0 {
            continue;
        }
        let unet = t.name.strip_prefix("model.diffusion_model.");
        let is_3x3 = t.shape.len() == 4 && t.shape[2..] == [3, 3];
        if unet.is_some_and(|n| is_3x3 && n != "input_blocks.0.0.weight" && n != "out.2.weight") {
            conv = (conv.0 + 1, conv.1 + e);
        }
        if unet.is_some_and(|n| {
            n.ends_with("emb_layers.1.weight") || n.ends_with("skip_connection.weight")
        }) {
            resnet_linear = (resnet_linear.0 + 1, resnet_linear.1 + e);
        }
    }
    assert!(conv.0 > 0 && resnet_linear.0 > 0, "the LoCon changes convs");

    let out = dir.path().join("out.safetensors");
    let report = extract_lora(&base_path, &tuned_path, &out, &opts(2)).unwrap();
    assert!((report.total_energy - total).abs() <= 1e-9 * total);
    let entry = |kind| report.not_extracted.iter().find(|n| n.kind == kind);
    let c = entry(Unextracted::Conv).expect("conv layers reported");
    assert_eq!(c.count, conv.0);
    let share = conv.1 / total;
    assert!(
        (report.share(c.energy) - share).abs() <= 1e-9 * share,
        "{} vs {share}",
        report.share(c.energy)
    );
    let r = entry(Unextracted::ResnetLinear).expect("resnet linears reported");
    assert_eq!(
        (r.count, (r.energy - resnet_linear.1).abs() <= 1e-9 * total),
        (resnet_linear.0, true)
    );
    assert_eq!(entry(Unextracted::ConvInOut).map(|n| n.count), Some(2));
    assert_eq!(entry(Unextracted::TimeEmbedding).map(|n| n.count), Some(2));
    assert_eq!(report.unpaired, 0);
    // Extracted modules and the tensors left out account for the whole difference.
    let extracted: f64 = report.components.values().map(|s| s.total_energy).sum();
    let left: f64 = report.not_extracted.iter().map(|n| n.energy).sum();
    assert!((extracted + left - total).abs() <= 1e-9 * total);

    let with_conv = extract_lora(
        &base_path,
        &tuned_path,
        &out,
        &ExtractOptions {
            conv_rank: Some(2),
            ..opts(2)
        },
    )
    .unwrap();
    let kinds: Vec<Unextracted> = with_conv.not_extracted.iter().map(|n| n.kind).collect();
    assert!(
        !kinds.contains(&Unextracted::Conv) && !kinds.contains(&Unextracted::ResnetLinear),
        "{kinds:?}"
    );
    let count = |r: &loratool::ops::extract::ExtractReport| -> usize {
        r.components.values().map(|s| s.extracted).sum()
    };
    assert_eq!(count(&with_conv), count(&report) + conv.0 + resnet_linear.0);
}
