//! `inspect` must report exactly what the fixture generator recorded for every fixture.

mod common;

use loratool::ops::inspect::{inspect_file, InspectOptions};

#[test]
fn inspect_matches_the_generator_for_every_fixture() {
    let entries = common::adapter_entries();
    assert!(
        entries.len() >= 30,
        "manifest lists {} adapters",
        entries.len()
    );
    let mut failures = Vec::new();
    for e in &entries {
        let rel = e["path"].as_str().unwrap();
        let path = common::fixtures().join(rel);
        let rep = match inspect_file(&path, InspectOptions::default()) {
            Ok(r) => r,
            Err(err) => {
                failures.push(format!("{rel}: {err}"));
                continue;
            }
        };
        let got = serde_json::to_value(&rep).unwrap();
        for field in ["format", "network", "base_model", "rank", "dtype"] {
            if got[field] != e[field] {
                failures.push(format!(
                    "{rel}: {field} = {} but generator says {}",
                    got[field], e[field]
                ));
            }
        }
        let alpha_ok = match (got["alpha"].as_f64(), e["alpha"].as_f64()) {
            (Some(a), Some(b)) => (a - b).abs() < 1e-6,
            (None, None) => true,
            _ => false,
        };
        if !alpha_ok {
            failures.push(format!(
                "{rel}: alpha = {} but generator says {}",
                got["alpha"], e["alpha"]
            ));
        }
        if got["module_count"] != e["module_count"] {
            failures.push(format!(
                "{rel}: module_count = {} but generator says {}",
                got["module_count"], e["module_count"]
            ));
        }
        if got["modules_by_component"] != e["modules_by_component"] {
            failures.push(format!(
                "{rel}: modules_by_component = {} but generator says {}",
                got["modules_by_component"], e["modules_by_component"]
            ));
        }
        if let Some(n) = e["tensor_count"].as_u64() {
            if got["tensor_count"].as_u64() != Some(n) {
                failures.push(format!(
                    "{rel}: tensor_count = {} but generator says {n}",
                    got["tensor_count"]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every SD1 LoRA fixture's keys must say sd1 (or nothing), never another family: LoHa and
/// low-rank LoKr factors of a 1×1 conv `proj_in` are 2-D and once read as SD2's linear one.
#[test]
fn every_sd1_fixture_is_detected_sd1_without_conflict() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for e in common::adapter_entries() {
        let rel = e["path"].as_str().unwrap();
        if !rel.starts_with("loras/") || e["base_model"] != "sd1" {
            continue;
        }
        let rep = inspect_file(&common::fixtures().join(rel), InspectOptions::default())
            .unwrap_or_else(|err| panic!("{rel}: {err}"));
        let keys = rep.base_model_keys.map(|b| b.name());
        if rep.base_model.name() != "sd1" || keys.is_some_and(|k| k != "sd1") {
            failures.push(format!(
                "{rel}: detected {} (keys: {keys:?})",
                rep.base_model.name()
            ));
        }
        if let Some(w) = rep.warnings.iter().find(|w| w.contains("keys say")) {
            failures.push(format!("{rel}: {w}"));
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} sd1 fixtures");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
