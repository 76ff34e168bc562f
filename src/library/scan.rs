//! `library scan`: walk the roots, read what changed, write it to the index.
//!
//! 1. Walk every root (symlinks followed, loops and broken links reported) and stat each
//!    `.safetensors` / `.ckpt` / `.pt` file; every folder's names are kept to find sidecars.
//! 2. Compare with the index: same size, mtime and sidecars → nothing is read. Same size and mtime
//!    but other sidecars → the header is read again, the hashes kept.
//! 3. The rest is read in parallel (rayon): `ops::inspect` for what the file is, `hash_file` for
//!    sha256 and the data-section sha256 in one pass (or A1111's `cache.json`, when it holds both
//!    for an unchanged file). A file whose size or mtime moved while it was read is read once
//!    more, then reported and left out.
//! 4. Results are written by this thread in batches, one transaction each: a killed scan keeps
//!    what it committed and the next scan goes on from there. A new path with the sha256 of an
//!    indexed file whose path is gone takes over that entry (a move keeps id, tags and notes).
//! 5. Indexed files under the scanned roots that are gone are marked missing (`--prune`: removed).
//!
//! The scan reads no LoRA factors: a LoRA whose content changed gets `files.sketch = NULL`, and
//! `similar` / `dupes --near` compute the missing sketches on first use (`similar.rs`). Before
//! walking, the scan takes the lock it shares with `organize` and finishes what a killed organize
//! left (`organize.rs`).

use super::db::db_error;
use super::sidecar::{self, path_bytes, path_from_bytes, A1111Cache, Sidecar};
use super::Library;
use crate::ops::inspect::{inspect, InspectOptions, Report};
use crate::ops::inspect_model::ModelKind;
use crate::ops::progress::ProgressSink;
use crate::tensors::hash::{hash_file_reporting, FileHashes};
use crate::tensors::{Container, SafetensorsFile};
use crate::{Error, Result};
use rayon::prelude::*;
use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// File name extensions of the files the index holds (A1111's list for LoRAs).
pub const EXTENSIONS: &[&str] = &["safetensors", "ckpt", "pt"];

/// Called with a file's path after it was read and before it is checked for changes (tests use
/// it to change a file in the middle of its scan).
pub type ReadHook = Arc<dyn Fn(&Path) + Send + Sync>;

#[derive(Clone, Default)]
pub struct ScanOptions {
    /// Forget missing files under the scanned roots instead of marking them.
    pub prune: bool,
    pub progress: ProgressSink,
    #[doc(hidden)]
    pub after_read: Option<ReadHook>,
}

/// Something about one path that did not stop the scan.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

/// What a scan did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanReport {
    /// Model files found on disk.
    pub files: usize,
    pub new: usize,
    pub changed: usize,
    pub moved: usize,
    pub unchanged: usize,
    /// Entries newly marked missing.
    pub missing: usize,
    pub pruned: usize,
    /// Files indexed as unreadable (their error is in the index).
    pub unreadable: usize,
    pub bytes_read: u64,
    /// Files whose hashes came from A1111's cache.json instead of a read.
    pub hashes_from_a1111_cache: usize,
    /// Files of an interrupted `organize` moved together first (forward or back).
    pub interrupted_moves: usize,
    pub problems: Vec<Problem>,
}

/// A model file found by the walk.
#[derive(Debug, Clone)]
struct Found {
    path: PathBuf,
    size: u64,
    mtime_ns: i64,
    sidecars: Vec<Sidecar>,
    sidecar_sig: String,
}

/// The index's view of a file, read before the work starts.
struct Known {
    size: u64,
    mtime_ns: i64,
    sidecar_sig: String,
    missing: bool,
    hashes: Option<FileHashes>,
    hash_source: Option<String>,
}

/// What reading one file gave.
pub(crate) struct Analyzed {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    pub sidecars: Vec<Sidecar>,
    pub sidecar_sig: String,
    pub facts: Facts,
    pub hashes: Option<FileHashes>,
    pub hash_source: Option<&'static str>,
    /// Whether the content was read (not only the header).
    pub read_bytes: u64,
}

/// What the index records of a file's content (from `ops::inspect`).
#[derive(Debug, Default)]
pub(crate) struct Facts {
    pub file_type: &'static str,
    pub model_kind: Option<String>,
    pub container: Option<String>,
    pub format: Option<String>,
    pub network: Option<String>,
    pub base_model: Option<String>,
    pub family: Option<String>,
    pub rank: Option<i64>,
    pub rank_min: Option<i64>,
    pub alpha: Option<f64>,
    pub dtype: Option<String>,
    pub module_count: Option<i64>,
    pub tensor_count: Option<i64>,
    pub parameters: Option<i64>,
    pub components: Vec<String>,
    pub alias: Option<String>,
    pub trigger_words: Vec<String>,
    pub top_tags: Vec<String>,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub user_metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub warnings: Vec<String>,
    pub error: Option<String>,
}

enum Outcome {
    Indexed(Box<Analyzed>),
    Skipped(Problem),
}

/// Modification time in nanoseconds since the epoch.
pub fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn display(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn has_model_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Walks `roots`, collecting model files with their sidecars; everything odd is a problem.
fn walk(roots: &[PathBuf], problems: &mut Vec<Problem>) -> Vec<Found> {
    let mut names: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
    let mut files: Vec<(PathBuf, u64, i64)> = Vec::new();
    let mut seen = HashSet::new();
    for root in roots {
        if !root.is_dir() {
            problems.push(Problem {
                path: display(root),
                message: "root is not a folder (or is gone)".into(),
            });
            continue;
        }
        for entry in walkdir::WalkDir::new(root).follow_links(true) {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let path = e.path().map(Path::to_path_buf).unwrap_or_default();
                    let message = if let Some(anc) = e.loop_ancestor() {
                        format!("symlink loop (back to {}); not followed", anc.display())
                    } else if path.symlink_metadata().is_ok() && path.metadata().is_err() {
                        "broken symlink; skipped".to_string()
                    } else {
                        format!(
                            "cannot read: {}",
                            e.io_error().map_or(e.to_string(), |io| io.to_string())
                        )
                    };
                    problems.push(Problem {
                        path: display(&path),
                        message,
                    });
                    continue;
                }
            };
            if entry.file_type().is_dir() {
                continue;
            }
            let path = entry.path();
            if let Some(parent) = path.parent() {
                names
                    .entry(parent.to_path_buf())
                    .or_default()
                    .insert(entry.file_name().to_os_string());
            }
            if !entry.file_type().is_file() || !has_model_extension(path) {
                continue;
            }
            // Two roots that overlap (or a symlinked folder inside a root) list a path once.
            if !seen.insert(path.to_path_buf()) {
                continue;
            }
            match entry.metadata() {
                Ok(m) => files.push((path.to_path_buf(), m.len(), mtime_ns(&m))),
                Err(e) => problems.push(Problem {
                    path: display(path),
                    message: format!("cannot stat: {e}"),
                }),
            }
        }
    }
    let empty = HashSet::new();
    files
        .into_iter()
        .map(|(path, size, mtime_ns)| {
            let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
            let stem = path.file_stem().map(path_bytes_os).unwrap_or_default();
            let sidecars = sidecar::find(&dir, &stem, names.get(&dir).unwrap_or(&empty));
            let sidecar_sig = sidecar::signature(&sidecars);
            Found {
                path,
                size,
                mtime_ns,
                sidecars,
                sidecar_sig,
            }
        })
        .collect()
}

fn path_bytes_os(s: &std::ffi::OsStr) -> Vec<u8> {
    path_bytes(Path::new(s)).to_vec()
}

/// Whether `path` lies under `root` (byte-wise, on component boundaries).
pub(crate) fn is_under(path: &[u8], root: &[u8]) -> bool {
    let root = root.strip_suffix(b"/").unwrap_or(root);
    path.len() > root.len() && path.starts_with(root) && path[root.len()] == b'/'
}

/// What the index records of an `inspect` report.
pub(crate) fn facts_of(report: Result<Report>) -> (Facts, Option<Container>) {
    let mut f = Facts::default();
    match report {
        Ok(Report::Lora(r)) => {
            f.file_type = "lora";
            f.container = Some(serde_name(&r.container));
            f.format = Some(r.format.to_string());
            f.network = Some(r.network.to_string());
            f.base_model = Some(r.base_model.name().to_string());
            f.rank = r.rank.map(|x| x as i64);
            f.rank_min = r.rank_min.map(|x| x as i64);
            f.alpha = r.alpha.map(f64::from);
            f.dtype = Some(r.dtype.clone());
            f.module_count = Some(r.module_count as i64);
            f.tensor_count = Some(r.tensor_count as i64);
            f.components = r
                .modules_by_component
                .keys()
                .map(|k| k.to_string())
                .collect();
            f.alias = r.metadata.get("ss_output_name").cloned();
            f.trigger_words = r.trigger_words.clone();
            f.top_tags = r.top_tags.iter().map(|t| t.tag.clone()).collect();
            f.warnings = r.warnings.clone();
            let container = r.container;
            f.metadata = r.metadata;
            (f, Some(container))
        }
        Ok(Report::Model(m)) => {
            f.file_type = if m.kind == ModelKind::Checkpoint {
                "checkpoint"
            } else {
                "other"
            };
            f.model_kind = Some(m.kind.name().to_string());
            f.container = Some(m.container.to_string());
            f.layout_into(&m);
            f.base_model = Some(m.base_model.name().to_string());
            f.family = Some(m.family.to_string());
            f.dtype = Some(m.dtype.clone());
            f.tensor_count = Some(m.tensor_count as i64);
            f.parameters = Some(m.parameters as i64);
            f.components = m
                .components
                .iter()
                .map(|c| c.name.name().to_string())
                .collect();
            f.alias = m.metadata.get("ss_output_name").cloned();
            f.warnings = m.warnings.clone();
            let container = match m.container {
                "safetensors" => Some(Container::Safetensors),
                _ => Some(Container::Pickle),
            };
            f.metadata = m.metadata;
            (f, container)
        }
        Err(e) => {
            f.file_type = "unreadable";
            f.error = Some(e.to_string());
            (f, None)
        }
    }
}

impl Facts {
    fn layout_into(&mut self, m: &crate::ops::inspect_model::ModelReport) {
        self.format = m.layout.map(str::to_string);
    }
}

fn serde_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// Reads one file: what it is and (unless `known` hashes still hold) its hashes, checking that
/// the file did not change meanwhile. `Err` is a problem to report: the file is left out.
fn analyze(
    found: &Found,
    known: Option<&FileHashes>,
    known_source: Option<&str>,
    cache: &A1111Cache,
    unique_stem: bool,
    opts: &ScanOptions,
) -> std::result::Result<Analyzed, Problem> {
    let path = &found.path;
    let mut last_change = String::new();
    for _attempt in 0..2 {
        let before = stat(path).map_err(|e| Problem {
            path: display(path),
            message: format!("cannot stat: {e}"),
        })?;
        let (facts, container) = facts_of(inspect(path, InspectOptions::default()));
        let mut facts = facts;
        facts.user_metadata = sidecar::read_user_metadata(path);
        let mut read_bytes = 0;
        let same_as_known = before.0 == found.size && before.1 == found.mtime_ns;
        let (hashes, source) = match known.filter(|_| same_as_known) {
            Some(h) => (Some(h.clone()), known_source.map(source_name)),
            None => {
                let safetensors = container == Some(Container::Safetensors);
                let cached = match unique_stem && !cache.is_empty() {
                    true => cache.lookup(path.file_stem().unwrap_or_default(), before.1),
                    false => (None, None),
                };
                match cached {
                    (Some(sha), addnet) if addnet.is_some() || !safetensors => {
                        (Some(from_cache(sha, addnet)), Some("a1111_cache"))
                    }
                    _ => {
                        let start = match safetensors {
                            true => SafetensorsFile::data_start_of(path).ok().flatten(),
                            false => None,
                        };
                        read_bytes = before.0;
                        // The bar moves per chunk: a multi-gigabyte checkpoint is not one jump.
                        let advance = |n| opts.progress.advance(n);
                        match hash_file_reporting(path, start, &advance) {
                            Ok(h) => (Some(h), Some("read")),
                            Err(e) => {
                                if facts.error.is_none() {
                                    facts.file_type = "unreadable";
                                    facts.error = Some(e.to_string());
                                }
                                (None, None)
                            }
                        }
                    }
                }
            }
        };
        if let Some(hook) = &opts.after_read {
            hook(path);
        }
        let after = stat(path).map_err(|e| Problem {
            path: display(path),
            message: format!("gone while being read: {e}"),
        })?;
        if after != before {
            last_change = format!(
                "changed while being read (size {} → {}, mtime changed: {})",
                before.0,
                after.0,
                after.1 != before.1
            );
            continue;
        }
        return Ok(Analyzed {
            path: path.clone(),
            size: before.0,
            mtime_ns: before.1,
            sidecars: found.sidecars.clone(),
            sidecar_sig: found.sidecar_sig.clone(),
            facts,
            hashes,
            hash_source: source,
            read_bytes,
        });
    }
    Err(Problem {
        path: display(path),
        message: format!("{last_change}; not indexed this time"),
    })
}

fn source_name(s: &str) -> &'static str {
    match s {
        "a1111_cache" => "a1111_cache",
        _ => "read",
    }
}

fn from_cache(sha256: String, addnet: Option<String>) -> FileHashes {
    FileHashes {
        autov2: sha256[..10].to_uppercase(),
        autov3: addnet.as_ref().map(|h| h[..12].to_uppercase()),
        sha256,
        addnet,
    }
}

fn stat(path: &Path) -> std::io::Result<(u64, i64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.len(), mtime_ns(&m)))
}

/// 8 + the header length of a safetensors file (where AutoV3's bytes start).
impl Library {
    /// Scans every root.
    pub fn scan(&mut self, opts: &ScanOptions) -> Result<ScanReport> {
        let roots = self.root_paths()?;
        self.scan_roots(&roots, opts)
    }

    /// Scans `roots` (which must be roots of the index or lie under one).
    pub fn scan_roots(&mut self, roots: &[PathBuf], opts: &ScanOptions) -> Result<ScanReport> {
        let mut report = ScanReport::default();
        // No organize runs meanwhile; one that was killed is finished or undone first.
        let _lock = self.lock_moves()?;
        let recovered = self.finish_interrupted_moves()?;
        report.interrupted_moves = recovered.forward + recovered.back;
        for p in recovered.problems {
            report.problems.push(Problem {
                path: String::new(),
                message: format!("interrupted organize: {p}"),
            });
        }
        let found = walk(roots, &mut report.problems);
        report.files = found.len();
        let known = self.known()?;
        let cache = A1111Cache::find(roots);
        let mut stems: HashMap<&std::ffi::OsStr, usize> = HashMap::new();
        for f in &found {
            *stems
                .entry(f.path.file_stem().unwrap_or_default())
                .or_default() += 1;
        }

        let mut todo: Vec<(&Found, Option<&Known>)> = Vec::new();
        let mut total = 0;
        for f in &found {
            let k = known.get(path_bytes(&f.path));
            match k {
                Some(k)
                    if k.size == f.size
                        && k.mtime_ns == f.mtime_ns
                        && k.sidecar_sig == f.sidecar_sig
                        && !k.missing =>
                {
                    report.unchanged += 1
                }
                Some(k) if k.size == f.size && k.mtime_ns == f.mtime_ns && k.hashes.is_some() => {
                    todo.push((f, Some(k)))
                }
                _ => {
                    total += f.size;
                    todo.push((f, None));
                }
            }
        }
        opts.progress.start(total);

        let (tx, rx) = mpsc::sync_channel::<Outcome>(256);
        let walked: HashSet<&[u8]> = found.iter().map(|f| path_bytes(&f.path)).collect();
        let write_result = std::thread::scope(|s| {
            let readers = s.spawn(|| {
                todo.par_iter().for_each_with(tx, |tx, (f, k)| {
                    let unique = stems.get(f.path.file_stem().unwrap_or_default()) == Some(&1);
                    let hashes = k.and_then(|k| k.hashes.as_ref());
                    let source = k.and_then(|k| k.hash_source.as_deref());
                    let outcome = match analyze(f, hashes, source, &cache, unique, opts) {
                        Ok(a) => Outcome::Indexed(Box::new(a)),
                        Err(p) => Outcome::Skipped(p),
                    };
                    // What the hashing did not report (hashes from a cache, unreadable files).
                    let reported = match &outcome {
                        Outcome::Indexed(a) => a.read_bytes,
                        Outcome::Skipped(_) => 0,
                    };
                    if k.is_none() {
                        opts.progress.advance(f.size.saturating_sub(reported));
                    }
                    let _ = tx.send(outcome);
                });
            });
            let written = self.write_outcomes(rx, &mut report);
            let _ = readers.join();
            written
        });
        write_result?;
        self.mark_missing(roots, &walked, opts.prune, &mut report)?;
        Ok(report)
    }

    /// Every indexed file's state, by path.
    fn known(&self) -> Result<HashMap<Vec<u8>, Known>> {
        let err = |e| db_error(&self.path, e);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT path, size, mtime_ns, sidecar_sig, missing, sha256, autov2, addnet, autov3, hash_source
                 FROM files",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                let sha256: Option<String> = r.get(5)?;
                let hashes = match sha256 {
                    Some(sha256) => Some(FileHashes {
                        sha256,
                        autov2: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                        addnet: r.get(7)?,
                        autov3: r.get(8)?,
                    }),
                    None => None,
                };
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    Known {
                        size: r.get::<_, i64>(1)? as u64,
                        mtime_ns: r.get(2)?,
                        sidecar_sig: r.get(3)?,
                        missing: r.get::<_, i64>(4)? != 0,
                        hashes,
                        hash_source: r.get(9)?,
                    },
                ))
            })
            .map_err(err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(err)
    }

    /// Writes results as they come, one transaction per batch (by count or time).
    fn write_outcomes(
        &mut self,
        rx: mpsc::Receiver<Outcome>,
        report: &mut ScanReport,
    ) -> Result<()> {
        const BATCH: usize = 500;
        const EVERY: Duration = Duration::from_millis(500);
        let mut batch: Vec<Analyzed> = Vec::new();
        let mut since = Instant::now();
        loop {
            let next = rx.recv_timeout(EVERY);
            let done = matches!(next, Err(mpsc::RecvTimeoutError::Disconnected));
            match next {
                Ok(Outcome::Indexed(a)) => batch.push(*a),
                Ok(Outcome::Skipped(p)) => report.problems.push(p),
                Err(_) => {}
            }
            if !batch.is_empty() && (done || batch.len() >= BATCH || since.elapsed() >= EVERY) {
                self.write_batch(&batch, report)?;
                batch.clear();
                since = Instant::now();
            }
            if done {
                return Ok(());
            }
        }
    }

    fn write_batch(&mut self, batch: &[Analyzed], report: &mut ScanReport) -> Result<()> {
        let path = self.path.clone();
        let err = |e| db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        for a in batch {
            let how = write_file(&tx, a).map_err(err)?;
            match how {
                Written::New => report.new += 1,
                Written::Updated => report.changed += 1,
                Written::Moved => report.moved += 1,
            }
            if a.facts.file_type == "unreadable" {
                report.unreadable += 1;
                report.problems.push(Problem {
                    path: display(&a.path),
                    message: format!(
                        "unreadable (indexed with its error): {}",
                        a.facts.error.as_deref().unwrap_or("?")
                    ),
                });
            }
            report.bytes_read += a.read_bytes;
            if a.hash_source == Some("a1111_cache") && a.read_bytes == 0 {
                report.hashes_from_a1111_cache += 1;
            }
        }
        tx.commit().map_err(err)
    }

    /// Marks indexed files under `roots` that the walk did not see (and that are not on disk)
    /// missing, or removes them with `prune`.
    fn mark_missing(
        &mut self,
        roots: &[PathBuf],
        walked: &HashSet<&[u8]>,
        prune: bool,
        report: &mut ScanReport,
    ) -> Result<()> {
        let path = self.path.clone();
        let err = |e| db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let gone: Vec<(i64, Vec<u8>, bool)> = {
            let mut stmt = tx
                .prepare("SELECT id, path, missing FROM files")
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, i64>(2)? != 0))
                })
                .map_err(err)?;
            let mut gone = Vec::new();
            for row in rows {
                let (id, p, missing) = row.map_err(err)?;
                let under = roots.iter().any(|r| is_under(&p, path_bytes(r)));
                if under && !walked.contains(p.as_slice()) && !path_from_bytes(&p).is_file() {
                    gone.push((id, p, missing));
                }
            }
            gone
        };
        for (id, _, missing) in gone {
            if prune {
                tx.execute("DELETE FROM files_fts WHERE rowid = ?1", [id])
                    .map_err(err)?;
                tx.execute("DELETE FROM files WHERE id = ?1", [id])
                    .map_err(err)?;
                report.pruned += 1;
            } else if !missing {
                tx.execute("UPDATE files SET missing = 1 WHERE id = ?1", [id])
                    .map_err(err)?;
                report.missing += 1;
            }
        }
        tx.commit().map_err(err)
    }

    /// Reads one file again and updates its entry (after `library sidecar` wrote its `.json`).
    pub fn reindex_file(&mut self, path: &Path) -> Result<()> {
        self.reindex_file_with(path, None)
    }

    /// [`Library::reindex_file`] with the file's hashes when the caller has just computed them
    /// from its current contents; otherwise known ones are reused if the file is unchanged, or
    /// the file is read.
    pub fn reindex_file_with(&mut self, path: &Path, fresh: Option<&FileHashes>) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();
        let names: HashSet<OsString> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        let (size, mtime_ns) = stat(path).map_err(|e| Error::io(path, e))?;
        let stem = path.file_stem().map(path_bytes_os).unwrap_or_default();
        let sidecars = sidecar::find(dir, &stem, &names);
        let found = Found {
            path: path.to_path_buf(),
            size,
            mtime_ns,
            sidecar_sig: sidecar::signature(&sidecars),
            sidecars,
        };
        let known = self.known()?;
        let k = known.get(path_bytes(path));
        let (hashes, source) = match fresh {
            Some(h) => (Some(h), Some("read")),
            None => (
                k.filter(|k| k.size == size && k.mtime_ns == mtime_ns)
                    .and_then(|k| k.hashes.as_ref()),
                k.and_then(|k| k.hash_source.as_deref()),
            ),
        };
        let opts = ScanOptions::default();
        let cache = A1111Cache::default();
        match analyze(&found, hashes, source, &cache, false, &opts) {
            Ok(a) => {
                let mut report = ScanReport::default();
                self.write_batch(&[a], &mut report)
            }
            Err(p) => {
                problems.push(p);
                Err(Error::Invalid(format!(
                    "{}: {}",
                    problems[0].path, problems[0].message
                )))
            }
        }
    }
}

enum Written {
    New,
    Updated,
    Moved,
}

/// Writes one file's entry: the row at its path, else the entry of a file with the same sha256
/// whose path is gone (a move: the entry keeps its id, tags and notes), else a new row.
fn write_file(tx: &Transaction, a: &Analyzed) -> rusqlite::Result<Written> {
    let pb = path_bytes(&a.path);
    let existing: Option<i64> = tx
        .query_row("SELECT id FROM files WHERE path = ?1", [pb], |r| r.get(0))
        .optional()?;
    let (id, how) = match existing {
        Some(id) => (id, Written::Updated),
        None => match moved_from(tx, a)? {
            Some(id) => (id, Written::Moved),
            None => {
                tx.execute(
                    "INSERT INTO files (path, dir, file_name, stem, size, mtime_ns, type, added_at, indexed_at)
                     VALUES (?1, '', '', '', 0, 0, 'other', ?2, ?2)",
                    params![pb, now()],
                )?;
                (tx.last_insert_rowid(), Written::New)
            }
        },
    };
    let f = &a.facts;
    let json = |v: &dyn erased::Json| v.to_json();
    let dir = a.path.parent().map(path_bytes).unwrap_or_default();
    let file_name = a.path.file_name().unwrap_or_default().to_string_lossy();
    let stem = a.path.file_stem().unwrap_or_default().to_string_lossy();
    let h = a.hashes.as_ref();
    tx.prepare_cached(
        "UPDATE files SET path = ?2, dir = ?3, file_name = ?4, stem = ?5, size = ?6, mtime_ns = ?7,
            sidecar_sig = ?8, type = ?9, model_kind = ?10, container = ?11, format = ?12,
            network = ?13, base_model = ?14, family = ?15, rank = ?16, rank_min = ?17, alpha = ?18,
            dtype = ?19, module_count = ?20, tensor_count = ?21, parameters = ?22, components = ?23,
            alias = ?24, trigger_words = ?25, top_tags = ?26, metadata = ?27, user_metadata = ?28,
            warnings = ?29, error = ?30, sha256 = ?31, autov2 = ?32, addnet = ?33, autov3 = ?34,
            hash_source = ?35, missing = 0, indexed_at = ?36,
            sketch = CASE WHEN type = 'lora' AND ?9 = 'lora' AND sha256 IS ?31 THEN sketch END
         WHERE id = ?1",
    )?
    .execute(params![
        id,
        pb,
        dir,
        file_name,
        stem,
        a.size as i64,
        a.mtime_ns,
        a.sidecar_sig,
        f.file_type,
        f.model_kind,
        f.container,
        f.format,
        f.network,
        f.base_model,
        f.family,
        f.rank,
        f.rank_min,
        f.alpha,
        f.dtype,
        f.module_count,
        f.tensor_count,
        f.parameters,
        json(&f.components),
        f.alias,
        json(&f.trigger_words),
        json(&f.top_tags),
        json(&f.metadata),
        f.user_metadata.as_ref().map(|m| json(m)),
        json(&f.warnings),
        f.error,
        h.map(|h| h.sha256.as_str()),
        h.map(|h| h.autov2.as_str()),
        h.and_then(|h| h.addnet.as_deref()),
        h.and_then(|h| h.autov3.as_deref()),
        a.hash_source,
        now(),
    ])?;
    tx.prepare_cached("DELETE FROM sidecars WHERE file_id = ?1")?
        .execute([id])?;
    let mut ins = tx.prepare_cached(
        "INSERT OR IGNORE INTO sidecars (file_id, kind, path) VALUES (?1, ?2, ?3)",
    )?;
    for s in &a.sidecars {
        ins.execute(params![id, s.kind, path_bytes(&s.path)])?;
    }
    super::query::refresh_fts(tx, id)?;
    Ok(how)
}

/// The entry of an indexed file with `a`'s sha256 whose path no longer holds a file.
fn moved_from(tx: &Transaction, a: &Analyzed) -> rusqlite::Result<Option<i64>> {
    let Some(sha) = a.hashes.as_ref().map(|h| h.sha256.as_str()) else {
        return Ok(None);
    };
    let mut stmt = tx
        .prepare_cached("SELECT id, path FROM files WHERE sha256 = ?1 ORDER BY missing DESC, id")?;
    let rows: Vec<(i64, Vec<u8>)> = stmt
        .query_map([sha], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows
        .into_iter()
        .find(|(_, p)| !path_from_bytes(p).is_file())
        .map(|(id, _)| id))
}

/// JSON text of the index's list and map columns.
mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "null".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_a_root_on_component_boundaries() {
        assert!(is_under(b"/a/b/c.safetensors", b"/a/b"));
        assert!(is_under(b"/a/b/c.safetensors", b"/a/b/"));
        assert!(!is_under(b"/a/bc/c.safetensors", b"/a/b"));
        assert!(!is_under(b"/a/b", b"/a/b"));
    }
}
