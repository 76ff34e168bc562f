//! Where files came from (the `sources` table): written by `fetch` and `identify`, read by
//! `show`, `export` and `outdated`.

use super::scan::now;
use super::sidecar::path_bytes;
use super::Library;
use crate::hub::fetch::Origin;
use crate::tensors::hash::FileHashes;
use crate::{Error, Result};
use rusqlite::params;
use std::path::Path;

impl Library {
    /// Indexes `path` (reading it again if it changed) and records where it came from, replacing
    /// an earlier record from the same service.
    /// `hashes`: the file's hashes when the caller has just read them (a download's verifying
    /// read), so the index does not read the file again.
    pub fn record_source(
        &mut self,
        path: &Path,
        origin: &Origin,
        hashes: Option<&FileHashes>,
    ) -> Result<()> {
        self.reindex_file_with(path, hashes)?;
        let err = |e: rusqlite::Error| Error::Invalid(format!("{}: {e}", self.path.display()));
        let id: i64 = self
            .conn
            .query_row(
                "SELECT id FROM files WHERE path = ?1",
                [path_bytes(path)],
                |r| r.get(0),
            )
            .map_err(err)?;
        let fetched_at = now();
        match origin {
            Origin::Civitai {
                model_id,
                version_id,
                file_id,
            } => self.conn.execute(
                "INSERT OR REPLACE INTO sources (file_id, source, civitai_model_id, civitai_version_id,
                     civitai_file_id, fetched_at) VALUES (?1, 'civitai', ?2, ?3, ?4, ?5)",
                params![
                    id,
                    model_id.map(|v| v as i64),
                    *version_id as i64,
                    file_id.map(|v| v as i64),
                    fetched_at
                ],
            ),
            Origin::HuggingFace {
                repo,
                revision,
                path: hf_path,
            } => self.conn.execute(
                "INSERT OR REPLACE INTO sources (file_id, source, hf_repo, hf_revision, hf_path,
                     fetched_at) VALUES (?1, 'huggingface', ?2, ?3, ?4, ?5)",
                params![id, repo, revision, hf_path, fetched_at],
            ),
        }
        .map_err(err)?;
        Ok(())
    }
}

/// An indexed file and the Civitai model and version it is known to be.
#[derive(Debug, Clone)]
pub struct CivitaiLink {
    pub path: std::path::PathBuf,
    pub model_id: u64,
    pub version_id: u64,
}

impl Library {
    /// Present files with Civitai ids: from `fetch`/`identify` records, else from a
    /// `.civitai.info` beside them (written by us or by the Civitai Helper extensions).
    pub fn civitai_links(&self) -> Result<Vec<CivitaiLink>> {
        let err = |e: rusqlite::Error| super::db::db_error(&self.path, e);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT f.path, s.civitai_model_id, s.civitai_version_id,
                        (SELECT sc.path FROM sidecars sc WHERE sc.file_id = f.id AND sc.kind = 'civitai_info')
                 FROM files f LEFT JOIN sources s ON s.file_id = f.id AND s.source = 'civitai'
                 WHERE f.missing = 0 ORDER BY f.path",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            })
            .map_err(err)?;
        let mut links = Vec::new();
        for row in rows {
            let (path, model, version, info) = row.map_err(err)?;
            let ids = match (model, version) {
                (Some(m), Some(v)) => Some((m as u64, v as u64)),
                _ => info.and_then(|p| {
                    let json =
                        super::sidecar::read_civitai_info(&super::sidecar::path_from_bytes(&p))?;
                    crate::hub::identify::ids_in_civitai_info(&json)
                }),
            };
            if let Some((model_id, version_id)) = ids {
                links.push(CivitaiLink {
                    path: super::sidecar::path_from_bytes(&path),
                    model_id,
                    version_id,
                });
            }
        }
        Ok(links)
    }

    /// Present files with their hashes, for `identify`: all of them, or only those with no
    /// Civitai record and no `.civitai.info`.
    pub fn files_to_identify(
        &self,
        all: bool,
    ) -> Result<Vec<(std::path::PathBuf, crate::tensors::hash::FileHashes)>> {
        let err = |e: rusqlite::Error| super::db::db_error(&self.path, e);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT f.path, f.sha256, f.autov2, f.addnet, f.autov3 FROM files f
                 WHERE f.missing = 0 AND f.sha256 IS NOT NULL AND f.type IN ('lora', 'checkpoint')
                   AND (?1 OR (NOT EXISTS (SELECT 1 FROM sources s WHERE s.file_id = f.id AND s.source = 'civitai')
                        AND NOT EXISTS (SELECT 1 FROM sidecars sc WHERE sc.file_id = f.id AND sc.kind = 'civitai_info')))
                 ORDER BY f.path",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([all], |r| {
                Ok((
                    super::sidecar::path_from_bytes(&r.get::<_, Vec<u8>>(0)?),
                    crate::tensors::hash::FileHashes {
                        sha256: r.get(1)?,
                        autov2: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                        addnet: r.get(3)?,
                        autov3: r.get(4)?,
                    },
                ))
            })
            .map_err(err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(err)
    }

    /// What `outdated` learnt about a model less than `max_age_s` ago: the newest version's id
    /// and name.
    pub fn cached_civitai_model(&self, model_id: u64, max_age_s: i64) -> Option<(u64, String)> {
        self.conn
            .query_row(
                "SELECT newest_version_id, newest_version_name FROM civitai_models
                 WHERE model_id = ?1 AND checked_at >= ?2",
                params![model_id as i64, now() - max_age_s],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<String>>(1)?)),
            )
            .ok()
            .map(|(id, name)| (id, name.unwrap_or_default()))
    }

    pub fn cache_civitai_model(&self, model_id: u64, newest: u64, name: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO civitai_models (model_id, newest_version_id,
                     newest_version_name, checked_at) VALUES (?1, ?2, ?3, ?4)",
                params![model_id as i64, newest as i64, name, now()],
            )
            .map_err(|e| super::db::db_error(&self.path, e))?;
        Ok(())
    }
}

impl Library {
    /// The hashes the index holds for `path`, when its size and mtime are still the ones indexed
    /// (so a render's infotext need not read a multi-gigabyte checkpoint again).
    pub fn known_hashes(&self, path: &Path) -> Option<crate::tensors::hash::FileHashes> {
        let meta = std::fs::metadata(path).ok()?;
        let (size, mtime) = (meta.len() as i64, super::scan::mtime_ns(&meta));
        self.conn
            .query_row(
                "SELECT sha256, autov2, addnet, autov3 FROM files
                 WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 AND missing = 0
                   AND sha256 IS NOT NULL",
                params![path_bytes(path), size, mtime],
                |r| {
                    Ok(crate::tensors::hash::FileHashes {
                        sha256: r.get(0)?,
                        autov2: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        addnet: r.get(2)?,
                        autov3: r.get(3)?,
                    })
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_s_hashes_are_recorded_without_reading_the_file_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tiny.safetensors");
        let mut header = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.to_vec();
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        let data_start = 8 + header.len() as u64;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&1f32.to_le_bytes());
        std::fs::write(&file, bytes).unwrap();
        let mut lib = Library::open(&dir.path().join("library.db")).unwrap();
        // Hashes no read of this file could give: if the index read it, it would hold others.
        let given = FileHashes {
            sha256: "ab".repeat(32),
            autov2: "ABABABABAB".into(),
            addnet: Some("cd".repeat(32)),
            autov3: Some("CDCDCDCDCDCD".into()),
        };
        let origin = Origin::HuggingFace {
            repo: "someone/tiny".into(),
            revision: Some("main".into()),
            path: "tiny.safetensors".into(),
        };
        lib.record_source(&file, &origin, Some(&given)).unwrap();
        let file = std::fs::canonicalize(&file).unwrap();
        assert_eq!(lib.known_hashes(&file), Some(given));
        // Without them, a fresh index reads the file: its real hashes.
        let mut other = Library::open(&dir.path().join("other.db")).unwrap();
        other.record_source(&file, &origin, None).unwrap();
        let real = crate::tensors::hash::hash_file(&file, Some(data_start)).unwrap();
        assert_eq!(other.known_hashes(&file), Some(real));
    }
}
