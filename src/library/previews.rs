//! `library previews`: a preview image for every indexed LoRA (or every one without any), rendered
//! with a checkpoint of its family, its trigger words and preferred weight from A1111's
//! `<stem>.json`, written as `<stem>.preview.png` beside it and recorded in the index.
//!
//! Each family's checkpoint is loaded once per worker and only the tensors a LoRA patches are
//! rebuilt between LoRAs ([`LoadedModels`]). Every preview is written whole (temp file, fsync,
//! rename) and an existing file is never replaced without `force`, so a run that was killed is
//! resumed by running it again: what was written is skipped, the rest is rendered.

use super::query::{Entry, ListFilter};
use super::sidecar::{previews_of, rendered_preview_path, A1111Card};
use super::Library;
use crate::family::layout::Checkpoint;
use crate::family::BaseModel;
use crate::ops::progress::ProgressSink;
use crate::preview::png::write_png;
use crate::preview::txt2img::{LoadedModels, Txt2Img};
use crate::tensors::WriteOptions;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};

/// What `library previews` renders and how.
#[derive(Clone)]
pub struct PreviewsOptions {
    /// Only LoRAs without any preview image (any name A1111 looks for).
    pub missing_only: bool,
    /// Only LoRAs of this base model (`sd1`, `sdxl`, …).
    pub base: Option<String>,
    /// The checkpoint each base model renders with; a LoRA whose base has none is skipped.
    pub models: BTreeMap<String, PathBuf>,
    /// Every render's settings: prompt (the LoRA's tag and trigger words are appended),
    /// negative prompt, sampler, steps, seed, placement. Its `model` and `loras` are ignored.
    pub request: Txt2Img,
    /// The render size; `None`: the family's native size (1024 for SDXL, 512 otherwise).
    pub size: Option<(u32, u32)>,
    /// Workers, each with its own copy of the models (memory grows with it).
    pub jobs: usize,
    /// Replace an existing `<stem>.preview.png`.
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreviewStatus {
    Rendered,
    Skipped,
    Failed,
}

/// What happened to one LoRA.
#[derive(Debug, Clone, Serialize)]
pub struct PreviewOutcome {
    pub path: String,
    pub base_model: Option<String>,
    pub status: PreviewStatus,
    /// The preview written (rendered) or the one that made it skip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// Why it was skipped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The prompt it was rendered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PreviewsReport {
    pub rendered: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Checkpoint loads (one per family per worker).
    pub model_loads: usize,
    pub outcomes: Vec<PreviewOutcome>,
}

/// One LoRA to render.
struct Job {
    entry: Entry,
    path: PathBuf,
    preview: PathBuf,
}

impl Library {
    /// Renders the previews `opts` asks for (see the module's description); `progress` counts
    /// sampling steps. A LoRA that cannot be rendered is reported and the rest go on; only a
    /// problem with the options themselves is an error.
    pub fn render_previews(
        &mut self,
        opts: &PreviewsOptions,
        progress: &ProgressSink,
    ) -> Result<PreviewsReport> {
        for (base, model) in &opts.models {
            check_model_family(base, model)?;
        }
        // Unreadable files are listed too: they may be LoRAs, and the user should hear of them.
        let mut entries = Vec::new();
        for file_type in ["lora", "unreadable"] {
            entries.extend(self.list(&ListFilter {
                file_type: Some(file_type.into()),
                base: opts.base.clone(),
                ..ListFilter::default()
            })?);
        }
        let mut report = PreviewsReport::default();
        let mut by_family: BTreeMap<String, Vec<Job>> = BTreeMap::new();
        for entry in entries {
            let path = entry.file_path();
            let existing = previews_of(&path);
            let preview = rendered_preview_path(&path);
            let skip = |reason: String, shown: Option<&PathBuf>| PreviewOutcome {
                path: entry.path.clone(),
                base_model: entry.base_model.clone(),
                status: PreviewStatus::Skipped,
                preview: shown.map(|p| p.display().to_string()),
                reason: Some(reason),
                prompt: None,
            };
            let base = entry.base_model.clone().unwrap_or_else(|| "unknown".into());
            let outcome = if opts.missing_only && !existing.is_empty() {
                Some(skip("has a preview".into(), existing.first()))
            } else if preview.exists() && !opts.force {
                Some(skip(
                    "its preview exists (--force replaces it)".into(),
                    Some(&preview),
                ))
            } else if entry.file_type == "unreadable" {
                Some(skip(
                    format!(
                        "unreadable: {}",
                        entry.error.as_deref().unwrap_or("not a model file")
                    ),
                    None,
                ))
            } else if !opts.models.contains_key(&base) {
                Some(skip(
                    format!("no checkpoint for {base} (give --model-for {base}=PATH)"),
                    None,
                ))
            } else {
                None
            };
            match outcome {
                Some(o) => report.push(o),
                None => by_family.entry(base).or_default().push(Job {
                    entry,
                    path,
                    preview,
                }),
            }
        }
        let total: usize = by_family.values().map(Vec::len).sum();
        progress.start((total * opts.request.steps) as u64);
        for (base, jobs) in by_family {
            let model = &opts.models[&base];
            self.render_family(opts, &base, model, jobs, progress, &mut report)?;
        }
        Ok(report)
    }

    /// Renders one family's LoRAs on `opts.jobs` workers, recording each preview in the index
    /// as it arrives.
    fn render_family(
        &mut self,
        opts: &PreviewsOptions,
        base: &str,
        model: &Path,
        jobs: Vec<Job>,
        progress: &ProgressSink,
        report: &mut PreviewsReport,
    ) -> Result<()> {
        let workers = opts.jobs.clamp(1, jobs.len().max(1));
        let queue = Mutex::new(jobs.into_iter().collect::<std::collections::VecDeque<_>>());
        let (send, receive) = mpsc::channel::<(Job, Result<(String, String)>)>();
        let loads = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let send = send.clone();
                let (queue, loads) = (&queue, &loads);
                scope.spawn(move || {
                    let next = || queue.lock().ok().and_then(|mut q| q.pop_front());
                    let loaded = Checkpoint::open(model).and_then(|checkpoint| {
                        loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let base_request = Txt2Img {
                            model: model.to_path_buf(),
                            ..opts.request.clone()
                        };
                        // The models borrow the checkpoint: both live in this worker.
                        let mut models = LoadedModels::load(&checkpoint, &base_request)?;
                        while let Some(job) = next() {
                            let result = render_one(&mut models, opts, base, model, &job, progress);
                            if send.send((job, result)).is_err() {
                                break;
                            }
                        }
                        Ok(())
                    });
                    if let Err(e) = loaded {
                        // The checkpoint would not load: every LoRA this worker would have
                        // taken fails with that reason.
                        let reason = format!("{}: {e}", model.display());
                        while let Some(job) = next() {
                            let failed = Err(Error::Invalid(reason.clone()));
                            if send.send((job, failed)).is_err() {
                                break;
                            }
                        }
                    }
                });
            }
            drop(send);
            for (job, result) in receive {
                let outcome = match result {
                    Ok((prompt, infotext)) => {
                        self.record_preview(&job, &infotext);
                        PreviewOutcome {
                            path: job.entry.path.clone(),
                            base_model: job.entry.base_model.clone(),
                            status: PreviewStatus::Rendered,
                            preview: Some(job.preview.display().to_string()),
                            reason: None,
                            prompt: Some(prompt),
                        }
                    }
                    Err(e) => PreviewOutcome {
                        path: job.entry.path.clone(),
                        base_model: job.entry.base_model.clone(),
                        status: PreviewStatus::Failed,
                        preview: None,
                        reason: Some(e.to_string()),
                        prompt: None,
                    },
                };
                report.push(outcome);
            }
        });
        report.model_loads += loads.into_inner();
        Ok(())
    }

    /// The index learns of a preview just written: the file's sidecars are re-read and the
    /// render's parameters kept. A failure here loses nothing (the next scan finds the file).
    fn record_preview(&mut self, job: &Job, infotext: &str) {
        let recorded = self.reindex_file(&job.path).and_then(|_| {
            self.conn
                .execute(
                    "INSERT OR REPLACE INTO previews (file_id, path, rendered, parameters, created_at)
                     VALUES (?1, ?2, 1, ?3, ?4)",
                    rusqlite::params![
                        job.entry.id,
                        super::sidecar::path_bytes(&job.preview),
                        infotext,
                        super::scan::now()
                    ],
                )
                .map_err(|e| super::db::db_error(&self.path, e))
        });
        if let Err(e) = recorded {
            eprintln!(
                "loratool: {}: preview written but not indexed: {e}",
                job.path.display()
            );
        }
    }
}

impl PreviewsReport {
    fn push(&mut self, o: PreviewOutcome) {
        match o.status {
            PreviewStatus::Rendered => self.rendered += 1,
            PreviewStatus::Skipped => self.skipped += 1,
            PreviewStatus::Failed => self.failed += 1,
        }
        self.outcomes.push(o);
    }
}

/// `--model-for BASE=PATH` must name a checkpoint of that base model.
fn check_model_family(base: &str, model: &Path) -> Result<()> {
    let checkpoint = Checkpoint::open(model)?;
    let family = checkpoint.family();
    if family.name() != base {
        return Err(Error::bad_file(
            model,
            format!(
                "an {} checkpoint, given for {base} LoRAs",
                match family {
                    BaseModel::Unknown => "unrecognised".to_string(),
                    f => f.name().to_string(),
                }
            ),
        ));
    }
    Ok(())
}

/// Renders one LoRA's preview and writes it; returns the prompt and the infotext.
fn render_one(
    models: &mut LoadedModels,
    opts: &PreviewsOptions,
    base: &str,
    model: &Path,
    job: &Job,
    progress: &ProgressSink,
) -> Result<(String, String)> {
    let card = A1111Card::read(&job.path);
    // A1111's card: `<lora:NAME:preferred weight>` (0 or none: the default multiplier, 1).
    let weight = card.preferred_weight.unwrap_or(1.0);
    let name = job.entry.stem.clone();
    let join = |a: &str, b: Option<&str>| match (a.trim(), b) {
        (a, Some(b)) if !a.is_empty() => format!("{a}, {b}"),
        (_, Some(b)) => b.to_string(),
        (a, None) => a.to_string(),
    };
    let tag = format!("<lora:{name}:{weight}>");
    let prompt = join(&opts.request.prompt, card.trigger());
    let prompt = match prompt.is_empty() {
        true => tag,
        false => format!("{prompt} {tag}"),
    };
    let (width, height) = opts.size.unwrap_or(match base {
        "sdxl" => (1024, 1024),
        _ => (512, 512),
    });
    let req = Txt2Img {
        model: model.to_path_buf(),
        prompt: prompt.clone(),
        negative: join(&opts.request.negative, card.negative()),
        loras: Vec::new(),
        known_loras: vec![(name, job.path.clone())],
        trigger: false,
        width,
        height,
        ..opts.request.clone()
    };
    let (mut rendered, _) = models.render(&req, &[req.seed], progress)?;
    let rendered = rendered.remove(0);
    let write = WriteOptions {
        force: opts.force,
        inputs: vec![model.to_path_buf(), job.path.clone()],
    };
    write_png(&job.preview, &rendered.image, &rendered.infotext, &write)?;
    Ok((prompt, rendered.infotext))
}
