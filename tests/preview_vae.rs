//! The preview's VAE decoder against diffusers' AutoencoderKL (fixtures/preview/vae_sd1, made by
//! fixtures/generate_preview_vae.py) on the tiny SD1 checkpoint.

mod common;
use common::fixture;

use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{PatchPlan, PlanOptions};
use loratool::preview::vae::VaeDecoder;
use loratool::preview::weights::Weights;
use loratool::tensors::TensorFile;

#[test]
fn decode_matches_diffusers() {
    let reference = TensorFile::open(&fixture("preview/vae_sd1.safetensors")).unwrap();
    let latent = reference.read_f32("latent").unwrap();
    let want = reference.read_f32("image").unwrap();
    let checkpoint = Checkpoint::open(&fixture("models/sd1_ldm.safetensors")).unwrap();
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan);
    // The tiny VAE normalises with 2 groups (its config.json); real SD VAEs with 32.
    let vae = VaeDecoder::load(&weights, Some(2)).unwrap();
    let z = candle_core::Tensor::from_vec(latent.data, latent.shape, &candle_core::Device::Cpu)
        .unwrap();
    let image = vae.decode(&z).unwrap();
    assert_eq!(image.dims(), want.shape.as_slice());
    let got = image.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want.data)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs() / scale));
    assert!(err <= 1e-4, "relative error {err}");
}

#[test]
fn a_checkpoint_without_a_vae_says_so() {
    let checkpoint = Checkpoint::open(&fixture("models/sd1_diffusers")).unwrap();
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan);
    let e = VaeDecoder::load(&weights, Some(2))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no VAE in this checkpoint"), "{e}");
}
