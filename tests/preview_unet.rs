//! The preview's UNet against diffusers' UNet2DConditionModel (fixtures/preview/unet_sd1, made by
//! fixtures/generate_preview_unet.py) on the tiny SD1 checkpoint, from the single file and from
//! the pipeline folder (whose diffusers names go through the family's UNet key map).

mod common;
use common::{fixture, max_rel_error};

use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{PatchPlan, PlanOptions};
use loratool::preview::unet::{Heads, Unet, UnetConfig};
use loratool::preview::weights::{Placement, Weights};
use loratool::tensors::TensorFile;
use std::path::Path;

fn eps_of(ck: &Path) -> (Vec<f32>, Vec<f32>) {
    eps_in(ck, Placement::default())
}

fn eps_in(ck: &Path, placement: Placement) -> (Vec<f32>, Vec<f32>) {
    let reference = TensorFile::open(&fixture("preview/unet_sd1.safetensors")).unwrap();
    let tensor = |n: &str| common::candle_tensor(&reference, n);
    let timesteps = reference.read_f32("timestep").unwrap().data;
    let want = reference.read_f32("eps").unwrap().data;
    let checkpoint = Checkpoint::open(ck).unwrap();
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan).with_placement(placement);
    // The tiny UNet: 2 heads, 4 norm groups (its config.json); SD1's rule is 8 heads, 32 groups.
    let config = UnetConfig {
        heads: Some(Heads::Count(2)),
        groups: 4,
    };
    let unet = Unet::load(&weights, &config).unwrap();
    let eps = unet
        .forward(&tensor("sample"), &timesteps, &tensor("context"))
        .unwrap();
    assert_eq!(eps.dims(), &[2, 4, 8, 8]);
    let eps = eps.to_dtype(candle_core::DType::F32).unwrap();
    (eps.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want)
}

#[test]
fn one_forward_matches_diffusers() {
    let (got, want) = eps_of(&fixture("models/sd1_ldm.safetensors"));
    let err = max_rel_error(&got, &want);
    assert!(err <= 1e-4, "single file: relative error {err}");
    let (got, want) = eps_of(&fixture("models/sd1_diffusers"));
    let err = max_rel_error(&got, &want);
    assert!(err <= 1e-4, "pipeline folder: relative error {err}");
}

#[test]
fn half_precision_forward_is_within_f16_rounding() {
    let half = Placement {
        dtype: candle_core::DType::F16,
        ..Placement::default()
    };
    let (got, want) = eps_in(&fixture("models/sd1_ldm.safetensors"), half);
    let err = max_rel_error(&got, &want);
    eprintln!("f16 UNet forward: relative error {err}");
    assert!(err <= 1e-2, "relative error {err}");
}
