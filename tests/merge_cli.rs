//! `loratool merge` refusals: every case gives one line naming the problem, a non-zero exit, no
//! file at the output path and untouched inputs.

mod common;

use common::{fixtures, loratool};
use std::path::{Path, PathBuf};
use std::process::Output;

fn sha(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn merge(args: &[&str]) -> Output {
    loratool().arg("merge").args(args).output().unwrap()
}

fn assert_refused(out: &Output, want: &str, output_path: &Path) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(want), "{stderr:?} should contain {want:?}");
    assert!(!output_path.exists(), "nothing at the output path");
    let dir = output_path.parent().unwrap();
    if dir.exists() {
        let leftovers: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("loratool"))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    }
}

fn fx(rel: &str) -> String {
    fixtures().join(rel).display().to_string()
}

fn write_stray_lora(path: &Path) {
    use loratool::tensors::writer::{write_all, TensorSpec, WriteOptions};
    use loratool::tensors::Dtype;
    let t = |name: &str, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let spec = TensorSpec {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
        };
        (spec, Dtype::F32.encode_f32(&vec![0.01; n]).unwrap())
    };
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let tensors = vec![
        t(&format!("{q}.lora_down.weight"), vec![2, 8]),
        t(&format!("{q}.lora_up.weight"), vec![8, 2]),
        t("lora_unet_not_a_layer.lora_down.weight", vec![2, 8]),
        t("lora_unet_not_a_layer.lora_up.weight", vec![8, 2]),
    ];
    let meta = [("ss_base_model_version".to_string(), "sd_v1".to_string())]
        .into_iter()
        .collect();
    write_all(path, &meta, &tensors, &WriteOptions::default()).unwrap();
}

#[test]
fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let out_s = out.display().to_string();
    let sd1 = fx("models/sd1_ldm.safetensors");
    let sdxl = fx("models/sdxl_ldm.safetensors");
    let before = [sha(Path::new(&sd1)), sha(Path::new(&sdxl))];

    assert_refused(
        &merge(&[
            "--base",
            &sd1,
            "--lora",
            &format!("{}:abc", fx("loras/sd1_kohya_lora.safetensors")),
            "-o",
            &out_s,
        ]),
        "weight 'abc' is not a number",
        &out,
    );
    assert_refused(
        &merge(&[
            "--base",
            &sd1,
            "--lora",
            &fx("loras/sdxl_kohya_lora.safetensors"),
            "-o",
            &out_s,
        ]),
        "this is a sdxl LoRA but",
        &out,
    );
    // The refusal names the flag that overrides it.
    assert_refused(
        &merge(&[
            "--base",
            &sd1,
            "--lora",
            &fx("loras/sdxl_kohya_lora.safetensors"),
            "-o",
            &out_s,
        ]),
        "(use --force to merge anyway)",
        &out,
    );
    // Forced across families, the shapes still cannot fit.
    assert_refused(
        &merge(&[
            "--base",
            &sd1,
            "--lora",
            &fx("loras/real_sd1_kohya.safetensors"),
            "-o",
            &out_s,
            "--force",
        ]),
        "does not fit",
        &out,
    );
    assert_refused(
        &merge(&[
            "--base",
            &sd1,
            "--lora",
            &fx("loras/sd1_kohya_lora.safetensors"),
            "-o",
            &sd1,
            "--force",
        ]),
        "refusing to write over an input file",
        &out,
    );
    let missing = dir.path().join("no/such/folder/out.safetensors");
    assert_refused(
        &merge(&[
            "--base",
            &sd1,
            "--lora",
            &fx("loras/sd1_kohya_lora.safetensors"),
            "-o",
            &missing.display().to_string(),
        ]),
        "output folder",
        &missing,
    );
    // One real module plus one that exists in no SD1 checkpoint.
    let stray = dir.path().join("stray.safetensors");
    write_stray_lora(&stray);
    let stray_s = stray.display().to_string();
    assert_refused(
        &merge(&["--base", &sd1, "--lora", &stray_s, "-o", &out_s, "--strict"]),
        "1 of 2 LoRA modules matched nothing in",
        &out,
    );
    let ok = merge(&["--base", &sd1, "--lora", &stray_s, "-o", &out_s]);
    assert!(ok.status.success());
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(
        stderr.contains(
            "1 of 2 LoRA modules matched nothing in the checkpoint: lora_unet_not_a_layer"
        ),
        "{stderr}"
    );
    std::fs::remove_file(&out).unwrap();
    // A LoRA with a NaN (a diverged training run) is refused before anything is written, in both
    // kinds of merge.
    let nan = dir.path().join("nan.safetensors");
    common::write_lora_with_a_nan(&nan);
    let nan_s = nan.display().to_string();
    for args in [
        vec!["--base", &sd1, "--lora", &nan_s, "-o", &out_s],
        vec![
            "--lora",
            &nan_s,
            "--lora",
            &fx("loras/sd1_kohya_lora.safetensors"),
            "-o",
            &out_s,
        ],
    ] {
        assert_refused(
            &merge(&args),
            "nan.safetensors: tensor 'lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight'",
            &out,
        );
        let stderr = String::from_utf8_lossy(&merge(&args).stderr).to_string();
        assert!(stderr.contains("contains NaN or Inf values"), "{stderr}");
    }
    assert_refused(
        &merge(&[
            "--base",
            &fx("loras/sd1_loha.safetensors"),
            "--lora",
            &fx("loras/sd1_kohya_lora.safetensors"),
            "-o",
            &out_s,
        ]),
        "not a model checkpoint",
        &out,
    );
    assert_eq!(
        before,
        [sha(Path::new(&sd1)), sha(Path::new(&sdxl))],
        "inputs untouched"
    );
}

#[test]
fn a_full_disk_leaves_nothing_behind() {
    // RLIMIT_FSIZE makes the write fail the way a full disk does (EFBIG instead of ENOSPC).
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().join("out.safetensors");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 200; exec '{}' merge --base '{}' --lora '{}' -o '{}' 2>'{}'",
            env!("CARGO_BIN_EXE_loratool"),
            fx("models/sdxl_ldm.safetensors"),
            fx("loras/sdxl_kohya_lora.safetensors"),
            out.display(),
            dir.path().join("stderr.txt").display()
        ))
        .status()
        .unwrap();
    assert!(!status.success());
    let stderr = std::fs::read_to_string(dir.path().join("stderr.txt")).unwrap();
    assert!(
        stderr.contains(&out.display().to_string()) && stderr.contains("too large"),
        "{stderr}"
    );
    assert!(!out.exists());
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["stderr.txt".to_string()]);
}
