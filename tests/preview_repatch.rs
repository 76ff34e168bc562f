//! Models loaded once and re-patched between LoRAs ([`LoadedModels`], what grids and `library
//! previews` render with) give exactly the images a fresh load with the same LoRAs gives, and
//! rebuild only the tensors the old or the new LoRAs patch.

mod common;
use common::fixture;

use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{LoraWeight, PatchPlan, PlanOptions};
use loratool::ops::progress::ProgressSink;
use loratool::preview::sampling::SamplerKind;
use loratool::preview::txt2img::{txt2img, LoadedModels, Txt2Img};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn request(model: &Path, loras: &[(&str, f32)]) -> Txt2Img {
    Txt2Img {
        config: Some(fixture("models/sd1_diffusers")),
        prompt: "a red fox in the snow".into(),
        negative: "blurry".into(),
        loras: loras
            .iter()
            .map(|(name, w)| LoraWeight::weighted(lora(name), *w))
            .collect(),
        sampler: SamplerKind::DpmPp2m,
        steps: 3,
        seed: 42,
        width: 64,
        height: 64,
        ..Txt2Img::new(model)
    }
}

fn lora(name: &str) -> PathBuf {
    fixture(&format!("loras/{name}.safetensors"))
}

/// The (file, tensor) pairs a set of LoRAs patches in the checkpoint.
fn patched(checkpoint: &Checkpoint, loras: &[(&str, f32)]) -> BTreeSet<(usize, String)> {
    let loras: Vec<LoraWeight> = loras
        .iter()
        .map(|(n, w)| LoraWeight::weighted(lora(n), *w))
        .collect();
    let plan = PatchPlan::build(checkpoint, &loras, &PlanOptions::default()).unwrap();
    plan.files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| f.keys().map(move |k| (i, k.clone())))
        .collect()
}

#[test]
fn re_patched_models_render_what_a_fresh_load_renders() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny_sd1.safetensors");
    common::full_vocab_sd1(&model, None);
    let checkpoint = Checkpoint::open(&model).unwrap();
    let mut models = LoadedModels::load(&checkpoint, &request(&model, &[])).unwrap();
    let sequence: [&[(&str, f32)]; 5] = [
        &[("sd1_kohya_lora", 0.8)],               // text encoder and UNet linears
        &[("sd1_locon", 1.0), ("sd1_loha", 0.5)], // convolutions, Hadamard products
        &[("sd1_norm", 1.0)],                     // norm weights
        &[],                                      // back to the bare checkpoint
        &[("sd1_kohya_lora", 0.8)],
    ];
    let mut previous: &[(&str, f32)] = &[];
    for loras in sequence {
        let req = request(&model, loras);
        let (mut rendered, rebuilt) = models
            .render(&req, &[42, 7], &ProgressSink::default())
            .unwrap();
        let expected: BTreeSet<_> = patched(&checkpoint, previous)
            .union(&patched(&checkpoint, loras))
            .cloned()
            .collect();
        assert_eq!(rebuilt, expected.len(), "{loras:?} after {previous:?}");
        let fresh = txt2img(&req, &ProgressSink::default()).unwrap();
        assert_eq!(rendered[0].infotext, fresh.infotext, "{loras:?}");
        assert!(
            rendered[0].image.pixels() == fresh.image.pixels(),
            "{loras:?}: the re-patched render differs from a fresh load's"
        );
        let seed_7 = txt2img(&Txt2Img { seed: 7, ..req }, &ProgressSink::default()).unwrap();
        assert!(rendered.remove(1).image.pixels() == seed_7.image.pixels());
        previous = loras;
    }
    assert!(
        !patched(&checkpoint, &[("sd1_norm", 1.0)]).is_empty(),
        "the norm LoRA must patch something for the sequence to test norms"
    );
}
