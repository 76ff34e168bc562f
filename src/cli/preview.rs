//! `loratool preview`: flags, the seed, the step bar, the PNG.

use super::progress::count_bar;
use super::values::parse_lora;
use clap::{Args, ValueEnum};
use loratool::preview::png::write_png;
use loratool::preview::sampling::{Prediction, SamplerKind, ScheduleKind};
use loratool::preview::txt2img::{lora_files, txt2img, txt2img_grid, GridSpec, Txt2Img};
use loratool::preview::weights::Placement;
use loratool::tensors::WriteOptions;
use loratool::Result;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SamplerArg {
    #[value(name = "euler-a")]
    EulerA,
    Euler,
    #[value(name = "dpm++2m")]
    DpmPp2m,
    Ddim,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Normal,
    Karras,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
}

/// Where the initial and per-step noise comes from; A1111's "RNG source". Only the CPU generator
/// (torch's mt19937, the same on every machine) is offered.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum RngArg {
    Cpu,
}

/// How every render samples, shared by `preview` and `library previews`.
#[derive(Args, Debug)]
pub struct SamplingFlags {
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.0)]
    cfg: f32,
    #[arg(long, value_enum, default_value = "euler-a")]
    sampler: SamplerArg,
    #[arg(long, value_enum, default_value = "normal")]
    schedule: ScheduleArg,
    /// A1111's "Clip skip" (CLIP-L only: A1111 conditions SD2 on OpenCLIP's penultimate layer
    /// whatever it is set to, and still records it).
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
    /// The noise source (A1111's "RNG source: CPU"; the same seed gives the same image anywhere).
    #[arg(long, value_enum, default_value = "cpu")]
    rng: RngArg,
    /// The models' weights and activations: f32 (exact, the default) or f16 (half the memory;
    /// on the CPU slower, and not bit-comparable with f32 renders).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// cpu, cuda[:N] or metal[:N] (the GPU ones need a build with `--features cuda`/`metal`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// What the UNet predicts, `eps` or `v`; by default A1111's rule decides (SD2: its probe of
    /// the UNet; everything else: eps).
    #[arg(long, value_name = "eps|v")]
    prediction: Option<String>,
}

impl SamplingFlags {
    /// `req` with these settings.
    pub fn apply(&self, req: Txt2Img) -> Result<Txt2Img> {
        let RngArg::Cpu = self.rng;
        Ok(Txt2Img {
            sampler: match self.sampler {
                SamplerArg::EulerA => SamplerKind::EulerAncestral,
                SamplerArg::Euler => SamplerKind::Euler,
                SamplerArg::DpmPp2m => SamplerKind::DpmPp2m,
                SamplerArg::Ddim => SamplerKind::Ddim,
            },
            schedule: match self.schedule {
                ScheduleArg::Normal => ScheduleKind::Normal,
                ScheduleArg::Karras => ScheduleKind::Karras,
            },
            steps: self.steps,
            cfg_scale: self.cfg,
            clip_skip: self.clip_skip,
            prediction: match &self.prediction {
                Some(p) => Some(Prediction::parse(p).ok_or_else(|| {
                    loratool::Error::Invalid(format!("--prediction '{p}': eps or v"))
                })?),
                None => None,
            },
            placement: Placement {
                device: Placement::device(&self.device)?,
                dtype: match self.dtype {
                    DtypeArg::F32 => candle_core::DType::F32,
                    DtypeArg::F16 => candle_core::DType::F16,
                },
            },
            ..req
        })
    }
}

#[derive(Args, Debug)]
pub struct PreviewArgs {
    /// An SD1, SD2 or SDXL checkpoint (single file or diffusers pipeline folder).
    #[arg(long, value_name = "CKPT")]
    model: PathBuf,
    /// A diffusers pipeline folder (or a folder of its */config.json) for head counts and norm
    /// groups the weights cannot tell (non-standard or tiny models); a pipeline folder given as
    /// --model is read for its own configs unless this is given.
    #[arg(long, value_name = "DIR")]
    config: Option<PathBuf>,
    /// A VAE file (LDM names, e.g. the ft-MSE VAE) that replaces the checkpoint's.
    #[arg(long, value_name = "PATH")]
    vae: Option<PathBuf>,
    /// The prompt, in A1111's syntax (`<lora:NAME:W>`, `(word:1.2)`, `[word]`, BREAK).
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    /// PATH, PATH:W or PATH:TE_W:UNET_W (optionally :lbw=SPEC), applied at load time.
    #[arg(long, value_name = "PATH[:W]")]
    lora: Vec<String>,
    /// Folders searched (recursively) for the prompt's `<lora:NAME>` files.
    #[arg(long, value_name = "DIR")]
    lora_dir: Vec<PathBuf>,
    /// Textual-inversion folders (A1111's `embeddings/`): files found by stem in the prompts.
    #[arg(long, value_name = "DIR")]
    embedding_dir: Vec<PathBuf>,
    /// The library index that resolves `<lora:NAME>` by file stem or alias when no --lora-dir has
    /// it (default: $LORATOOL_DB, else $XDG_DATA_HOME/loratool/library.db, when it exists).
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
    /// Append each LoRA's activation text (its A1111 `<stem>.json`) to the prompt.
    #[arg(long)]
    trigger: bool,
    /// -1: a random seed (printed and recorded).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    seed: i64,
    #[arg(long, default_value_t = 512)]
    width: u32,
    #[arg(long, default_value_t = 512)]
    height: u32,
    #[command(flatten)]
    sampling: SamplingFlags,
    /// A labelled contact sheet: `weights=0,0.5,1` (every LoRA at each weight, one column each)
    /// and optionally `;seeds=1,2` (one row each; default: --seed).
    #[arg(long, value_name = "SPEC")]
    grid: Option<String>,
    #[arg(short = 'o', long, value_name = "OUT.png")]
    output: Option<PathBuf>,
    /// Also (or instead of -o) write the image as `<lora stem>.preview.png` beside the render's
    /// one LoRA (A1111's and ComfyUI's preview), and update the library index's entry for it.
    #[arg(long)]
    save_beside: bool,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
}

pub fn run(args: PreviewArgs) -> Result<i32> {
    let seed = match args.seed {
        s if s >= 0 => s as u64,
        // A1111 draws seeds below 2³² as well.
        _ => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            (nanos % (1u128 << 32)) as u64
        }
    };
    let req = args.sampling.apply(Txt2Img {
        vae: args.vae.clone(),
        config: args.config.clone(),
        prompt: args.prompt.clone(),
        negative: args.negative.clone(),
        loras: args
            .lora
            .iter()
            .map(|l| parse_lora(l))
            .collect::<Result<_>>()?,
        lora_dirs: args.lora_dir.clone(),
        embedding_dirs: args.embedding_dir.clone(),
        library: loratool::library::db::default_path(args.db.as_deref()).ok(),
        trigger: args.trigger,
        seed,
        width: args.width,
        height: args.height,
        ..Txt2Img::new(&args.model)
    })?;
    let grid = match &args.grid {
        Some(spec) => Some(GridSpec::parse(spec, seed)?),
        None => None,
    };
    let beside = match args.save_beside {
        true => {
            let files = lora_files(&req)?;
            let [lora] = files.as_slice() else {
                return Err(loratool::Error::Invalid(format!(
                    "--save-beside: the render uses {} LoRAs; it needs exactly one",
                    files.len()
                )));
            };
            Some((
                lora.clone(),
                loratool::library::sidecar::rendered_preview_path(lora),
            ))
        }
        false => None,
    };
    let outputs: Vec<PathBuf> = args
        .output
        .iter()
        .cloned()
        .chain(beside.iter().map(|(_, png)| png.clone()))
        .collect();
    if outputs.is_empty() {
        return Err(loratool::Error::Invalid(
            "nowhere to write the image: give -o OUT.png or --save-beside".into(),
        ));
    }
    let write = WriteOptions {
        force: args.force,
        inputs: std::iter::once(args.model.clone())
            .chain(beside.iter().map(|(lora, _)| lora.clone()))
            .collect(),
    };
    // Checked before the render (minutes), and again by the atomic write.
    if let Some(existing) = outputs.iter().find(|o| o.exists() && !args.force) {
        return Err(loratool::Error::OutputExists {
            path: existing.clone(),
            appeared: false,
        });
    }
    let (bar, progress) = count_bar("sampling", "steps");
    let rendered = match &grid {
        Some(g) => txt2img_grid(&req, g, &progress),
        None => txt2img(&req, &progress),
    };
    bar.finish_and_clear();
    let rendered = rendered?;
    for note in &rendered.notes {
        eprintln!("note: {note}");
    }
    for out in &outputs {
        write_png(out, &rendered.image, &rendered.infotext, &write)?;
        println!("{} (seed {seed})", out.display());
    }
    // The index learns of the new preview now, not at the next scan (only for a LoRA it knows).
    if let (Some((lora, _)), Some(db)) = (&beside, req.library.as_ref().filter(|p| p.exists())) {
        let lora = std::fs::canonicalize(lora).unwrap_or_else(|_| lora.clone());
        let indexed = loratool::library::Library::open(db).and_then(|mut lib| {
            match lib.known_hashes(&lora) {
                Some(_) => lib.reindex_file(&lora),
                None => Ok(()),
            }
        });
        if let Err(e) = indexed {
            eprintln!(
                "loratool: {}: preview written but not indexed: {e}",
                lora.display()
            );
        }
    }
    Ok(0)
}
