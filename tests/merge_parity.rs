//! `merge --base` against the peers' own merged checkpoints (fixtures/merge/, written by
//! fixtures/generate_merge.py with diffusers `fuse_lora` and LyCORIS): every changed tensor within
//! 1e-5 relative Frobenius error in f32 (2e-3 when stored as f16), every other tensor bit-identical
//! to the base.

mod common;

use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::patch_plan::LoraWeight;
use loratool::tensors::{Dtype, TensorFile};
use std::path::{Path, PathBuf};

fn merge_cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(common::fixtures().join("merge/manifest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

/// The output file holding reference key `key` (`unet/<k>` in a pipeline folder) and the key in it.
fn locate(out: &Path, layout: &str, key: &str) -> (PathBuf, String) {
    if layout == "diffusers" {
        let (component, k) = key.split_once('/').unwrap();
        let file = if component.starts_with("text_encoder") {
            "model.safetensors"
        } else {
            "diffusion_pytorch_model.safetensors"
        };
        (out.join(component).join(file), k.to_string())
    } else {
        (out.to_path_buf(), key.to_string())
    }
}

fn run_case(case: &serde_json::Value, dtype: Option<Dtype>, tolerance: f64) -> Vec<String> {
    let fx = common::fixtures();
    let name = case["case"].as_str().unwrap();
    let layout = case["layout"].as_str().unwrap();
    let base = fx.join(case["base"].as_str().unwrap());
    let loras: Vec<LoraWeight> = case["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let w = l["weight"].as_f64().unwrap() as f32;
            LoraWeight::weighted(fx.join(l["path"].as_str().unwrap()), w)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(if layout == "diffusers" {
        "merged"
    } else {
        "merged.safetensors"
    });
    let opts = MergeOptions {
        dtype,
        window_bytes: 1 << 20,
        ..Default::default()
    };
    let report = merge_into_checkpoint(&base, &loras, &out, &opts).unwrap();
    let reference = TensorFile::open(&fx.join(case["reference"].as_str().unwrap())).unwrap();
    let mut failures = Vec::new();
    let changed = case["changed_tensors"].as_u64().unwrap() as usize;
    if report.tensors_changed != changed {
        failures.push(format!(
            "{name}: {} tensors changed, peer changed {changed}",
            report.tensors_changed
        ));
    }
    let mut opened: std::collections::HashMap<PathBuf, TensorFile> = Default::default();
    for t in reference.tensors() {
        let (file, key) = locate(&out, layout, &t.name);
        let f = opened
            .entry(file.clone())
            .or_insert_with(|| TensorFile::open(&file).unwrap());
        let got = f.read_f32(&key).unwrap();
        let err = got.relative_error(&reference.read_f32(&t.name).unwrap());
        if err.is_nan() || err > tolerance {
            failures.push(format!("{name}: {} relative error {err:.2e}", t.name));
        }
    }
    // Everything else is the base, byte for byte (when the dtype is kept).
    if dtype.is_none() {
        let pairs: Vec<(PathBuf, PathBuf)> = if layout == "diffusers" {
            [
                "unet/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
            ]
            .iter()
            .filter(|r| base.join(r).exists())
            .map(|r| (base.join(r), out.join(r)))
            .collect()
        } else {
            vec![(base.clone(), out.clone())]
        };
        for (b, o) in pairs {
            let (bf, of) = (TensorFile::open(&b).unwrap(), TensorFile::open(&o).unwrap());
            assert_eq!(bf.tensors().len(), of.tensors().len());
            for t in bf.tensors() {
                let prefix = if layout == "diffusers" {
                    format!(
                        "{}/",
                        b.parent().unwrap().file_name().unwrap().to_string_lossy()
                    )
                } else {
                    String::new()
                };
                if reference.get(&format!("{prefix}{}", t.name)).is_some() {
                    continue;
                }
                let o_info = of.get(&t.name).unwrap();
                if o_info.shape != t.shape
                    || o_info.dtype != t.dtype
                    || of.raw_bytes(&t.name).unwrap() != bf.raw_bytes(&t.name).unwrap()
                {
                    failures.push(format!(
                        "{name}: untouched {} differs from the base",
                        t.name
                    ));
                }
            }
        }
    }
    failures
}

#[test]
fn merged_tensors_match_the_peers_in_f32() {
    let cases = merge_cases();
    assert!(cases.len() >= 15);
    let failures: Vec<String> = cases
        .iter()
        .flat_map(|c| run_case(c, Some(Dtype::F32), 1e-5))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn merged_tensors_match_the_peers_in_the_base_dtype_and_the_rest_is_bit_identical() {
    let failures: Vec<String> = merge_cases()
        .iter()
        .flat_map(|c| run_case(c, None, 2e-3))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `--dtype` rounds once: merging straight into f16 or bf16 gives exactly the f32 merge rounded to
/// that type, for patched and untouched tensors alike; non-float tensors keep their bytes.
#[test]
fn every_output_dtype_is_the_f32_merge_rounded_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::fixtures().join("models/sd1_ldm.safetensors");
    let loras = vec![
        LoraWeight::weighted(
            common::fixtures().join("loras/sd1_kohya_lora.safetensors"),
            0.7,
        ),
        LoraWeight::weighted(common::fixtures().join("loras/sd1_locon.safetensors"), -0.5),
        // Through the whole-tensor path (needs the base weight).
        LoraWeight::weighted(common::fixtures().join("loras/sd1_dora.safetensors"), 0.4),
    ];
    let out = |dtype: Option<Dtype>| {
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        let opts = MergeOptions {
            dtype,
            window_bytes: 64 << 10, // many small windows
            ..Default::default()
        };
        merge_into_checkpoint(&base, &loras, &path, &opts).unwrap();
        TensorFile::open(&path).unwrap()
    };
    let (f32_out, f16_out, bf16_out) = (out(Some(Dtype::F32)), out(None), out(Some(Dtype::BF16)));
    let base = TensorFile::open(&base).unwrap();
    let mut patched = 0;
    for info in base.tensors() {
        let name = &info.name;
        if !info.dtype.is_float() {
            for o in [&f32_out, &f16_out, &bf16_out] {
                assert_eq!(o.raw_bytes(name).unwrap(), base.raw_bytes(name).unwrap());
            }
            continue;
        }
        let exact = f32_out.read_f32(name).unwrap().data;
        assert_eq!(f32_out.get(name).unwrap().dtype, Dtype::F32);
        for (o, d) in [(&f16_out, Dtype::F16), (&bf16_out, Dtype::BF16)] {
            assert_eq!(o.get(name).unwrap().dtype, d, "{name}");
            assert_eq!(
                o.raw_bytes(name).unwrap().as_ref(),
                d.encode_f32(&exact).unwrap().as_slice(),
                "{name} as {d}"
            );
        }
        if f16_out.raw_bytes(name).unwrap() != base.raw_bytes(name).unwrap() {
            patched += 1;
        }
    }
    assert!(patched > 50, "only {patched} tensors changed");
}

/// Progress is announced once with the output's data bytes (after a dtype change, and summed over
/// a pipeline folder's files) and then advanced by exactly that much.
#[test]
fn progress_counts_every_output_data_byte() {
    let dir = tempfile::tempdir().unwrap();
    let lora = LoraWeight::new(common::fixtures().join("loras/sd1_kohya_lora.safetensors"));
    for (base, out) in [
        ("models/sd1_ldm.safetensors", "single.safetensors"),
        ("models/sd1_diffusers", "folder"),
    ] {
        let counted = std::sync::Arc::new(common::Counted::default());
        let opts = MergeOptions {
            dtype: Some(Dtype::F32),
            window_bytes: 64 << 10,
            progress: loratool::ops::progress::ProgressSink::new(counted.clone()),
            ..Default::default()
        };
        let out = dir.path().join(out);
        merge_into_checkpoint(
            &common::fixtures().join(base),
            std::slice::from_ref(&lora),
            &out,
            &opts,
        )
        .unwrap();
        let files: Vec<PathBuf> = if out.is_dir() {
            [
                "unet/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors",
            ]
            .iter()
            .map(|f| out.join(f))
            .filter(|p| p.exists())
            .collect()
        } else {
            vec![out.clone()]
        };
        let data_bytes: u64 = files
            .iter()
            .map(|f| {
                let t = TensorFile::open(f).unwrap();
                t.tensors()
                    .iter()
                    .map(|i| (i.numel() * i.dtype.size().unwrap()) as u64)
                    .sum::<u64>()
            })
            .sum();
        assert!(data_bytes > 0);
        assert_eq!(*counted.starts.lock().unwrap(), vec![data_bytes], "{base}");
        assert_eq!(
            counted.done.load(std::sync::atomic::Ordering::Relaxed),
            data_bytes,
            "{base}"
        );
    }
}
