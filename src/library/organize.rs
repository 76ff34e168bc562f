//! `library organize`: move indexed files, each with all its sidecars, into `DIR/<group>/`.
//!
//! Crash safety rests on a journal in the index (`moves`, schema v2): a file's planned paths are
//! committed (with `synchronous=FULL`) before anything moves; then its sidecars and last the model
//! are renamed without replacing anything (`renameat2(RENAME_NOREPLACE)`, or link + unlink where a
//! filesystem lacks it); the folders are fsynced; and one transaction moves the entry to its new
//! path and deletes its journal rows. Where the model file is decides a file's fate when a run was
//! killed: [`Library::finish_interrupted_moves`] (run first by every `organize` and `scan`) moves
//! the sidecars to the model — forward when the model reached its new place, back otherwise.
//! `organize` and `scan` hold one lock file (`<db>.lock`) so neither sees the other's half-moves.
//! Across filesystems (`EXDEV`) a path moves by copy (`copy_across`): the copy is complete and
//! fsynced before it gets the new name, and the old name goes only after that, so a kill leaves the
//! old name, both names with the same bytes (recovery removes one), or the new name.

use super::db::db_error;
use super::scan::{is_under, now};
use super::sidecar::{self, path_bytes, path_from_bytes};
use super::Library;
use crate::tensors::{remove_stale_temps, OutputFile, WriteOptions};
use crate::{Error, Result};
use rusqlite::{params, TransactionBehavior};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::fs::{File, FileTimes};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What `--by` groups files by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// The base model: sd1, sd2, sdxl, sd3, flux, unknown.
    Base,
    /// A LoRA's network kind (lora, locon, loha, …) or another file's kind (checkpoint, vae, …).
    Kind,
    /// The Civitai creator (`.civitai.info`: `model.creator.username` or `creator.username`), else
    /// `modelspec.author`, else `unknown`.
    Creator,
    /// The first of the file's tags alphabetically, else `untagged`.
    Tag,
}

#[derive(Debug, Clone)]
pub struct OrganizeOptions {
    pub by: GroupBy,
    pub into: PathBuf,
    /// `None`: every type.
    pub file_type: Option<String>,
    pub dry_run: bool,
}

/// One path of a move.
#[derive(Debug, Clone, Serialize)]
pub struct PathMove {
    pub from: String,
    pub to: String,
}

/// A file of the plan: the model and its sidecars.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedMove {
    pub id: i64,
    pub group: String,
    pub model: PathMove,
    pub sidecars: Vec<PathMove>,
    /// Why it is not moved (a conflict, or a failure when it was tried); `None`: moved (or to be).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    #[serde(skip)]
    paths: Vec<(PathBuf, PathBuf)>,
}

/// What an organize did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Serialize, Default)]
pub struct OrganizeReport {
    pub into: String,
    pub dry_run: bool,
    /// `DIR` was not under a root, so it was added as one.
    pub added_root: bool,
    /// Files already at their place.
    pub in_place: usize,
    pub moved: usize,
    /// Every file the plan touches, conflicts included (`skipped` set).
    pub plan: Vec<PlannedMove>,
    /// Files of an earlier, interrupted run put back together first.
    pub recovered: Recovered,
}

/// What [`Library::finish_interrupted_moves`] did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Recovered {
    /// Moves completed (the model had reached its new place).
    pub forward: usize,
    /// Moves undone (the model was still at its old place).
    pub back: usize,
    pub problems: Vec<String>,
}

/// A folder name from a group value: no separators, not hidden, never empty.
fn folder_name(v: &str, empty: &str) -> String {
    let s: String = v
        .trim()
        .chars()
        .map(|c| match c {
            '/' | '\\' | '\0' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        empty.to_string()
    } else {
        s
    }
}

/// The Civitai creator recorded in a `.civitai.info` file.
fn civitai_creator(path: &Path) -> Option<String> {
    let v = super::sidecar::read_civitai_info(path)?;
    let name = v
        .pointer("/model/creator/username")
        .or_else(|| v.pointer("/creator/username"))?;
    name.as_str()
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
}

/// Renames without ever replacing `to`: `renameat2(RENAME_NOREPLACE)`, or a hard link then
/// unlinking `from` on filesystems without it (both leave `from` or `to` holding the file).
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(e),
    }
}

fn fsync_dir(dir: &Path) {
    // A folder that cannot be opened or synced leaves durability to the filesystem's own flush.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("/"))
}

fn lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Moves `from` to `to` without ever replacing `to`: a rename, or across filesystems a copy
/// ([`copy_across`]). The error is one line naming both paths.
fn move_path(from: &Path, to: &Path) -> std::result::Result<(), String> {
    match rename_noreplace(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => copy_across(from, to),
        Err(e) => Err(format!("{} → {}: {e}", from.display(), to.display())),
    }
}

/// Moves `from` to `to` on another filesystem. The bytes go to a file in `to`'s folder that has no
/// name until it is complete (the project's `OutputFile`: `O_TMPFILE`, else a hidden
/// `.<name>.loratool-<pid>-<n>.tmp` that signals and later runs remove), with `from`'s permissions
/// and times, so the next scan sees the same size and mtime and reads nothing. It is checked
/// (length, and `from` unchanged meanwhile), fsynced, linked at `to` without replacing anything
/// and the folder fsynced; only then is `from` unlinked and its folder fsynced.
fn copy_across(from: &Path, to: &Path) -> std::result::Result<(), String> {
    let on_from = |e: std::io::Error| format!("{}: {e}", from.display());
    let mut src = File::open(from).map_err(on_from)?;
    let before = src.metadata().map_err(on_from)?;
    if !before.is_file() {
        return Err(format!(
            "{}: not a regular file; not copied",
            from.display()
        ));
    }
    let out = OutputFile::create(to, &WriteOptions::default()).map_err(|e| e.to_string())?;
    let mut dst = out.file();
    // On Linux `io::copy` between two files uses copy_file_range / sendfile where it can.
    let copied = std::io::copy(&mut src, &mut dst)
        .map_err(|e| format!("{} → {}: copy failed: {e}", from.display(), to.display()))?;
    let times = FileTimes::new()
        .set_accessed(before.accessed().map_err(on_from)?)
        .set_modified(before.modified().map_err(on_from)?);
    let on_to = |e: std::io::Error| format!("{}: {e}", to.display());
    dst.set_permissions(before.permissions()).map_err(on_to)?;
    dst.set_times(times).map_err(on_to)?;
    let written = dst.metadata().map_err(on_to)?.len();
    let after = src.metadata().map_err(on_from)?;
    // Every write and the fsync in `commit` report their own errors; what is left to catch is a
    // file that something else was writing while it was copied, and a short copy.
    if after.len() != before.len() || after.modified().ok() != before.modified().ok() {
        return Err(format!(
            "{}: changed while being copied to {}; not moved",
            from.display(),
            to.display()
        ));
    }
    if copied != before.len() || written != before.len() {
        return Err(format!(
            "{}: the copy at {} came out short ({written} of {} bytes); not moved",
            from.display(),
            to.display(),
            before.len()
        ));
    }
    drop(src);
    out.commit().map_err(|e| e.to_string())?;
    if let Err(e) = std::fs::remove_file(from) {
        // The copy is complete, but two names must not stay: take the copy back.
        let undone = std::fs::remove_file(to).is_ok();
        fsync_dir(parent(to));
        return Err(format!(
            "{}: copied to {} but cannot be removed ({e}); {}",
            from.display(),
            to.display(),
            if undone {
                "the copy was removed"
            } else {
                "both names now exist"
            }
        ));
    }
    fsync_dir(parent(from));
    Ok(())
}

/// Whether two files hold the same bytes (false when either cannot be read).
fn same_contents(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let mut bufs = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = match fa.read(&mut bufs.0) {
            Ok(n) => n,
            Err(_) => return false,
        };
        // `read_exact` of as many bytes from `b`: a shorter `b` is a difference.
        if fb.read_exact(&mut bufs.1[..n]).is_err() || bufs.0[..n] != bufs.1[..n] {
            return false;
        }
        if n == 0 {
            // `a` is at its end: `b` must be too.
            return matches!(fb.read(&mut bufs.1[..1]), Ok(0));
        }
    }
}

/// Where one path of a journaled move is.
enum At {
    Old,
    New,
    /// Both names hold the file: one inode (a link whose unlink did not happen), or across
    /// filesystems a complete copy whose source was not unlinked yet (same bytes).
    Both,
    /// Both hold different files, or neither exists.
    Unclear,
}

fn where_is(old: &Path, new: &Path) -> At {
    let (o, n) = (
        std::fs::symlink_metadata(old),
        std::fs::symlink_metadata(new),
    );
    match (o, n) {
        (Ok(_), Err(_)) => At::Old,
        (Err(_), Ok(_)) => At::New,
        (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino() => At::Both,
        // A copy only gets its name once complete, so equal bytes mean the copy finished.
        (Ok(a), Ok(b))
            if a.is_file() && b.is_file() && a.len() == b.len() && same_contents(old, new) =>
        {
            At::Both
        }
        _ => At::Unclear,
    }
}

/// Brings one path, found `at`, to `to` (`forward`) or back to `from`; a problem is described.
fn settle(from: &Path, to: &Path, at: At, forward: bool) -> std::result::Result<(), String> {
    let (src, dst) = if forward { (from, to) } else { (to, from) };
    match (at, forward) {
        (At::New, true) | (At::Old, false) => Ok(()),
        (At::Old, true) | (At::New, false) => move_path(src, dst),
        (At::Both, _) => std::fs::remove_file(src)
            .map_err(|e| format!("{}: {e} (also at {})", src.display(), dst.display())),
        (At::Unclear, _) => match (src.exists(), dst.exists()) {
            (false, false) => Ok(()), // gone meanwhile: the next scan marks it missing
            _ => Err(format!(
                "{} and {} both exist; left as they are",
                from.display(),
                to.display()
            )),
        },
    }
}

impl Library {
    /// Takes the lock that `organize` and `scan` share (released when the file is dropped).
    pub(crate) fn lock_moves(&self) -> Result<std::fs::File> {
        let mut name = self.path.as_os_str().to_os_string();
        name.push(".lock");
        let path = PathBuf::from(name);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } != 0 {
            return Err(Error::io(&path, std::io::Error::last_os_error()));
        }
        Ok(f)
    }

    /// Finishes or undoes the moves a killed `organize` left in the journal, so that every file is
    /// with all its sidecars at one place and its entry says where (call with the lock held).
    pub fn finish_interrupted_moves(&mut self) -> Result<Recovered> {
        let db = self.path.clone();
        let err = |e| db_error(&db, e);
        let mut rec = Recovered::default();
        let rows: Vec<(i64, Vec<u8>, Vec<u8>, bool)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT file_id, old_path, new_path, is_model FROM moves ORDER BY file_id")
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(err)?
                .collect::<rusqlite::Result<_>>()
                .map_err(err)?;
            rows
        };
        let mut by_file: BTreeMap<i64, Vec<(PathBuf, PathBuf, bool)>> = BTreeMap::new();
        for (id, old, new, is_model) in rows {
            by_file.entry(id).or_default().push((
                path_from_bytes(&old),
                path_from_bytes(&new),
                is_model,
            ));
        }
        for (id, paths) in by_file {
            // Looked at once: across filesystems telling `Both` costs a read of both copies.
            let places: Vec<At> = paths.iter().map(|(o, n, _)| where_is(o, n)).collect();
            let forward = paths
                .iter()
                .zip(&places)
                .find(|(p, _)| p.2)
                .is_some_and(|(_, at)| matches!(at, At::New | At::Both));
            let mut dirs = HashSet::new();
            for ((old, new, _), at) in paths.iter().zip(places) {
                if let Err(p) = settle(old, new, at, forward) {
                    rec.problems.push(p);
                }
                dirs.insert(parent(old).to_path_buf());
                dirs.insert(parent(new).to_path_buf());
            }
            for d in &dirs {
                // The hidden temp of a cross-filesystem copy that a kill interrupted (none on
                // Linux filesystems with unnamed files).
                remove_stale_temps(d);
                fsync_dir(d);
            }
            if forward {
                let pairs: Vec<(PathBuf, PathBuf)> = paths
                    .iter()
                    .map(|(o, n, _)| (o.clone(), n.clone()))
                    .collect();
                let model = paths.iter().find(|p| p.2).expect("forward has a model");
                self.record_move(id, &model.1, &pairs)?;
                rec.forward += 1;
            } else {
                self.conn
                    .execute("DELETE FROM moves WHERE file_id = ?1", [id])
                    .map_err(err)?;
                rec.back += 1;
            }
        }
        Ok(rec)
    }

    /// The transaction that ends a move: the entry (id, tags, notes kept) and its sidecars take
    /// their new paths, and the journal rows go.
    fn record_move(&mut self, id: i64, model: &Path, pairs: &[(PathBuf, PathBuf)]) -> Result<()> {
        let path = self.path.clone();
        let err = |e| db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let dir = path_bytes(parent(model)).to_vec();
        // An entry of a file gone from the new path (marked missing) gives way.
        tx.execute(
            "DELETE FROM files_fts WHERE rowid IN (SELECT id FROM files WHERE path = ?2 AND id <> ?1)",
            params![id, path_bytes(model)],
        )
        .map_err(err)?;
        tx.execute(
            "DELETE FROM files WHERE path = ?2 AND id <> ?1",
            params![id, path_bytes(model)],
        )
        .map_err(err)?;
        tx.execute(
            "UPDATE files SET path = ?2, dir = ?3, missing = 0 WHERE id = ?1",
            params![id, path_bytes(model), dir],
        )
        .map_err(err)?;
        for (old, new) in pairs {
            tx.execute(
                "UPDATE sidecars SET path = ?3 WHERE file_id = ?1 AND path = ?2",
                params![id, path_bytes(old), path_bytes(new)],
            )
            .map_err(err)?;
            tx.execute(
                "UPDATE previews SET path = ?3 WHERE file_id = ?1 AND path = ?2",
                params![id, path_bytes(old), path_bytes(new)],
            )
            .map_err(err)?;
        }
        tx.execute("DELETE FROM moves WHERE file_id = ?1", [id])
            .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// `library organize`: plans every move, reports conflicts (skipped), and unless `dry_run`
    /// moves each file with its sidecars.
    pub fn organize(&mut self, opts: &OrganizeOptions) -> Result<OrganizeReport> {
        let _lock = match opts.dry_run {
            true => None,
            false => Some(self.lock_moves()?),
        };
        let mut report = OrganizeReport {
            dry_run: opts.dry_run,
            ..Default::default()
        };
        if !opts.dry_run {
            self.conn
                .pragma_update(None, "synchronous", "FULL")
                .map_err(self.err())?;
            report.recovered = self.finish_interrupted_moves()?;
            std::fs::create_dir_all(&opts.into).map_err(|e| Error::io(&opts.into, e))?;
        }
        let into = std::fs::canonicalize(&opts.into)
            .or_else(|_| std::path::absolute(&opts.into))
            .map_err(|e| Error::io(&opts.into, e))?;
        report.into = lossy(&into);
        let roots = self.root_paths()?;
        if !roots
            .iter()
            .any(|r| r == &into || is_under(path_bytes(&into), path_bytes(r)))
        {
            report.added_root = true;
            if !opts.dry_run {
                self.add_roots(std::slice::from_ref(&into))?;
            }
        }
        report.plan = self.plan(opts, &into, &roots, &mut report.in_place)?;
        if opts.dry_run {
            return Ok(report);
        }
        let mut made = HashSet::new();
        for item in report.plan.iter_mut().filter(|p| p.skipped.is_none()) {
            match self.move_one(item, &into, &mut made) {
                Ok(()) => report.moved += 1,
                Err(why) => item.skipped = Some(why),
            }
        }
        Ok(report)
    }

    /// Every move, conflicts marked.
    fn plan(
        &self,
        opts: &OrganizeOptions,
        into: &Path,
        roots: &[PathBuf],
        in_place: &mut usize,
    ) -> Result<Vec<PlannedMove>> {
        let err = |e| db_error(&self.path, e);
        let mut sql = "SELECT f.id, f.path, f.type, f.base_model, f.network, f.model_kind,
                json_extract(f.metadata, '$.\"modelspec.author\"'),
                (SELECT min(tag) FROM tags t WHERE t.file_id = f.id)
             FROM files f WHERE f.missing = 0"
            .to_string();
        if opts.file_type.is_some() {
            sql.push_str(" AND f.type = ?1");
        }
        sql.push_str(" ORDER BY f.path");
        type Row = (
            i64,
            Vec<u8>,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let mut stmt = self.conn.prepare(&sql).map_err(err)?;
        let map = |r: &rusqlite::Row| -> rusqlite::Result<Row> {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        };
        let rows: Vec<Row> = match &opts.file_type {
            Some(t) => stmt.query_map([t], map),
            None => stmt.query_map([], map),
        }
        .map_err(err)?
        .collect::<rusqlite::Result<_>>()
        .map_err(err)?;

        let mut listings: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
        let mut claimed: HashSet<PathBuf> = HashSet::new();
        let mut plan = Vec::new();
        for (id, raw, file_type, base, network, model_kind, author, tag) in rows {
            if !roots.iter().any(|r| is_under(&raw, path_bytes(r))) {
                continue;
            }
            let from = path_from_bytes(&raw);
            let dir = parent(&from).to_path_buf();
            let names = listings.entry(dir.clone()).or_insert_with(|| {
                std::fs::read_dir(&dir)
                    .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
                    .unwrap_or_default()
            });
            let stem = from.file_stem().unwrap_or_default().as_bytes();
            let sidecars = sidecar::find(&dir, stem, names);
            let group = match opts.by {
                GroupBy::Base => folder_name(base.as_deref().unwrap_or(""), "unknown"),
                GroupBy::Kind => {
                    let k = match file_type.as_str() {
                        "lora" => network,
                        _ => model_kind.or(Some(file_type)),
                    };
                    folder_name(k.as_deref().unwrap_or(""), "unknown")
                }
                GroupBy::Creator => {
                    let info = sidecars.iter().find(|s| s.kind == "civitai_info");
                    let who = info.and_then(|s| civitai_creator(&s.path)).or(author);
                    folder_name(who.as_deref().unwrap_or(""), "unknown")
                }
                GroupBy::Tag => folder_name(tag.as_deref().unwrap_or(""), "untagged"),
            };
            let target = into.join(&group);
            let to = target.join(from.file_name().unwrap_or_default());
            if to == from {
                *in_place += 1;
                continue;
            }
            let mut paths = vec![(from.clone(), to.clone())];
            for s in &sidecars {
                paths.push((
                    s.path.clone(),
                    target.join(s.path.file_name().unwrap_or_default()),
                ));
            }
            let mut item = PlannedMove {
                id,
                group,
                model: PathMove {
                    from: lossy(&from),
                    to: lossy(&to),
                },
                sidecars: paths[1..]
                    .iter()
                    .map(|(f, t)| PathMove {
                        from: lossy(f),
                        to: lossy(t),
                    })
                    .collect(),
                skipped: None,
                paths,
            };
            item.skipped = if !from.is_file() {
                Some("gone from disk (rescan)".into())
            } else if let Some((_, t)) = item
                .paths
                .iter()
                .find(|(_, t)| t.symlink_metadata().is_ok())
            {
                Some(format!("{} exists; not overwritten", t.display()))
            } else if let Some((_, t)) = item.paths.iter().find(|(_, t)| claimed.contains(t)) {
                Some(format!("another file of the plan goes to {}", t.display()))
            } else if let Some((f, _)) = item.paths.iter().find(|(f, _)| claimed.contains(f)) {
                Some(format!(
                    "{} belongs to another file of the plan too",
                    f.display()
                ))
            } else {
                None
            };
            if item.skipped.is_none() {
                for (f, t) in &item.paths {
                    claimed.insert(f.clone());
                    claimed.insert(t.clone());
                }
            }
            plan.push(item);
        }
        Ok(plan)
    }

    /// Moves one planned file: journal, sidecars, model, fsync, record. On failure what moved
    /// is put back and the reason returned.
    fn move_one(
        &mut self,
        item: &PlannedMove,
        into: &Path,
        made: &mut HashSet<PathBuf>,
    ) -> std::result::Result<(), String> {
        let target = parent(&item.paths[0].1).to_path_buf();
        if made.insert(target.clone()) {
            std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
            fsync_dir(into);
        }
        self.journal(item).map_err(|e| e.to_string())?;
        // Sidecars first, the model last: where the model is decides recovery.
        let order: Vec<&(PathBuf, PathBuf)> = item.paths[1..]
            .iter()
            .chain(std::iter::once(&item.paths[0]))
            .collect();
        for (i, (from, to)) in order.iter().enumerate() {
            if let Err(why) = move_path(from, to) {
                // Put back what moved (copied back, across filesystems).
                let mut put_back = true;
                for (f, t) in order[..i].iter().rev() {
                    put_back &= move_path(t, f).is_ok();
                }
                fsync_dir(parent(from));
                fsync_dir(&target);
                // What could not be put back, or a copy whose old name could not be removed (nor
                // the copy), stays in the journal: the next organize or scan settles it.
                let left_both = matches!(where_is(from, to), At::Both);
                if put_back && !left_both {
                    let _ = self
                        .conn
                        .execute("DELETE FROM moves WHERE file_id = ?1", [item.id]);
                }
                return Err(why);
            }
        }
        let mut dirs: HashSet<&Path> = item.paths.iter().map(|(f, _)| parent(f)).collect();
        dirs.insert(&target);
        dirs.iter().for_each(|d| fsync_dir(d));
        self.record_move(item.id, &item.paths[0].1, &item.paths)
            .map_err(|e| e.to_string())
    }

    fn journal(&mut self, item: &PlannedMove) -> Result<()> {
        let path = self.path.clone();
        let err = |e| db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        for (i, (from, to)) in item.paths.iter().enumerate() {
            tx.execute(
                "INSERT OR REPLACE INTO moves (file_id, old_path, new_path, is_model, planned_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![item.id, path_bytes(from), path_bytes(to), i == 0, now()],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_are_plain() {
        assert_eq!(folder_name("sdxl", "unknown"), "sdxl");
        assert_eq!(folder_name("a/b", "unknown"), "a_b");
        assert_eq!(folder_name("..", "unknown"), "unknown");
        assert_eq!(folder_name("  ", "untagged"), "untagged");
        assert_eq!(folder_name(".hidden", "x"), "hidden");
    }

    #[test]
    fn rename_never_replaces() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        assert!(rename_noreplace(&a, &b).is_err());
        assert_eq!(std::fs::read(&b).unwrap(), b"b");
        std::fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert!(!a.exists() && b.exists());
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The copy path works within one filesystem too, so it is tested here without a second one
    /// (tests/library_organize.rs moves across a real one).
    #[test]
    fn a_copy_keeps_bytes_mode_and_mtime_and_never_replaces() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let (src_dir, dst_dir) = (t.path().join("src"), t.path().join("dst"));
        std::fs::create_dir_all(&src_dir).unwrap();
        std::fs::create_dir_all(&dst_dir).unwrap();
        let (a, b) = (src_dir.join("m.safetensors"), dst_dir.join("m.safetensors"));
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&a, &bytes).unwrap();
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 123_456_789);
        let f = File::options().write(true).open(&a).unwrap();
        f.set_modified(mtime).unwrap();
        f.set_permissions(std::fs::Permissions::from_mode(0o640))
            .unwrap();
        drop(f);

        std::fs::write(&b, b"theirs").unwrap();
        let e = copy_across(&a, &b).unwrap_err();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read(&b).unwrap(), b"theirs");
        assert_eq!(std::fs::read(&a).unwrap(), bytes);
        assert_eq!(names(&dst_dir), ["m.safetensors"], "no temp left");

        std::fs::remove_file(&b).unwrap();
        copy_across(&a, &b).unwrap();
        assert!(!a.exists());
        assert_eq!(std::fs::read(&b).unwrap(), bytes);
        let m = std::fs::metadata(&b).unwrap();
        assert_eq!(m.modified().unwrap(), mtime);
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        assert_eq!(names(&dst_dir), ["m.safetensors"]);
        assert!(names(&src_dir).is_empty());

        let e = copy_across(&a, &src_dir.join("x")).unwrap_err();
        assert!(e.starts_with(&a.display().to_string()), "{e}");
    }

    #[test]
    fn two_names_with_the_same_bytes_hold_one_file() {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(p("old"), &big).unwrap();
        std::fs::write(p("copy"), &big).unwrap();
        assert!(matches!(where_is(&p("old"), &p("copy")), At::Both));
        let mut other = big.clone();
        *other.last_mut().unwrap() ^= 1;
        std::fs::write(p("changed"), &other).unwrap();
        assert!(matches!(where_is(&p("old"), &p("changed")), At::Unclear));
        std::fs::write(p("short"), &big[..big.len() - 1]).unwrap();
        assert!(!same_contents(&p("old"), &p("short")));
        assert!(!same_contents(&p("short"), &p("old")));
        assert!(matches!(where_is(&p("old"), &p("none")), At::Old));
        assert!(matches!(where_is(&p("none"), &p("old")), At::New));

        // Recovery forward removes the old name, back the new one; bytes that differ stay.
        settle(&p("old"), &p("copy"), where_is(&p("old"), &p("copy")), true).unwrap();
        assert!(!p("old").exists() && p("copy").exists());
        std::fs::write(p("old"), &big).unwrap();
        settle(
            &p("old"),
            &p("copy"),
            where_is(&p("old"), &p("copy")),
            false,
        )
        .unwrap();
        assert!(p("old").exists() && !p("copy").exists());
        let e = settle(&p("old"), &p("changed"), At::Unclear, true).unwrap_err();
        assert!(e.contains("both exist"), "{e}");
        assert!(p("old").exists() && p("changed").exists());
    }
}
