//! Similarity of two LoRAs: the exact cosine against the dense computation, resized, converted,
//! negated and unrelated copies, and the sketch estimate against the exact value.

mod common;

use common::write_random_lora;
use loratool::adapter::{delta, Adapter};
use loratool::family::{self, kohya_names::module_kohya_name};
use loratool::library::similarity::{exact_similarity, Sketch};
use loratool::ops::convert::{convert_adapter, ConvertOptions, TargetFormat};
use loratool::ops::resize::{resize_lora, RankRule, ResizeOptions, ResizeReport};
use loratool::tensors::writer::{write_all, TensorSpec, WriteOptions};
use loratool::tensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn lora_path(name: &str) -> PathBuf {
    common::fixtures().join(format!("loras/{name}.safetensors"))
}

fn open(name: &str) -> Adapter {
    Adapter::open(&lora_path(name)).unwrap()
}

/// The definition, computed the slow way: every module's dense ΔW (`delta::delta`), summed per
/// weight (kohya name + shape), inner products in f64.
fn dense_cosine(a: &Adapter, b: &Adapter) -> f64 {
    let dense = |x: &Adapter| -> BTreeMap<(String, Vec<usize>), Vec<f64>> {
        let fam = family::detect(x.file.metadata(), &x.modules).base_model;
        let mut out: BTreeMap<(String, Vec<usize>), Vec<f64>> = BTreeMap::new();
        for m in &x.modules {
            let Ok(d) = delta::delta(m, &x.file) else {
                continue;
            };
            let shape = vec![d.rows(), d.cols()];
            let e = out
                .entry((module_kohya_name(m, fam), shape))
                .or_insert_with(|| vec![0.0; d.numel()]);
            e.iter_mut().zip(&d.data).for_each(|(s, v)| *s += *v as f64);
        }
        out
    };
    let (da, db) = (dense(a), dense(b));
    let norm = |d: &BTreeMap<_, Vec<f64>>| -> f64 {
        d.values()
            .flat_map(|v| v.iter())
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
    };
    let cross: f64 = da
        .iter()
        .filter_map(|(k, x)| {
            db.get(k)
                .map(|y| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>())
        })
        .sum();
    cross / (norm(&da) * norm(&db))
}

fn resize_into(src: &Path, out: &Path, rule: RankRule) -> ResizeReport {
    let opts = ResizeOptions {
        rule,
        max_rank: None,
        dtype: Some(Dtype::F32),
        force: true,
        progress: Default::default(),
    };
    resize_lora(src, out, &opts).unwrap()
}

#[test]
fn exact_cosine_equals_the_dense_computation() {
    let dir = tempfile::tempdir().unwrap();
    let mut pairs: Vec<(Adapter, Adapter, String)> = Vec::new();
    for (a, b) in [
        ("sd1_kohya_lora", "sd1_locon"),
        ("sd1_kohya_lora", "sd1_peft"),
        ("sd1_locon", "sd1_loha"),
        ("sd1_loha", "sd1_mixed"),
        ("sd1_lokr_lowrank", "sd1_full"),
        ("sd1_locon_tucker", "sd1_loha_tucker"),
        ("sd1_dora", "sd1_peft_rslora"),
    ] {
        pairs.push((open(a), open(b), format!("{a} / {b}")));
    }
    // Correlated pairs across kinds: each fixture against its rank-2 resize (a plain LoRA).
    for name in [
        "sd1_kohya_lora",
        "sd1_locon",
        "sd1_loha",
        "sd1_loha_tucker",
        "sd1_locon_tucker",
        "sd1_lokr_lowrank",
        "sd1_lokr_full",
        "sd1_full",
        "sd1_peft",
    ] {
        let out = dir.path().join(format!("{name}_r2.safetensors"));
        resize_into(&lora_path(name), &out, RankRule::Fixed(2));
        pairs.push((
            open(name),
            Adapter::open(&out).unwrap(),
            format!("{name} / rank 2"),
        ));
    }
    for (a, b, label) in &pairs {
        let exact = exact_similarity(a, b).unwrap();
        let dense = dense_cosine(a, b);
        assert!(
            (exact.cosine - dense).abs() <= 1e-6,
            "{label}: exact {} dense {dense}",
            exact.cosine
        );
        assert!(exact.shared_modules > 0, "{label}");
    }
}

#[test]
fn one_lora_in_kohya_and_peft_spelling_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    for (name, to) in [
        ("sd1_kohya_lora", TargetFormat::Peft),
        ("sd1_peft", TargetFormat::Kohya),
        ("sdxl_peft", TargetFormat::Kohya),
    ] {
        let out = dir.path().join(format!("{name}_converted.safetensors"));
        convert_adapter(&lora_path(name), &out, to, &ConvertOptions::default()).unwrap();
        let (a, b) = (open(name), Adapter::open(&out).unwrap());
        let s = exact_similarity(&a, &b).unwrap();
        assert!((s.cosine - 1.0).abs() < 1e-6, "{name}: {}", s.cosine);
        assert_eq!(s.shared_modules, a.modules.len(), "{name}");
        assert_eq!(
            (s.modules_a, s.modules_b),
            (s.shared_modules, s.shared_modules)
        );
        let e = Sketch::of(&a).unwrap().estimate(&Sketch::of(&b).unwrap());
        assert!((e - 1.0).abs() < 1e-4, "{name}: estimate {e}");
    }
}

#[test]
fn a_resized_copy_is_similar() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("r16.safetensors");
    write_random_lora(&src, &open("sd1_kohya_lora"), 16, 1, 0.75);
    let out = dir.path().join("r8.safetensors");
    let report = resize_into(&src, &out, RankRule::Fixed(8));
    let (a, b) = (Adapter::open(&src).unwrap(), Adapter::open(&out).unwrap());
    let s = exact_similarity(&a, &b).unwrap();
    assert!(s.cosine > 0.95, "{}", s.cosine);
    let e = Sketch::of(&a).unwrap().estimate(&Sketch::of(&b).unwrap());
    assert!(e > 0.95, "estimate {e}");

    // A truncation T of X has ⟨X, T⟩ = ‖T‖², so the cosine is ‖T‖/‖X‖: the energy resize kept.
    for (name, rank) in [("sd1_kohya_lora", 3), ("sd1_locon", 1)] {
        let out = dir.path().join(format!("{name}_{rank}.safetensors"));
        let report2 = resize_into(&lora_path(name), &out, RankRule::Fixed(rank));
        let a = open(name);
        check_kept_energy(&a, &Adapter::open(&out).unwrap(), &report2, name);
    }
    check_kept_energy(&a, &b, &report, "random r16");
}

fn check_kept_energy(a: &Adapter, b: &Adapter, report: &ResizeReport, label: &str) {
    let (mut total, mut kept) = (0f64, 0f64);
    for (m, r) in a.modules.iter().zip(&report.modules) {
        assert_eq!(m.name, r.name);
        let n2 = delta::delta_norm(m, &a.file).unwrap().unwrap().powi(2);
        total += n2;
        kept += n2 * r.retained_fro.powi(2);
    }
    let s = exact_similarity(a, b).unwrap();
    let want = (kept / total).sqrt();
    assert!(
        (s.cosine - want).abs() < 1e-6,
        "{label}: cosine {} but resize kept {want}",
        s.cosine
    );
}

#[test]
fn unrelated_loras_are_not_similar() {
    let dir = tempfile::tempdir().unwrap();
    let template = open("sd1_kohya_lora");
    let (p1, p2) = (
        dir.path().join("x.safetensors"),
        dir.path().join("y.safetensors"),
    );
    write_random_lora(&p1, &template, 8, 11, 0.8);
    write_random_lora(&p2, &template, 8, 12, 0.8);
    let (x, y) = (Adapter::open(&p1).unwrap(), Adapter::open(&p2).unwrap());
    let cases = [
        (x, y, "two random LoRAs of one layout"),
        (
            open("sd1_kohya_lora"),
            open("sd1_peft"),
            "sd1_kohya_lora / sd1_peft",
        ),
        (
            open("real_sd1_kohya"),
            open("sd1_kohya_lora"),
            "real_sd1_kohya / sd1_kohya_lora",
        ),
    ];
    for (a, b, label) in &cases {
        let s = exact_similarity(a, b).unwrap();
        let e = Sketch::of(a).unwrap().estimate(&Sketch::of(b).unwrap());
        assert!(s.cosine.abs() < 0.2, "{label}: {}", s.cosine);
        assert!(e.abs() < 0.2, "{label}: estimate {e}");
        assert!(
            s.cosine.abs() <= (s.shared_energy_a * s.shared_energy_b).sqrt() + 1e-12,
            "{label}"
        );
    }
    // Same family, different widths: no weight in common.
    let s = exact_similarity(&cases[2].0, &cases[2].1).unwrap();
    assert_eq!((s.shared_modules, s.cosine), (0, 0.0));
    // One layout: every weight shared.
    let s = exact_similarity(&cases[0].0, &cases[0].1).unwrap();
    assert_eq!(s.shared_modules, template.modules.len());
}

#[test]
fn a_negated_copy_is_minus_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = loratool::tensors::TensorFile::open(&lora_path("sd1_kohya_lora")).unwrap();
    let tensors: Vec<(TensorSpec, Vec<u8>)> = src
        .tensors()
        .iter()
        .map(|t| {
            let mut v = src.read_f32(&t.name).unwrap();
            if t.name.ends_with(".lora_up.weight") {
                v.data.iter_mut().for_each(|x| *x = -*x);
            }
            TensorSpec::encode(t.name.clone(), &v, t.dtype)
        })
        .collect();
    let out = dir.path().join("neg.safetensors");
    write_all(&out, src.metadata(), &tensors, &WriteOptions::default()).unwrap();
    let (a, b) = (open("sd1_kohya_lora"), Adapter::open(&out).unwrap());
    let s = exact_similarity(&a, &b).unwrap();
    assert!((s.cosine + 1.0).abs() < 1e-12, "{}", s.cosine);
    let e = Sketch::of(&a).unwrap().estimate(&Sketch::of(&b).unwrap());
    assert!((e + 1.0).abs() < 1e-5, "estimate {e}");
}

/// The sketch's documented error (docs/DELTA_MATH.md): |estimate − exact| ≤ 0.1 for every pair,
/// rms ≤ 0.03, over random LoRAs, their resized copies (cosines 0.3–1) and the fixtures of every
/// kind that has a delta (36–264 modules each).
#[test]
fn sketch_estimate_is_within_its_documented_error() {
    let dir = tempfile::tempdir().unwrap();
    let template = open("sd1_kohya_lora");
    let mut files = Vec::new();
    for seed in 0..2u64 {
        let p = dir.path().join(format!("s{seed}.safetensors"));
        write_random_lora(&p, &template, 16, seed, 0.8);
        files.push(p.clone());
        for r in [1, 2, 4] {
            let q = dir.path().join(format!("s{seed}_{r}.safetensors"));
            resize_into(&p, &q, RankRule::Fixed(r));
            files.push(q);
        }
    }
    for n in ["sd1_locon", "sd1_loha", "sd1_peft", "sd1_mixed"] {
        files.push(lora_path(n));
        let q = dir.path().join(format!("{n}_1.safetensors"));
        resize_into(&lora_path(n), &q, RankRule::Fixed(1));
        files.push(q);
    }
    let adapters: Vec<Adapter> = files.iter().map(|p| Adapter::open(p).unwrap()).collect();
    let sketches: Vec<Sketch> = adapters.iter().map(|a| Sketch::of(a).unwrap()).collect();
    let (mut sq, mut n, mut similar) = (0f64, 0, 0);
    for i in 0..adapters.len() {
        for j in i + 1..adapters.len() {
            let exact = exact_similarity(&adapters[i], &adapters[j]).unwrap().cosine;
            let err = (sketches[i].estimate(&sketches[j]) - exact).abs();
            assert!(
                err <= 0.1,
                "{:?} / {:?}: exact {exact}, error {err}",
                files[i],
                files[j]
            );
            sq += err * err;
            n += 1;
            similar += usize::from(exact > 0.3);
        }
    }
    let rms = (sq / n as f64).sqrt();
    assert!(rms <= 0.03, "rms error {rms} over {n} pairs");
    assert!(similar >= 10, "only {similar} similar pairs");
}
