//! `loratool library …`: flags, the index's location, tables and JSON.

use super::progress::{bytes_bar, count_bar};
use clap::{Args, Subcommand, ValueEnum};
use loratool::library::gallery::{GalleryOptions, GalleryReport};
use loratool::library::organize::{GroupBy, OrganizeOptions, OrganizeReport};
use loratool::library::query::{Entry, ListFilter, Resolved, Sort};
use loratool::library::scan::{ScanOptions, ScanReport};
use loratool::library::sidecar::{write_user_metadata, UserMetadataEdit};
use loratool::library::similar::{NearReport, SimilarReport, Skipped};
use loratool::library::{db, Library};
use loratool::ops::progress::ProgressSink;
use loratool::{Error, Result};
use std::ffi::OsString;
use std::path::PathBuf;
use tabled::builder::Builder;
use tabled::settings::peaker::Priority;
use tabled::settings::{Style, Width};

#[derive(Args, Debug)]
pub struct LibraryArgs {
    /// The index file (default: $LORATOOL_DB, else $XDG_DATA_HOME/loratool/library.db).
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<PathBuf>,
    #[command(subcommand)]
    command: LibraryCommand,
}

#[derive(Subcommand, Debug)]
enum LibraryCommand {
    /// Remember folders as roots and scan them.
    Add {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        #[command(flatten)]
        scan: ScanFlags,
    },
    /// List the roots.
    Roots {
        #[arg(long)]
        json: bool,
    },
    /// (Re)index every root: only new and changed files are read.
    Scan(ScanFlags),
    /// List indexed files.
    List(ListArgs),
    /// Everything known about one file (a name, alias, hash prefix or path).
    Show {
        name: OsString,
        #[arg(long)]
        json: bool,
    },
    /// Identical files, identical tensors under other metadata, and A1111 name collisions; with
    /// `--near`, LoRAs whose effects (ΔW) are alike.
    Dupes {
        #[arg(long)]
        json: bool,
        /// Group LoRAs whose ΔW cosine is at least the threshold (resized, re-saved copies).
        #[arg(long)]
        near: bool,
        #[arg(long, default_value_t = 0.95, requires = "near")]
        threshold: f64,
    },
    /// The LoRAs of the same base model whose effect (ΔW) is most like NAME's.
    Similar {
        name: OsString,
        /// How many to compare exactly and show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
    /// Rehash every file; report changed, truncated and missing ones (exit 1 if any).
    Verify {
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Add or remove tags.
    Tag {
        #[arg(value_enum)]
        action: TagAction,
        name: OsString,
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Set a file's note (an empty text clears it).
    Note { name: OsString, text: String },
    /// Write A1111's `<stem>.json` (keeping every field it does not set) and re-index the file.
    Sidecar(SidecarArgs),
    /// Move indexed files, each with all its sidecars, into DIR/<group>/ (never overwriting).
    Organize(OrganizeArgs),
    /// Render `<stem>.preview.png` beside every indexed LoRA (or every one without a preview)
    /// with a checkpoint of its base model, its trigger words and preferred weight; recorded in
    /// the index. Killed, a second run renders only what is still missing.
    Previews(PreviewsArgs),
    /// Look indexed files up on Civitai by hash; write `.civitai.info`, the preview and A1111's
    /// `<stem>.json` where missing; record the ids. Model files are never changed.
    Identify {
        /// Every indexed file, not only those without Civitai information.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
        /// Civitai API token (default: CIVITAI_API_TOKEN).
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
    },
    /// Files with Civitai ids whose model has a newer version, with the command that fetches it.
    Outdated {
        #[arg(long)]
        json: bool,
        /// Ask Civitai again even for models checked in the last day.
        #[arg(long)]
        refresh: bool,
        /// Civitai API token (default: CIVITAI_API_TOKEN).
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
    },
    /// A static web page of the LoRAs (DIR/index.html, thumbnails in DIR/thumbs/): search,
    /// filters, sort, details and the A1111 prompt tag. Opens from disk; no server.
    Gallery {
        /// The folder to write (created when missing).
        #[arg(short = 'o', long = "out", value_name = "DIR")]
        out: PathBuf,
        /// Replace an index.html in DIR that loratool did not write.
        #[arg(long)]
        force: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// The summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The whole index as JSON (schema: docs/LIBRARY.md).
    Export {
        #[arg(long, required = true)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct ScanFlags {
    /// Forget files that are gone instead of marking them missing.
    #[arg(long)]
    prune: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// The scan report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PreviewsArgs {
    /// Only LoRAs without any preview image (any name A1111 looks for).
    #[arg(long)]
    missing: bool,
    /// Only LoRAs of this base model (sd1, sd2, sdxl, …).
    #[arg(long)]
    base: Option<String>,
    /// The checkpoint for a base model's LoRAs, e.g. `sd1=v1-5.safetensors` (repeatable); LoRAs
    /// of a base model without one are skipped and reported.
    #[arg(long, value_name = "BASE=PATH", required = true)]
    model_for: Vec<String>,
    /// A diffusers pipeline folder (or a folder of its */config.json) for head counts and norm
    /// groups the weights cannot tell (non-standard or tiny models), for every checkpoint.
    #[arg(long, value_name = "DIR")]
    config: Option<PathBuf>,
    /// Text before each LoRA's activation text and `<lora:NAME:W>` tag.
    #[arg(long, default_value = "")]
    prompt: String,
    /// The negative prompt (each LoRA's `negative text` is added to it).
    #[arg(long, default_value = "")]
    negative: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Default: the base model's native size (1024 for SDXL, 512 otherwise).
    #[arg(long, requires = "height")]
    width: Option<u32>,
    #[arg(long, requires = "width")]
    height: Option<u32>,
    /// Renders at once, each with its own copy of the checkpoint in memory.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Replace existing `<stem>.preview.png` files.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    sampling: super::preview::SamplingFlags,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TagAction {
    Add,
    Rm,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum TypeArg {
    Lora,
    Checkpoint,
    Other,
    Unreadable,
    All,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SortArg {
    Name,
    Size,
    Added,
    Rank,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[arg(long = "type", value_enum, default_value = "lora")]
    file_type: TypeArg,
    /// Base model: sd1, sd2, sdxl, sd3, flux, …
    #[arg(long)]
    base: Option<String>,
    /// Network kind (lora, locon, loha, lokr, …) or model kind (checkpoint, vae, …).
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    tag: Option<String>,
    /// Words in the file name, alias, trigger words, tags, notes or metadata.
    #[arg(long)]
    search: Option<String>,
    /// Only files without a preview image.
    #[arg(long)]
    missing_preview: bool,
    /// Only files that are gone from disk.
    #[arg(long)]
    missing: bool,
    #[arg(long, value_enum, default_value = "name")]
    sort: SortArg,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ByArg {
    /// sd1, sd2, sdxl, sd3, flux, unknown.
    Base,
    /// lora, locon, loha, … (checkpoint, vae, … for other files).
    Kind,
    /// The Civitai creator (.civitai.info), else modelspec.author, else unknown.
    Creator,
    /// The first tag alphabetically, else untagged.
    Tag,
}

#[derive(Args, Debug)]
struct OrganizeArgs {
    #[arg(long, value_enum)]
    by: ByArg,
    /// The folder to organize into (added as a root when it is not under one).
    #[arg(long, value_name = "DIR")]
    into: PathBuf,
    #[arg(long = "type", value_enum, default_value = "lora")]
    file_type: TypeArg,
    /// Print the plan; move nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SidecarArgs {
    name: OsString,
    #[arg(long)]
    activation_text: Option<String>,
    #[arg(long)]
    preferred_weight: Option<f64>,
    #[arg(long)]
    negative_text: Option<String>,
    #[arg(long)]
    notes: Option<String>,
    #[arg(long)]
    description: Option<String>,
    /// SD1, SD2, SDXL, SD3 or Unknown.
    #[arg(long)]
    sd_version: Option<String>,
}

pub fn run(args: LibraryArgs) -> Result<i32> {
    let path = db::default_path(args.db.as_deref())?;
    let mut lib = Library::open(&path)?;
    match args.command {
        LibraryCommand::Add { dirs, scan } => {
            let roots = lib.add_roots(&dirs)?;
            run_scan(&mut lib, Some(&roots), &scan)
        }
        LibraryCommand::Roots { json } => {
            let roots = lib.roots()?;
            if json {
                print_json(&roots);
            } else {
                let mut b = Builder::default();
                b.push_record(["root", "files", "missing"]);
                for r in &roots {
                    b.push_record([r.path.clone(), r.files.to_string(), r.missing.to_string()]);
                }
                print_table(b);
            }
            Ok(0)
        }
        LibraryCommand::Scan(flags) => run_scan(&mut lib, None, &flags),
        LibraryCommand::List(a) => {
            let filter = ListFilter {
                file_type: type_filter(a.file_type),
                base: a.base,
                kind: a.kind,
                tag: a.tag,
                search: a.search,
                missing_preview: a.missing_preview,
                missing: a.missing,
                sort: match a.sort {
                    SortArg::Name => Sort::Name,
                    SortArg::Size => Sort::Size,
                    SortArg::Added => Sort::Added,
                    SortArg::Rank => Sort::Rank,
                },
            };
            let list = lib.list(&filter)?;
            if a.json {
                print_json(&list);
            } else {
                print_list(&list);
            }
            Ok(0)
        }
        LibraryCommand::Show { name, json } => {
            let e = resolve_one(&lib, &name)?;
            if json {
                print_json(&e);
            } else {
                print_entry(&e);
            }
            Ok(0)
        }
        LibraryCommand::Dupes {
            json,
            near: true,
            threshold,
        } => {
            let report = lib.near_dupes(threshold)?;
            if json {
                print_json(&report);
            } else {
                print_near(&report);
            }
            Ok(0)
        }
        LibraryCommand::Similar { name, top, json } => {
            let e = resolve_one(&lib, &name)?;
            let report = lib.similar(e.id, top)?;
            if json {
                print_json(&report);
            } else {
                print_similar(&report);
            }
            Ok(0)
        }
        LibraryCommand::Dupes { json, .. } => {
            let groups = lib.dupes()?;
            if json {
                print_json(&groups);
            } else if groups.is_empty() {
                println!("no duplicates and no name collisions");
            } else {
                for g in &groups {
                    let what = match g.reason {
                        "same_file" => format!("same file (sha256 {})", short(&g.key, 12)),
                        "same_tensors" => format!(
                            "same tensors, other metadata (AutoV3 {})",
                            short(&g.key, 12).to_uppercase()
                        ),
                        _ => format!("A1111 name collision: '{}'", g.key),
                    };
                    println!("{what}");
                    for f in &g.files {
                        println!("  {}", f.path);
                    }
                }
            }
            Ok(0)
        }
        LibraryCommand::Verify { json, quiet } => {
            let (bar, sink) = bar_unless(quiet, "verifying");
            let report = lib.verify(&sink)?;
            bar.finish_and_clear();
            if json {
                print_json(&report);
            } else {
                for i in &report.issues {
                    println!("{}: {}: {}", i.problem, i.path, i.detail);
                }
                println!(
                    "{} files checked: {} ok, {} with problems",
                    report.checked,
                    report.ok,
                    report.issues.len()
                );
            }
            Ok(if report.issues.is_empty() { 0 } else { 1 })
        }
        LibraryCommand::Tag { action, name, tags } => {
            let e = resolve_one(&lib, &name)?;
            lib.set_tags(e.id, &tags, matches!(action, TagAction::Add))?;
            let e = lib.entry(e.id)?.unwrap_or(e);
            println!("{}: tags {}", e.path, e.tags.join(", "));
            Ok(0)
        }
        LibraryCommand::Note { name, text } => {
            let e = resolve_one(&lib, &name)?;
            lib.set_note(e.id, &text)?;
            println!("{}: note set", e.path);
            Ok(0)
        }
        LibraryCommand::Sidecar(a) => {
            let e = resolve_one(&lib, &a.name)?;
            let edit = UserMetadataEdit {
                activation_text: a.activation_text,
                preferred_weight: a.preferred_weight,
                negative_text: a.negative_text,
                notes: a.notes,
                description: a.description,
                sd_version: a.sd_version,
            };
            let model = lib.entry_path(e.id)?;
            let written = write_user_metadata(&model, &edit)?;
            lib.reindex_file(&model)?;
            println!("wrote {}", written.display());
            Ok(0)
        }
        LibraryCommand::Organize(a) => {
            let opts = OrganizeOptions {
                by: match a.by {
                    ByArg::Base => GroupBy::Base,
                    ByArg::Kind => GroupBy::Kind,
                    ByArg::Creator => GroupBy::Creator,
                    ByArg::Tag => GroupBy::Tag,
                },
                into: a.into,
                file_type: type_filter(a.file_type),
                dry_run: a.dry_run,
            };
            let report = lib.organize(&opts)?;
            if a.json {
                print_json(&report);
            } else {
                print_organize(&report);
            }
            let failed = report.plan.iter().any(|p| p.skipped.is_some());
            Ok(if failed { 1 } else { 0 })
        }
        LibraryCommand::Previews(a) => run_previews(&mut lib, a),
        LibraryCommand::Identify { all, json, token } => {
            super::identify::run_library(&services(token.as_deref())?, lib, all, json)
        }
        LibraryCommand::Outdated {
            json,
            refresh,
            token,
        } => super::identify::run_outdated(&services(token.as_deref())?, lib, json, refresh),
        LibraryCommand::Gallery {
            out,
            force,
            quiet,
            json,
        } => {
            let (bar, progress) = match quiet {
                true => (indicatif::ProgressBar::hidden(), ProgressSink::default()),
                false => count_bar("thumbnails", "previews"),
            };
            let report = lib.gallery(&GalleryOptions {
                out,
                force,
                progress,
            })?;
            bar.finish_and_clear();
            if json {
                print_json(&report);
            } else {
                print_gallery(&report);
            }
            Ok(0)
        }
        LibraryCommand::Export { json: _ } => {
            print_json(&lib.export()?);
            Ok(0)
        }
    }
}

fn services(token: Option<&str>) -> Result<loratool::hub::fetch::Services> {
    loratool::hub::fetch::Services::from_env(token).map_err(|problem| Error::Fetch {
        item: "library".into(),
        problem,
    })
}

fn bar_unless(quiet: bool, label: &str) -> (indicatif::ProgressBar, ProgressSink) {
    match quiet {
        true => (indicatif::ProgressBar::hidden(), ProgressSink::default()),
        false => bytes_bar(label),
    }
}

fn run_scan(lib: &mut Library, roots: Option<&[PathBuf]>, flags: &ScanFlags) -> Result<i32> {
    let (bar, progress) = bar_unless(flags.quiet, "hashing");
    let opts = ScanOptions {
        prune: flags.prune,
        progress,
        after_read: None,
    };
    let report = match roots {
        Some(r) => lib.scan_roots(r, &opts),
        None => lib.scan(&opts),
    }?;
    bar.finish_and_clear();
    if flags.json {
        print_json(&report);
    } else {
        print_scan(&report);
    }
    Ok(0)
}

fn print_gallery(r: &GalleryReport) {
    for n in &r.notes {
        eprintln!("loratool: note: {}: {}", n.path, n.message);
    }
    println!(
        "wrote {}: {} LoRAs, {} thumbnails written, {} reused, {} without a preview{}",
        r.output,
        r.loras,
        r.thumbnails_written,
        r.thumbnails_reused,
        r.missing_previews,
        match r.unreadable_previews {
            0 => String::new(),
            n => format!(", {n} with an unreadable preview"),
        }
    );
}

fn print_scan(r: &ScanReport) {
    for p in &r.problems {
        eprintln!("loratool: {}: {}", p.path, p.message);
    }
    let mut line = format!(
        "{} files: {} new, {} changed, {} moved, {} unchanged, {} newly missing",
        r.files, r.new, r.changed, r.moved, r.unchanged, r.missing
    );
    if r.pruned > 0 {
        line.push_str(&format!(", {} pruned", r.pruned));
    }
    if r.unreadable > 0 {
        line.push_str(&format!(", {} unreadable", r.unreadable));
    }
    if r.hashes_from_a1111_cache > 0 {
        line.push_str(&format!(
            ", {} hashed by A1111's cache.json",
            r.hashes_from_a1111_cache
        ));
    }
    println!("{line}");
}

/// The one entry a name, hash or path means; several are an error that lists them all.
fn resolve_one(lib: &Library, name: &std::ffi::OsStr) -> Result<Entry> {
    match lib.resolve(name)? {
        Resolved::One(e) => Ok(*e),
        Resolved::None => Err(Error::Invalid(format!(
            "{}: no indexed file has this name, alias, hash or path",
            name.to_string_lossy()
        ))),
        Resolved::Many(list) => {
            let mut msg = format!(
                "{}: ambiguous, {} files answer to it (give a path or a hash):",
                name.to_string_lossy(),
                list.len()
            );
            for e in &list {
                msg.push_str(&format!(
                    "\n  {}  AutoV3 {}  AutoV2 {}",
                    e.path,
                    e.autov3.as_deref().unwrap_or("-"),
                    e.autov2.as_deref().unwrap_or("-")
                ));
            }
            Err(Error::Invalid(msg))
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("loratool: {e}"),
    }
}

fn short(s: &str, n: usize) -> &str {
    s.get(..n).unwrap_or(s)
}

fn human_size(bytes: i64) -> String {
    let b = bytes as f64;
    match bytes {
        b0 if b0 < 1 << 10 => format!("{bytes} B"),
        b0 if b0 < 1 << 20 => format!("{:.1} KiB", b / 1024.0),
        b0 if b0 < 1 << 30 => format!("{:.1} MiB", b / 1048576.0),
        _ => format!("{:.2} GiB", b / 1073741824.0),
    }
}

/// The terminal's width when stdout is one (else no limit).
fn terminal_width() -> Option<usize> {
    // SAFETY: TIOCGWINSZ fills a winsize struct; a failure leaves it zeroed.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        return Some(ws.ws_col as usize);
    }
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok())
}

fn print_table(b: Builder) {
    let mut table = b.build();
    table.with(Style::sharp());
    if let Some(w) = terminal_width() {
        table.with(Width::truncate(w).priority(Priority::max(true)));
    }
    println!("{table}");
}

fn print_list(list: &[Entry]) {
    if list.is_empty() {
        println!("no files");
        return;
    }
    let mut b = Builder::default();
    b.push_record([
        "name", "type", "base", "kind", "rank", "size", "AutoV3", "path",
    ]);
    for e in list {
        b.push_record([
            e.alias
                .as_ref()
                .filter(|a| **a != e.stem)
                .map(|a| format!("{} ({a})", e.stem))
                .unwrap_or_else(|| e.stem.clone()),
            e.file_type.clone(),
            e.base_model.clone().unwrap_or_default(),
            e.kind.clone().unwrap_or_default(),
            e.rank.map(|r| r.to_string()).unwrap_or_default(),
            human_size(e.size),
            e.autov3
                .clone()
                .or_else(|| e.autov2.clone())
                .unwrap_or_default(),
            e.path.clone(),
        ]);
    }
    print_table(b);
    println!("{} files", list.len());
}

fn print_entry(e: &Entry) {
    let mut b = Builder::default();
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut row = |k: &str, v: String| b.push_record([k.to_string(), v]);
    row("path", e.path.clone());
    row("name", e.stem.clone());
    row("alias", opt(&e.alias));
    row("type", e.file_type.clone());
    row("kind", opt(&e.kind));
    row("base model", opt(&e.base_model));
    if e.family.is_some() {
        row("family", opt(&e.family));
    }
    row("format", opt(&e.format));
    if let Some(r) = e.rank {
        row("rank", r.to_string());
    }
    if let Some(a) = e.alpha {
        row("alpha", a.to_string());
    }
    if let Some(m) = e.module_count {
        row("modules", m.to_string());
    }
    if !e.components.is_empty() {
        row("components", e.components.join(", "));
    }
    row("dtype", opt(&e.dtype));
    row("size", human_size(e.size));
    row("sha256", opt(&e.sha256));
    row("AutoV2", opt(&e.autov2));
    row("AutoV3", opt(&e.autov3));
    row("trigger words", e.trigger_words.join(", "));
    row("top tags", e.top_tags.join(", "));
    row("tags", e.tags.join(", "));
    row("note", e.note.clone());
    let sidecars: Vec<String> = e
        .sidecars
        .iter()
        .map(|s| {
            std::path::Path::new(&s.path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    row("sidecars", sidecars.join(", "));
    let sources: Vec<String> = e
        .sources
        .iter()
        .map(|s| match (&s.hf_repo, s.civitai_version_id) {
            (Some(repo), _) => format!(
                "Hugging Face {repo}/{}@{}",
                s.hf_path.as_deref().unwrap_or("?"),
                s.hf_revision.as_deref().unwrap_or("?")
            ),
            (None, Some(v)) => format!(
                "Civitai https://civitai.com/models/{}?modelVersionId={v}",
                s.civitai_model_id.unwrap_or(0)
            ),
            _ => s.source.clone(),
        })
        .collect();
    row("source", sources.join(", "));
    if e.missing {
        row("missing", "yes (gone from disk)".into());
    }
    if let Some(err) = &e.error {
        row("error", err.clone());
    }
    for w in &e.warnings {
        row("warning", w.clone());
    }
    print_table(b);
}

fn share(v: Option<f64>) -> String {
    v.map(|x| format!("{:.0}%", x * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn print_skipped(skipped: &[Skipped]) {
    for s in skipped {
        eprintln!("loratool: note: {}: skipped: {}", s.path, s.reason);
    }
}

fn print_similar(r: &SimilarReport) {
    print_skipped(&r.skipped);
    if r.matches.is_empty() {
        println!(
            "{}: no other LoRA of base model {} to compare",
            r.query.path,
            r.query.base_model.as_deref().unwrap_or("unknown")
        );
        return;
    }
    let mut b = Builder::default();
    b.push_record(["name", "cosine", "shared", "energy (query/file)", "path"]);
    for m in &r.matches {
        b.push_record([
            m.file.stem.clone(),
            format!("{:.4}", m.cosine),
            m.shared_modules.to_string(),
            format!(
                "{} / {}",
                share(m.shared_energy_query),
                share(m.shared_energy_file)
            ),
            m.file.path.clone(),
        ]);
    }
    print_table(b);
    println!(
        "{} compared exactly ({} computed, {} cached) of {} candidates ranked by sketch",
        r.matches.len(),
        r.computed,
        r.matches.len() - r.computed,
        r.candidates
    );
}

fn print_near(r: &NearReport) {
    print_skipped(&r.skipped);
    if r.groups.is_empty() {
        println!("no LoRAs with a ΔW cosine of {} or more", r.threshold);
    }
    for g in &r.groups {
        println!(
            "near duplicates ({}, cosine ≥ {}):",
            g.base_model.as_deref().unwrap_or("unknown"),
            r.threshold
        );
        for f in &g.files {
            println!("  {}", f.path);
        }
        for p in &g.pairs {
            let name = |id: i64| {
                g.files
                    .iter()
                    .find(|f| f.id == id)
                    .map(|f| f.stem.clone())
                    .unwrap_or_default()
            };
            println!("    {} ~ {}: {:.4}", name(p.a), name(p.b), p.cosine);
        }
    }
    eprintln!(
        "{} sketch estimates, {} pairs compared exactly ({} computed)",
        r.estimates, r.confirmed, r.computed
    );
}

fn type_filter(t: TypeArg) -> Option<String> {
    match t {
        TypeArg::All => None,
        t => t.to_possible_value().map(|v| v.get_name().to_string()),
    }
}

fn print_organize(r: &OrganizeReport) {
    let rec = &r.recovered;
    if rec.forward + rec.back > 0 {
        println!(
            "interrupted organize: {} moves finished, {} undone",
            rec.forward, rec.back
        );
    }
    for p in &rec.problems {
        eprintln!("loratool: interrupted organize: {p}");
    }
    if r.added_root {
        println!("{}: not under a root; added as one", r.into);
    }
    let (mut moves, mut paths, mut conflicts) = (0, 0, 0);
    for p in &r.plan {
        let word = match &p.skipped {
            Some(_) => "skip",
            None => "move",
        };
        println!("{word} {} -> {}", p.model.from, p.model.to);
        for s in &p.sidecars {
            println!("     {} -> {}", s.from, s.to);
        }
        match &p.skipped {
            Some(why) => {
                conflicts += 1;
                println!("     not moved: {why}");
            }
            None => {
                moves += 1;
                paths += 1 + p.sidecars.len();
            }
        }
    }
    let verb = if r.dry_run { "to move" } else { "moved" };
    println!(
        "{moves} files {verb} ({paths} paths with sidecars), {} already in place, {conflicts} skipped{}",
        r.in_place,
        if r.dry_run { "; dry run, nothing moved" } else { "" }
    );
}

fn run_previews(lib: &mut Library, a: PreviewsArgs) -> Result<i32> {
    use loratool::library::previews::{PreviewStatus, PreviewsOptions};
    let mut models = std::collections::BTreeMap::new();
    for spec in &a.model_for {
        let Some((base, path)) = spec
            .split_once('=')
            .filter(|(b, p)| !b.is_empty() && !p.is_empty())
        else {
            return Err(Error::Invalid(format!(
                "--model-for '{spec}': BASE=PATH, e.g. sd1=v1-5.safetensors"
            )));
        };
        models.insert(base.to_string(), PathBuf::from(path));
    }
    let request = a.sampling.apply(loratool::preview::txt2img::Txt2Img {
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        seed: a.seed,
        config: a.config.clone(),
        ..loratool::preview::txt2img::Txt2Img::new("")
    })?;
    let opts = PreviewsOptions {
        missing_only: a.missing,
        base: a.base.clone(),
        models,
        request,
        size: a.width.zip(a.height),
        jobs: a.jobs,
        force: a.force,
    };
    let (bar, progress) = super::progress::count_bar("rendering previews", "steps");
    let report = lib.render_previews(&opts, &progress);
    bar.finish_and_clear();
    let report = report?;
    if a.json {
        print_json(&report);
    } else {
        for o in &report.outcomes {
            let what = match o.status {
                PreviewStatus::Rendered => "rendered",
                PreviewStatus::Skipped => "skipped",
                PreviewStatus::Failed => "failed",
            };
            let detail = o.reason.as_deref().or(o.preview.as_deref()).unwrap_or("");
            println!("{what:8} {}  {detail}", o.path);
        }
        println!(
            "{} rendered, {} skipped, {} failed",
            report.rendered, report.skipped, report.failed
        );
    }
    Ok(if report.failed > 0 { 1 } else { 0 })
}
