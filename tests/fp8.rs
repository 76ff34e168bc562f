//! fp8 (float8_e4m3fn / float8_e5m2) against torch's own conversions, and a merge into an fp8
//! Flux checkpoint against torch's rounding of the peer's delta (fixtures/generate_fp8.py).

mod common;

use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::patch_plan::LoraWeight;
use loratool::tensors::{Dtype, TensorFile};

fn fp8_fixture(name: &str) -> std::path::PathBuf {
    common::fixtures().join("fp8").join(name)
}

#[test]
fn encoding_matches_torch_byte_for_byte() {
    let f = TensorFile::open(&fp8_fixture("conversions.safetensors")).unwrap();
    let values = f.read_f32("values").unwrap().data;
    assert!(values.len() > 10_000);
    for (key, dtype) in [("e4m3", Dtype::F8E4M3), ("e5m2", Dtype::F8E5M2)] {
        assert_eq!(f.get(key).unwrap().dtype, dtype);
        let torch = f.raw_bytes(key).unwrap();
        let ours = dtype.encode_f32(&values).unwrap();
        let differ = ours
            .iter()
            .zip(torch.iter())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ,
            0,
            "{dtype}: {differ} of {} values differ",
            values.len()
        );
        // Decoding torch's codes and encoding again is the identity.
        let decoded = f.read_f32(key).unwrap().data;
        assert_eq!(
            dtype.encode_f32(&decoded).unwrap(),
            torch.as_ref(),
            "{dtype}"
        );
    }
}

#[test]
fn merging_into_an_fp8_checkpoint_rounds_once_like_torch() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = fp8_fixture("flux_bfl_fp8.safetensors");
    let lora = LoraWeight::weighted(common::fixtures().join("loras/flux_kohya.safetensors"), 0.8);
    let out = dir.path().join("merged.safetensors");
    let opts = MergeOptions {
        window_bytes: 64 << 10,
        ..Default::default()
    };
    let report = merge_into_checkpoint(&base_path, &[lora], &out, &opts).unwrap();
    let (base, merged) = (
        TensorFile::open(&base_path).unwrap(),
        TensorFile::open(&out).unwrap(),
    );
    let expected = TensorFile::open(&fp8_fixture("flux_bfl_fp8_kohya_w0.8.safetensors")).unwrap();
    assert_eq!(report.tensors_changed, expected.tensors().len());
    let mut fp8_elements = 0;
    for info in base.tensors() {
        let name = &info.name;
        let m = merged.get(name).unwrap();
        assert_eq!((m.dtype, &m.shape), (info.dtype, &info.shape), "{name}");
        let got = merged.raw_bytes(name).unwrap();
        match expected.get(name) {
            Some(e) => {
                assert_eq!(e.dtype, Dtype::F8E4M3, "{name}");
                assert_eq!(got, expected.raw_bytes(name).unwrap(), "{name}");
                assert_ne!(got, base.raw_bytes(name).unwrap(), "{name} changed");
                fp8_elements += info.numel();
            }
            None => assert_eq!(got, base.raw_bytes(name).unwrap(), "{name} untouched"),
        }
    }
    assert!(fp8_elements > 10_000);
}

/// `base` merged with `lora` (stored as `dtype`), opened.
fn merged(
    dir: &std::path::Path,
    base: &std::path::Path,
    lora: &LoraWeight,
    dtype: Option<Dtype>,
) -> TensorFile {
    let out = dir.join(format!(
        "{}.safetensors",
        dtype.map_or("base".into(), |d| d.to_string())
    ));
    let opts = MergeOptions {
        dtype,
        window_bytes: 64 << 10,
        ..Default::default()
    };
    merge_into_checkpoint(base, std::slice::from_ref(lora), &out, &opts).unwrap();
    TensorFile::open(&out).unwrap()
}

/// The rule of docs/DECISIONS.md ("fp8 output"), written out again for the two layouts tested:
/// weights of two or more dimensions inside the denoiser's repeated blocks.
fn block_matrix(name: &str, shape: &[usize]) -> bool {
    let name = name.strip_prefix("model.diffusion_model.").unwrap_or(name);
    let input_block = name
        .strip_prefix("input_blocks.")
        .and_then(|r| r.split('.').next())
        .is_some_and(|n| n != "0");
    let block = [
        "double_blocks.",
        "single_blocks.",
        "middle_block.",
        "output_blocks.",
    ]
    .iter()
    .any(|b| name.starts_with(b))
        || input_block;
    block && name.ends_with(".weight") && shape.len() >= 2
}

/// `merge --dtype fp8` stores exactly the block matrices as F8_E4M3; every other tensor keeps its
/// dtype and bytes, or (changed by the LoRA) is what the merge without `--dtype` writes. fp8 values
/// are the f32 merge rounded once (the f32 output, encoded), and the untouched block matrices are
/// `reference` where given (torch's `.to(float8_e4m3fn)`), else our encoder of the stored values.
/// The fp8 tensors hold most of the denoiser's elements, which is how ComfyUI picks its fp8 path.
fn check_fp8_merge(base_path: &std::path::Path, lora: &str, reference: Option<&TensorFile>) {
    let dir = tempfile::tempdir().unwrap();
    let lora = |w: f32| LoraWeight::weighted(common::fixtures().join(lora), w);
    let base = TensorFile::open(base_path).unwrap();
    for weight in [0.0, 0.8] {
        let sub = dir.path().join(format!("w{weight}"));
        std::fs::create_dir(&sub).unwrap();
        let fp8 = merged(&sub, base_path, &lora(weight), Some(Dtype::F8E4M3));
        let same = merged(&sub, base_path, &lora(weight), None);
        let f32 = merged(&sub, base_path, &lora(weight), Some(Dtype::F32));
        let (mut cast, mut kept, mut changed) = (0, 0, 0);
        let mut denoiser_elements = std::collections::HashMap::<Dtype, usize>::new();
        for info in base.tensors() {
            let name = &info.name;
            let out = fp8.get(name).unwrap();
            assert_eq!(out.shape, info.shape, "{name}");
            let bytes = fp8.raw_bytes(name).unwrap();
            let untouched = same.raw_bytes(name).unwrap() == base.raw_bytes(name).unwrap();
            if block_matrix(name, &info.shape) && info.dtype.is_float() {
                assert_eq!(out.dtype, Dtype::F8E4M3, "{name}");
                let once = Dtype::F8E4M3
                    .encode_f32(&f32.read_f32(name).unwrap().data)
                    .unwrap();
                assert_eq!(bytes, once, "{name}: the f32 merge rounded once");
                if untouched {
                    if let Some(r) = reference {
                        assert_eq!(
                            bytes,
                            r.raw_bytes(name).unwrap(),
                            "{name}: torch's rounding"
                        );
                    }
                }
                cast += 1;
            } else {
                assert_eq!(out.dtype, info.dtype, "{name}");
                assert_eq!(bytes, same.raw_bytes(name).unwrap(), "{name}");
                kept += 1;
            }
            changed += usize::from(!untouched);
            if !name.starts_with("cond_stage_model.") && !name.starts_with("first_stage_model.") {
                *denoiser_elements.entry(out.dtype).or_default() += info.numel();
            }
        }
        assert!(cast > 10 && kept > 10, "{cast} cast, {kept} kept");
        assert_eq!(changed > 0, weight != 0.0, "weight {weight}");
        let dominant = denoiser_elements.iter().max_by_key(|(_, n)| **n).unwrap().0;
        assert_eq!(*dominant, Dtype::F8E4M3, "{denoiser_elements:?}");
    }
}

#[test]
fn dtype_fp8_casts_the_block_matrices_of_flux() {
    let reference = TensorFile::open(&fp8_fixture("flux_bfl_fp8.safetensors")).unwrap();
    check_fp8_merge(
        &common::fixtures().join("models/flux_bfl.safetensors"),
        "loras/flux_kohya.safetensors",
        Some(&reference),
    );
}

#[test]
fn dtype_fp8_casts_the_unet_block_matrices_of_sd1() {
    let base = common::fixtures().join("models/sd1_ldm.safetensors");
    let f = TensorFile::open(&base).unwrap();
    // The checkpoint has text encoder and VAE, which keep their dtype.
    assert!(f
        .tensors()
        .iter()
        .any(|t| t.name.starts_with("cond_stage_model.")));
    assert!(f
        .tensors()
        .iter()
        .any(|t| t.name.starts_with("first_stage_model.")));
    check_fp8_merge(&base, "loras/sd1_kohya_lora.safetensors", None);
}

#[test]
fn fp8_is_for_checkpoints_only() {
    let dir = tempfile::tempdir().unwrap();
    let lora = common::fixtures().join("loras/sd1_kohya_lora.safetensors");
    let out = common::loratool()
        .args(["merge", "--dtype", "fp8", "--lora"])
        .arg(&lora)
        .arg("--lora")
        .arg(&lora)
        .arg("-o")
        .arg(dir.path().join("merged.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--dtype fp8 applies to merges into a checkpoint"),
        "{err}"
    );
    let out = common::loratool()
        .args(["merge", "--dtype", "fp8", "--base"])
        .arg(common::fixtures().join("models/sd1_ldm.safetensors"))
        .arg("--lora")
        .arg(&lora)
        .arg("-o")
        .arg(dir.path().join("fp8.safetensors"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = TensorFile::open(&dir.path().join("fp8.safetensors")).unwrap();
    let dtype = |n: &str| f.get(n).unwrap().dtype;
    assert_eq!(
        dtype("model.diffusion_model.middle_block.1.proj_in.weight"),
        Dtype::F8E4M3
    );
    assert_eq!(
        dtype("model.diffusion_model.time_embed.0.weight"),
        Dtype::F16
    );
}
