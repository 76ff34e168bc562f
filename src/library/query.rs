//! Reading the index: entries, `list` with its filters and full-text search, name resolution
//! (A1111's rules), duplicates, `verify`, `export`.

use super::scan::now;
use super::sidecar::{path_bytes, path_from_bytes};
use super::Library;
use crate::ops::progress::ProgressSink;
use crate::tensors::hash::hash_file;
use crate::tensors::writer::hex;
use crate::Result;
use rayon::prelude::*;
use rusqlite::{params, params_from_iter, Connection, Row};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::Path;

/// Everything the index knows about one file (the `files[]` objects of `export --json`,
/// documented in docs/LIBRARY.md).
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: i64,
    /// The path, with any bytes that are not UTF-8 replaced by U+FFFD.
    pub path: String,
    /// The raw path bytes in hex, only when the path is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    pub file_name: String,
    /// A1111's name: the file stem.
    pub stem: String,
    /// A1111's alias: `ss_output_name`.
    pub alias: Option<String>,
    /// `lora`, `checkpoint`, `other` or `unreadable`.
    #[serde(rename = "type")]
    pub file_type: String,
    /// For LoRAs the network kind (`lora`, `locon`, `loha`, …); for other files inspect's kind
    /// (`checkpoint`, `vae`, `text_encoder`, `embedding`, `unknown`).
    pub kind: Option<String>,
    pub container: Option<String>,
    pub format: Option<String>,
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
    pub size: i64,
    pub mtime_ns: i64,
    pub sha256: Option<String>,
    pub autov2: Option<String>,
    pub addnet: Option<String>,
    pub autov3: Option<String>,
    /// `read` or `a1111_cache`.
    pub hash_source: Option<String>,
    pub trigger_words: Vec<String>,
    pub top_tags: Vec<String>,
    pub tags: Vec<String>,
    pub note: String,
    pub sidecars: Vec<SidecarEntry>,
    /// Where the file came from (`fetch`, `identify`).
    pub sources: Vec<SourceEntry>,
    pub has_preview: bool,
    pub user_metadata: Option<serde_json::Value>,
    pub warnings: Vec<String>,
    pub error: Option<String>,
    pub missing: bool,
    pub added_at: i64,
    pub indexed_at: i64,
    pub verified_at: Option<i64>,
    /// All string metadata of the file (`show` and `export`; left out of `list`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SidecarEntry {
    pub kind: String,
    pub path: String,
}

const COLUMNS: &str = "id, path, file_name, stem, alias, type, network, model_kind, container, \
    format, base_model, family, rank, rank_min, alpha, dtype, module_count, tensor_count, \
    parameters, components, size, mtime_ns, sha256, autov2, addnet, autov3, hash_source, \
    trigger_words, top_tags, note, user_metadata, warnings, error, missing, added_at, indexed_at, \
    verified_at, metadata";

fn json_list(text: Option<String>) -> Vec<String> {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

impl Entry {
    /// The file's path as stored, bytes that are not UTF-8 included (from [`Entry::path_hex`]).
    pub fn file_path(&self) -> std::path::PathBuf {
        match &self.path_hex {
            Some(hex) => {
                let bytes: Vec<u8> = (0..hex.len() / 2)
                    .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                    .collect();
                path_from_bytes(&bytes)
            }
            None => std::path::PathBuf::from(&self.path),
        }
    }
}

fn entry_from_row(r: &Row, full: bool) -> rusqlite::Result<Entry> {
    let path: Vec<u8> = r.get(1)?;
    let (path_str, path_hex) = match std::str::from_utf8(&path) {
        Ok(s) => (s.to_string(), None),
        Err(_) => (
            String::from_utf8_lossy(&path).into_owned(),
            Some(hex(&path)),
        ),
    };
    let file_type: String = r.get(5)?;
    let network: Option<String> = r.get(6)?;
    let model_kind: Option<String> = r.get(7)?;
    Ok(Entry {
        id: r.get(0)?,
        path: path_str,
        path_hex,
        file_name: r.get(2)?,
        stem: r.get(3)?,
        alias: r.get(4)?,
        kind: if file_type == "lora" {
            network
        } else {
            model_kind
        },
        file_type,
        container: r.get(8)?,
        format: r.get(9)?,
        base_model: r.get(10)?,
        family: r.get(11)?,
        rank: r.get(12)?,
        rank_min: r.get(13)?,
        alpha: r.get(14)?,
        dtype: r.get(15)?,
        module_count: r.get(16)?,
        tensor_count: r.get(17)?,
        parameters: r.get(18)?,
        components: json_list(r.get(19)?),
        size: r.get(20)?,
        mtime_ns: r.get(21)?,
        sha256: r.get(22)?,
        autov2: r.get(23)?,
        addnet: r.get(24)?,
        autov3: r.get(25)?,
        hash_source: r.get(26)?,
        trigger_words: json_list(r.get(27)?),
        top_tags: json_list(r.get(28)?),
        tags: Vec::new(),
        note: r.get(29)?,
        sidecars: Vec::new(),
        sources: Vec::new(),
        has_preview: false,
        user_metadata: r
            .get::<_, Option<String>>(30)?
            .and_then(|t| serde_json::from_str(&t).ok()),
        warnings: json_list(r.get(31)?),
        error: r.get(32)?,
        missing: r.get::<_, i64>(33)? != 0,
        added_at: r.get(34)?,
        indexed_at: r.get(35)?,
        verified_at: r.get(36)?,
        metadata: match full {
            true => Some(
                r.get::<_, Option<String>>(37)?
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default(),
            ),
            false => None,
        },
    })
}

/// Fills an entry's tags and sidecars.
fn complete(conn: &Connection, e: &mut Entry) -> rusqlite::Result<()> {
    let mut tags = conn.prepare_cached("SELECT tag FROM tags WHERE file_id = ?1 ORDER BY tag")?;
    e.tags = tags
        .query_map([e.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut side =
        conn.prepare_cached("SELECT kind, path FROM sidecars WHERE file_id = ?1 ORDER BY path")?;
    e.sidecars = side
        .query_map([e.id], |r| {
            Ok(SidecarEntry {
                kind: r.get(0)?,
                path: String::from_utf8_lossy(&r.get::<_, Vec<u8>>(1)?).into_owned(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    e.has_preview = e.sidecars.iter().any(|s| s.kind == "preview");
    let mut src = conn.prepare_cached(&format!("{SOURCE_COLUMNS} WHERE file_id = ?1"))?;
    e.sources = src
        .query_map([e.id], source_from_row)?
        .map(|r| r.map(|(_, s)| s))
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

/// A `sources` row.
#[derive(Debug, Clone, Serialize)]
pub struct SourceEntry {
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub civitai_model_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub civitai_version_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub civitai_file_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hf_repo: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hf_revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hf_path: Option<String>,
    pub fetched_at: i64,
}

const SOURCE_COLUMNS: &str = "SELECT file_id, source, civitai_model_id, civitai_version_id,
    civitai_file_id, hf_repo, hf_revision, hf_path, fetched_at FROM sources";

fn source_from_row(r: &Row) -> rusqlite::Result<(i64, SourceEntry)> {
    Ok((
        r.get(0)?,
        SourceEntry {
            source: r.get(1)?,
            civitai_model_id: r.get(2)?,
            civitai_version_id: r.get(3)?,
            civitai_file_id: r.get(4)?,
            hf_repo: r.get(5)?,
            hf_revision: r.get(6)?,
            hf_path: r.get(7)?,
            fetched_at: r.get(8)?,
        },
    ))
}

/// [`complete`] for many entries: three queries in all instead of three per entry.
fn complete_all(conn: &Connection, list: &mut [Entry]) -> rusqlite::Result<()> {
    use std::collections::HashMap;
    let mut tags: HashMap<i64, Vec<String>> = HashMap::new();
    let mut stmt = conn.prepare_cached("SELECT file_id, tag FROM tags ORDER BY tag")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
        let (id, tag) = row?;
        tags.entry(id).or_default().push(tag);
    }
    let mut sides: HashMap<i64, Vec<SidecarEntry>> = HashMap::new();
    let mut stmt = conn.prepare_cached("SELECT file_id, kind, path FROM sidecars ORDER BY path")?;
    for row in stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            SidecarEntry {
                kind: r.get(1)?,
                path: String::from_utf8_lossy(&r.get::<_, Vec<u8>>(2)?).into_owned(),
            },
        ))
    })? {
        let (id, s) = row?;
        sides.entry(id).or_default().push(s);
    }
    let mut sources: HashMap<i64, Vec<SourceEntry>> = HashMap::new();
    let mut stmt = conn.prepare_cached(SOURCE_COLUMNS)?;
    for row in stmt.query_map([], source_from_row)? {
        let (id, s) = row?;
        sources.entry(id).or_default().push(s);
    }
    for e in list {
        e.sources = sources.remove(&e.id).unwrap_or_default();
        e.tags = tags.remove(&e.id).unwrap_or_default();
        e.sidecars = sides.remove(&e.id).unwrap_or_default();
        e.has_preview = e.sidecars.iter().any(|s| s.kind == "preview");
    }
    Ok(())
}

/// Metadata keys whose values are base64 images (kohya's cover images, modelspec's thumbnail):
/// neither searched nor shown as text.
pub const EMBEDDED_IMAGE_KEYS: &[&str] = &["ssmd_cover_images", "modelspec.thumbnail"];

/// Recomputes the full-text row of one entry (after a scan, a tag or a note changed it).
pub(crate) fn refresh_fts(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM files_fts WHERE rowid = ?1")?
        .execute([id])?;
    let row = conn
        .prepare_cached(
            "SELECT file_name, alias, trigger_words, top_tags, note, metadata, user_metadata FROM files WHERE id = ?1",
        )?
        .query_row([id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        });
    let Ok((name, alias, triggers, top_tags, note, metadata, user)) = row else {
        return Ok(());
    };
    let mut words = json_list(triggers);
    words.extend(json_list(top_tags));
    let tags: Vec<String> = conn
        .prepare_cached("SELECT tag FROM tags WHERE file_id = ?1")?
        .query_map([id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut meta_text = String::new();
    let meta: BTreeMap<String, String> = metadata
        .and_then(|m| serde_json::from_str(&m).ok())
        .unwrap_or_default();
    for (k, v) in &meta {
        // Embedded images are base64, not words.
        if EMBEDDED_IMAGE_KEYS.contains(&k.as_str()) || v.len() > 256 << 10 {
            continue;
        }
        meta_text.push_str(v);
        meta_text.push('\n');
    }
    let mut notes = note;
    if let Some(serde_json::Value::Object(u)) = user.and_then(|u| serde_json::from_str(&u).ok()) {
        for v in u.values().filter_map(|v| v.as_str()) {
            notes.push('\n');
            notes.push_str(v);
        }
    }
    conn.prepare_cached(
        "INSERT INTO files_fts (rowid, name, alias, trigger_words, tags, notes, metadata) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        id,
        name,
        alias.unwrap_or_default(),
        words.join(", "),
        tags.join(" "),
        notes,
        meta_text
    ])?;
    Ok(())
}

/// A1111's one namespace of LoRA names: each LoRA under its stem and (when it differs) its alias
/// (`networks.py` registers both). A name with several files is a collision.
pub fn a1111_names(loras: &[Entry]) -> BTreeMap<&str, Vec<&Entry>> {
    let mut names: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in loras {
        names.entry(e.stem.as_str()).or_default().push(e);
        if let Some(a) = e.alias.as_deref().filter(|a| *a != e.stem) {
            names.entry(a).or_default().push(e);
        }
    }
    names
}

/// `--search TEXT` as an FTS5 query: every word must occur, as a word or a word's beginning.
pub fn fts_query(text: &str) -> String {
    text.split_whitespace()
        .map(|w| format!("\"{}\"*", w.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sort {
    #[default]
    Name,
    Size,
    Added,
    Rank,
}

/// The filters of `library list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `None`: every type.
    pub file_type: Option<String>,
    pub base: Option<String>,
    pub kind: Option<String>,
    pub tag: Option<String>,
    pub search: Option<String>,
    pub missing_preview: bool,
    /// Only files that are gone (by default they are left out).
    pub missing: bool,
    pub sort: Sort,
}

/// What a name, hash or path given to `show`, `tag`, `note` or `sidecar` means.
#[derive(Debug)]
pub enum Resolved {
    One(Box<Entry>),
    /// Several entries answer to it (each listed, so the user can pick a path or a hash).
    Many(Vec<Entry>),
    None,
}

/// One group of `library dupes`.
#[derive(Debug, Clone, Serialize)]
pub struct DupeGroup {
    /// `same_file` (sha256), `same_tensors` (data-section sha256 = AutoV3, different sha256),
    /// `name_collision` (one A1111 name — stem or alias — for several LoRAs).
    pub reason: &'static str,
    /// The sha256, the data-section sha256, or the name.
    pub key: String,
    pub files: Vec<Entry>,
}

/// One finding of `library verify`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyIssue {
    pub id: i64,
    pub path: String,
    /// `missing`, `truncated`, `changed` or `unreadable`.
    pub problem: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub checked: usize,
    pub ok: usize,
    pub bytes_read: u64,
    pub issues: Vec<VerifyIssue>,
}

/// The whole index (`library export --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Export {
    pub schema_version: i64,
    pub exported_at: i64,
    pub roots: Vec<super::Root>,
    pub files: Vec<Entry>,
}

impl Library {
    fn entries(
        &self,
        sql: &str,
        args: &[rusqlite::types::Value],
        full: bool,
    ) -> Result<Vec<Entry>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        let mut list: Vec<Entry> = stmt
            .query_map(params_from_iter(args), |r| entry_from_row(r, full))
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        if list.len() <= 64 {
            for e in &mut list {
                complete(&self.conn, e).map_err(self.err())?;
            }
        } else {
            complete_all(&self.conn, &mut list).map_err(self.err())?;
        }
        Ok(list)
    }

    /// One entry by id, with its metadata.
    pub fn entry(&self, id: i64) -> Result<Option<Entry>> {
        let sql = format!("SELECT {COLUMNS} FROM files WHERE id = ?1");
        Ok(self.entries(&sql, &[id.into()], true)?.pop())
    }

    /// `library list`.
    pub fn list(&self, f: &ListFilter) -> Result<Vec<Entry>> {
        self.list_entries(f, false)
    }

    /// [`Library::list`] with each entry's metadata (`library gallery`).
    pub fn list_with_metadata(&self, f: &ListFilter) -> Result<Vec<Entry>> {
        self.list_entries(f, true)
    }

    fn list_entries(&self, f: &ListFilter, full: bool) -> Result<Vec<Entry>> {
        use rusqlite::types::Value;
        let mut conds = vec![format!("missing = {}", f.missing as i32)];
        let mut args: Vec<Value> = Vec::new();
        let mut arg = |v: String| {
            args.push(Value::Text(v));
            format!("?{}", args.len())
        };
        if let Some(t) = &f.file_type {
            conds.push(format!("type = {}", arg(t.clone())));
        }
        if let Some(b) = &f.base {
            conds.push(format!("base_model = {}", arg(b.clone())));
        }
        if let Some(k) = &f.kind {
            let a = arg(k.clone());
            conds.push(format!(
                "((type = 'lora' AND network = {a}) OR (type <> 'lora' AND model_kind = {a}))"
            ));
        }
        if let Some(t) = &f.tag {
            conds.push(format!(
                "id IN (SELECT file_id FROM tags WHERE tag = {})",
                arg(t.clone())
            ));
        }
        if let Some(s) = f.search.as_deref().filter(|s| !s.trim().is_empty()) {
            conds.push(format!(
                "id IN (SELECT rowid FROM files_fts WHERE files_fts MATCH {})",
                arg(fts_query(s))
            ));
        }
        if f.missing_preview {
            conds.push(
                "id NOT IN (SELECT file_id FROM sidecars WHERE kind = 'preview')".to_string(),
            );
        }
        let order = match f.sort {
            Sort::Name => "stem COLLATE NOCASE, path",
            Sort::Size => "size DESC, path",
            Sort::Added => "added_at DESC, id DESC",
            Sort::Rank => "rank DESC NULLS LAST, path",
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM files WHERE {} ORDER BY {order}",
            conds.join(" AND ")
        );
        self.entries(&sql, &args, full)
    }

    /// Resolves what the user typed: an indexed path, an A1111 name (stem or `ss_output_name`
    /// alias), or a prefix of sha256 / AutoV2 / data-section sha256 / AutoV3 (8 hex or more).
    /// Present files win over missing ones.
    pub fn resolve(&self, query: &OsStr) -> Result<Resolved> {
        let by_ids = |ids: Vec<i64>| -> Result<Resolved> {
            let mut found = Vec::new();
            for id in ids.into_iter().collect::<BTreeSet<_>>() {
                found.extend(self.entry(id)?);
            }
            let present: Vec<Entry> = found.iter().filter(|e| !e.missing).cloned().collect();
            let list = if present.is_empty() { found } else { present };
            Ok(match list.len() {
                0 => Resolved::None,
                1 => Resolved::One(Box::new(list.into_iter().next().expect("one"))),
                _ => Resolved::Many(list),
            })
        };
        let ids = |sql: &str, arg: &dyn rusqlite::ToSql| -> Result<Vec<i64>> {
            let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
            let rows = stmt
                .query_map([arg], |r| r.get(0))
                .map_err(self.err())?
                .collect::<rusqlite::Result<Vec<i64>>>()
                .map_err(self.err())?;
            Ok(rows)
        };
        // A path: as typed, made absolute, and with symlinks resolved.
        let p = Path::new(query);
        let mut forms = vec![p.to_path_buf()];
        if let Ok(abs) = std::path::absolute(p) {
            forms.push(abs);
        }
        if let Ok(c) = std::fs::canonicalize(p) {
            forms.push(c);
        }
        for form in forms {
            let found = ids("SELECT id FROM files WHERE path = ?1", &path_bytes(&form))?;
            if !found.is_empty() {
                return by_ids(found);
            }
        }
        let text = query.to_string_lossy();
        let found = ids(
            "SELECT id FROM files WHERE stem = ?1 OR alias = ?1",
            &text.as_ref(),
        )?;
        if !found.is_empty() {
            return by_ids(found);
        }
        if text.len() >= 8 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            // A range on the indexed columns ('g' sorts after every hex digit).
            let lo = text.to_ascii_lowercase();
            let hi = format!("{lo}g");
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT id FROM files WHERE sha256 >= ?1 AND sha256 < ?2
                     UNION SELECT id FROM files WHERE addnet >= ?1 AND addnet < ?2",
                )
                .map_err(self.err())?;
            let found = stmt
                .query_map([&lo, &hi], |r| r.get(0))
                .map_err(self.err())?
                .collect::<rusqlite::Result<Vec<i64>>>()
                .map_err(self.err())?;
            return by_ids(found);
        }
        Ok(Resolved::None)
    }

    /// `library dupes`: same file, same tensors, A1111 name collisions (present files only).
    pub fn dupes(&self) -> Result<Vec<DupeGroup>> {
        let mut groups = Vec::new();
        let keyed = |sql: &str| -> Result<Vec<String>> {
            let mut stmt = self.conn.prepare(sql).map_err(self.err())?;
            let keys = stmt
                .query_map([], |r| r.get(0))
                .map_err(self.err())?
                .collect::<rusqlite::Result<_>>()
                .map_err(self.err())?;
            Ok(keys)
        };
        let by = |col: &str, key: &str| -> Result<Vec<Entry>> {
            let sql = format!(
                "SELECT {COLUMNS} FROM files WHERE missing = 0 AND {col} = ?1 ORDER BY path"
            );
            self.entries(&sql, &[key.to_string().into()], false)
        };
        for sha in keyed(
            "SELECT sha256 FROM files WHERE missing = 0 AND sha256 IS NOT NULL
             GROUP BY sha256 HAVING count(*) > 1 ORDER BY sha256",
        )? {
            groups.push(DupeGroup {
                reason: "same_file",
                files: by("sha256", &sha)?,
                key: sha,
            });
        }
        for addnet in keyed(
            "SELECT addnet FROM files WHERE missing = 0 AND addnet IS NOT NULL
             GROUP BY addnet HAVING count(DISTINCT sha256) > 1 ORDER BY addnet",
        )? {
            groups.push(DupeGroup {
                reason: "same_tensors",
                files: by("addnet", &addnet)?,
                key: addnet,
            });
        }
        // A1111 registers each LoRA under its stem and its alias in one namespace.
        let loras = self.entries(
            &format!(
                "SELECT {COLUMNS} FROM files WHERE missing = 0 AND type = 'lora' ORDER BY path"
            ),
            &[],
            false,
        )?;
        for (name, files) in a1111_names(&loras) {
            if files.len() > 1 {
                groups.push(DupeGroup {
                    reason: "name_collision",
                    key: name.to_string(),
                    files: files.into_iter().cloned().collect(),
                });
            }
        }
        Ok(groups)
    }

    /// `library verify`: rehashes every present, hashed entry and reports what no longer matches.
    pub fn verify(&mut self, progress: &ProgressSink) -> Result<VerifyReport> {
        let sql = format!(
            "SELECT {COLUMNS} FROM files WHERE missing = 0 AND sha256 IS NOT NULL ORDER BY path"
        );
        let entries = self.entries(&sql, &[], false)?;
        let paths: Vec<Vec<u8>> = {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT path FROM files WHERE missing = 0 AND sha256 IS NOT NULL ORDER BY path",
                )
                .map_err(self.err())?;
            let rows = stmt
                .query_map([], |r| r.get(0))
                .map_err(self.err())?
                .collect::<rusqlite::Result<_>>()
                .map_err(self.err())?;
            rows
        };
        progress.start(entries.iter().map(|e| e.size as u64).sum());
        let results: Vec<(i64, Option<VerifyIssue>, u64)> = entries
            .par_iter()
            .zip(paths.par_iter())
            .map(|(e, raw)| {
                let path = path_from_bytes(raw);
                let issue = |problem, detail: String| VerifyIssue {
                    id: e.id,
                    path: e.path.clone(),
                    problem,
                    detail,
                };
                let out = match std::fs::metadata(&path) {
                    Err(err) => (e.id, Some(issue("missing", err.to_string())), 0),
                    Ok(m) if (m.len() as i64) < e.size => (
                        e.id,
                        Some(issue(
                            "truncated",
                            format!("{} bytes, indexed with {}", m.len(), e.size),
                        )),
                        0,
                    ),
                    Ok(m) => match hash_file(&path, None) {
                        Err(err) => (e.id, Some(issue("unreadable", err.to_string())), m.len()),
                        Ok(h) if Some(&h.sha256) != e.sha256.as_ref() => (
                            e.id,
                            Some(issue(
                                "changed",
                                format!(
                                    "sha256 {} (size {}), indexed {} (size {})",
                                    h.autov2,
                                    m.len(),
                                    e.autov2.as_deref().unwrap_or("?"),
                                    e.size
                                ),
                            )),
                            m.len(),
                        ),
                        Ok(_) => (e.id, None, m.len()),
                    },
                };
                progress.advance(e.size as u64);
                out
            })
            .collect();
        let mut report = VerifyReport {
            checked: results.len(),
            ..Default::default()
        };
        let path = self.path.clone();
        let err = |e| super::db::db_error(&path, e);
        let tx = self.conn.transaction().map_err(err)?;
        for (id, issue, read) in results {
            report.bytes_read += read;
            match issue {
                Some(i) => report.issues.push(i),
                None => {
                    report.ok += 1;
                    tx.execute(
                        "UPDATE files SET verified_at = ?2 WHERE id = ?1",
                        params![id, now()],
                    )
                    .map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)?;
        Ok(report)
    }

    /// `library export --json`.
    pub fn export(&self) -> Result<Export> {
        let sql = format!("SELECT {COLUMNS} FROM files ORDER BY path");
        Ok(Export {
            schema_version: super::db::SCHEMA_VERSION,
            exported_at: now(),
            roots: self.roots()?,
            files: self.entries(&sql, &[], true)?,
        })
    }

    /// The raw path of an entry (names need not be UTF-8).
    pub fn entry_path(&self, id: i64) -> Result<std::path::PathBuf> {
        let bytes: Vec<u8> = self
            .conn
            .query_row("SELECT path FROM files WHERE id = ?1", [id], |r| r.get(0))
            .map_err(self.err())?;
        Ok(path_from_bytes(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_words_become_quoted_prefixes() {
        assert_eq!(fts_query("red hair"), "\"red\"* \"hair\"*");
        assert_eq!(fts_query("a\"b"), "\"a\"\"b\"*");
    }
}
