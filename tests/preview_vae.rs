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

/// The tiny checkpoint's VAE decoded from `weights` on a fixed latent.
fn decode_with(weights: &Weights) -> Vec<f32> {
    let reference = TensorFile::open(&fixture("preview/vae_sd1.safetensors")).unwrap();
    let latent = reference.read_f32("latent").unwrap();
    let vae = VaeDecoder::load(weights, Some(2)).unwrap();
    let z = candle_core::Tensor::from_vec(latent.data, latent.shape, &candle_core::Device::Cpu)
        .unwrap();
    let image = vae.decode(&z).unwrap();
    image.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `src` with its header's tensor names renamed by `rename` (offsets unchanged), as `dst`.
fn renamed_copy(src: &std::path::Path, dst: &std::path::Path, rename: &dyn Fn(&str) -> String) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let renamed: serde_json::Map<String, serde_json::Value> =
        header.into_iter().map(|(k, v)| (rename(&k), v)).collect();
    let mut text = serde_json::to_vec(&renamed).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(dst, out).unwrap();
}

#[test]
fn a_diffusers_named_vae_decodes_as_its_ldm_twin() {
    // fixtures/models: the same weights as LDM names (sd1_ldm) and as a pipeline folder's VAE
    // (diffusers' own converter agrees on the pairing, fixtures/README.md).
    let ldm = Checkpoint::open(&fixture("models/sd1_ldm.safetensors")).unwrap();
    let want = decode_with(&Weights::new(
        PatchPlan::build(&ldm, &[], &PlanOptions::default()).unwrap(),
    ));
    let folder = fixture("models/sd1_diffusers");
    let vae_file = folder.join("vae/diffusion_pytorch_model.safetensors");
    let as_vae_flag = Weights::new(PatchPlan::build(&ldm, &[], &PlanOptions::default()).unwrap())
        .with_vae(&vae_file)
        .unwrap();
    assert_eq!(decode_with(&as_vae_flag), want);

    // A pipeline folder brings its own VAE.
    let pipeline = Checkpoint::open(&folder).unwrap();
    let own = Weights::new(PatchPlan::build(&pipeline, &[], &PlanOptions::default()).unwrap())
        .with_pipeline_vae()
        .unwrap();
    assert_eq!(decode_with(&own), want);

    // diffusers < 0.14 names (query/key/value/proj_attn), as the ft-MSE VAE on the Hub has.
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("legacy_vae.safetensors");
    renamed_copy(&vae_file, &legacy, &|k| {
        k.replace("attentions.0.to_q", "attentions.0.query")
            .replace("attentions.0.to_k", "attentions.0.key")
            .replace("attentions.0.to_v", "attentions.0.value")
            .replace("attentions.0.to_out.0", "attentions.0.proj_attn")
    });
    let text = std::fs::read(&legacy).unwrap();
    assert!(String::from_utf8_lossy(&text).contains("proj_attn"));
    let old = Weights::new(PatchPlan::build(&ldm, &[], &PlanOptions::default()).unwrap())
        .with_vae(&legacy)
        .unwrap();
    assert_eq!(decode_with(&old), want);
}

/// `--dtype f16` halves the text encoder and the UNet, never the VAE (SDXL's overflows in f16).
#[test]
fn the_vae_stays_f32_when_the_models_run_in_f16() {
    use candle_core::DType;
    use loratool::preview::weights::{Part, Placement};
    let checkpoint = Checkpoint::open(&fixture("models/sd1_ldm.safetensors")).unwrap();
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan).with_placement(Placement {
        device: candle_core::Device::Cpu,
        dtype: DType::F16,
    });
    let vae = weights.get(Part::Vae, "decoder.conv_in.weight").unwrap();
    let unet = weights.get(Part::Unet, "input_blocks.0.0.weight").unwrap();
    assert_eq!((vae.dtype(), unet.dtype()), (DType::F32, DType::F16));
    assert_eq!(weights.placement_of(Part::Vae).dtype, DType::F32);
}
