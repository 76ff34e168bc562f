//! SDXL in the preview against the peers (fixtures/preview/*sdxl*, made by
//! fixtures/generate_preview_sdxl.py on a tiny SDXL with the real SGM single-file layout and its
//! diffusers pipeline folder): both text encoders (CLIP-L's hidden_states[-2] and OpenCLIP-bigG's
//! penultimate states without final norm, A1111's emphasis on each, the pooled projection) against
//! sgm's embedders restated on transformers and open_clip, the UNet's class embedding of the
//! vector input against diffusers' `added_cond_kwargs`, the VAE, and whole renders from prompts
//! (A1111's conditioning: windows, pooled from the first, an empty negative zeroed) against
//! k-diffusion around diffusers, a kohya LoRA on both text encoders and the UNet included.

mod common;
use common::{fixture, max_rel_error};

use loratool::family::layout::Checkpoint;
use loratool::ops::patch_plan::{LoraWeight, PatchPlan, PlanOptions};
use loratool::preview::clip::{Activation, ClipConfig};
use loratool::preview::prompt::parse_emphasis;
use loratool::preview::render::{
    scaling_factor, Conditioning, RenderSettings, SDXL_SCALING_FACTOR,
};
use loratool::preview::sampling::{
    NoiseSchedule, Prediction, SamplerKind, SamplerSettings, ScheduleKind,
};
use loratool::preview::sdxl::{conditioning, vector, SdxlTextEncoders, SizeConditioning};
use loratool::preview::tokenizer::{ClipPadding, ClipTokenizer};
use loratool::preview::unet::{Heads, Unet, UnetConfig};
use loratool::preview::vae::VaeDecoder;
use loratool::preview::weights::{Part, Weights};
use loratool::tensors::TensorFile;
use std::path::Path;

const SGM: &str = "preview/sdxl_sgm.safetensors";
const FOLDER: &str = "preview/sdxl_diffusers";
const LORA: &str = "preview/sdxl_lora.safetensors";

/// The tiny UNet: heads of 2 channels, 2 norm groups (its config.json).
const UNET: UnetConfig = UnetConfig {
    heads: Some(Heads::Width(2)),
    groups: 2,
};
/// Both tiny text encoders have 2 heads (their config.json).
const TEXT_HEADS: Option<usize> = Some(2);

/// The checkpoint's weights with `loras` at load (a pipeline folder's own `vae/` included).
fn weights_of<'c>(checkpoint: &'c Checkpoint, loras: &[LoraWeight]) -> Weights<'c> {
    Weights::new(PatchPlan::build(checkpoint, loras, &PlanOptions::default()).unwrap())
        .with_pipeline_vae()
        .unwrap()
}

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `got` within `bound` of `want` (relative to its largest value); the error is printed, for
/// `--nocapture` runs that measure.
fn check(label: &str, got: &[f32], want: &[f32], bound: f32) {
    let err = max_rel_error(got, want);
    eprintln!("{label}: {err:.2e}");
    assert!(err <= bound, "{label}: relative error {err}");
}

#[test]
fn both_text_encoders_match_sgms_embedders_with_a1111s_emphasis() {
    let clip = common::preview_reference("clip_sdxl.safetensors");
    let tokens_l = common::token_rows(&clip, "tokens_l");
    let tokens_g = common::token_rows(&clip, "tokens_g");
    let multipliers = clip.read_f32("multipliers").unwrap().data;

    // A1111's windows of the fixture's prompts, each encoder padded its way.
    let prompts: Vec<String> = serde_json::from_str(&clip.metadata()["prompts"]).unwrap();
    let tokenizer = ClipTokenizer::new().unwrap();
    for (source, label) in [(SGM, "single file"), (FOLDER, "pipeline folder")] {
        let checkpoint = Checkpoint::open(&fixture(source)).unwrap();
        let weights = weights_of(&checkpoint, &[]);
        let encoders = SdxlTextEncoders::load(&weights, TEXT_HEADS, TEXT_HEADS).unwrap();
        let (l, g) = (encoders.clip_l.config(), encoders.clip_g.config());
        assert_eq!(
            (l.part, l.layers, l.vocab, l.hidden, l.activation, l.padding),
            (
                Part::ClipTextEncoder,
                12,
                49408,
                4,
                Activation::QuickGelu,
                ClipPadding::EndOfText
            ),
            "{label}"
        );
        assert_eq!(
            (g.part, g.layers, g.vocab, g.hidden, g.activation, g.padding),
            (
                Part::ClipTextEncoder2,
                32,
                49408,
                4,
                Activation::Gelu,
                ClipPadding::Zero
            ),
            "{label}"
        );
        // A1111 ignores the clip-skip setting for SDXL (sdxl_clip_l_skip off) and sgm's states
        // skip the final layer norm.
        for c in [l, g] {
            assert_eq!(c.a1111_clip_skip(1), 2);
            assert_eq!(c.a1111_clip_skip(3), 2);
            assert!(!c.final_layer_norm);
        }

        let mut got_l = Vec::new();
        let mut got_g = Vec::new();
        let mut got_pooled = Vec::new();
        let mut weighted_l = Vec::new();
        let mut weighted_g = Vec::new();
        for (i, (tl, tg)) in tokens_l.iter().zip(&tokens_g).enumerate() {
            let ones = vec![1.0; 77];
            let m: Vec<f64> = multipliers[i * 77..(i + 1) * 77]
                .iter()
                .map(|v| *v as f64)
                .collect();
            let el = encoders
                .clip_l
                .embed_tokens(std::slice::from_ref(tl))
                .unwrap();
            let eg = encoders
                .clip_g
                .embed_tokens(std::slice::from_ref(tg))
                .unwrap();
            got_l.extend(values(
                &encoders
                    .clip_l
                    .encode_weighted_embeddings(&el, &ones, 2)
                    .unwrap(),
            ));
            weighted_l.extend(values(
                &encoders
                    .clip_l
                    .encode_weighted_embeddings(&el, &m, 2)
                    .unwrap(),
            ));
            let (z, pooled) = encoders
                .clip_g
                .encode_weighted_pooled(&eg, tg, &ones, 2)
                .unwrap();
            got_g.extend(values(&z));
            got_pooled.extend(values(&pooled));
            let (z, weighted_pooled) = encoders
                .clip_g
                .encode_weighted_pooled(&eg, tg, &m, 2)
                .unwrap();
            weighted_g.extend(values(&z));
            // The pooled embedding carries no emphasis.
            assert_eq!(values(&weighted_pooled), values(&pooled));
        }
        let want = |n: &str| clip.read_f32(n).unwrap().data;
        check(
            &format!("{label}: CLIP-L states"),
            &got_l,
            &want("states_l"),
            1e-5,
        );
        check(
            &format!("{label}: OpenCLIP states"),
            &got_g,
            &want("states_g"),
            1e-5,
        );
        check(
            &format!("{label}: pooled"),
            &got_pooled,
            &want("pooled"),
            1e-5,
        );
        // "Original" emphasis divides by the states' mean, near zero in a random model: its last bits
        // grow (1.2e-5 measured), hence 1e-4 here.
        check(
            &format!("{label}: CLIP-L emphasis"),
            &weighted_l,
            &want("weighted_l"),
            1e-4,
        );
        check(
            &format!("{label}: OpenCLIP emphasis"),
            &weighted_g,
            &want("weighted_g"),
            1e-4,
        );
        // SD1's conditioning (the last layer through the final norm) is another thing.
        let sd1_style = encoders.clip_l.encode(&tokens_l, 1);
        assert!(
            sd1_style.is_err()
                || max_rel_error(&values(&sd1_style.unwrap()), &want("states_l")) > 1e-2
        );

        let windows = |padding_of_g: bool| -> Vec<Vec<u32>> {
            prompts
                .iter()
                .flat_map(|p| {
                    let chunks = encoders
                        .chunk(&tokenizer, &parse_emphasis(p).unwrap(), &[])
                        .unwrap();
                    let chunks = match padding_of_g {
                        true => chunks.clip_g,
                        false => chunks.clip_l,
                    };
                    chunks.into_iter().map(|c| c.tokens).collect::<Vec<_>>()
                })
                .collect()
        };
        assert_eq!(windows(false), tokens_l, "{label}: CLIP-L windows");
        assert_eq!(windows(true), tokens_g, "{label}: OpenCLIP windows");
    }
}

#[test]
fn the_unet_reads_the_vector_input_as_diffusers_and_the_vae_decodes_alike() {
    let r = common::preview_reference("unet_sdxl.safetensors");
    let tensor = |n: &str| common::candle_tensor(&r, n);
    let time_ids = r.read_f32("time_ids").unwrap().data;
    let pooled = tensor("pooled");
    let timesteps = r.read_f32("timestep").unwrap().data;
    let want = r.read_f32("out").unwrap().data;
    for (source, label) in [(SGM, "single file"), (FOLDER, "pipeline folder")] {
        let checkpoint = Checkpoint::open(&fixture(source)).unwrap();
        let weights = weights_of(&checkpoint, &[]);
        let unet = Unet::load(&weights, &UNET).unwrap();
        assert_eq!(unet.context_width(), 8, "{label}");
        assert_eq!(unet.vector_width(), Some(8 + 6 * 256), "{label}");
        // The vector input from the pooled embedding and the six numbers of each batch item.
        let mut rows = Vec::new();
        for b in 0..2 {
            let n = &time_ids[b * 6..(b + 1) * 6];
            let sizes = SizeConditioning {
                original: (n[0] as u32, n[1] as u32),
                crop_top_left: (n[2] as u32, n[3] as u32),
                target: (n[4] as u32, n[5] as u32),
            };
            assert_eq!(sizes.time_ids().as_slice(), n);
            rows.push(vector(&pooled.narrow(0, b, 1).unwrap(), &sizes, 8 + 6 * 256).unwrap());
        }
        let y = candle_core::Tensor::cat(&rows, 0).unwrap();
        // torch's exp is within an ulp of the correctly rounded one; times 1024 that moves a
        // size embedding's sine by ~1e-5.
        check(
            &format!("{label}: vector"),
            &values(&y),
            &r.read_f32("vector").unwrap().data,
            5e-5,
        );
        let out = unet
            .forward_with_vector(&tensor("sample"), &timesteps, &tensor("context"), Some(&y))
            .unwrap();
        check(&format!("{label}: UNet"), &values(&out), &want, 1e-4);
        // Without the vector the UNet refuses, rather than rendering something else.
        assert!(unet
            .forward(&tensor("sample"), &timesteps, &tensor("context"))
            .is_err());

        let vae = VaeDecoder::load(&weights, Some(2)).unwrap();
        let image = vae.decode(&tensor("vae.z")).unwrap();
        check(
            &format!("{label}: VAE"),
            &values(&image),
            &r.read_f32("vae.image").unwrap().data,
            1e-4,
        );
    }
    // A1111's numbers for a render: (height, width) twice, crop 0, 0.
    let sizes = SizeConditioning::of_render(96, 64);
    assert_eq!(sizes.time_ids(), [64.0, 96.0, 0.0, 0.0, 64.0, 96.0]);
}

/// The render cases fixtures/generate_preview_sdxl.py wrote (its `cases` metadata).
#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative: String,
    height: u32,
    width: u32,
    sampler: String,
    karras: bool,
    steps: usize,
    cfg: f32,
    seed: u64,
    lora: bool,
}

/// A prompt's conditioning as A1111 builds it for SDXL, `zeroed` when it is an empty negative.
fn conditioning_of(
    encoders: &SdxlTextEncoders,
    text: &str,
    sizes: &SizeConditioning,
    vector_width: usize,
    negative: bool,
) -> Conditioning {
    let tokenizer = ClipTokenizer::new().unwrap();
    let chunks = encoders
        .chunk(&tokenizer, &parse_emphasis(text).unwrap(), &[])
        .unwrap();
    let (states, pooled) = encoders.encode(&chunks, &[], &[]).unwrap();
    conditioning(
        states,
        pooled,
        sizes,
        vector_width,
        negative && text.is_empty(),
    )
    .unwrap()
}

#[test]
fn renders_from_prompts_match_k_diffusion_around_diffusers() {
    let r = common::preview_reference("render_sdxl.safetensors");
    let cases: Vec<Case> = serde_json::from_str(&r.metadata()["cases"]).unwrap();
    assert!(cases.iter().any(|c| c.lora) && cases.iter().any(|c| c.negative.is_empty()));
    let checkpoint = Checkpoint::open(&fixture(SGM)).unwrap();
    assert_eq!(scaling_factor(checkpoint.family()), SDXL_SCALING_FACTOR);
    let schedule = NoiseSchedule::stable_diffusion();
    let mut latents = std::collections::HashMap::new();
    for case in &cases {
        let loras = match case.lora {
            true => vec![LoraWeight::weighted(fixture(LORA), 0.8)],
            false => vec![],
        };
        let weights = weights_of(&checkpoint, &loras);
        let encoders = SdxlTextEncoders::load(&weights, TEXT_HEADS, TEXT_HEADS).unwrap();
        let unet = Unet::load(&weights, &UNET).unwrap();
        let vae = VaeDecoder::load(&weights, Some(2)).unwrap();
        let width = unet.vector_width().unwrap();
        let sizes = SizeConditioning::of_render(case.width, case.height);
        let cond = conditioning_of(&encoders, &case.prompt, &sizes, width, false);
        let uncond = conditioning_of(&encoders, &case.negative, &sizes, width, true);
        let want = |n: &str| r.read_f32(&format!("{}.{n}", case.name)).unwrap().data;
        check(
            &format!("{}: text states", case.name),
            &values(&cond.context),
            &want("context"),
            1e-4,
        );
        check(
            &format!("{}: negative text states", case.name),
            &values(&uncond.context),
            &want("uncond_context"),
            1e-4,
        );
        check(
            &format!("{}: vector", case.name),
            &values(cond.vector.as_ref().unwrap()),
            &want("vector"),
            5e-5,
        );
        check(
            &format!("{}: negative vector", case.name),
            &values(uncond.vector.as_ref().unwrap()),
            &want("uncond_vector"),
            5e-5,
        );
        if case.negative.is_empty() {
            assert!(values(&uncond.context).iter().all(|v| *v == 0.0));
            assert!(values(uncond.vector.as_ref().unwrap())[..8]
                .iter()
                .all(|v| *v == 0.0));
        }
        if case.prompt.len() > 300 {
            assert_eq!(
                cond.context.dims(),
                &[1, 154, 8],
                "{}: two windows",
                case.name
            );
        }
        let settings = RenderSettings {
            sampler: SamplerSettings {
                sampler: match case.sampler.as_str() {
                    "euler" => SamplerKind::Euler,
                    "dpmpp_2m" => SamplerKind::DpmPp2m,
                    other => panic!("sampler {other}"),
                },
                schedule: match case.karras {
                    true => ScheduleKind::Karras,
                    false => ScheduleKind::Normal,
                },
                steps: case.steps,
                cfg_scale: case.cfg,
                seed: case.seed,
                eta_noise_seed_delta: 0,
            },
            width: case.width,
            height: case.height,
            prediction: Prediction::Epsilon,
            scaling_factor: SDXL_SCALING_FACTOR,
        };
        let models = common::ConditionedModels {
            unet: &unet,
            vae: &vae,
            schedule: &schedule,
            cond: &cond,
            uncond: &uncond,
        };
        let calls = common::check_conditioned_render(&r, &case.name, &models, &settings);
        assert_eq!(calls, case.steps, "{}", case.name);
        latents.insert(case.name.clone(), want("latent"));
    }
    // The LoRA case differs from its twin without the LoRA by more than the tolerance.
    let moved = max_rel_error(&latents["lora"], &latents["euler_normal"]);
    assert!(moved > 1e-2, "the LoRA moves the latent by {moved}");
}

/// A copy of the SGM fixture without the tensors whose name contains `drop`.
fn sgm_without(dst: &Path, drop: &str) {
    use loratool::tensors::writer::TensorSpec;
    let f = TensorFile::open(&fixture(SGM)).unwrap();
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for t in f.tensors().iter().filter(|t| !t.name.contains(drop)) {
        specs.push(TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        });
        data.extend_from_slice(&f.raw_bytes(&t.name).unwrap());
    }
    common::write_safetensors(dst, f.metadata(), &specs, &data);
}

#[test]
fn an_sdxl_unet_without_its_class_embedding_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("no_label_emb.safetensors");
    sgm_without(&broken, "label_emb");
    let checkpoint = Checkpoint::open(&broken).unwrap();
    let err = Unet::load(&weights_of(&checkpoint, &[]), &UNET)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("no_label_emb.safetensors") && err.contains("label_emb"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // The same through the command: one line, the file named, before any rendering.
    let out = common::loratool()
        .arg("preview")
        .arg("--model")
        .arg(&broken)
        .args(["--config"])
        .arg(fixture(FOLDER))
        .args([
            "--prompt", "a fox", "--steps", "1", "--width", "64", "--height", "64", "-o",
        ])
        .arg(dir.path().join("never.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no_label_emb.safetensors") && stderr.contains("label_emb"),
        "{stderr}"
    );
    assert!(!dir.path().join("never.png").exists());

    // Without its second text encoder an SGM file has nothing to pool.
    let no_g = dir.path().join("no_clip_g.safetensors");
    sgm_without(&no_g, "conditioner.embedders.1.");
    let checkpoint = Checkpoint::open(&no_g).unwrap();
    let err = ClipConfig::infer_part(&weights_of(&checkpoint, &[]), Part::ClipTextEncoder2, None)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("no_clip_g.safetensors") && err.contains("second"),
        "{err}"
    );
}

/// `loratool preview` on the tiny SDXL `model` (with the fixture folder's configs) rendering
/// `case`, plus `extra` flags; the PNG's RGB bytes.
fn preview_case(model: &Path, case: &Case, lora_dir: &Path, png: &Path, extra: &[&str]) -> Vec<u8> {
    let prompt = match case.lora {
        true => format!("{} <lora:xl_style:0.8>", case.prompt),
        false => case.prompt.clone(),
    };
    let (sampler, schedule) = match case.sampler.as_str() {
        "euler" => ("euler", "normal"),
        _ => ("dpm++2m", "karras"),
    };
    let out = common::loratool()
        .arg("preview")
        .arg("--model")
        .arg(model)
        .arg("--config")
        .arg(fixture(FOLDER))
        .arg("--lora-dir")
        .arg(lora_dir)
        .args(["--prompt", &prompt, "--negative", &case.negative])
        .args(["--sampler", sampler, "--schedule", schedule])
        .args([
            "--steps",
            &case.steps.to_string(),
            "--cfg",
            &case.cfg.to_string(),
        ])
        .args(["--seed", &case.seed.to_string()])
        .args(["--width", &case.width.to_string()])
        .args(["--height", &case.height.to_string()])
        .arg("-o")
        .arg(png)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {}: {}",
        case.name,
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    png_pixels(png)
}

#[test]
fn preview_renders_sdxl_end_to_end_from_the_single_file_and_the_folder() {
    let r = common::preview_reference("render_sdxl.safetensors");
    let cases: Vec<Case> = serde_json::from_str(&r.metadata()["cases"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lora_dir = dir.path().join("loras");
    std::fs::create_dir(&lora_dir).unwrap();
    std::fs::copy(fixture(LORA), lora_dir.join("xl_style.safetensors")).unwrap();
    for name in ["euler_normal", "dpmpp2m_karras_empty_negative", "lora"] {
        let case = cases.iter().find(|c| c.name == name).unwrap();
        let want = r.read_f32(&format!("{name}.pixels")).unwrap().data;
        let n = (case.width * case.height) as usize;
        for (k, model) in [fixture(SGM), fixture(FOLDER)].iter().enumerate() {
            let png = dir.path().join(format!("{name}_{k}.png"));
            let got = preview_case(model, case, &lora_dir, &png, &[]);
            assert_eq!(got.len(), 3 * n);
            let worst = (0..3)
                .flat_map(|c| (0..n).map(move |i| (c, i)))
                .map(|(c, i)| (got[i * 3 + c] as i32 - want[c * n + i] as i32).abs())
                .max()
                .unwrap();
            assert!(
                worst <= 2,
                "{name} from {}: a pixel differs by {worst}/255",
                model.display()
            );
        }
    }
    // A1111 conditions SDXL on the penultimate layers whatever its clip-skip setting, and still
    // records the setting.
    let case = cases.iter().find(|c| c.name == "euler_normal").unwrap();
    let plain = preview_case(
        &fixture(SGM),
        case,
        &lora_dir,
        &dir.path().join("a.png"),
        &[],
    );
    let skip = dir.path().join("skip.png");
    let skipped = preview_case(&fixture(SGM), case, &lora_dir, &skip, &["--clip-skip", "2"]);
    assert_eq!(plain, skipped);
    let text = loratool::preview::png::read_parameters(&skip)
        .unwrap()
        .unwrap()
        .text;
    assert!(
        text.contains("Clip skip: 2") && text.contains("Size: 64x64"),
        "{text}"
    );
}

/// The RGB bytes of a PNG.
fn png_pixels(path: &Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}
