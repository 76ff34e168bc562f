//! The patch plan that merge and the preview sampler share: a patched tensor asked for by name is
//! what merge writes for it, and a weight-0 LoRA leaves every tensor bit-identical.

mod common;

use common::fixtures;
use loratool::family::layout::Checkpoint;
use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::patch_plan::{LoraWeight, PatchPlan, PlanOptions};
use loratool::tensors::{Dtype, TensorFile};

#[test]
fn patched_tensors_by_name_are_what_merge_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("models/sd1_ldm.safetensors");
    let loras = [
        LoraWeight::weighted(fixtures().join("loras/sd1_kohya_lora.safetensors"), 0.7),
        // DoRA goes through the whole-tensor path in merge.
        LoraWeight::weighted(fixtures().join("loras/sd1_dora.safetensors"), 0.4),
        LoraWeight {
            text_encoder: 0.0,
            ..LoraWeight::weighted(fixtures().join("loras/sd1_loha.safetensors"), -0.5)
        },
    ];
    let out = dir.path().join("merged.safetensors");
    let opts = MergeOptions {
        dtype: Some(Dtype::F32),
        window_bytes: 1 << 20,
        ..Default::default()
    };
    merge_into_checkpoint(&base, &loras, &out, &opts).unwrap();
    let merged = TensorFile::open(&out).unwrap();

    let checkpoint = Checkpoint::open(&base).unwrap();
    let plan = PatchPlan::build(&checkpoint, &loras, &PlanOptions::default()).unwrap();
    let original = TensorFile::open(&base).unwrap();
    let mut patched = 0;
    for t in original.tensors() {
        let (_, patches) = plan.find(&t.name).unwrap();
        let ours = plan.patched_tensor(&t.name).unwrap();
        let theirs = merged.read_f32(&t.name).unwrap();
        if patches.is_none() {
            assert_eq!(ours.data, original.read_f32(&t.name).unwrap().data);
            continue;
        }
        patched += 1;
        let err = ours.relative_error(&theirs);
        assert!(err <= 1e-6, "{}: {err:.2e}", t.name);
        // The LoHa's text-encoder modules have weight 0: they are not in the plan.
        for p in patches.unwrap() {
            let (adapter, m) = plan.module(p);
            assert!(
                !(adapter.file.path().ends_with("sd1_loha.safetensors")
                    && m.component.is_text_encoder()),
                "{}: a weight-0 patch",
                t.name
            );
        }
    }
    assert!(patched > 20, "{patched} tensors patched");
    assert_eq!(plan.matches.len(), 3);
    assert!(plan.patched_tensor("no.such.tensor").is_err());
}

#[test]
fn a_weight_0_lora_changes_no_bit() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("models/sd1_ldm.safetensors");
    let out = dir.path().join("merged.safetensors");
    let lora = LoraWeight::weighted(fixtures().join("loras/sd1_locon.safetensors"), 0.0);
    let report = merge_into_checkpoint(&base, &[lora], &out, &MergeOptions::default()).unwrap();
    assert_eq!(report.tensors_changed, 0);
    let (a, b) = (
        TensorFile::open(&base).unwrap(),
        TensorFile::open(&out).unwrap(),
    );
    for t in a.tensors() {
        assert_eq!(a.raw_bytes(&t.name).unwrap(), b.raw_bytes(&t.name).unwrap());
    }
}

/// A LoHa on q only of SDXL's fused OpenCLIP `in_proj_weight` goes through merge's whole-tensor
/// path on the q rows alone: k and v keep their stored bytes, q is what the whole tensor in f32
/// (the preview's `patched_tensor`) gives, rounded once.
#[test]
fn a_loha_on_q_of_a_fused_in_proj_leaves_k_and_v_bytes() {
    use loratool::tensors::writer::{write_all, TensorSpec, WriteOptions};
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("models/sdxl_ldm.safetensors");
    let source = TensorFile::open(&fixtures().join("loras/sdxl_loha.safetensors")).unwrap();
    let module = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.";
    let tensors: Vec<(TensorSpec, Vec<u8>)> = source
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with(module))
        .map(|t| {
            let spec = TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            };
            (spec, source.raw_bytes(&t.name).unwrap().into_owned())
        })
        .collect();
    assert!(tensors.iter().any(|(s, _)| s.name.ends_with("hada_w1_a")));
    let lora_path = dir.path().join("q_only_loha.safetensors");
    write_all(
        &lora_path,
        source.metadata(),
        &tensors,
        &WriteOptions::default(),
    )
    .unwrap();

    let loras = [LoraWeight::weighted(&lora_path, 0.9)];
    let out = dir.path().join("merged.safetensors");
    let report = merge_into_checkpoint(&base, &loras, &out, &MergeOptions::default()).unwrap();
    assert_eq!(report.tensors_changed, 1);
    let name = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight";
    let (original, merged) = (
        TensorFile::open(&base).unwrap(),
        TensorFile::open(&out).unwrap(),
    );
    let info = original.get(name).unwrap().clone();
    assert_eq!(info.dtype, Dtype::F16);
    let width = info.shape[1];
    let row = width * 2;
    let (stored, written) = (
        original.raw_bytes(name).unwrap(),
        merged.raw_bytes(name).unwrap(),
    );
    assert_eq!(written.len(), stored.len());
    assert_eq!(
        written[width * row..],
        stored[width * row..],
        "k and v rows"
    );
    let checkpoint = Checkpoint::open(&base).unwrap();
    let plan = PatchPlan::build(&checkpoint, &loras, &PlanOptions::default()).unwrap();
    let whole = Dtype::F16
        .encode_f32(&plan.patched_tensor(name).unwrap().data)
        .unwrap();
    assert_eq!(written[..width * row], whole[..width * row], "q rows");
    assert_ne!(written[..width * row], stored[..width * row], "q changed");
    for t in original.tensors().iter().filter(|t| t.name != name) {
        assert_eq!(
            merged.raw_bytes(&t.name).unwrap(),
            original.raw_bytes(&t.name).unwrap(),
            "{}",
            t.name
        );
    }
}
