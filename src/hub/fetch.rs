//! One `fetch` source from start to finish: ask the service what the file is, download it with the
//! engine, write the sidecars. Recording it in the index is the caller's (it owns the library).

use super::civitai::{self, Civitai, FileChoice};
use super::download::{download, Target};
use super::filename::sanitize;
use super::http::Http;
use super::huggingface::HuggingFace;
use super::source::Source;
use super::Problem;
use crate::ops::progress::ProgressSink;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Where a fetched file came from, as the index records it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Origin {
    Civitai {
        model_id: Option<u64>,
        version_id: u64,
        file_id: Option<u64>,
    },
    #[serde(rename = "huggingface")]
    HuggingFace {
        repo: String,
        revision: Option<String>,
        path: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Fetched {
    pub path: PathBuf,
    pub sha256: String,
    /// The hashes the verifying read computed (see [`super::download::Downloaded::hashes`]).
    #[serde(skip)]
    pub hashes: crate::tensors::hash::FileHashes,
    pub size: u64,
    pub resumed_from: u64,
    pub already_present: bool,
    pub origin: Origin,
    pub sidecars: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_problem: Option<String>,
}

impl Fetched {
    fn of(
        done: super::download::Downloaded,
        origin: Origin,
        sidecars: Vec<PathBuf>,
        sidecar_problem: Option<String>,
    ) -> Fetched {
        Fetched {
            path: done.path,
            sha256: done.sha256,
            hashes: done.hashes,
            size: done.size,
            resumed_from: done.resumed_from,
            already_present: done.already_present,
            origin,
            sidecars,
            sidecar_problem,
        }
    }
}

pub struct FetchOptions {
    pub into: PathBuf,
    pub choice: FileChoice,
    pub sidecars: bool,
}

pub struct Services {
    pub http: Http,
    pub civitai: Civitai,
    pub hf: HuggingFace,
}

impl Services {
    pub fn from_env(token: Option<&str>) -> Result<Services, Problem> {
        Ok(Services {
            http: Http::new()?,
            civitai: Civitai::from_env(token)?,
            hf: HuggingFace::from_env(token)?,
        })
    }

    pub fn parse(&self, arg: &str) -> crate::Result<Source> {
        super::source::parse(arg, &self.civitai.host(), &self.hf.host())
    }

    /// Name, size and what is being fetched, for the progress bar, plus the download itself.
    pub fn fetch(
        &self,
        source: &Source,
        opts: &FetchOptions,
        progress: &ProgressSink,
    ) -> Result<Fetched, Problem> {
        match source {
            Source::Civitai { model, version } => {
                self.fetch_civitai(*model, *version, opts, progress)
            }
            Source::HuggingFace {
                repo,
                path,
                revision,
            } => self.fetch_hf(repo, path.as_deref(), revision, opts, progress),
        }
    }

    fn fetch_civitai(
        &self,
        model: Option<u64>,
        version: Option<u64>,
        opts: &FetchOptions,
        progress: &ProgressSink,
    ) -> Result<Fetched, Problem> {
        let http = &self.http;
        let version_id = match (model, version) {
            (_, Some(v)) => v,
            (Some(m), None) => {
                let model = self.civitai.model(http, m)?;
                if model.get("mode").and_then(Value::as_str) == Some("Archived") {
                    return Err(Problem::Archived);
                }
                Civitai::newest_version_id(&model).ok_or_else(|| {
                    Problem::Request(format!("Civitai model {m} has no published version"))
                })?
            }
            (None, None) => return Err(Problem::Request("no Civitai id given".into())),
        };
        let version = self.civitai.version(http, version_id)?;
        // Archived models keep their pages but list no files (and the download answers 410).
        if version.pointer("/model/mode").and_then(Value::as_str) == Some("Archived") {
            return Err(Problem::Archived);
        }
        if let (Some(m), Some(listed)) = (model, version.get("modelId").and_then(Value::as_u64)) {
            if m != listed {
                return Err(Problem::Request(format!(
                    "Civitai version {version_id} belongs to model {listed}, not {m}"
                )));
            }
        }
        let file = civitai::choose_file(&version, &opts.choice)?;
        let listed_name = file.get("name").and_then(Value::as_str).unwrap_or_default();
        let name = sanitize(listed_name).map_err(Problem::Request)?;
        let target = Target {
            dir: opts.into.clone(),
            name,
            sha256: civitai::listed_sha256(file),
            size: None,
            approx_size: civitai::listed_size(file),
        };
        let origin = self.civitai.file_origin(file)?;
        let done = download(http, &origin, &target, progress)?;
        let (sidecars, sidecar_problem) = match opts.sidecars {
            true => self.civitai_sidecars(&done.path, &version),
            false => (Vec::new(), None),
        };
        let origin = Origin::Civitai {
            model_id: version.get("modelId").and_then(Value::as_u64).or(model),
            version_id,
            file_id: file.get("id").and_then(Value::as_u64),
        };
        Ok(Fetched::of(done, origin, sidecars, sidecar_problem))
    }

    /// Sidecars never fail a download that succeeded: a problem is reported beside it.
    pub fn civitai_sidecars(
        &self,
        model: &Path,
        version: &Value,
    ) -> (Vec<PathBuf>, Option<String>) {
        match super::sidecars::write_civitai(&self.http, model, version, true) {
            Ok(w) => (
                w.paths,
                w.preview_problem.map(|p| format!("no preview: {p}")),
            ),
            Err(p) => (Vec::new(), Some(p.to_string())),
        }
    }

    fn fetch_hf(
        &self,
        repo: &str,
        path: Option<&str>,
        revision: &str,
        opts: &FetchOptions,
        progress: &ProgressSink,
    ) -> Result<Fetched, Problem> {
        let http = &self.http;
        let path = match path {
            Some(p) => p.to_string(),
            None => {
                let files = self.hf.safetensors_files(http, repo, revision)?;
                match files.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        return Err(Problem::Request(format!(
                            "{repo}@{revision} has no .safetensors file"
                        )))
                    }
                    many => {
                        return Err(Problem::Request(format!(
                            "{repo}@{revision} has {} .safetensors files; name one with hf:{repo}/PATH: {}",
                            many.len(),
                            many.join(", ")
                        )))
                    }
                }
            }
        };
        let remote = self.hf.head(http, repo, revision, &path)?;
        let last = path.rsplit('/').next().unwrap_or(&path);
        let name = sanitize(last).map_err(Problem::Request)?;
        let target = Target {
            dir: opts.into.clone(),
            name,
            sha256: remote.sha256.clone(),
            size: remote.size,
            approx_size: None,
        };
        let origin = self.hf.file_origin(&remote)?;
        let done = download(http, &origin, &target, progress)?;
        let origin = Origin::HuggingFace {
            repo: repo.to_string(),
            revision: remote.commit.or(Some(revision.to_string())),
            path,
        };
        Ok(Fetched::of(done, origin, Vec::new(), None))
    }
}
