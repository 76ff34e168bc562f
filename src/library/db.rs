//! The index database: where it lives, how a connection is set up, and the versioned schema.
//!
//! One SQLite file in WAL mode: readers never block the writer nor each other, and a second writer
//! waits on the busy timeout instead of failing. Every change a command makes is one transaction
//! (a scan commits in batches), so a crash or SIGKILL leaves the database at the last commit.
//! `synchronous=NORMAL` is WAL's durable-enough setting: a power cut may lose the last commits but
//! never corrupts the file, and no commit pays an fsync of its own.

use crate::{Error, Result};
use rusqlite::{Connection, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 3;

/// How long a writer waits for another one before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(600);

/// The migrations, in order: entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// Schema version 1 (documented in docs/LIBRARY.md, "The index").
const V1: &str = r#"
CREATE TABLE roots (
    id          INTEGER PRIMARY KEY,
    path        BLOB NOT NULL UNIQUE,
    added_at    INTEGER NOT NULL
);

CREATE TABLE files (
    id            INTEGER PRIMARY KEY,
    path          BLOB NOT NULL UNIQUE,
    dir           BLOB NOT NULL,
    file_name     TEXT NOT NULL,
    stem          TEXT NOT NULL,
    size          INTEGER NOT NULL,
    mtime_ns      INTEGER NOT NULL,
    sidecar_sig   TEXT NOT NULL DEFAULT '',
    type          TEXT NOT NULL CHECK (type IN ('lora', 'checkpoint', 'other', 'unreadable')),
    model_kind    TEXT,
    container     TEXT,
    format        TEXT,
    network       TEXT,
    base_model    TEXT,
    family        TEXT,
    rank          INTEGER,
    rank_min      INTEGER,
    alpha         REAL,
    dtype         TEXT,
    module_count  INTEGER,
    tensor_count  INTEGER,
    parameters    INTEGER,
    components    TEXT NOT NULL DEFAULT '[]',
    alias         TEXT,
    trigger_words TEXT NOT NULL DEFAULT '[]',
    top_tags      TEXT NOT NULL DEFAULT '[]',
    metadata      TEXT NOT NULL DEFAULT '{}',
    user_metadata TEXT,
    warnings      TEXT NOT NULL DEFAULT '[]',
    error         TEXT,
    sha256        TEXT,
    autov2        TEXT,
    addnet        TEXT,
    autov3        TEXT,
    hash_source   TEXT,
    note          TEXT NOT NULL DEFAULT '',
    missing       INTEGER NOT NULL DEFAULT 0,
    added_at      INTEGER NOT NULL,
    indexed_at    INTEGER NOT NULL,
    verified_at   INTEGER
);
CREATE INDEX files_sha256 ON files(sha256);
CREATE INDEX files_addnet ON files(addnet);
CREATE INDEX files_stem ON files(stem);
CREATE INDEX files_alias ON files(alias);
CREATE INDEX files_type ON files(type, base_model);

CREATE TABLE tags (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    tag     TEXT NOT NULL,
    PRIMARY KEY (file_id, tag)
) WITHOUT ROWID;
CREATE INDEX tags_tag ON tags(tag);

CREATE TABLE sidecars (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    kind    TEXT NOT NULL,
    path    BLOB NOT NULL,
    PRIMARY KEY (file_id, path)
) WITHOUT ROWID;

-- Filled by `loratool fetch` (later): where a file came from.
CREATE TABLE sources (
    file_id            INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    source             TEXT NOT NULL CHECK (source IN ('civitai', 'huggingface', 'url')),
    civitai_model_id   INTEGER,
    civitai_version_id INTEGER,
    civitai_file_id    INTEGER,
    hf_repo            TEXT,
    hf_revision        TEXT,
    hf_path            TEXT,
    url                TEXT,
    fetched_at         INTEGER NOT NULL,
    PRIMARY KEY (file_id, source)
) WITHOUT ROWID;

-- Filled by `loratool preview` (later): preview images and whether loratool rendered them.
CREATE TABLE previews (
    file_id     INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    path        BLOB NOT NULL,
    rendered    INTEGER NOT NULL DEFAULT 0,
    parameters  TEXT,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (file_id, path)
) WITHOUT ROWID;

-- Filled by `library similar` / `dupes --near` (later): cosine of two LoRAs' ΔW, keyed by their
-- data-section sha256 (AutoV3 is its first 12 hex), smaller hash first. Content-keyed, so moves,
-- renames and metadata edits keep the cache valid.
CREATE TABLE similarity (
    addnet_a       TEXT NOT NULL,
    addnet_b       TEXT NOT NULL,
    cosine         REAL NOT NULL,
    shared_modules INTEGER NOT NULL,
    computed_at    INTEGER NOT NULL,
    PRIMARY KEY (addnet_a, addnet_b),
    CHECK (addnet_a < addnet_b)
) WITHOUT ROWID;

CREATE VIRTUAL TABLE files_fts USING fts5(
    name, alias, trigger_words, tags, notes, metadata,
    tokenize = 'unicode61 remove_diacritics 2'
);
"#;

/// Schema version 2: each LoRA's similarity sketch (`similarity::Sketch::to_bytes`; NULL until
/// `similar` / `dupes --near` computes it, an empty BLOB when the file has none), the shares of each side's energy in the
/// shared weights in the similarity cache, and the journal of `library organize`
/// (one row per path of a file being moved; a file's rows are deleted in the transaction that
/// records its new place).
const V2: &str = r#"
ALTER TABLE files ADD COLUMN sketch BLOB;
ALTER TABLE similarity ADD COLUMN energy_a REAL;
ALTER TABLE similarity ADD COLUMN energy_b REAL;

CREATE TABLE moves (
    file_id   INTEGER NOT NULL,
    old_path  BLOB NOT NULL,
    new_path  BLOB NOT NULL,
    is_model  INTEGER NOT NULL,
    planned_at INTEGER NOT NULL,
    PRIMARY KEY (file_id, old_path)
) WITHOUT ROWID;
"#;

/// Schema version 3: what `library outdated` learnt about Civitai models (one request per model,
/// reused for a day).
const V3: &str = r#"
CREATE TABLE civitai_models (
    model_id            INTEGER PRIMARY KEY,
    newest_version_id   INTEGER,
    newest_version_name TEXT,
    checked_at          INTEGER NOT NULL
);
"#;

/// Where the index lives: `--db`, else `LORATOOL_DB`, else `$XDG_DATA_HOME/loratool/library.db`
/// (`~/.local/share/loratool/library.db` without it).
pub fn default_path(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("LORATOOL_DB").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("share")))
        .ok_or_else(|| {
            Error::Invalid("cannot place the library: set XDG_DATA_HOME, HOME or --db".into())
        })?;
    Ok(data.join("loratool").join("library.db"))
}

/// Opens (creating if needed) the database at `path` and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let err = |e| db_error(path, e);
    let mut conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(err)?;
    migrate(&mut conn).map_err(err)?;
    let version = user_version(&conn).map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(Error::Invalid(format!(
            "{}: the index has schema version {version}, newer than this loratool's {SCHEMA_VERSION}",
            path.display()
        )));
    }
    Ok(conn)
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Applies the missing migrations in one write transaction (re-reading the version under the
/// lock, so two processes opening a new database at once migrate it once).
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    if user_version(conn)? >= SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let from = user_version(&tx)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from.max(0) as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
    }
    tx.commit()
}

/// A database error, naming the database file.
pub fn db_error(path: &Path, e: rusqlite::Error) -> Error {
    Error::Invalid(format!("{}: database: {e}", path.display()))
}
