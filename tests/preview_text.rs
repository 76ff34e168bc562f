//! The preview's text encoder against transformers' CLIPTextModel (fixtures/preview, made by
//! fixtures/generate_preview_text.py), and LoRAs applied at load time against the checkpoint
//! `merge` writes.

mod common;
use common::{fixture, max_rel_error};

use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{LoraWeight, PatchPlan, PlanOptions};
use loratool::preview::clip::{ClipConfig, ClipTextEncoder};
use loratool::preview::weights::Weights;
use loratool::tensors::TensorFile;
use std::path::Path;

fn reference(name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = TensorFile::open(&fixture("preview/clip_sd1.safetensors")).unwrap();
    let t = f.read_f32(name).unwrap();
    (t.shape, t.data)
}

fn tokens() -> Vec<Vec<u32>> {
    let (shape, data) = reference("tokens");
    data.chunks(shape[1])
        .map(|c| c.iter().map(|v| *v as u32).collect())
        .collect()
}

fn hidden(ck: &Path, loras: &[LoraWeight], skip: usize) -> Vec<f32> {
    let checkpoint = Checkpoint::open(ck).unwrap();
    let plan = PatchPlan::build(&checkpoint, loras, &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan);
    // The tiny encoder has 2 heads of 8 (its config.json); real CLIP-L's rule gives 12.
    let config = ClipConfig::infer(&weights, Some(2)).unwrap();
    assert_eq!((config.hidden, config.layers, config.vocab), (16, 12, 1000));
    let encoder = ClipTextEncoder::load(&weights, config).unwrap();
    let out = encoder.encode(&tokens(), skip).unwrap();
    assert_eq!(out.dims(), &[3, 77, 16]);
    out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn hidden_states_match_transformers_for_clip_skip_1_and_2() {
    for (skip, name) in [(1, "skip1"), (2, "skip2")] {
        let got = hidden(&fixture("models/sd1_ldm.safetensors"), &[], skip);
        let (_, want) = reference(name);
        let err = max_rel_error(&got, &want);
        assert!(err <= 1e-5, "clip skip {skip}: relative error {err}");
    }
    // The diffusers pipeline folder holds the same weights: the same states.
    let folder = hidden(&fixture("models/sd1_diffusers"), &[], 1);
    let (_, want) = reference("skip1");
    assert!(max_rel_error(&folder, &want) <= 1e-5);
}

#[test]
fn a_lora_at_load_equals_the_merged_checkpoint_and_weight_zero_changes_nothing() {
    let base = fixture("models/sd1_ldm.safetensors");
    let lora = fixture("loras/sd1_kohya_lora.safetensors");
    let plain = hidden(&base, &[], 1);
    let zero = hidden(&base, &[LoraWeight::weighted(&lora, 0.0)], 1);
    assert_eq!(plain, zero, "a weight-0 LoRA is bit-identical to none");

    let at_load = hidden(&base, &[LoraWeight::weighted(&lora, 0.7)], 1);
    assert!(
        max_rel_error(&at_load, &plain) > 1e-3,
        "the LoRA changes the text encoder"
    );
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged.safetensors");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
        .arg("merge")
        .arg("--base")
        .arg(&base)
        .arg("--lora")
        .arg(format!("{}:0.7", lora.display()))
        .args(["--dtype", "f32", "-o"])
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_merge = hidden(&merged, &[], 1);
    let err = max_rel_error(&at_load, &from_merge);
    assert!(err <= 1e-5, "LoRA at load vs merged: relative error {err}");
}

#[test]
fn emphasis_scales_states_and_restores_their_mean_as_a1111_does() {
    let checkpoint = Checkpoint::open(&fixture("models/sd1_ldm.safetensors")).unwrap();
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan);
    let config = ClipConfig::infer(&weights, Some(2)).unwrap();
    let encoder = ClipTextEncoder::load(&weights, config).unwrap();
    let (_, multipliers) = reference("multipliers");
    let (_, want) = reference("weighted_skip1");
    let mut got = Vec::new();
    for (i, seq) in tokens().iter().enumerate() {
        let m: Vec<f64> = multipliers[i * 77..(i + 1) * 77]
            .iter()
            .map(|v| *v as f64)
            .collect();
        let z = encoder.encode_weighted(seq, &m, 1).unwrap();
        got.extend(z.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let err = max_rel_error(&got, &want);
    assert!(err <= 1e-5, "relative error {err}");
    let e = encoder
        .encode_weighted(&tokens()[0], &[1.0; 3], 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 emphasis multipliers for 77 tokens"), "{e}");
}

#[test]
fn bad_clip_skip_and_tokens_are_errors() {
    let checkpoint = Checkpoint::open(&fixture("models/sd1_ldm.safetensors")).unwrap();
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan);
    let encoder =
        ClipTextEncoder::load(&weights, ClipConfig::infer(&weights, Some(2)).unwrap()).unwrap();
    let e = encoder.encode(&tokens(), 13).unwrap_err().to_string();
    assert!(
        e.contains("clip skip 13: this text encoder has 12 layers"),
        "{e}"
    );
    let e = encoder
        .encode(&[vec![5000; 77]], 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("token id 5000 is outside"), "{e}");
}
