//! `loratool library`: an SQLite index of a LoRA and checkpoint collection (docs/LIBRARY.md).
//!
//! - [`db`]: where the index lives, connection settings (WAL, busy timeout), schema and migrations.
//! - [`scan`]: walking the roots, reading what changed (inspect + hashes), writing it in batches.
//! - [`sidecar`]: the files other tools keep beside a model, A1111's `cache.json`, and writing
//!   A1111's `<stem>.json`.
//! - [`query`]: entries, listing and search (FTS5), name resolution as A1111 does it, duplicates,
//!   verification, export.
//! - [`organize`]: moving files with their sidecars into folders by a property, crash-safe.
//! - [`similarity`]: how alike two LoRAs' effects are, from their factors.
//! - [`sources`]: where files came from (Civitai ids, Hugging Face repo and revision).
//! - [`similar`]: `similar` and `dupes --near` over the index (stored sketches, cached exact cosines).
//! - [`gallery`]: a static web page of the LoRAs with thumbnails of their previews.

pub mod db;
pub mod gallery;
pub mod organize;
pub mod previews;
pub mod query;
pub mod scan;
pub mod sidecar;
pub mod similar;
pub mod similarity;
pub mod sources;

use crate::{Error, Result};
use rusqlite::{params, Connection, TransactionBehavior};
use serde::Serialize;
use sidecar::{path_bytes, path_from_bytes};
use std::path::{Path, PathBuf};

/// An open index.
pub struct Library {
    pub(crate) conn: Connection,
    pub(crate) path: PathBuf,
}

/// A folder the index scans.
#[derive(Debug, Clone, Serialize)]
pub struct Root {
    pub path: String,
    pub added_at: i64,
    pub files: i64,
    pub missing: i64,
}

impl Library {
    /// Opens the index at `path`, creating it (and its folder) if needed.
    pub fn open(path: &Path) -> Result<Library> {
        Ok(Library {
            conn: db::open(path)?,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw connection, for checks (`PRAGMA integrity_check`) and tests.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |e| db::db_error(&self.path, e)
    }

    /// Remembers `dirs` as roots (absolute, symlinks resolved) and returns them.
    pub fn add_roots(&mut self, dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let mut roots = Vec::new();
        for d in dirs {
            let abs = std::fs::canonicalize(d).map_err(|e| Error::io(d, e))?;
            if !abs.is_dir() {
                return Err(Error::Invalid(format!("{}: not a folder", d.display())));
            }
            roots.push(abs);
        }
        let path = self.path.clone();
        let err = |e| db::db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        for r in &roots {
            tx.execute(
                "INSERT OR IGNORE INTO roots (path, added_at) VALUES (?1, ?2)",
                params![path_bytes(r), scan::now()],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(roots)
    }

    /// The roots' paths.
    pub fn root_paths(&self) -> Result<Vec<PathBuf>> {
        let mut stmt = self
            .conn
            .prepare("SELECT path FROM roots ORDER BY path")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .map_err(self.err())?;
        rows.map(|r| r.map(|b| path_from_bytes(&b)))
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())
    }

    /// The roots with their file counts.
    pub fn roots(&self) -> Result<Vec<Root>> {
        let paths = self.root_paths()?;
        let mut stmt = self
            .conn
            .prepare("SELECT path, missing FROM files")
            .map_err(self.err())?;
        let files: Vec<(Vec<u8>, bool)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)))
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        let mut out = Vec::new();
        for p in paths {
            let added_at = self
                .conn
                .query_row(
                    "SELECT added_at FROM roots WHERE path = ?1",
                    [path_bytes(&p)],
                    |r| r.get(0),
                )
                .map_err(self.err())?;
            let under: Vec<&(Vec<u8>, bool)> = files
                .iter()
                .filter(|(f, _)| scan::is_under(f, path_bytes(&p)))
                .collect();
            out.push(Root {
                path: p.to_string_lossy().into_owned(),
                added_at,
                files: under.len() as i64,
                missing: under.iter().filter(|(_, m)| *m).count() as i64,
            });
        }
        Ok(out)
    }

    /// Adds (`add`) or removes tags of one entry.
    pub fn set_tags(&mut self, id: i64, tags: &[String], add: bool) -> Result<()> {
        let path = self.path.clone();
        let err = |e| db::db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        for t in tags.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            let sql = match add {
                true => "INSERT OR IGNORE INTO tags (file_id, tag) VALUES (?1, ?2)",
                false => "DELETE FROM tags WHERE file_id = ?1 AND tag = ?2",
            };
            tx.execute(sql, params![id, t]).map_err(err)?;
        }
        query::refresh_fts(&tx, id).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Sets the note of one entry (empty text clears it).
    pub fn set_note(&mut self, id: i64, note: &str) -> Result<()> {
        let path = self.path.clone();
        let err = |e| db::db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute(
            "UPDATE files SET note = ?2 WHERE id = ?1",
            params![id, note],
        )
        .map_err(err)?;
        query::refresh_fts(&tx, id).map_err(err)?;
        tx.commit().map_err(err)
    }
}
