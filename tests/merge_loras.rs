//! LoRA+LoRA merges: `concat` is the exact sum of deltas, `svd` is within 1.01× of the optimal
//! rank-R error, and a merged LoRA baked into a checkpoint equals baking its inputs one by one.

mod common;

use loratool::adapter::{delta, Adapter};
use loratool::family::kohya_names::module_kohya_name as kohya_name;
use loratool::family::BaseModel;
use loratool::linalg;
use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::merge_loras::{merge_loras, LoraMergeMethod, LoraMergeOptions};
use loratool::ops::patch_plan::LoraWeight;
use loratool::tensors::{Dtype, Tensor, TensorFile};
use std::collections::HashMap;

fn lw(rel: &str, w: f32) -> LoraWeight {
    LoraWeight::weighted(common::fixtures().join(rel), w)
}

/// Σ wᵢ·ΔWᵢ per output module name, from the peers' reference deltas.
fn expected_sum(inputs: &[(&str, &str, f32)], family: BaseModel) -> HashMap<String, Tensor> {
    let mut sum: HashMap<String, Tensor> = HashMap::new();
    for (lora, reference, w) in inputs {
        let a = Adapter::open(&common::fixtures().join(lora)).unwrap();
        let refs = TensorFile::open(&common::fixtures().join(reference)).unwrap();
        for m in &a.modules {
            let d = refs.read_f32(&m.name).unwrap();
            let e = sum
                .entry(kohya_name(m, family))
                .or_insert_with(|| Tensor::zeros(vec![d.numel()]));
            e.data
                .iter_mut()
                .zip(&d.data)
                .for_each(|(x, y)| *x += w * y);
        }
    }
    sum
}

const SD1_INPUTS: [(&str, &str, f32); 3] = [
    (
        "loras/sd1_kohya_lora.safetensors",
        "reference/sd1_kohya_lora.delta.safetensors",
        0.6,
    ),
    (
        "loras/sd1_peft.safetensors",
        "reference/sd1_peft.delta.safetensors",
        0.4,
    ),
    (
        "loras/sd1_loha.safetensors",
        "reference/sd1_loha.delta.safetensors",
        -0.3,
    ),
];

#[test]
fn concat_is_the_exact_sum_of_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.safetensors");
    let loras: Vec<LoraWeight> = SD1_INPUTS.iter().map(|(p, _, w)| lw(p, *w)).collect();
    let opts = LoraMergeOptions {
        method: LoraMergeMethod::Concat,
        dtype: Some(Dtype::F32),
        force: false,
        progress: Default::default(),
    };
    let report = merge_loras(&loras, &out, &opts).unwrap();
    assert_eq!(report.family, Some(BaseModel::Sd1));
    assert!(
        report.dense_modules > 0,
        "the LoHa modules go through the dense path"
    );
    let want = expected_sum(&SD1_INPUTS, BaseModel::Sd1);
    let merged = Adapter::open(&out).unwrap();
    assert_eq!(merged.modules.len(), want.len());
    for m in &merged.modules {
        let got = delta::delta(m, &merged.file).unwrap();
        let err = got.relative_error(&want[&m.name]);
        assert!(err <= 1e-5, "{}: relative error {err:.2e}", m.name);
    }
    let meta = merged.file.metadata();
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert_eq!(meta["modelspec.architecture"], "stable-diffusion-v1/lora");
    // sshs_model_hash is the data-section hash of the file actually written.
    let h = loratool::tensors::hash::hash_file(
        &out,
        Some(merged.file.as_safetensors().unwrap().data_start()),
    )
    .unwrap();
    assert_eq!(meta["sshs_model_hash"], h.addnet.unwrap());
}

#[test]
fn svd_is_within_one_percent_of_the_optimal_rank_r_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("svd.safetensors");
    let inputs = &SD1_INPUTS[..2];
    let loras: Vec<LoraWeight> = inputs.iter().map(|(p, _, w)| lw(p, *w)).collect();
    let rank = 3;
    let opts = LoraMergeOptions {
        method: LoraMergeMethod::Svd { rank },
        dtype: Some(Dtype::F32),
        force: false,
        progress: Default::default(),
    };
    merge_loras(&loras, &out, &opts).unwrap();
    let want = expected_sum(inputs, BaseModel::Sd1);
    let merged = Adapter::open(&out).unwrap();
    for m in &merged.modules {
        let exact = &want[&m.name];
        let got = delta::delta(m, &merged.file).unwrap();
        let (rows, cols) = (m.shape[0], exact.numel() / m.shape[0]);
        let sv = linalg::truncate_dense(&exact.data, rows, cols, rank)
            .unwrap()
            .singular_values;
        let optimal: f64 = sv.iter().skip(rank).map(|s| s * s).sum::<f64>().sqrt();
        let err = got.relative_error(exact) * exact.frobenius_norm();
        assert!(
            err <= 1.01 * optimal + 1e-6 * exact.frobenius_norm(),
            "{}: error {err:.3e} vs optimal {optimal:.3e}",
            m.name
        );
        assert!(m.rank.unwrap() <= rank);
    }
}

#[test]
fn a_merged_lora_bakes_in_like_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::fixtures().join("models/sdxl_ldm.safetensors");
    let loras = vec![
        lw("loras/sdxl_kohya_lora.safetensors", 0.6),
        lw("loras/sdxl_peft.safetensors", -0.4),
    ];
    let lora_out = dir.path().join("lora.safetensors");
    let opts = LoraMergeOptions {
        method: LoraMergeMethod::Concat,
        dtype: Some(Dtype::F32),
        force: false,
        progress: Default::default(),
    };
    merge_loras(&loras, &lora_out, &opts).unwrap();
    let mopts = MergeOptions {
        dtype: Some(Dtype::F32),
        strict: true,
        window_bytes: 1 << 20,
        ..Default::default()
    };
    let via_lora = dir.path().join("a.safetensors");
    merge_into_checkpoint(
        &base,
        &[LoraWeight::weighted(lora_out, 1.0)],
        &via_lora,
        &mopts,
    )
    .unwrap();
    let direct = dir.path().join("b.safetensors");
    merge_into_checkpoint(&base, &loras, &direct, &mopts).unwrap();
    let (a, b) = (
        TensorFile::open(&via_lora).unwrap(),
        TensorFile::open(&direct).unwrap(),
    );
    for t in b.tensors() {
        let (x, y) = (a.read_f32(&t.name).unwrap(), b.read_f32(&t.name).unwrap());
        assert!(x.relative_error(&y) <= 1e-5, "{}", t.name);
    }
}

/// Progress announces the merged LoRA's modules once (modules of several inputs that land on the
/// same output module count once) and counts each once.
#[test]
fn progress_counts_every_output_module_once() {
    let dir = tempfile::tempdir().unwrap();
    let loras = [
        LoraWeight::weighted(
            common::fixtures().join("loras/sd1_kohya_lora.safetensors"),
            0.6,
        ),
        LoraWeight::weighted(common::fixtures().join("loras/sd1_loha.safetensors"), 0.4),
    ];
    for (i, method) in [LoraMergeMethod::Concat, LoraMergeMethod::Svd { rank: 2 }]
        .into_iter()
        .enumerate()
    {
        let counted = std::sync::Arc::new(common::Counted::default());
        let report = merge_loras(
            &loras,
            &dir.path().join(format!("merged{i}.safetensors")),
            &LoraMergeOptions {
                method,
                dtype: None,
                force: false,
                progress: loratool::ops::progress::ProgressSink::new(counted.clone()),
            },
        )
        .unwrap();
        let modules = report.modules as u64;
        let inputs: usize = loras
            .iter()
            .map(|l| Adapter::open(&l.path).unwrap().modules.len())
            .sum();
        assert!(modules > 0 && (modules as usize) < inputs, "{method:?}");
        assert_eq!(*counted.starts.lock().unwrap(), vec![modules], "{method:?}");
        assert_eq!(
            counted.done.load(std::sync::atomic::Ordering::Relaxed),
            modules,
            "{method:?}"
        );
    }
}
