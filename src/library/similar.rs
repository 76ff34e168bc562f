//! `library similar` and `library dupes --near`: the index's LoRAs ranked by their stored sketches
//! (`files.sketch`), the pairs worth showing compared exactly from the files' factors, and each
//! exact result cached in `similarity` by the two data-section sha256 (docs/LIBRARY.md).
//!
//! The scan stores no sketch (`NULL` for a new or changed LoRA): both commands first compute the
//! missing sketches of the LoRAs they consider, in parallel, and store them in one transaction.

use super::db::db_error;
use super::scan::now;
use super::sidecar::path_from_bytes;
use super::similarity::{exact_similarity, rank_by_estimate, Similarity, Sketch};
use super::Library;
use crate::adapter::Adapter;
use crate::{Error, Result};
use rayon::prelude::*;
use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// The sketch's documented error bound used to pick pairs for exact confirmation: every pair whose
/// estimate is at least `threshold − NEAR_MARGIN` is compared exactly (docs/DELTA_MATH.md).
pub const NEAR_MARGIN: f64 = 0.1;

/// A LoRA of the index as the similarity commands see it.
#[derive(Debug, Clone, Serialize)]
pub struct SimilarFile {
    pub id: i64,
    pub stem: String,
    pub path: String,
    pub base_model: Option<String>,
    /// The data-section sha256 (the cache key).
    pub addnet: Option<String>,
    #[serde(skip)]
    raw_path: Vec<u8>,
}

/// One LoRA compared with the query.
#[derive(Debug, Clone, Serialize)]
pub struct SimilarMatch {
    pub file: SimilarFile,
    /// The sketch's estimate that ranked it.
    pub estimate: f64,
    /// The exact cosine of the two ΔW.
    pub cosine: f64,
    pub shared_modules: i64,
    /// Share of the query's / this file's `‖ΔW‖²` in the shared weights (absent for cache rows
    /// written before they were recorded).
    pub shared_energy_query: Option<f64>,
    pub shared_energy_file: Option<f64>,
    /// Whether the exact value came from the cache.
    pub cached: bool,
}

/// Something left out of a similarity command, with why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// `library similar`.
#[derive(Debug, Clone, Serialize)]
pub struct SimilarReport {
    pub query: SimilarFile,
    /// LoRAs of the same base model with a sketch (the ones ranked).
    pub candidates: usize,
    /// Best first by exact cosine.
    pub matches: Vec<SimilarMatch>,
    /// Exact comparisons computed now (the rest came from the cache).
    pub computed: usize,
    pub skipped: Vec<Skipped>,
}

/// One pair of `dupes --near`.
#[derive(Debug, Clone, Serialize)]
pub struct NearPair {
    pub a: i64,
    pub b: i64,
    pub estimate: f64,
    pub cosine: f64,
}

/// Files joined by pairs at or above the threshold (a connected component).
#[derive(Debug, Clone, Serialize)]
pub struct NearGroup {
    pub base_model: Option<String>,
    pub files: Vec<SimilarFile>,
    pub pairs: Vec<NearPair>,
}

/// `library dupes --near`.
#[derive(Debug, Clone, Serialize)]
pub struct NearReport {
    pub threshold: f64,
    /// Sketch estimates computed (n(n−1)/2 per base model).
    pub estimates: usize,
    /// Pairs compared exactly (estimate ≥ threshold − 0.1), of which `computed` were not cached.
    pub confirmed: usize,
    pub computed: usize,
    pub groups: Vec<NearGroup>,
    pub skipped: Vec<Skipped>,
}

/// A candidate with its sketch read from the index.
struct Sketched {
    file: SimilarFile,
    sketch: Sketch,
}

/// A cached or computed exact comparison, oriented `a`→`b` as asked.
struct Exact {
    cosine: f64,
    shared_modules: i64,
    energy_a: Option<f64>,
    energy_b: Option<f64>,
    cached: bool,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The sketch to store for a LoRA: [`Sketch::to_bytes`], or empty when its factors cannot be read
/// (it is not retried while the file is unchanged; `similar` skips it).
fn sketch_bytes(path: &std::path::Path) -> Vec<u8> {
    Adapter::open(path)
        .and_then(|a| Sketch::of(&a))
        .map(|s| s.to_bytes())
        .unwrap_or_default()
}

/// Size and mtime of a file, as the index records them.
fn stat(path: &std::path::Path) -> Option<(i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len() as i64, super::scan::mtime_ns(&m)))
}

impl Library {
    /// Computes and stores the sketch of every LoRA without one (`sketch IS NULL`) that the
    /// similarity commands consider: present LoRAs of base model `base` (`None`: all; `Some(None)`
    /// matches NULL), plus entry `also`. Files are read in parallel; the sketches are written in
    /// one transaction, each only if the entry still has no sketch and the file's size and mtime
    /// are those indexed and did not move while it was read (otherwise it is left for a rescan).
    /// Returns how many were stored.
    pub fn fill_sketches(&self, base: Option<Option<&str>>, also: Option<i64>) -> Result<usize> {
        let err = |e| db_error(&self.path, e);
        let (filter_base, base_value) = match base {
            Some(b) => (1, b),
            None => (0, None),
        };
        let todo: Vec<(i64, Vec<u8>, i64, i64)> = {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT id, path, size, mtime_ns FROM files
                     WHERE type = 'lora' AND sketch IS NULL
                       AND ((missing = 0 AND (?1 = 0 OR base_model IS ?2)) OR id IS ?3)",
                )
                .map_err(err)?;
            let rows = stmt
                .query_map(params![filter_base, base_value, also], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(err)?
        };
        if todo.is_empty() {
            return Ok(0);
        }
        let sketches: Vec<(i64, i64, i64, Vec<u8>)> = todo
            .into_par_iter()
            .filter_map(|(id, raw, size, mtime)| {
                let path = path_from_bytes(&raw);
                if stat(&path)? != (size, mtime) {
                    return None;
                }
                let bytes = sketch_bytes(&path);
                (stat(&path)? == (size, mtime)).then_some((id, size, mtime, bytes))
            })
            .collect();
        let tx =
            Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(err)?;
        let mut stored = 0;
        {
            let mut update = tx
                .prepare(
                    "UPDATE files SET sketch = ?2
                     WHERE id = ?1 AND type = 'lora' AND sketch IS NULL
                       AND size = ?3 AND mtime_ns = ?4",
                )
                .map_err(err)?;
            for (id, size, mtime, bytes) in &sketches {
                stored += update
                    .execute(params![id, bytes, size, mtime])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(stored)
    }

    /// Present LoRAs with a usable sketch (`base`: only that base model; `None` matches NULL).
    /// Sketches that do not parse are reported and left out.
    fn sketched(&self, base: Option<Option<&str>>) -> Result<(Vec<Sketched>, Vec<Skipped>)> {
        let err = |e| db_error(&self.path, e);
        let mut sql = "SELECT id, stem, path, base_model, addnet, sketch FROM files
             WHERE type = 'lora' AND missing = 0 AND length(sketch) > 0"
            .to_string();
        if base.is_some() {
            sql.push_str(" AND base_model IS ?1");
        }
        let mut stmt = self.conn.prepare(&sql).map_err(err)?;
        let map = |r: &rusqlite::Row| -> rusqlite::Result<(SimilarFile, Vec<u8>)> {
            Ok((
                SimilarFile {
                    id: r.get(0)?,
                    stem: r.get(1)?,
                    path: lossy(&r.get::<_, Vec<u8>>(2)?),
                    base_model: r.get(3)?,
                    addnet: r.get(4)?,
                    raw_path: r.get(2)?,
                },
                r.get(5)?,
            ))
        };
        let rows: Vec<(SimilarFile, Vec<u8>)> = match base {
            Some(b) => stmt.query_map([b], map),
            None => stmt.query_map([], map),
        }
        .map_err(err)?
        .collect::<rusqlite::Result<_>>()
        .map_err(err)?;
        let parsed: Vec<std::result::Result<Sketched, Skipped>> = rows
            .into_par_iter()
            .map(|(file, bytes)| match Sketch::from_bytes(&bytes) {
                Ok(sketch) => Ok(Sketched { file, sketch }),
                Err(e) => Err(Skipped {
                    path: file.path,
                    reason: format!("{e} (rescan to recompute)"),
                }),
            })
            .collect();
        let mut ok = Vec::new();
        let mut skipped = Vec::new();
        for p in parsed {
            match p {
                Ok(s) => ok.push(s),
                Err(s) => skipped.push(s),
            }
        }
        Ok((ok, skipped))
    }

    fn cached(&self, a: &str, b: &str) -> Result<Option<Exact>> {
        let (lo, hi, flip) = if a < b { (a, b, false) } else { (b, a, true) };
        let row = self
            .conn
            .prepare_cached(
                "SELECT cosine, shared_modules, energy_a, energy_b FROM similarity
                 WHERE addnet_a = ?1 AND addnet_b = ?2",
            )
            .and_then(|mut s| {
                s.query_row([lo, hi], |r| {
                    Ok((
                        r.get::<_, f64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<f64>>(2)?,
                        r.get::<_, Option<f64>>(3)?,
                    ))
                })
                .optional()
            })
            .map_err(self.err())?;
        Ok(row.map(|(cosine, shared_modules, ea, eb)| {
            let (energy_a, energy_b) = if flip { (eb, ea) } else { (ea, eb) };
            Exact {
                cosine,
                shared_modules,
                energy_a,
                energy_b,
                cached: true,
            }
        }))
    }

    fn store(&self, a: &str, b: &str, s: &Similarity) -> Result<()> {
        let (lo, hi, ea, eb) = if a < b {
            (a, b, s.shared_energy_a, s.shared_energy_b)
        } else {
            (b, a, s.shared_energy_b, s.shared_energy_a)
        };
        self.conn
            .execute(
                "INSERT OR REPLACE INTO similarity
                 (addnet_a, addnet_b, cosine, shared_modules, computed_at, energy_a, energy_b)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![lo, hi, s.cosine, s.shared_modules as i64, now(), ea, eb],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The exact comparison of two indexed LoRAs: from the cache, or computed from the files
    /// (opened through `open`, which keeps each adapter once) and cached.
    fn exact(
        &self,
        a: &SimilarFile,
        b: &SimilarFile,
        open: &mut Opened,
        modules: usize,
    ) -> std::result::Result<Exact, Skipped> {
        let keys = a.addnet.as_deref().zip(b.addnet.as_deref());
        if let Some((ka, kb)) = keys {
            if ka == kb {
                // The same tensors: the same ΔW.
                return Ok(Exact {
                    cosine: 1.0,
                    shared_modules: modules as i64,
                    energy_a: Some(1.0),
                    energy_b: Some(1.0),
                    cached: true,
                });
            }
            if let Some(hit) = self.cached(ka, kb).map_err(|e| skip(a, e))? {
                return Ok(hit);
            }
        }
        let adapter_a = open.get(a)?;
        let adapter_b = open.get(b)?;
        let s = exact_similarity(&adapter_a, &adapter_b).map_err(|e| skip(b, e))?;
        if let Some((ka, kb)) = keys {
            self.store(ka, kb, &s).map_err(|e| skip(a, e))?;
        }
        Ok(Exact {
            cosine: s.cosine,
            shared_modules: s.shared_modules as i64,
            energy_a: Some(s.shared_energy_a),
            energy_b: Some(s.shared_energy_b),
            cached: false,
        })
    }

    /// `library similar`: the `top` LoRAs of `id`'s base model most like it, by sketch, then
    /// compared exactly (cached).
    pub fn similar(&self, id: i64, top: usize) -> Result<SimilarReport> {
        let row: Option<(SimilarFile, Option<Vec<u8>>, String)> = self
            .conn
            .query_row(
                "SELECT id, stem, path, base_model, addnet, sketch, type FROM files WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        SimilarFile {
                            id: r.get(0)?,
                            stem: r.get(1)?,
                            path: lossy(&r.get::<_, Vec<u8>>(2)?),
                            base_model: r.get(3)?,
                            addnet: r.get(4)?,
                            raw_path: r.get(2)?,
                        },
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
            .optional()
            .map_err(self.err())?;
        let Some((query, mut bytes, file_type)) = row else {
            return Err(Error::Invalid(format!("no entry {id}")));
        };
        if file_type != "lora" {
            return Err(Error::Invalid(format!(
                "{}: not a LoRA ({file_type})",
                query.path
            )));
        }
        self.fill_sketches(Some(query.base_model.as_deref()), Some(id))?;
        if bytes.is_none() {
            bytes = self
                .conn
                .query_row("SELECT sketch FROM files WHERE id = ?1", [id], |r| r.get(0))
                .map_err(self.err())?;
        }
        let bytes = bytes.ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no similarity sketch (the file is gone or changed since it was indexed); \
                 run `loratool library scan`",
                query.path
            ))
        })?;
        if bytes.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: its factors could not be read when it was scanned (no sketch)",
                query.path
            )));
        }
        let sketch = Sketch::from_bytes(&bytes)?;
        let (mut all, mut skipped) = self.sketched(Some(query.base_model.as_deref()))?;
        all.retain(|c| c.file.id != id);
        let sketches: Vec<Sketch> = all.iter().map(|c| c.sketch.clone()).collect();
        let ranked = rank_by_estimate(&sketch, &sketches, top);
        let mut open = Opened::default();
        let mut matches = Vec::new();
        let mut computed = 0;
        for (i, estimate) in ranked {
            let c = &all[i].file;
            match self.exact(&query, c, &mut open, sketch.modules()) {
                Ok(x) => {
                    computed += usize::from(!x.cached);
                    matches.push(SimilarMatch {
                        file: c.clone(),
                        estimate,
                        cosine: x.cosine,
                        shared_modules: x.shared_modules,
                        shared_energy_query: x.energy_a,
                        shared_energy_file: x.energy_b,
                        cached: x.cached,
                    });
                }
                Err(s) => skipped.push(s),
            }
        }
        matches.sort_by(|a, b| b.cosine.total_cmp(&a.cosine));
        Ok(SimilarReport {
            query,
            candidates: all.len(),
            matches,
            computed,
            skipped,
        })
    }

    /// `library dupes --near`: within each base model, every pair whose sketch estimate is at
    /// least `threshold − 0.1` is compared exactly (cached); pairs at or above `threshold` join
    /// their files into groups. Cost: n(n−1)/2 sketch estimates per base model.
    pub fn near_dupes(&self, threshold: f64) -> Result<NearReport> {
        self.fill_sketches(None, None)?;
        let (all, skipped) = self.sketched(None)?;
        let mut by_base: BTreeMap<Option<String>, Vec<Sketched>> = BTreeMap::new();
        for s in all {
            by_base
                .entry(s.file.base_model.clone())
                .or_default()
                .push(s);
        }
        let mut report = NearReport {
            threshold,
            estimates: 0,
            confirmed: 0,
            computed: 0,
            groups: Vec::new(),
            skipped,
        };
        let floor = threshold - NEAR_MARGIN;
        let mut open = Opened::default();
        for (base, files) in by_base {
            let n = files.len();
            report.estimates += n * n.saturating_sub(1) / 2;
            let candidates: Vec<(usize, usize, f64)> = (0..n)
                .into_par_iter()
                .flat_map_iter(|i| {
                    let files = &files;
                    (i + 1..n).filter_map(move |j| {
                        let e = files[i].sketch.estimate(&files[j].sketch);
                        (e >= floor).then_some((i, j, e))
                    })
                })
                .collect();
            let mut parent: Vec<usize> = (0..n).collect();
            let mut pairs = Vec::new();
            for (i, j, estimate) in candidates {
                let (a, b) = (&files[i], &files[j]);
                report.confirmed += 1;
                let x = match self.exact(&a.file, &b.file, &mut open, a.sketch.modules()) {
                    Ok(x) => x,
                    Err(s) => {
                        report.skipped.push(s);
                        continue;
                    }
                };
                report.computed += usize::from(!x.cached);
                if x.cosine >= threshold {
                    let (ri, rj) = (find(&mut parent, i), find(&mut parent, j));
                    parent[ri.max(rj)] = ri.min(rj);
                    pairs.push(NearPair {
                        a: a.file.id,
                        b: b.file.id,
                        estimate,
                        cosine: x.cosine,
                    });
                }
            }
            let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for i in 0..n {
                let r = find(&mut parent, i);
                groups.entry(r).or_default().push(i);
            }
            for members in groups.into_values().filter(|m| m.len() > 1) {
                let ids: Vec<i64> = members.iter().map(|&i| files[i].file.id).collect();
                report.groups.push(NearGroup {
                    base_model: base.clone(),
                    files: members.iter().map(|&i| files[i].file.clone()).collect(),
                    pairs: pairs
                        .iter()
                        .filter(|p| ids.contains(&p.a))
                        .cloned()
                        .collect(),
                });
            }
        }
        Ok(report)
    }
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

fn skip(f: &SimilarFile, e: impl std::fmt::Display) -> Skipped {
    Skipped {
        path: f.path.clone(),
        reason: e.to_string(),
    }
}

/// Adapters opened for exact comparisons, each once (header only; factors are read on use).
#[derive(Default)]
struct Opened(HashMap<i64, std::rc::Rc<Adapter>>);

impl Opened {
    fn get(&mut self, f: &SimilarFile) -> std::result::Result<std::rc::Rc<Adapter>, Skipped> {
        if let Some(a) = self.0.get(&f.id) {
            return Ok(a.clone());
        }
        let path = path_from_bytes(&f.raw_path);
        let path = match path.is_file() {
            true => path,
            false => return Err(skip(f, "gone from disk (rescan)")),
        };
        let a = std::rc::Rc::new(Adapter::open(&path).map_err(|e| skip(f, e))?);
        self.0.insert(f.id, a.clone());
        Ok(a)
    }
}
