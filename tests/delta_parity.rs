//! Delta math against the peers: every module of every fixture LoRA must reproduce the ΔW (or,
//! for kinds that depend on the base weight, the merged weight) that diffusers/peft or LyCORIS
//! computed for it (fixtures/reference/*.delta.safetensors, written by fixtures/generate.py).

mod common;

use loratool::adapter::{delta, Adapter, ModuleKind};
use loratool::tensors::{Tensor, TensorFile};

/// f32 math on the same stored factors: only summation order differs from torch.
const TOLERANCE: f64 = 1e-5;

fn compare(what: &str, got: &Tensor, want: &Tensor, failures: &mut Vec<String>) {
    if got.numel() != want.numel() {
        failures.push(format!(
            "{what}: {} values, reference has {}",
            got.numel(),
            want.numel()
        ));
        return;
    }
    let err = got.relative_error(want);
    if err.is_nan() || err > TOLERANCE {
        failures.push(format!("{what}: relative error {err:.3e}"));
    }
}

#[test]
fn every_module_matches_its_peer_reference() {
    let mut failures = Vec::new();
    let mut checked = 0usize;
    let mut kinds = std::collections::BTreeSet::new();
    for e in common::adapter_entries() {
        let Some(reference) = e["reference"].as_str() else {
            continue;
        };
        let rel = e["path"].as_str().unwrap();
        let adapter = Adapter::open(&common::fixtures().join(rel)).unwrap();
        let refs = TensorFile::open(&common::fixtures().join(reference)).unwrap();
        for m in &adapter.modules {
            let what = format!("{rel}: {}", m.name);
            let merged_key = format!("{}.merged", m.name);
            if refs.get(&merged_key).is_some() {
                let base = refs.read_f32(&format!("{}.base", m.name)).unwrap();
                for (mult, key) in [
                    (1.0f32, merged_key.clone()),
                    (0.5, format!("{}.merged_0.5", m.name)),
                ] {
                    if refs.get(&key).is_none() {
                        continue;
                    }
                    match delta::apply(m, &adapter.file, &base, mult) {
                        Ok(got) => compare(
                            &format!("{what} (×{mult})"),
                            &got,
                            &refs.read_f32(&key).unwrap(),
                            &mut failures,
                        ),
                        Err(err) => failures.push(format!("{what}: {err}")),
                    }
                }
            } else {
                match refs.read_f32(&m.name) {
                    Ok(want) => match delta::delta(m, &adapter.file) {
                        Ok(got) => compare(&what, &got, &want, &mut failures),
                        Err(err) => failures.push(format!("{what}: {err}")),
                    },
                    Err(_) => {
                        failures.push(format!("{what}: no reference tensor"));
                        continue;
                    }
                }
            }
            let bias_key = format!("{}.bias_delta", m.name);
            if refs.get(&bias_key).is_some() {
                match delta::bias_delta(m, &adapter.file).unwrap() {
                    Some(b) => compare(
                        &format!("{what} bias"),
                        &b,
                        &refs.read_f32(&bias_key).unwrap(),
                        &mut failures,
                    ),
                    None => failures.push(format!("{what}: bias delta missing")),
                }
            }
            kinds.insert(if m.dora { "dora" } else { m.kind.name() });
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} modules differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    for k in [
        ModuleKind::Lora,
        ModuleKind::Loha,
        ModuleKind::Lokr,
        ModuleKind::Ia3,
        ModuleKind::Full,
        ModuleKind::Norm,
    ] {
        assert!(
            kinds.contains(k.name()),
            "no {} module was checked",
            k.name()
        );
    }
    assert!(kinds.contains("dora"));
}
