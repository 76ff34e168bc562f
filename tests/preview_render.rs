//! Whole renders on the tiny SD1 checkpoint against A1111's path run by the peers (k-diffusion
//! driving diffusers' UNet and VAE; fixtures/preview/render_sd1, made by
//! fixtures/generate_preview_render.py): Euler (normal), DPM++ 2M (Karras) and Euler a, with CFG;
//! and a prompt longer than its negative prompt, which A1111 runs through the UNet apart.

mod common;
use common::fixture;

use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{PatchPlan, PlanOptions};
use loratool::preview::render::{render, RenderSettings, SD_SCALING_FACTOR};
use loratool::preview::sampling::{
    NoiseSchedule, Prediction, SamplerKind, SamplerSettings, ScheduleKind,
};
use loratool::preview::unet::{Heads, Unet, UnetConfig};
use loratool::preview::vae::VaeDecoder;
use loratool::preview::weights::Weights;
use loratool::tensors::TensorFile;

#[test]
fn renders_match_k_diffusion_with_diffusers_models() {
    let reference = TensorFile::open(&fixture("preview/render_sd1.safetensors")).unwrap();
    let tensor = |n: &str| common::candle_tensor(&reference, n);
    let checkpoint = Checkpoint::open(&fixture("models/sd1_ldm.safetensors")).unwrap();
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan);
    let unet = Unet::load(
        &weights,
        &UnetConfig {
            heads: Some(Heads::Count(2)),
            groups: 4,
        },
    )
    .unwrap();
    let vae = VaeDecoder::load(&weights, Some(2)).unwrap();
    let schedule = NoiseSchedule::stable_diffusion();
    let (cond, uncond) = (tensor("cond"), tensor("uncond"));
    let cases = [
        (
            "euler_normal",
            SamplerKind::Euler,
            ScheduleKind::Normal,
            4,
            7.0,
            42,
        ),
        (
            "dpmpp2m_karras",
            SamplerKind::DpmPp2m,
            ScheduleKind::Karras,
            5,
            5.5,
            7,
        ),
        (
            "euler_a_normal",
            SamplerKind::EulerAncestral,
            ScheduleKind::Normal,
            4,
            7.0,
            3,
        ),
        // A prompt of two windows against a one-window negative: the UNet runs each on its own,
        // as A1111 does by default, not on the negative padded with the empty prompt.
        (
            "euler_uneven",
            SamplerKind::Euler,
            ScheduleKind::Normal,
            4,
            7.0,
            11,
        ),
    ];
    let long_cond = tensor("long_cond");
    for (name, sampler, schedule_kind, steps, cfg, seed) in cases {
        let settings = RenderSettings {
            sampler: SamplerSettings {
                sampler,
                schedule: schedule_kind,
                steps,
                cfg_scale: cfg,
                seed,
                eta_noise_seed_delta: 0,
            },
            width: 64,
            height: 64,
            prediction: Prediction::Epsilon,
            scaling_factor: SD_SCALING_FACTOR,
        };
        let models = common::RenderModels {
            unet: &unet,
            vae: &vae,
            schedule: &schedule,
            cond: match name {
                "euler_uneven" => &long_cond,
                _ => &cond,
            },
            uncond: &uncond,
        };
        let calls = common::check_render(&reference, name, &models, &settings);
        assert_eq!(calls, steps, "{name}");
    }
}

#[test]
fn sizes_that_are_not_multiples_of_8_are_refused() {
    let checkpoint = Checkpoint::open(&fixture("models/sd1_ldm.safetensors")).unwrap();
    let plan = PatchPlan::build(&checkpoint, &[], &PlanOptions::default()).unwrap();
    let weights = Weights::new(plan);
    let config = UnetConfig {
        heads: Some(Heads::Count(2)),
        groups: 4,
    };
    let unet = Unet::load(&weights, &config).unwrap();
    let vae = VaeDecoder::load(&weights, Some(2)).unwrap();
    let cond = candle_core::Tensor::zeros(
        (1, 77, 16),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let settings = RenderSettings {
        sampler: SamplerSettings {
            sampler: SamplerKind::Euler,
            schedule: ScheduleKind::Normal,
            steps: 1,
            cfg_scale: 1.0,
            seed: 1,
            eta_noise_seed_delta: 0,
        },
        width: 60,
        height: 64,
        prediction: Prediction::Epsilon,
        scaling_factor: SD_SCALING_FACTOR,
    };
    let e = render(
        &unet,
        &vae,
        &NoiseSchedule::stable_diffusion(),
        &cond.into(),
        None,
        &settings,
        &mut |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("size 60x64: width and height must be positive multiples of 8"),
        "{e}"
    );
}
