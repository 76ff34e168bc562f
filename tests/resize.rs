//! `resize`: lossless at or above the true rank, optimal below it, for LoRA and dense kinds.

mod common;

use loratool::adapter::{delta, Adapter};
use loratool::linalg;
use loratool::ops::resize::{resize_lora, RankRule, ResizeOptions};
use loratool::tensors::{Dtype, TensorFile};

fn resize(lora: &str, rule: RankRule, out: &std::path::Path) -> Adapter {
    let opts = ResizeOptions {
        rule,
        max_rank: None,
        dtype: Some(Dtype::F32),
        force: true,
        progress: Default::default(),
    };
    resize_lora(
        &common::fixtures().join(format!("loras/{lora}.safetensors")),
        out,
        &opts,
    )
    .unwrap();
    Adapter::open(out).unwrap()
}

#[test]
fn at_or_above_the_true_rank_resize_is_lossless() {
    let dir = tempfile::tempdir().unwrap();
    for (lora, rank) in [
        ("sd1_kohya_lora", 4),
        ("sd1_kohya_lora", 16),
        ("sd1_peft_rslora", 8),
        ("sd1_loha", 64),
        ("sd1_lokr_lowrank", 256),
        ("sd1_locon_tucker", 64),
    ] {
        let out = dir.path().join(format!("{lora}_{rank}.safetensors"));
        let resized = resize(lora, RankRule::Fixed(rank), &out);
        let original =
            Adapter::open(&common::fixtures().join(format!("loras/{lora}.safetensors"))).unwrap();
        let refs = TensorFile::open(
            &common::fixtures().join(format!("reference/{lora}.delta.safetensors")),
        )
        .unwrap();
        assert_eq!(resized.modules.len(), original.modules.len());
        for (o, r) in original.modules.iter().zip(&resized.modules) {
            let want = refs.read_f32(&o.name).unwrap();
            let got = delta::delta(r, &resized.file).unwrap();
            let err = got.relative_error(&want);
            assert!(err <= 1e-5, "{lora} → {rank}: {} error {err:.2e}", o.name);
        }
    }
}

#[test]
fn below_the_true_rank_resize_is_optimal_and_reports_retained_energy() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r3.safetensors");
    let rank = 3;
    let opts = ResizeOptions {
        rule: RankRule::Fixed(rank),
        max_rank: None,
        dtype: Some(Dtype::F32),
        force: true,
        progress: Default::default(),
    };
    let report = resize_lora(
        &common::fixtures().join("loras/sdxl_kohya_lora.safetensors"),
        &out,
        &opts,
    )
    .unwrap();
    let resized = Adapter::open(&out).unwrap();
    let refs =
        TensorFile::open(&common::fixtures().join("reference/sdxl_kohya_lora.delta.safetensors"))
            .unwrap();
    for (m, rep) in resized.modules.iter().zip(&report.modules) {
        assert_eq!(m.rank, Some(rank));
        let want = refs.read_f32(&m.name).unwrap();
        let got = delta::delta(m, &resized.file).unwrap();
        let cols = want.numel() / m.shape[0];
        let sv = linalg::truncate_dense(&want.data, m.shape[0], cols, rank)
            .unwrap()
            .singular_values;
        let total: f64 = sv.iter().map(|s| s * s).sum();
        let optimal = sv.iter().skip(rank).map(|s| s * s).sum::<f64>().sqrt();
        let err = got.relative_error(&want) * want.frobenius_norm();
        assert!(
            err <= 1.01 * optimal + 1e-6 * want.frobenius_norm(),
            "{}: {err:.3e} vs optimal {optimal:.3e}",
            m.name
        );
        let retained = (sv.iter().take(rank).map(|s| s * s).sum::<f64>() / total).sqrt();
        assert!((rep.retained_fro - retained).abs() < 1e-4, "{}", m.name);
    }
    let meta = resized.file.metadata();
    assert_eq!(meta["ss_network_dim"], "3");
    assert!(meta["ss_training_comment"].starts_with("dimension is resized from 8 to 3"));
}

#[test]
fn dynamic_resize_reaches_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dyn.safetensors");
    let opts = ResizeOptions {
        rule: RankRule::SvFro(0.9),
        max_rank: None,
        dtype: Some(Dtype::F32),
        force: true,
        progress: Default::default(),
    };
    let report = resize_lora(
        &common::fixtures().join("loras/sd1_kohya_lora.safetensors"),
        &out,
        &opts,
    )
    .unwrap();
    assert!(report.modules.iter().all(|m| m.retained_fro >= 0.9 - 1e-9));
    assert!(
        report.modules.iter().any(|m| m.new_rank < 4),
        "some module should shrink"
    );
    let capped = ResizeOptions {
        max_rank: Some(2),
        ..opts
    };
    let report = resize_lora(
        &common::fixtures().join("loras/sd1_kohya_lora.safetensors"),
        &out,
        &capped,
    )
    .unwrap();
    assert!(report.modules.iter().all(|m| m.new_rank <= 2));
}

/// A LoRA holding a NaN is refused with the tensor named, and nothing is written.
#[test]
fn a_lora_with_nan_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let nan = dir.path().join("nan.safetensors");
    common::write_lora_with_a_nan(&nan);
    let out = dir.path().join("out.safetensors");
    let opts = ResizeOptions {
        rule: RankRule::Fixed(2),
        max_rank: None,
        dtype: None,
        force: false,
        progress: Default::default(),
    };
    let err = resize_lora(&nan, &out, &opts).unwrap_err().to_string();
    assert!(
        err.contains("nan.safetensors")
            && err.contains("self_attn_q_proj.lora_up.weight")
            && err.contains("contains NaN or Inf values"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Progress announces every module of the input once and counts each once, resized or copied.
#[test]
fn progress_counts_every_module_once() {
    let dir = tempfile::tempdir().unwrap();
    for lora in ["sd1_kohya_lora", "sd1_mixed"] {
        let input = common::fixtures().join(format!("loras/{lora}.safetensors"));
        let modules = Adapter::open(&input).unwrap().modules.len() as u64;
        let counted = std::sync::Arc::new(common::Counted::default());
        let report = resize_lora(
            &input,
            &dir.path().join(format!("{lora}.safetensors")),
            &ResizeOptions {
                rule: RankRule::Fixed(2),
                max_rank: None,
                dtype: None,
                force: false,
                progress: loratool::ops::progress::ProgressSink::new(counted.clone()),
            },
        )
        .unwrap();
        assert_eq!(
            (report.modules.len() + report.copied) as u64,
            modules,
            "{lora}"
        );
        assert_eq!(*counted.starts.lock().unwrap(), vec![modules], "{lora}");
        assert_eq!(
            counted.done.load(std::sync::atomic::Ordering::Relaxed),
            modules,
            "{lora}"
        );
    }
}
