//! Checkpoints are recognised by their tensors, never by folder or file name: diffusers component
//! files saved under any name, in any folder, merge and extract exactly as inside their pipeline.

mod common;

use common::{fixtures, loratool};
use loratool::family::layout::{detect, Checkpoint, Content, Layout};
use loratool::family::{BaseModel, Component};
use loratool::ops::convert::TargetFormat;
use loratool::ops::extract::{extract_lora, ExtractOptions};
use loratool::ops::merge::{merge_into_checkpoint, MergeOptions};
use loratool::ops::patch_plan::LoraWeight;
use loratool::tensors::{Dtype, TensorFile};
use std::path::{Path, PathBuf};

fn merge(base: &Path, lora: &str, out: &Path) -> loratool::Result<()> {
    let opts = MergeOptions {
        strict: false,
        window_bytes: 1 << 20,
        ..Default::default()
    };
    let lora = LoraWeight::weighted(fixtures().join(lora), 0.7);
    merge_into_checkpoint(base, &[lora], out, &opts).map(|_| ())
}

/// Copies a pipeline component file to `downloads/<name>` in `dir`.
fn renamed(dir: &Path, component: &str, name: &str) -> PathBuf {
    let folder = dir.join("downloads");
    std::fs::create_dir_all(&folder).unwrap();
    let from = std::fs::read_dir(fixtures().join("models/sd1_diffusers").join(component))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let to = folder.join(name);
    std::fs::copy(from, &to).unwrap();
    to
}

#[test]
fn component_files_under_any_name_merge_as_in_their_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lora = "loras/sd1_kohya_lora.safetensors";
    let pipeline_out = d.join("pipeline_out");
    merge(
        &fixtures().join("models/sd1_diffusers"),
        lora,
        &pipeline_out,
    )
    .unwrap();

    for (component, name) in [
        ("unet", "sd15_unet.safetensors"),
        ("text_encoder", "clip-l.safetensors"),
    ] {
        let base = renamed(d, component, name);
        let expected = match component {
            "unet" => Content::Model(Layout::DiffusersComponent(Component::Unet)),
            _ => Content::Model(Layout::DiffusersComponent(Component::TextEncoder)),
        };
        assert_eq!(
            detect(TensorFile::open(&base).unwrap().tensors()),
            Some(expected)
        );
        let out = d.join(format!("merged_{name}"));
        merge(&base, lora, &out).unwrap_or_else(|e| panic!("{name}: {e}"));
        let inside = std::fs::read_dir(pipeline_out.join(component))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .unwrap();
        let (a, b) = (
            TensorFile::open(&out).unwrap(),
            TensorFile::open(&inside).unwrap(),
        );
        let mut changed = 0;
        for t in a.tensors() {
            let (x, y) = (a.raw_bytes(&t.name).unwrap(), b.raw_bytes(&t.name).unwrap());
            assert_eq!(x, y, "{name}: {}", t.name);
            let base_bytes = TensorFile::open(&base)
                .unwrap()
                .raw_bytes(&t.name)
                .unwrap()
                .to_vec();
            changed += usize::from(*x != *base_bytes);
        }
        assert!(changed > 0, "{name}: the LoRA changed something");
    }
}

#[test]
fn files_that_are_not_checkpoints_are_named_as_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vae = renamed(d, "vae", "model.safetensors");
    let out = d.join("out.safetensors");
    for (base, want) in [
        (vae, "this is a VAE"),
        (
            fixtures().join("loras/sd1_locon.safetensors"),
            "this is a LoRA",
        ),
    ] {
        let result = loratool()
            .args(["merge", "--base"])
            .arg(&base)
            .arg("--lora")
            .arg(fixtures().join("loras/sd1_kohya_lora.safetensors"))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success());
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&base.display().to_string()) && stderr.contains(want),
            "{stderr}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn a_pipeline_is_its_components_and_its_family() {
    let ck = Checkpoint::open(&fixtures().join("models/sdxl_diffusers")).unwrap();
    assert!(ck.pipeline);
    let layouts: Vec<Layout> = ck.files.iter().map(|f| f.layout).collect();
    assert_eq!(
        layouts,
        [
            Layout::DiffusersComponent(Component::Unet),
            Layout::DiffusersComponent(Component::TextEncoder),
            Layout::DiffusersComponent(Component::TextEncoder2),
        ]
    );
    assert_eq!(ck.family(), BaseModel::Sdxl);
    // A folder that is not a pipeline says so.
    let e = Checkpoint::open(&fixtures().join("loras")).err().unwrap();
    assert!(
        e.to_string().contains("not a diffusers pipeline folder"),
        "{e}"
    );
}

#[test]
fn extract_pairs_component_files_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = renamed(d, "unet", "base_unet.safetensors");
    let tuned = d.join("tuned_unet.safetensors");
    merge(&base, "loras/sd1_kohya_lora.safetensors", &tuned).unwrap();
    let opts = ExtractOptions {
        rank: 4,
        conv_rank: None,
        te_rank: None,
        min_diff: 0.0,
        dynamic: None,
        clamp_quantile: None,
        dtype: Dtype::F32,
        format: TargetFormat::Kohya,
        force: false,
        allow_empty: false,
        progress: Default::default(),
    };
    let out = d.join("extracted.safetensors");
    let report = extract_lora(&base, &tuned, &out, &opts).unwrap();
    assert_eq!(report.family, Some(BaseModel::Sd1));
    assert!(report.components["unet"].extracted > 0);
    // A UNet file against a text-encoder file is refused, whatever their names.
    let te = renamed(d, "text_encoder", "unet.safetensors");
    let e = extract_lora(&base, &te, &d.join("x.safetensors"), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("different parts of a model"), "{e}");
}
