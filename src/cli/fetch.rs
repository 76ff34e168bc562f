//! `loratool fetch`: flags, destination, progress bars, the summary and the index record.

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use loratool::hub::civitai::FileChoice;
use loratool::hub::fetch::{FetchOptions, Fetched, Services};
use loratool::hub::human_bytes;
use loratool::library::{db, Library};
use loratool::ops::progress::{Progress, ProgressSink};
use loratool::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// civitai:MODEL[@VERSION], a Civitai model or download URL, an AIR
    /// (urn:air:…:civitai:MODEL@VERSION), hf:OWNER/REPO[/PATH][@REV] or a Hugging Face URL. With
    /// --identify: local files.
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<String>,
    /// Look the given local files up on Civitai by hash and write their sidecars; nothing is
    /// downloaded but sidecars and previews.
    #[arg(long)]
    identify: bool,
    /// Destination folder (default: the library's first root).
    #[arg(long, value_name = "DIR")]
    into: Option<PathBuf>,
    /// Civitai: the file of the version with this name.
    #[arg(long, value_name = "NAME")]
    file: Option<String>,
    /// Civitai: the file type (Model, Pruned Model, Training Data, VAE, …).
    #[arg(long = "type", value_name = "TYPE")]
    file_type: Option<String>,
    /// Civitai: SafeTensor or PickleTensor (or another format Civitai lists).
    #[arg(long)]
    format: Option<String>,
    /// Civitai: fp16, fp32, bf16, …
    #[arg(long)]
    fp: Option<String>,
    /// Civitai: pruned or full.
    #[arg(long)]
    size: Option<String>,
    /// Downloads at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=8))]
    jobs: u16,
    /// API token (default: CIVITAI_API_TOKEN for Civitai; HF_TOKEN or the huggingface-cli login
    /// for Hugging Face). Never printed or written anywhere.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Do not write .civitai.info, the preview image and A1111's <stem>.json.
    #[arg(long)]
    no_sidecars: bool,
    /// Do not record fetched files in the library index.
    #[arg(long)]
    no_index: bool,
    /// The index file (default: $LORATOOL_DB, else $XDG_DATA_HOME/loratool/library.db).
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
    /// A JSON report on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: FetchArgs) -> Result<i32> {
    let services = Services::from_env(args.token.as_deref()).map_err(|problem| Error::Fetch {
        item: "fetch".into(),
        problem,
    })?;
    if args.identify {
        return super::identify::run_paths(
            &services,
            &args.sources,
            args.db.as_deref(),
            args.json,
            args.no_index,
        );
    }
    let sources = args
        .sources
        .iter()
        .map(|s| services.parse(s).map(|p| (s.clone(), p)))
        .collect::<Result<Vec<_>>>()?;
    let db_path = db::default_path(args.db.as_deref())?;
    let into = match &args.into {
        Some(d) => d.clone(),
        None => default_destination(&db_path)?,
    };
    std::fs::create_dir_all(&into).map_err(|e| Error::io(&into, e))?;
    let opts = FetchOptions {
        into,
        choice: FileChoice {
            name: args.file.clone(),
            file_type: args.file_type.clone(),
            format: args.format.clone(),
            fp: args.fp.clone(),
            size: args.size.clone(),
        },
        sidecars: !args.no_sidecars,
    };

    let bars = MultiProgress::new();
    let queue = Mutex::new(sources.iter().enumerate());
    let results: Mutex<Vec<(usize, std::result::Result<Fetched, Error>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..(args.jobs as usize).min(sources.len()) {
            scope.spawn(|| {
                while let Some((i, (arg, source))) =
                    queue.lock().map(|mut q| q.next()).ok().flatten()
                {
                    let bar = bars.add(file_bar(arg));
                    let sink = ProgressSink::new(Arc::new(Bar(bar.clone())));
                    let outcome =
                        services
                            .fetch(source, &opts, &sink)
                            .map_err(|problem| Error::Fetch {
                                item: arg.clone(),
                                problem,
                            });
                    bar.finish_and_clear();
                    if let Ok(mut r) = results.lock() {
                        r.push((i, outcome));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(i, _)| *i);

    let mut failed = false;
    let mut report = Vec::new();
    let mut library = match args.no_index {
        true => None,
        false => Some(Library::open(&db_path)),
    };
    for (i, outcome) in results {
        let arg = &sources[i].0;
        match outcome {
            Ok(f) => {
                let indexed = match library.as_mut() {
                    Some(Ok(lib)) => lib
                        .record_source(&f.path, &f.origin, Some(&f.hashes))
                        .map_err(|e| e.to_string()),
                    Some(Err(e)) => Err(e.to_string()),
                    None => Ok(()),
                };
                if let Err(e) = &indexed {
                    eprintln!(
                        "loratool: {}: downloaded but not indexed: {e}",
                        f.path.display()
                    );
                }
                if let Some(p) = &f.sidecar_problem {
                    eprintln!("loratool: {}: {p}", f.path.display());
                }
                if !args.json {
                    print_fetched(&f);
                }
                report.push(serde_json::json!({"source": arg, "ok": true, "file": f, "indexed": indexed.is_ok()}));
            }
            Err(e) => {
                failed = true;
                eprintln!("loratool: {e}");
                report
                    .push(serde_json::json!({"source": arg, "ok": false, "error": e.to_string()}));
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    }
    Ok(i32::from(failed))
}

fn print_fetched(f: &Fetched) {
    let how = match (f.already_present, f.resumed_from) {
        (true, _) => "already present".to_string(),
        (false, 0) => format!("fetched {}", human_bytes(f.size)),
        (false, n) => format!(
            "fetched {} (resumed at {})",
            human_bytes(f.size),
            human_bytes(n)
        ),
    };
    println!("{how}: {}  sha256 {}", f.path.display(), f.sha256);
    for s in &f.sidecars {
        println!("  wrote {}", s.display());
    }
}

/// The library's first root, when there is a library with roots.
fn default_destination(db_path: &Path) -> Result<PathBuf> {
    let none = || {
        Error::Invalid(
            "no destination: pass --into DIR, or make a folder the default with `loratool library add DIR`"
                .into(),
        )
    };
    if !db_path.exists() {
        return Err(none());
    }
    let lib = Library::open(db_path)?;
    lib.root_paths()?.into_iter().next().ok_or_else(none)
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, total: u64) {
        if total > 0 {
            self.0.set_length(total);
        }
    }

    fn advance(&self, done: u64) {
        self.0.inc(done);
    }
}

fn file_bar(label: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} {eta} left",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let label: String = label.chars().take(40).collect();
    bar.set_message(label);
    bar
}
