//! Key maps: every module of every fixture LoRA must find its weight in the checkpoint it was
//! trained on, in both layouts, with a shape that fits; and the LDM ⇄ diffusers UNet names must
//! map the fixture models' real key sets onto each other.

mod common;

use loratool::adapter::Adapter;
use loratool::family::checkpoint::{checkpoint_family, KeyMap};
use loratool::family::layout::Layout;
use loratool::family::unet_names::{diffusers_to_ldm, ldm_to_diffusers};
use loratool::family::BaseModel;
use loratool::tensors::TensorFile;
use std::collections::HashSet;

fn open(rel: &str) -> TensorFile {
    TensorFile::open(&common::fixtures().join(rel)).unwrap()
}

#[test]
fn unet_names_map_the_fixture_models_onto_each_other() {
    for (ldm_file, diff_file) in [
        (
            "models/sd1_ldm.safetensors",
            "models/sd1_diffusers/unet/diffusion_pytorch_model.safetensors",
        ),
        (
            "models/sdxl_ldm.safetensors",
            "models/sdxl_diffusers/unet/diffusion_pytorch_model.safetensors",
        ),
    ] {
        let ldm: HashSet<String> = open(ldm_file)
            .tensors()
            .iter()
            .filter_map(|t| {
                t.name
                    .strip_prefix("model.diffusion_model.")
                    .map(str::to_string)
            })
            .collect();
        let diff: HashSet<String> = open(diff_file)
            .tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect();
        assert_eq!(ldm.len(), diff.len());
        let up_attn = |i: usize| {
            diff.iter()
                .any(|k| k.starts_with(&format!("up_blocks.{i}.attentions.")))
        };
        for k in &ldm {
            let d = ldm_to_diffusers(k).unwrap_or_else(|| panic!("{k} has no diffusers name"));
            assert!(diff.contains(&d), "{k} → {d} is not in {diff_file}");
            assert_eq!(diffusers_to_ldm(&d, up_attn).as_deref(), Some(k.as_str()));
        }
    }
}

#[test]
fn checkpoint_families() {
    assert_eq!(
        checkpoint_family(
            open("models/sd1_ldm.safetensors").tensors(),
            Layout::SingleFile
        ),
        BaseModel::Sd1
    );
    assert_eq!(
        checkpoint_family(
            open("models/sdxl_ldm.safetensors").tensors(),
            Layout::SingleFile
        ),
        BaseModel::Sdxl
    );
}

#[test]
fn every_fixture_module_finds_its_weight() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for e in common::adapter_entries() {
        let Some(model) = e["model"].as_str().filter(|m| m.starts_with("models/")) else {
            continue;
        };
        let adapter = Adapter::open(&common::fixtures().join(e["path"].as_str().unwrap())).unwrap();
        let ldm_model = model
            .replace("_diffusers", "_ldm.safetensors")
            .replace("_ldm.safetensors.safetensors", "_ldm.safetensors");
        let ckpt = open(&ldm_model);
        let family = checkpoint_family(ckpt.tensors(), Layout::SingleFile);
        let map = KeyMap::build(ckpt.tensors(), Layout::SingleFile, family);
        for m in &adapter.modules {
            checked += 1;
            match map.lookup(m) {
                None => failures.push(format!(
                    "{}: {} unmatched in {ldm_model}",
                    e["path"], m.name
                )),
                Some(t) => {
                    let info = ckpt.get(&t.weight).unwrap();
                    let rows = t.rows.as_ref().map(|r| r.len()).unwrap_or(info.shape[0]);
                    let numel = rows * info.numel() / info.shape[0];
                    let want: usize = m.shape.iter().product();
                    let fits = match m.kind.name() {
                        "ia3" | "norm" | "oft" | "boft" => true,
                        _ => want == numel,
                    };
                    if !fits {
                        failures.push(format!(
                            "{}: {} shape {:?} vs {} {:?}",
                            e["path"], m.name, m.shape, t.weight, info.shape
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
