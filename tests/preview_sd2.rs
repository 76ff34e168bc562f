//! SD2 in the preview against the peers (fixtures/preview/*_sd2, made by
//! fixtures/generate_preview_sd2.py on a tiny SD2 checkpoint with the real single-file layout):
//! the OpenCLIP text encoder (through the family's key map, fused q/k/v included) against LDM's
//! penultimate-layer embedder on open_clip's own tower, A1111's SD2 token padding, the UNet with
//! linear projections and fixed-width heads against diffusers, A1111's v-prediction probe, and
//! whole v-prediction renders against k-diffusion's CompVisVDenoiser and A1111's DDIM.

mod common;
use common::{fixture, max_rel_error};

use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{LoraWeight, PatchPlan, PlanOptions};
use loratool::preview::clip::{Activation, ClipConfig, ClipTextEncoder};
use loratool::preview::prompt::parse_emphasis;
use loratool::preview::render::{RenderSettings, SD_SCALING_FACTOR};
use loratool::preview::sampling::{
    NoiseSchedule, Prediction, SamplerKind, SamplerSettings, ScheduleKind,
};
use loratool::preview::tokenizer::{ChunkOptions, ClipPadding, ClipTokenizer};
use loratool::preview::unet::{prediction_from_probe, Heads, Unet, UnetConfig};
use loratool::preview::vae::VaeDecoder;
use loratool::preview::weights::Weights;
use loratool::tensors::writer::TensorSpec;
use loratool::tensors::{Dtype, TensorFile};
use std::collections::BTreeMap;
use std::path::Path;

const CHECKPOINT: &str = "preview/sd2_ldm.safetensors";

/// The tiny model's UNet: heads of 2 channels, 2 norm groups (its config.json).
const UNET: UnetConfig = UnetConfig {
    heads: Some(Heads::Width(2)),
    groups: 2,
};

fn weights_of<'c>(checkpoint: &'c Checkpoint, loras: &[LoraWeight]) -> Weights<'c> {
    Weights::new(PatchPlan::build(checkpoint, loras, &PlanOptions::default()).unwrap())
}

fn states(encoder: &ClipTextEncoder, tokens: &[Vec<u32>], clip_skip: usize) -> Vec<f32> {
    let skip = encoder.config().a1111_clip_skip(clip_skip);
    let out = encoder.encode(tokens, skip).unwrap();
    assert_eq!(out.dims(), &[tokens.len(), 77, 8]);
    out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn openclip_states_match_ldms_penultimate_layer_whatever_the_clip_skip() {
    let clip = common::preview_reference("clip_sd2.safetensors");
    let tokens = common::token_rows(&clip, "tokens");
    let want = clip.read_f32("penultimate").unwrap().data;

    let checkpoint = Checkpoint::open(&fixture(CHECKPOINT)).unwrap();
    let weights = weights_of(&checkpoint, &[]);
    assert!(weights.text_encoder_is_openclip());
    // The tiny encoder has 2 heads of 4 (its config.json); OpenCLIP-H's rule gives 16 of 64.
    let config = ClipConfig::infer(&weights, Some(2)).unwrap();
    assert_eq!(
        (
            config.hidden,
            config.layers,
            config.vocab,
            config.intermediate
        ),
        (8, 24, 1000, 32)
    );
    assert_eq!(config.activation, Activation::Gelu);
    assert_eq!(config.padding, ClipPadding::Zero);
    assert_eq!(config.fixed_clip_skip, Some(2));
    let encoder = ClipTextEncoder::load(&weights, config).unwrap();
    for clip_skip in [1, 2, 5] {
        let err = max_rel_error(&states(&encoder, &tokens, clip_skip), &want);
        assert!(err <= 1e-5, "clip skip {clip_skip}: relative error {err}");
    }

    // A1111's "Original" emphasis on these states.
    let multipliers = clip.read_f32("multipliers").unwrap().data;
    let mut got = Vec::new();
    for (i, seq) in tokens.iter().enumerate() {
        let m: Vec<f64> = multipliers[i * 77..(i + 1) * 77]
            .iter()
            .map(|v| *v as f64)
            .collect();
        let z = encoder.encode_weighted(seq, &m, 2).unwrap();
        got.extend(z.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let err = max_rel_error(&got, &clip.read_f32("weighted").unwrap().data);
    assert!(err <= 1e-5, "emphasis: relative error {err}");

    // The pipeline folder: diffusers' conversion (23 layers, HF names), GELU as its config.json
    // says; the same states from its last layer.
    let folder = Checkpoint::open(&fixture("preview/sd2_diffusers")).unwrap();
    let weights = weights_of(&folder, &[]);
    assert!(!weights.text_encoder_is_openclip());
    let config = ClipConfig::infer(&weights, Some(2)).unwrap().openclip();
    assert_eq!((config.layers, config.fixed_clip_skip), (23, Some(1)));
    let encoder = ClipTextEncoder::load(&weights, config).unwrap();
    let err = max_rel_error(&states(&encoder, &tokens, 2), &want);
    assert!(err <= 1e-5, "pipeline folder: relative error {err}");
}

#[test]
fn prompts_are_padded_the_a1111_sd2_way() {
    let clip = common::preview_reference("clip_sd2.safetensors");
    let prompts: Vec<String> =
        serde_json::from_str(&clip.metadata()["prompts"]).expect("prompts metadata");
    let want = common::token_rows(&clip, "prompt_tokens");
    let tokenizer = ClipTokenizer::new().unwrap();
    let options = ChunkOptions::a1111(ClipPadding::Zero);
    let got: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| {
            tokenizer
                .chunk(&parse_emphasis(p).unwrap(), &[], &options)
                .unwrap()
                .chunks
                .into_iter()
                .map(|c| c.tokens)
        })
        .collect();
    assert_eq!(got, want);
}

/// A kohya LoRA on the tiny SD2 text encoder's q, k, v (rows of the fused `in_proj_weight`),
/// out_proj and fc1 of layers 0 and 22, with seeded values.
fn sd2_text_lora(path: &Path) {
    let mut specs = Vec::new();
    let mut data = Vec::new();
    let mut seed = 1u32;
    let mut next = || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    for layer in [0, 22] {
        for (module, out, inp) in [
            ("self_attn_q_proj", 8, 8),
            ("self_attn_k_proj", 8, 8),
            ("self_attn_v_proj", 8, 8),
            ("self_attn_out_proj", 8, 8),
            ("mlp_fc1", 32, 8),
        ] {
            let name = format!("lora_te_text_model_encoder_layers_{layer}_{module}");
            for (leaf, shape) in [
                ("lora_down.weight", vec![2, inp]),
                ("lora_up.weight", vec![out, 2]),
            ] {
                let n: usize = shape.iter().product();
                data.extend((0..n).flat_map(|_| next().to_le_bytes()));
                specs.push(TensorSpec {
                    name: format!("{name}.{leaf}"),
                    dtype: Dtype::F32,
                    shape,
                });
            }
            specs.push(TensorSpec {
                name: format!("{name}.alpha"),
                dtype: Dtype::F32,
                shape: vec![],
            });
            data.extend(1.5f32.to_le_bytes());
        }
    }
    let meta = BTreeMap::from([("ss_base_model_version".to_string(), "sd_v2".to_string())]);
    common::write_safetensors(path, &meta, &specs, &data);
}

#[test]
fn a_lora_on_fused_qkv_at_load_equals_the_merged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let lora = dir.path().join("sd2_text_lora.safetensors");
    sd2_text_lora(&lora);
    let base = fixture(CHECKPOINT);
    let tokens = common::token_rows(&common::preview_reference("clip_sd2.safetensors"), "tokens");
    let hidden = |ck: &Path, loras: &[LoraWeight]| {
        let checkpoint = Checkpoint::open(ck).unwrap();
        let weights = weights_of(&checkpoint, loras);
        let encoder =
            ClipTextEncoder::load(&weights, ClipConfig::infer(&weights, Some(2)).unwrap()).unwrap();
        states(&encoder, &tokens, 1)
    };
    let plain = hidden(&base, &[]);
    assert_eq!(plain, hidden(&base, &[LoraWeight::weighted(&lora, 0.0)]));
    let at_load = hidden(&base, &[LoraWeight::weighted(&lora, 0.8)]);
    assert!(
        max_rel_error(&at_load, &plain) > 1e-3,
        "the LoRA changes the states"
    );
    let merged = dir.path().join("merged.safetensors");
    let out = common::loratool()
        .arg("merge")
        .arg("--base")
        .arg(&base)
        .arg("--lora")
        .arg(format!("{}:0.8", lora.display()))
        .args(["--dtype", "f32", "-o"])
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = max_rel_error(&at_load, &hidden(&merged, &[]));
    assert!(err <= 1e-5, "LoRA at load vs merged: relative error {err}");
}

#[test]
fn the_unet_matches_diffusers_and_a1111s_probe_says_v() {
    let r = common::preview_reference("unet_sd2.safetensors");
    let tensor = |n: &str| common::candle_tensor(&r, n);
    let checkpoint = Checkpoint::open(&fixture(CHECKPOINT)).unwrap();
    let weights = weights_of(&checkpoint, &[]);
    let unet = Unet::load(&weights, &UNET).unwrap();
    assert_eq!(unet.context_width(), 8);
    let timesteps = r.read_f32("timestep").unwrap().data;
    let out = unet
        .forward(&tensor("sample"), &timesteps, &tensor("context"))
        .unwrap();
    let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let err = max_rel_error(&got, &r.read_f32("out").unwrap().data);
    assert!(err <= 1e-4, "relative error {err}");
    // The same UNet from the pipeline folder (diffusers names, linear projections) through the
    // family's UNet key map.
    let pipeline = Checkpoint::open(&fixture("preview/sd2_diffusers")).unwrap();
    let from_folder = Unet::load(&weights_of(&pipeline, &[]), &UNET)
        .unwrap()
        .forward(&tensor("sample"), &timesteps, &tensor("context"))
        .unwrap();
    let from_folder = from_folder.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let err = max_rel_error(&from_folder, &r.read_f32("out").unwrap().data);
    assert!(err <= 1e-4, "pipeline folder: relative error {err}");
    // SD2's own rule (64-wide heads: one head at these widths) is another model.
    let one_head = Unet::load(
        &weights,
        &UnetConfig {
            heads: None,
            ..UNET
        },
    )
    .unwrap()
    .forward(&tensor("sample"), &timesteps, &tensor("context"))
    .unwrap();
    let one_head = one_head.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let wrong = max_rel_error(&one_head, &r.read_f32("out").unwrap().data);
    assert!(wrong > 1e-3, "{wrong}");

    let want = r.read_f32("probe").unwrap().data[0];
    let probe = unet.a1111_v_probe().unwrap();
    assert!(
        (probe - want).abs() <= 1e-4 * want.abs(),
        "{probe} vs {want}"
    );
    assert_eq!(prediction_from_probe(probe), Prediction::V);
    assert_eq!(prediction_from_probe(-1.0), Prediction::Epsilon);
    assert_eq!(prediction_from_probe(-1.001), Prediction::V);

    // Its twin with conv_out's bias one higher: every output, so the mean, moves by 1 (ε).
    let dir = tempfile::tempdir().unwrap();
    let twin = dir.path().join("eps.safetensors");
    common::sd2_variant(&twin, 1.0, None);
    let checkpoint = Checkpoint::open(&twin).unwrap();
    let weights = weights_of(&checkpoint, &[]);
    let probe = Unet::load(&weights, &UNET)
        .unwrap()
        .a1111_v_probe()
        .unwrap();
    assert!(
        (probe - (want + 1.0)).abs() < 1e-2,
        "{probe} vs {}",
        want + 1.0
    );
    assert_eq!(prediction_from_probe(probe), Prediction::Epsilon);
}

#[test]
fn v_prediction_renders_match_k_diffusion_and_a1111s_ddim() {
    let r = common::preview_reference("render_sd2.safetensors");
    let tensor = |n: &str| common::candle_tensor(&r, n);
    let checkpoint = Checkpoint::open(&fixture(CHECKPOINT)).unwrap();
    let weights = weights_of(&checkpoint, &[]);
    let unet = Unet::load(&weights, &UNET).unwrap();
    let vae = VaeDecoder::load(&weights, Some(2)).unwrap();
    // The checkpoint's own alphas_cumprod buffer, as A1111 samples with it.
    let file = TensorFile::open(&fixture(CHECKPOINT)).unwrap();
    let schedule =
        NoiseSchedule::from_alphas_cumprod(file.read_f32("alphas_cumprod").unwrap().data).unwrap();
    let (cond, uncond) = (tensor("cond"), tensor("uncond"));
    let cases = [
        (
            "euler_normal",
            SamplerKind::Euler,
            ScheduleKind::Normal,
            4,
            7.0,
            42,
            4,
        ),
        (
            "dpmpp2m_karras",
            SamplerKind::DpmPp2m,
            ScheduleKind::Karras,
            5,
            5.5,
            7,
            5,
        ),
        // A1111's DDIM makes steps − 1 model calls.
        (
            "ddim",
            SamplerKind::Ddim,
            ScheduleKind::Normal,
            4,
            7.0,
            3,
            3,
        ),
    ];
    for (name, sampler, schedule_kind, steps, cfg, seed, calls) in cases {
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
            prediction: Prediction::V,
            scaling_factor: SD_SCALING_FACTOR,
        };
        let models = common::RenderModels {
            unet: &unet,
            vae: &vae,
            schedule: &schedule,
            cond: &cond,
            uncond: &uncond,
        };
        let model_calls = common::check_render(&r, name, &models, &settings);
        assert_eq!(model_calls, calls, "{name}");
    }
}
