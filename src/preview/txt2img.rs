//! `loratool preview` from arguments to image: A1111's prompt (`<lora:…>` tags, emphasis,
//! chunks), the checkpoint with every LoRA applied at load, the text encoder, the sampler, the
//! VAE, and the infotext A1111 would write for the same render.

use super::clip::{Activation, ClipConfig, ClipTextEncoder};
use super::embeddings::{load_dirs, Embedding};
use super::infotext::{
    embedding_short_hash, lora_short_hash, loratool_version, model_short_hash, schedule_type,
    GenerationParameters, NamedHash, SamplerName, ScheduleName,
};
use super::png::RgbImage;
use super::prompt::{parse_emphasis, parse_extra_networks, LoraTag};
use super::render::{decode_latent, sample_latent, scaling_factor, RenderSettings};
use super::sampling::{NoiseSchedule, Prediction, SamplerKind, SamplerSettings, ScheduleKind};
use super::sdxl::{SdxlTextEncoders, SizeConditioning};
use super::tokenizer::{ChunkOptions, ClipTokenizer, PromptChunk, TextualInversion};
use super::unet::{prediction_from_probe, vector_width_of, Heads, Unet, UnetConfig};
use super::vae::VaeDecoder;
use super::weights::{candle_error, Part, Placement, Weights};
use crate::family::layout::Checkpoint;
use crate::family::{BaseModel, Component};
use crate::ops::patch_plan::{LoraWeight, PatchPlan, PlanOptions};
use crate::ops::progress::ProgressSink;
use crate::tensors::hash::{hash_file, FileHashes};
use crate::tensors::{SafetensorsFile, TensorFile};
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct Txt2Img {
    pub model: PathBuf,
    /// A VAE file that replaces the checkpoint's (A1111's VAE setting).
    pub vae: Option<PathBuf>,
    /// A diffusers pipeline folder (or a folder of its `*/config.json`) whose configs give the
    /// head counts and norm groups shapes cannot tell.
    pub config: Option<PathBuf>,
    pub prompt: String,
    pub negative: String,
    /// LoRAs from `--lora` (the prompt's `<lora:…>` tags are added to them).
    pub loras: Vec<LoraWeight>,
    pub lora_dirs: Vec<PathBuf>,
    /// `<lora:NAME>` names whose files the caller already knows (`library previews`), looked up
    /// before the folders and the index.
    pub known_loras: Vec<(String, PathBuf)>,
    /// Textual-inversion folders (A1111's `embeddings/`).
    pub embedding_dirs: Vec<PathBuf>,
    /// The library index that resolves `<lora:NAME>` by stem or `ss_output_name` alias when the
    /// folders do not have NAME (`None`: folders only).
    pub library: Option<PathBuf>,
    /// Append each LoRA's activation text (A1111's `<stem>.json`) to the prompt.
    pub trigger: bool,
    pub sampler: SamplerKind,
    pub schedule: ScheduleKind,
    pub steps: usize,
    pub cfg_scale: f32,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub clip_skip: usize,
    /// What the UNet predicts (`--prediction`); `None`: A1111's rule (ε, or its probe's answer
    /// for SD2).
    pub prediction: Option<Prediction>,
    /// In a grid cell: the weight that replaces every prompt tag's multipliers.
    pub grid_weight: Option<f32>,
    /// The device and dtype the models run in (`--device`, `--dtype`).
    pub placement: Placement,
}

impl Txt2Img {
    /// A request for `model` with `preview`'s defaults (A1111's: 20 steps of Euler a, CFG 7,
    /// 512×512, clip skip 1, seed 0), an empty prompt and no LoRA.
    pub fn new(model: impl Into<PathBuf>) -> Txt2Img {
        Txt2Img {
            model: model.into(),
            vae: None,
            config: None,
            prompt: String::new(),
            negative: String::new(),
            loras: Vec::new(),
            lora_dirs: Vec::new(),
            known_loras: Vec::new(),
            embedding_dirs: Vec::new(),
            library: None,
            trigger: false,
            sampler: SamplerKind::EulerAncestral,
            schedule: ScheduleKind::Normal,
            steps: 20,
            cfg_scale: 7.0,
            seed: 0,
            width: 512,
            height: 512,
            clip_skip: 1,
            prediction: None,
            grid_weight: None,
            placement: Placement::default(),
        }
    }
}

pub struct Rendered {
    pub image: RgbImage,
    pub infotext: String,
    /// What the user should know but that did not stop the render (an embedding the prompt
    /// names that was skipped, and why), one line each.
    pub notes: Vec<String>,
}

/// What the configs say, each `None` when absent (the family's rule then applies).
#[derive(Debug, Default)]
struct Configs {
    text_heads: Option<usize>,
    /// SDXL's second text encoder's (`text_encoder_2/config.json`).
    text2_heads: Option<usize>,
    text_activation: Option<Activation>,
    unet_heads: Option<Heads>,
    unet_groups: Option<usize>,
    vae_groups: Option<usize>,
}

/// The UNet's heads from its diffusers config: `num_attention_heads`, else (diffusers' misnamed
/// field) `attention_head_dim`. One number is a head count for every transformer (SD1); a list
/// gives each level's count (SD2, SDXL), which must make heads of one width.
fn unet_heads(unet: &serde_json::Value, path: &Path) -> Result<Option<Heads>> {
    let field = ["num_attention_heads", "attention_head_dim"]
        .iter()
        .find_map(|k| unet.get(*k).filter(|v| !v.is_null()));
    let counts: Vec<u64> = match field {
        None => return Ok(None),
        Some(serde_json::Value::Number(n)) => {
            return Ok(n.as_u64().map(|n| Heads::Count(n as usize)))
        }
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).collect(),
        Some(_) => return Ok(None),
    };
    let channels: Vec<u64> = unet
        .get("block_out_channels")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    let widths: Vec<u64> = channels
        .iter()
        .zip(&counts)
        .filter(|(c, n)| **n > 0 && *c % *n == 0)
        .map(|(c, n)| c / n)
        .collect();
    match widths.first() {
        Some(&w) if widths.len() == counts.len() && widths.iter().all(|x| *x == w) => {
            Ok(Some(Heads::Width(w as usize)))
        }
        _ => Err(Error::bad_file(
            path,
            format!(
                "head counts {counts:?} over block widths {channels:?} do not make heads of one width"
            ),
        )),
    }
}

/// The configs in a pipeline folder (or a folder of its `*/config.json`); `None` when it has none.
fn read_configs(dir: &Path) -> Result<Option<Configs>> {
    let read = |sub: &str| -> Result<Option<serde_json::Value>> {
        let path = dir.join(sub).join("config.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::bad_file(&path, format!("not JSON: {e}"))),
            Err(_) => Ok(None),
        }
    };
    let num = |v: &Option<serde_json::Value>, k: &str| {
        v.as_ref()
            .and_then(|v| v.get(k))
            .and_then(|n| n.as_u64())
            .map(|n| n as usize)
    };
    let (text, text2, unet, vae) = (
        read("text_encoder")?,
        read("text_encoder_2")?,
        read("unet")?,
        read("vae")?,
    );
    if text.is_none() && text2.is_none() && unet.is_none() && vae.is_none() {
        return Ok(None);
    }
    let unet_heads = match &unet {
        Some(u) => unet_heads(u, &dir.join("unet").join("config.json"))?,
        None => None,
    };
    let text_activation = text
        .as_ref()
        .and_then(|t| t.get("hidden_act"))
        .and_then(|a| match a.as_str() {
            Some("gelu") => Some(Activation::Gelu),
            Some("quick_gelu") => Some(Activation::QuickGelu),
            _ => None,
        });
    Ok(Some(Configs {
        text_heads: num(&text, "num_attention_heads"),
        text2_heads: num(&text2, "num_attention_heads"),
        text_activation,
        unet_heads,
        unet_groups: num(&unet, "norm_num_groups"),
        vae_groups: num(&vae, "norm_num_groups"),
    }))
}

/// A `<lora:NAME…>` tag's file: the stem NAME in a `--lora-dir` folder (searched recursively, as
/// A1111 lists its Lora folder). An unknown name is an error listing close matches.
fn resolve_lora(tag: &LoraTag, dirs: &[PathBuf], library: Option<&Path>) -> Result<PathBuf> {
    let all = super::files_under(dirs, &["safetensors", "pt", "ckpt"]);
    let stem = |p: &PathBuf| {
        p.file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    if let Some(found) = all.iter().find(|p| stem(p) == tag.name) {
        return Ok(found.clone());
    }
    // The library resolves names as A1111 does (stem, then alias), over every root it indexes.
    if let Some(db) = library.filter(|p| p.exists()) {
        use crate::library::query::Resolved;
        let lib = crate::library::Library::open(db)?;
        match lib.resolve(std::ffi::OsStr::new(&tag.name))? {
            Resolved::One(e) if !e.missing => return Ok(PathBuf::from(&e.path)),
            Resolved::Many(list) => {
                let paths: Vec<&str> = list.iter().map(|e| e.path.as_str()).collect();
                return Err(Error::Invalid(format!(
                    "{}: the library has {} LoRAs named '{}': {}",
                    tag.tag,
                    list.len(),
                    tag.name,
                    paths.join(", ")
                )));
            }
            _ => {}
        }
    }
    let want = tag.name.to_lowercase();
    let mut close: Vec<String> = all
        .iter()
        .map(stem)
        .filter(|s| {
            let s = s.to_lowercase();
            s.contains(&want) || want.contains(&s) || s.get(..3) == want.get(..3)
        })
        .collect();
    close.sort();
    close.dedup();
    Err(Error::Invalid(format!(
        "{}: no LoRA named '{}' in {}{}",
        tag.tag,
        tag.name,
        match dirs.is_empty() {
            true => "any folder (pass --lora-dir DIR)".to_string(),
            false => dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        },
        match close.is_empty() {
            true => String::new(),
            false => format!(" (close: {})", close.join(", ")),
        }
    )))
}

/// The checkpoint's own `alphas_cumprod` buffer when it holds one (A1111 loads it with the
/// weights, and samples on it), else SD's scaled-linear schedule.
fn schedule_of(checkpoint: &Checkpoint) -> Result<NoiseSchedule> {
    let holder = checkpoint
        .files
        .iter()
        .find(|cf| cf.file.get("alphas_cumprod").is_some());
    match holder {
        Some(cf) => {
            let t = cf.file.read_f32("alphas_cumprod")?;
            NoiseSchedule::from_alphas_cumprod(t.data)
                .map_err(|e| Error::bad_file(&checkpoint.root, format!("its alphas_cumprod: {e}")))
        }
        None => Ok(NoiseSchedule::stable_diffusion()),
    }
}

/// The UNet to render with (LoRAs applied) and what A1111 decides it predicts: v for an SD2
/// checkpoint whose UNet fails its probe ([`Unet::a1111_v_probe`]), ε otherwise (SD1 and the rest
/// load A1111's ε configs). A1111 probes the checkpoint as loaded, before any LoRA: when LoRAs
/// change the UNet, the bare UNet is loaded and probed, then the tensors the LoRAs patch are
/// rebuilt in place.
fn load_unet(weights: &mut Weights, config: &UnetConfig) -> Result<(Unet, Prediction)> {
    let checkpoint = weights.checkpoint();
    if checkpoint.family() != BaseModel::Sd2 {
        return Ok((Unet::load(weights, config)?, Prediction::Epsilon));
    }
    let plan = weights.plan();
    let patches_unet = plan
        .files
        .iter()
        .flat_map(|f| f.values().flatten())
        .any(|p| plan.module(p).1.component == Component::Unet);
    if !patches_unet {
        let unet = Unet::load(weights, config)?;
        let probe = unet.a1111_v_probe()?;
        return Ok((unet, prediction_from_probe(probe)));
    }
    let bare = PatchPlan::build(checkpoint, &[], &PlanOptions::default())?;
    let with_loras = weights.repatch(bare)?.previous;
    weights.keep_for_repatch();
    let unet = Unet::load(weights, config)?;
    let probe = unet.a1111_v_probe()?;
    weights.repatch(with_loras)?;
    weights.stop_keeping();
    Ok((unet, prediction_from_probe(probe)))
}

/// A prompt's windows through the text encoder, concatenated along the token axis. Embedding
/// vectors replace the token embeddings at their slots, cut at the window's end (A1111's
/// `EmbeddingsWithFixes`).
fn encode_chunks(
    encoder: &ClipTextEncoder,
    chunks: &[PromptChunk],
    embeddings: &[Embedding],
    clip_skip: usize,
) -> Result<Tensor> {
    let tables: Vec<&[Vec<f32>]> = embeddings.iter().map(|e| e.vectors.as_slice()).collect();
    let parts = chunks
        .iter()
        .map(|c| {
            let table = encoder.embed_chunk(c, &tables)?;
            encoder.encode_weighted_embeddings(&table, &c.multipliers, clip_skip)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1).map_err(|e| candle_error("text states", e))
}

/// `--grid weights=0,0.5,1[;seeds=1,2]`: a weight per column (each replaces every LoRA's text
/// encoder and UNet multipliers) and a seed per row.
#[derive(Debug, Clone, PartialEq)]
pub struct GridSpec {
    pub weights: Vec<f32>,
    pub seeds: Vec<u64>,
}

impl GridSpec {
    pub fn parse(spec: &str, default_seed: u64) -> Result<GridSpec> {
        let bad = |why: &str| Error::Invalid(format!("--grid '{spec}': {why}"));
        let mut weights = None;
        let mut seeds = None;
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, values) = part
                .split_once('=')
                .ok_or_else(|| bad("expected weights=W,W,…[;seeds=S,S,…]"))?;
            let list: Vec<&str> = values.split(',').map(str::trim).collect();
            match key.trim() {
                "weights" => {
                    weights = Some(
                        list.iter()
                            .map(|v| v.parse::<f32>().ok().filter(|w| w.is_finite()))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| bad("a weight is not a number"))?,
                    )
                }
                "seeds" => {
                    seeds = Some(
                        list.iter()
                            .map(|v| v.parse::<u64>().ok())
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| bad("a seed is not a non-negative integer"))?,
                    )
                }
                other => return Err(bad(&format!("unknown axis '{other}' (weights, seeds)"))),
            }
        }
        let weights = weights.ok_or_else(|| bad("weights=… is required"))?;
        let seeds = seeds.unwrap_or_else(|| vec![default_seed]);
        if weights.is_empty() || weights.len() * seeds.len() > 64 {
            return Err(bad("between 1 and 64 images"));
        }
        Ok(GridSpec { weights, seeds })
    }
}

/// One render per grid cell (row = seed, column = weight), laid out with A1111's X/Y plot labels;
/// the sheet carries the first cell's infotext, as A1111's grids do. The models load once; each
/// weight (column) re-patches the tensors its LoRAs touch and renders all its seeds.
pub fn txt2img_grid(req: &Txt2Img, grid: &GridSpec, progress: &ProgressSink) -> Result<Rendered> {
    if req.loras.is_empty() && !req.prompt.contains("<lora:") {
        return Err(Error::Invalid(
            "--grid weights=…: there is no LoRA to weigh (add <lora:NAME:W> or --lora)".into(),
        ));
    }
    progress.start((req.steps * grid.weights.len() * grid.seeds.len()) as u64);
    let checkpoint = Checkpoint::open(&req.model)?;
    let mut models = LoadedModels::load(&checkpoint, req)?;
    let mut columns = Vec::with_capacity(grid.weights.len());
    for &w in &grid.weights {
        let cell = Txt2Img {
            loras: req
                .loras
                .iter()
                .map(|l| LoraWeight {
                    text_encoder: w,
                    unet: w,
                    ..l.clone()
                })
                .collect(),
            grid_weight: Some(w),
            ..req.clone()
        };
        columns.push(models.render(&cell, &grid.seeds, progress)?.0);
    }
    let notes = columns[0][0].notes.clone();
    let infotext = columns[0][0].infotext.clone();
    // Row-major: one row per seed, one column per weight.
    let cells: Vec<RgbImage> = (0..grid.seeds.len())
        .flat_map(|row| columns.iter().map(move |column| column[row].image.clone()))
        .collect();
    let labels = super::contact_sheet::GridLabels {
        columns: grid.weights.iter().map(|w| format!("weight {w}")).collect(),
        rows: grid.seeds.iter().map(|s| format!("seed {s}")).collect(),
    };
    Ok(Rendered {
        image: super::contact_sheet::contact_sheet(&cells, grid.weights.len(), &labels)?,
        infotext,
        notes,
    })
}

/// The LoRA files a request renders with: its prompt's `<lora:…>` tags resolved as the render
/// resolves them, then the `--lora` files.
pub fn lora_files(req: &Txt2Img) -> Result<Vec<PathBuf>> {
    let prompt = parse_extra_networks(&req.prompt)?;
    let mut files: Vec<PathBuf> = resolve_tags(req, &prompt.loras)?
        .into_iter()
        .map(|(_, path)| path)
        .collect();
    files.extend(req.loras.iter().map(|l| l.path.clone()));
    Ok(files)
}

/// Each `<lora:…>` tag with its file.
fn resolve_tags<'t>(req: &Txt2Img, tags: &'t [LoraTag]) -> Result<Vec<(&'t LoraTag, PathBuf)>> {
    tags.iter()
        .map(|tag| {
            let known = req.known_loras.iter().find(|(name, _)| *name == tag.name);
            let path = match known {
                Some((_, path)) => path.clone(),
                None => resolve_lora(tag, &req.lora_dirs, req.library.as_deref())?,
            };
            Ok((tag, path))
        })
        .collect()
}

pub fn txt2img(req: &Txt2Img, progress: &ProgressSink) -> Result<Rendered> {
    progress.start(req.steps as u64);
    let mut rendered = render_seeds(req, &[req.seed], progress, &mut HashMap::new())?;
    Ok(rendered.remove(0))
}

/// A request's prompts and LoRAs resolved: `<lora:…>` tags to files (with the grid's weight when
/// in a grid cell), the names the infotext gives them, trigger words appended.
struct Resolved {
    loras: Vec<LoraWeight>,
    named: Vec<(String, PathBuf)>,
    prompt_text: String,
    negative_text: String,
}

fn resolve(req: &Txt2Img) -> Result<Resolved> {
    if req.steps == 0 || req.steps > 1000 {
        return Err(Error::Invalid(format!(
            "--steps {}: between 1 and 1000",
            req.steps
        )));
    }
    let prompt = parse_extra_networks(&req.prompt)?;
    let negative = parse_extra_networks(&req.negative)?;
    let mut loras = req.loras.clone();
    let mut named = Vec::new();
    for (tag, path) in resolve_tags(req, &prompt.loras)? {
        loras.push(LoraWeight {
            path: path.clone(),
            text_encoder: req.grid_weight.unwrap_or(tag.te_weight as f32),
            unet: req.grid_weight.unwrap_or(tag.unet_weight as f32),
            block_weights: tag.block_weights.clone(),
        });
        named.push((tag.name.clone(), path));
    }
    for l in &req.loras {
        let name = l
            .path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        named.push((name, l.path.clone()));
    }
    let mut prompt_text = prompt.text.clone();
    if req.trigger {
        for l in &loras {
            if let Some(w) = crate::library::sidecar::A1111Card::read(&l.path).trigger() {
                prompt_text = format!("{}, {}", prompt_text.trim_end(), w);
            }
        }
    }
    Ok(Resolved {
        loras,
        named,
        prompt_text,
        negative_text: negative.text,
    })
}

/// The checkpoint's weights as `req` renders them (its VAE, its placement) with `loras` applied,
/// and what the configs say.
fn open_weights<'c>(
    req: &Txt2Img,
    checkpoint: &'c Checkpoint,
    loras: &[LoraWeight],
) -> Result<(Weights<'c>, Configs)> {
    let plan = PatchPlan::build(checkpoint, loras, &PlanOptions::default())?;
    let weights = Weights::new(plan).with_placement(req.placement.clone());
    let weights = match &req.vae {
        Some(v) => weights.with_vae(v)?,
        None => weights.with_pipeline_vae()?,
    };
    // A pipeline folder carries its own configs; `--config` replaces them.
    let configs = match &req.config {
        Some(dir) => read_configs(dir)?.ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no text_encoder/, text_encoder_2/, unet/ or vae/ config.json in it",
                dir.display()
            ))
        })?,
        None if req.model.is_dir() => read_configs(&req.model)?.unwrap_or_default(),
        None => Configs::default(),
    };
    // The VAE loads after sampling: a checkpoint without one fails now, not after the render.
    if !weights.has(Part::Vae, "decoder.conv_in.weight") {
        return Err(Error::bad_file(
            &req.model,
            "no VAE in the checkpoint (decoder.conv_in missing); give one with --vae",
        ));
    }
    Ok((weights, configs))
}

fn unet_config(configs: &Configs) -> UnetConfig {
    UnetConfig {
        heads: configs.unet_heads,
        groups: configs.unet_groups.unwrap_or(32),
    }
}

/// The text encoder(s) of a checkpoint: SD1's or SD2's one, or SDXL's two with the width of the
/// UNet's vector input their conditioning fills.
enum TextEncoders {
    Clip(ClipTextEncoder),
    Sdxl {
        encoders: SdxlTextEncoders,
        vector_width: usize,
    },
}

fn load_text_encoder(weights: &Weights, configs: &Configs) -> Result<TextEncoders> {
    if let Some(vector_width) = vector_width_of(weights)? {
        let encoders = SdxlTextEncoders::load(weights, configs.text_heads, configs.text2_heads)?;
        return Ok(TextEncoders::Sdxl {
            encoders,
            vector_width,
        });
    }
    let mut text_config = ClipConfig::infer(weights, configs.text_heads)?;
    if configs.text_activation == Some(Activation::Gelu) {
        text_config = text_config.openclip();
    }
    Ok(TextEncoders::Clip(ClipTextEncoder::load(
        weights,
        text_config,
    )?))
}

/// The conditioning of a request's prompt and negative prompt, and what the infotext and the
/// notes need to know about the embeddings they used.
struct Conditioning {
    cond: super::render::Conditioning,
    uncond: super::render::Conditioning,
    embeddings: Vec<Embedding>,
    /// Indices into `embeddings` of those the prompts used, in file-name order.
    used: Vec<usize>,
    notes: Vec<String>,
}

fn condition(encoders: &TextEncoders, req: &Txt2Img, r: &Resolved) -> Result<Conditioning> {
    let width = match encoders {
        TextEncoders::Clip(encoder) => encoder.config().hidden,
        TextEncoders::Sdxl { encoders, .. } => encoders.embedding_width(),
    };
    let (embeddings, skipped) = load_dirs(&req.embedding_dirs, width);
    // A skipped embedding the prompt names is encoded as plain words, as in A1111; say so.
    let named_in_prompts = |name: &str| {
        [&r.prompt_text, &r.negative_text].iter().any(|text| {
            text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
                .any(|word| word == name)
        })
    };
    let notes: Vec<String> = skipped
        .iter()
        .filter(|s| named_in_prompts(&s.name))
        .map(|s| format!("embedding '{}' not used: {}", s.name, s.reason))
        .collect();
    let tokenizer = ClipTokenizer::new()?;
    let encoder = match encoders {
        TextEncoders::Clip(encoder) => encoder,
        TextEncoders::Sdxl {
            encoders,
            vector_width,
        } => {
            let sizes = SizeConditioning::of_render(req.width, req.height);
            let (cond, uncond, used) = encoders.condition_pair(
                &tokenizer,
                &r.prompt_text,
                &r.negative_text,
                &embeddings,
                &sizes,
                *vector_width,
            )?;
            return Ok(Conditioning {
                cond,
                uncond,
                embeddings,
                used,
                notes,
            });
        }
    };
    let clip_skip = encoder.config().a1111_clip_skip(req.clip_skip);
    let inversions: Vec<TextualInversion> = embeddings.iter().map(Embedding::inversion).collect();
    let options = ChunkOptions::a1111(encoder.config().padding);
    let chunk = |text: &str| -> Result<Vec<PromptChunk>> {
        Ok(tokenizer
            .chunk(&parse_emphasis(text)?, &inversions, &options)?
            .chunks)
    };
    // Window counts may differ: the UNet then runs the two on their own (A1111's default).
    let cond_chunks = chunk(&r.prompt_text)?;
    let uncond_chunks = chunk(&r.negative_text)?;
    let cond = encode_chunks(encoder, &cond_chunks, &embeddings, clip_skip)?;
    let uncond = encode_chunks(encoder, &uncond_chunks, &embeddings, clip_skip)?;
    let mut used: Vec<usize> = cond_chunks
        .iter()
        .chain(&uncond_chunks)
        .flat_map(|c| c.embeddings.iter().map(|s| s.embedding))
        .collect();
    used.sort_unstable();
    used.dedup();
    Ok(Conditioning {
        cond: cond.into(),
        uncond: uncond.into(),
        embeddings,
        used,
        notes,
    })
}

fn render_settings(req: &Txt2Img, family: BaseModel) -> RenderSettings {
    RenderSettings {
        sampler: SamplerSettings {
            sampler: req.sampler,
            schedule: req.schedule,
            steps: req.steps,
            cfg_scale: req.cfg_scale,
            seed: req.seed,
            eta_noise_seed_delta: 0,
        },
        width: req.width,
        height: req.height,
        prediction: Prediction::Epsilon,
        scaling_factor: scaling_factor(family),
    }
}

/// One latent per seed.
fn sample_seeds(
    unet: &Unet,
    schedule: &NoiseSchedule,
    c: &Conditioning,
    settings: &mut RenderSettings,
    seeds: &[u64],
    progress: &ProgressSink,
) -> Result<Vec<super::sampling::Latent>> {
    let guided = settings.sampler.cfg_scale != 1.0;
    let mut latents = Vec::with_capacity(seeds.len());
    for &seed in seeds {
        settings.sampler.seed = seed;
        latents.push(sample_latent(
            unet,
            schedule,
            &c.cond,
            guided.then_some(&c.uncond),
            settings,
            &mut |_, _| progress.advance(1),
        )?);
    }
    Ok(latents)
}

/// One render per seed, everything else as `req` says: the prompts are encoded once, the UNet
/// and the VAE loaded once, one model in memory at a time. `known` keeps file hashes across
/// calls. The caller starts `progress` (one unit per sampling step).
fn render_seeds(
    req: &Txt2Img,
    seeds: &[u64],
    progress: &ProgressSink,
    known: &mut HashMap<PathBuf, FileHashes>,
) -> Result<Vec<Rendered>> {
    let resolved = resolve(req)?;
    let checkpoint = Checkpoint::open(&req.model)?;
    let (mut weights, configs) = open_weights(req, &checkpoint, &resolved.loras)?;
    // The text encoder is dropped before the UNet loads, the UNet before the VAE (peak RSS is
    // the UNet's, not the sum).
    let conditioning = condition(&load_text_encoder(&weights, &configs)?, req, &resolved)?;
    let schedule = schedule_of(&checkpoint)?;
    let mut settings = render_settings(req, checkpoint.family());
    let (latents, a1111_prediction) = {
        let (unet, a1111_prediction) = load_unet(&mut weights, &unet_config(&configs))?;
        settings.prediction = req.prediction.unwrap_or(a1111_prediction);
        let latents = sample_seeds(
            &unet,
            &schedule,
            &conditioning,
            &mut settings,
            seeds,
            progress,
        )?;
        (latents, a1111_prediction)
    };
    let images = {
        let vae = VaeDecoder::load(&weights, configs.vae_groups)?;
        latents
            .iter()
            .map(|latent| decode_latent(&vae, latent, &settings))
            .collect::<Result<Vec<_>>>()?
    };
    finish(
        req,
        &resolved,
        &conditioning,
        settings.prediction,
        a1111_prediction,
        seeds.iter().copied().zip(images),
        known,
    )
}

/// A checkpoint's text encoder, UNet and VAE loaded once and kept, to render request after
/// request with different LoRAs (a grid's columns, a library's previews): between renders only
/// the tensors the old or the new LoRAs patch are rebuilt ([`Weights::repatch`]), in place.
pub struct LoadedModels<'c> {
    weights: Weights<'c>,
    encoder: TextEncoders,
    unet: Unet,
    vae: VaeDecoder,
    schedule: NoiseSchedule,
    /// What A1111 decides the bare checkpoint predicts.
    a1111_prediction: Prediction,
    known: HashMap<PathBuf, FileHashes>,
}

impl<'c> LoadedModels<'c> {
    /// Loads `checkpoint` (`req.model`, opened by the caller) as `req` renders it — its VAE,
    /// config folder and placement — without LoRAs.
    pub fn load(checkpoint: &'c Checkpoint, req: &Txt2Img) -> Result<LoadedModels<'c>> {
        let (mut weights, configs) = open_weights(req, checkpoint, &[])?;
        weights.keep_for_repatch();
        let encoder = load_text_encoder(&weights, &configs)?;
        let unet = Unet::load(&weights, &unet_config(&configs))?;
        let a1111_prediction = match checkpoint.family() {
            BaseModel::Sd2 => prediction_from_probe(unet.a1111_v_probe()?),
            _ => Prediction::Epsilon,
        };
        let vae = VaeDecoder::load(&weights, configs.vae_groups)?;
        Ok(LoadedModels {
            weights,
            encoder,
            unet,
            vae,
            schedule: schedule_of(checkpoint)?,
            a1111_prediction,
            known: HashMap::new(),
        })
    }

    /// Re-patches the models for `loras` (replacing the previous ones): only the tensors either
    /// set patches are rebuilt. Returns how many.
    pub fn apply_loras(&mut self, loras: &[LoraWeight]) -> Result<usize> {
        let plan = PatchPlan::build(self.weights.checkpoint(), loras, &PlanOptions::default())?;
        Ok(self.weights.repatch(plan)?.rebuilt)
    }

    /// Renders `req` (whose model, VAE, config and placement must be those the models were
    /// loaded for) at each seed, after re-patching the models for its LoRAs. Returns the
    /// renders and how many tensors the re-patch rebuilt. The caller starts `progress`.
    pub fn render(
        &mut self,
        req: &Txt2Img,
        seeds: &[u64],
        progress: &ProgressSink,
    ) -> Result<(Vec<Rendered>, usize)> {
        let resolved = resolve(req)?;
        let rebuilt = self.apply_loras(&resolved.loras)?;
        let conditioning = condition(&self.encoder, req, &resolved)?;
        let mut settings = render_settings(req, self.weights.checkpoint().family());
        settings.prediction = req.prediction.unwrap_or(self.a1111_prediction);
        let latents = sample_seeds(
            &self.unet,
            &self.schedule,
            &conditioning,
            &mut settings,
            seeds,
            progress,
        )?;
        let images = latents
            .iter()
            .map(|latent| decode_latent(&self.vae, latent, &settings))
            .collect::<Result<Vec<_>>>()?;
        let rendered = finish(
            req,
            &resolved,
            &conditioning,
            settings.prediction,
            self.a1111_prediction,
            seeds.iter().copied().zip(images),
            &mut self.known,
        )?;
        Ok((rendered, rebuilt))
    }
}

/// The renders with the infotext A1111 would write for them (hashes from the library index when
/// it has a file unchanged, else read once here and kept in `known`).
fn finish(
    req: &Txt2Img,
    resolved: &Resolved,
    c: &Conditioning,
    prediction: Prediction,
    a1111_prediction: Prediction,
    images: impl Iterator<Item = (u64, RgbImage)>,
    known: &mut HashMap<PathBuf, FileHashes>,
) -> Result<Vec<Rendered>> {
    let sampler = match req.sampler {
        SamplerKind::Euler => SamplerName::Euler,
        SamplerKind::EulerAncestral => SamplerName::EulerAncestral,
        SamplerKind::DpmPp2m => SamplerName::DpmPp2M,
        SamplerKind::Ddim => SamplerName::Ddim,
    };
    let schedule_name = match req.schedule {
        ScheduleKind::Normal => ScheduleName::Normal,
        ScheduleKind::Karras => ScheduleName::Karras,
    };
    let library = req
        .library
        .as_deref()
        .filter(|p| p.exists())
        .and_then(|p| crate::library::Library::open(p).ok());
    let mut hashes_of = |path: &Path| -> Result<FileHashes> {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(h) = known.get(&canonical) {
            return Ok(h.clone());
        }
        let h = match library.as_ref().and_then(|l| l.known_hashes(&canonical)) {
            Some(h) => h,
            None => hash_file(path, SafetensorsFile::data_start_of(path).ok().flatten())?,
        };
        known.insert(canonical, h.clone());
        Ok(h)
    };
    // A diffusers pipeline folder has no file hash (A1111 loads single files only).
    let model_hash = match req.model.is_dir() {
        true => None,
        false => Some(model_short_hash(&hashes_of(&req.model)?)),
    };
    let mut ti_hashes = Vec::new();
    for &i in &c.used {
        let e = &c.embeddings[i];
        ti_hashes.push(NamedHash::new(
            &e.name,
            embedding_short_hash(&hashes_of(&e.path)?),
        ));
    }
    let mut lora_hashes = Vec::new();
    for (name, path) in &resolved.named {
        let sshs = TensorFile::open(path)?
            .metadata()
            .get("sshs_model_hash")
            .cloned();
        lora_hashes.push(NamedHash::new(
            name,
            lora_short_hash(&hashes_of(path)?, sshs.as_deref()),
        ));
    }
    let parameters = GenerationParameters {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative.clone(),
        steps: req.steps as u32,
        sampler: sampler.a1111_name().to_string(),
        schedule_type: Some(schedule_type(sampler, schedule_name).to_string()),
        cfg_scale: req.cfg_scale as f64,
        seed: req.seed,
        width: req.width,
        height: req.height,
        model_hash,
        model: req
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned()),
        clip_skip: req.clip_skip as u32,
        vae_hash: match &req.vae {
            Some(v) => Some(model_short_hash(&hashes_of(v)?)),
            None => None,
        },
        vae: req
            .vae
            .as_ref()
            .and_then(|v| v.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
        rng: Some("CPU".into()),
        lora_hashes,
        ti_hashes,
        // Not an A1111 key: written only when --prediction overrode what A1111 would use.
        extra: match prediction != a1111_prediction {
            true => vec![("Prediction".into(), prediction.name().into())],
            false => Vec::new(),
        },
        version: Some(loratool_version()),
    };
    Ok(images
        .map(|(seed, image)| Rendered {
            image,
            infotext: GenerationParameters {
                seed,
                ..parameters.clone()
            }
            .to_infotext(),
            notes: c.notes.clone(),
        })
        .collect())
}
