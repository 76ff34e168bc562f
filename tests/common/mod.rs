//! Shared helpers for the integration tests: the fixture manifest written by fixtures/generate.py.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A path under fixtures/.
pub fn fixture(p: &str) -> PathBuf {
    fixtures().join(p)
}

/// The largest |got − want| relative to want's largest magnitude (the preview parity measure).
pub fn max_rel_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "compared tensors differ in size");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs() / scale))
}

pub fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest parses")
}

/// Manifest entries of adapter files (the malicious pickle has no network).
pub fn adapter_entries() -> Vec<serde_json::Value> {
    manifest()["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter(|f| !f["network"].is_null())
        .cloned()
        .collect()
}

pub fn loratool() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
}

/// A copy of the SD1 kohya fixture whose first text-encoder `up` factor holds one NaN.
pub fn write_lora_with_a_nan(path: &std::path::Path) {
    use loratool::tensors::writer::{write_all, TensorSpec, WriteOptions};
    use loratool::tensors::TensorFile;
    let src = TensorFile::open(&fixtures().join("loras/sd1_kohya_lora.safetensors")).unwrap();
    let poisoned = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight";
    let tensors: Vec<(TensorSpec, Vec<u8>)> = src
        .tensors()
        .iter()
        .map(|t| {
            let spec = TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            };
            let mut values = src.read_f32(&t.name).unwrap().data;
            if t.name == poisoned {
                values[1] = f32::NAN;
            }
            (spec, t.dtype.encode_f32(&values).unwrap())
        })
        .collect();
    assert!(tensors.iter().any(|(s, _)| s.name == poisoned));
    write_all(path, src.metadata(), &tensors, &WriteOptions::default()).unwrap();
}

/// Records what an operation reports through its `progress` option: the totals announced and the
/// sum of the amounts advanced.
#[derive(Default)]
pub struct Counted {
    pub starts: std::sync::Mutex<Vec<u64>>,
    pub done: std::sync::atomic::AtomicU64,
}

impl loratool::ops::progress::Progress for Counted {
    fn start(&self, total: u64) {
        self.starts.lock().unwrap().push(total);
    }
    fn advance(&self, done: u64) {
        self.done
            .fetch_add(done, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Deterministic values in [−0.5, 0.5).
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// A kohya LoRA with `template`'s modules (names and target shapes) and random rank-`rank` factors,
/// component `i` of each module scaled by `decay^i` (a trained LoRA's falling spectrum).
pub fn write_random_lora(
    path: &std::path::Path,
    template: &loratool::adapter::Adapter,
    rank: usize,
    seed: u64,
    decay: f32,
) {
    let mut tensors = Vec::new();
    for (n, m) in template.modules.iter().enumerate() {
        let (up_shape, down_shape) = loratool::adapter::lora_factor_shapes(&m.shape, rank);
        let (out, cols) = (up_shape[0], down_shape[1..].iter().product::<usize>());
        let mut up = pseudo_random(out * rank, seed * 1_000_003 + 2 * n as u64);
        for (i, v) in up.iter_mut().enumerate() {
            *v *= decay.powi((i % rank) as i32);
        }
        let down = pseudo_random(rank * cols, seed * 1_000_003 + 2 * n as u64 + 1);
        let t = |shape: Vec<usize>, data: Vec<f32>| loratool::tensors::Tensor::new(shape, data);
        tensors.push(loratool::tensors::writer::TensorSpec::encode(
            format!("{}.lora_up.weight", m.name),
            &t(up_shape, up),
            loratool::tensors::Dtype::F32,
        ));
        tensors.push(loratool::tensors::writer::TensorSpec::encode(
            format!("{}.lora_down.weight", m.name),
            &t(down_shape, down),
            loratool::tensors::Dtype::F32,
        ));
        tensors.push(loratool::tensors::writer::TensorSpec::encode(
            format!("{}.alpha", m.name),
            &t(vec![], vec![rank as f32]),
            loratool::tensors::Dtype::F32,
        ));
    }
    loratool::tensors::writer::write_all(
        path,
        template.file.metadata(),
        &tensors,
        &loratool::tensors::writer::WriteOptions::default(),
    )
    .unwrap();
}

/// `loratool inspect --json ARGS FILES`: exit code, the JSON on stdout, stderr.
pub fn run_json(args: &[&str], files: &[std::path::PathBuf]) -> (i32, serde_json::Value, String) {
    let out = loratool()
        .arg("inspect")
        .arg("--json")
        .args(args)
        .args(files)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    (
        out.status.code().unwrap(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tiny SD2 checkpoint (fixtures/preview/sd2_ldm.safetensors) with `shift` added to its
/// UNet's conv_out bias (which moves A1111's v-prediction probe by `shift`: the file's −1.5 says
/// v, −0.5 says ε) and, when given, its 1,000-row token embedding tiled to `vocab` rows (the
/// tokenizer's ids reach 49,407).
pub fn sd2_variant(dst: &std::path::Path, shift: f32, vocab: Option<usize>) {
    use loratool::tensors::writer::TensorSpec;
    use loratool::tensors::TensorFile;
    let f = TensorFile::open(&fixture("preview/sd2_ldm.safetensors")).unwrap();
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for t in f.tensors() {
        let mut shape = t.shape.clone();
        let mut bytes = f.raw_bytes(&t.name).unwrap().to_vec();
        if t.name == "model.diffusion_model.out.2.bias" && shift != 0.0 {
            let v: Vec<f32> = f.read_f32(&t.name).unwrap().data;
            let v: Vec<f32> = v.iter().map(|x| x + shift).collect();
            bytes = t.dtype.encode_f32(&v).unwrap();
        }
        if let (Some(rows), "cond_stage_model.model.token_embedding.weight") =
            (vocab, t.name.as_str())
        {
            let row = bytes.len() / shape[0];
            bytes = (0..rows)
                .flat_map(|i| bytes[(i % shape[0]) * row..][..row].to_vec())
                .collect();
            shape[0] = rows;
        }
        specs.push(TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape,
        });
        data.extend_from_slice(&bytes);
    }
    write_safetensors(dst, f.metadata(), &specs, &data);
}

/// A safetensors file from its metadata, tensor specs and data bytes (in spec order).
pub fn write_safetensors(
    path: &std::path::Path,
    metadata: &std::collections::BTreeMap<String, String>,
    specs: &[loratool::tensors::writer::TensorSpec],
    data: &[u8],
) {
    let header = loratool::tensors::writer::build_header(metadata, specs);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// Tensor `name` of a reference file, as an f32 candle tensor on the CPU.
pub fn candle_tensor(file: &loratool::tensors::TensorFile, name: &str) -> candle_core::Tensor {
    let t = file.read_f32(name).unwrap();
    candle_core::Tensor::from_vec(t.data, t.shape, &candle_core::Device::Cpu).unwrap()
}

/// The models and text states a whole-render parity test drives.
pub struct RenderModels<'a> {
    pub unet: &'a loratool::preview::unet::Unet,
    pub vae: &'a loratool::preview::vae::VaeDecoder,
    pub schedule: &'a loratool::preview::sampling::NoiseSchedule,
    pub cond: &'a candle_core::Tensor,
    pub uncond: &'a candle_core::Tensor,
}

/// Renders case `name` of a render reference (64×64) with `settings` and checks it: the final
/// latent within 1e-4 (relative to its largest value) of `{name}.latent`, every pixel within 2/255
/// of `{name}.pixels` (`[3, 64, 64]` planes). Returns how many model calls the sampler made.
pub fn check_render(
    reference: &loratool::tensors::TensorFile,
    name: &str,
    models: &RenderModels,
    settings: &loratool::preview::render::RenderSettings,
) -> usize {
    let conditioned = ConditionedModels {
        unet: models.unet,
        vae: models.vae,
        schedule: models.schedule,
        cond: &models.cond.clone().into(),
        uncond: &models.uncond.clone().into(),
    };
    check_conditioned_render(reference, name, &conditioned, settings)
}

/// The models and the full conditioning (SDXL: text states and vector) a render parity test drives.
pub struct ConditionedModels<'a> {
    pub unet: &'a loratool::preview::unet::Unet,
    pub vae: &'a loratool::preview::vae::VaeDecoder,
    pub schedule: &'a loratool::preview::sampling::NoiseSchedule,
    pub cond: &'a loratool::preview::render::Conditioning,
    pub uncond: &'a loratool::preview::render::Conditioning,
}

/// [`check_render`] for any conditioning and the settings' size: the latent within 1e-4, every
/// pixel within 2/255 of `{name}.pixels` (`[3, height, width]` planes).
pub fn check_conditioned_render(
    reference: &loratool::tensors::TensorFile,
    name: &str,
    models: &ConditionedModels,
    settings: &loratool::preview::render::RenderSettings,
) -> usize {
    let mut calls = 0;
    let (latent, image) = loratool::preview::render::render(
        models.unet,
        models.vae,
        models.schedule,
        models.cond,
        Some(models.uncond),
        settings,
        &mut |_, _| calls += 1,
    )
    .unwrap();
    let want = reference.read_f32(&format!("{name}.latent")).unwrap().data;
    let err = max_rel_error(latent.values(), &want);
    assert!(err <= 1e-4, "{name}: latent relative error {err}");
    let pixels = reference.read_f32(&format!("{name}.pixels")).unwrap().data;
    let got = image.pixels();
    let n = (settings.width * settings.height) as usize;
    assert_eq!(pixels.len(), 3 * n, "{name}: reference size");
    let mut worst = 0i32;
    for c in 0..3 {
        for i in 0..n {
            worst = worst.max((got[i * 3 + c] as i32 - pixels[c * n + i] as i32).abs());
        }
    }
    eprintln!("{name}: latent {err:.2e}, pixels within {worst}/255");
    assert!(worst <= 2, "{name}: a pixel differs by {worst}/255");
    calls
}

/// SD's training schedule: betas from √0.00085 to √0.012 squared (scaled linear) or, when
/// `linear`, from 0.0001 to 0.02; their cumulative product of 1 − β.
pub fn sd_alphas_cumprod(linear: bool) -> Vec<f32> {
    let (a, b): (f64, f64) = match linear {
        true => (0.0001, 0.02),
        false => (0.00085f64.sqrt(), 0.012f64.sqrt()),
    };
    let mut acc = 1f64;
    (0..1000)
        .map(|i| {
            let x = a + (b - a) * i as f64 / 999.0;
            let beta = if linear { x } else { x * x };
            acc *= 1.0 - beta;
            acc as f32
        })
        .collect()
}

/// The tiny SD1 checkpoint (fixtures/models/sd1_ldm) with its 1,000-row token embedding tiled to
/// CLIP's full 49,408 rows, so real prompts tokenize; with an `alphas_cumprod` buffer when given
/// (as LDM checkpoints carry one).
pub fn full_vocab_sd1(dst: &std::path::Path, schedule: Option<Vec<f32>>) {
    let f = loratool::tensors::TensorFile::open(&fixture("models/sd1_ldm.safetensors")).unwrap();
    let embedding = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight";
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for t in f.tensors() {
        let mut shape = t.shape.clone();
        let mut bytes = f.raw_bytes(&t.name).unwrap().to_vec();
        if t.name == embedding {
            let row = bytes.len() / shape[0];
            bytes = (0..49408)
                .flat_map(|i| bytes[(i % shape[0]) * row..][..row].to_vec())
                .collect();
            shape[0] = 49408;
        }
        specs.push(loratool::tensors::writer::TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape,
        });
        data.extend_from_slice(&bytes);
    }
    if let Some(ac) = schedule {
        specs.push(loratool::tensors::writer::TensorSpec {
            name: "alphas_cumprod".into(),
            dtype: loratool::tensors::Dtype::F32,
            shape: vec![ac.len()],
        });
        data.extend(ac.iter().flat_map(|v| v.to_le_bytes()));
    }
    write_safetensors(dst, &std::collections::BTreeMap::new(), &specs, &data);
}

/// A peer-output file under fixtures/preview/.
pub fn preview_reference(file: &str) -> loratool::tensors::TensorFile {
    loratool::tensors::TensorFile::open(&fixture(&format!("preview/{file}"))).unwrap()
}

/// A `[rows, 77]` token-id tensor of a reference file as rows of ids.
pub fn token_rows(f: &loratool::tensors::TensorFile, name: &str) -> Vec<Vec<u32>> {
    let t = f.read_f32(name).unwrap();
    t.data
        .chunks(t.shape[1])
        .map(|c| c.iter().map(|v| *v as u32).collect())
        .collect()
}
