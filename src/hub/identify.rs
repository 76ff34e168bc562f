//! Identifying local files on Civitai by hash (`fetch --identify`, `library identify`): the batch
//! lookup by whole-file sha256 first, then AutoV3 one by one for files whose header was edited
//! (metadata editors change the sha256 but not the tensor bytes). Model files are never touched.

use super::civitai::Civitai;
use super::fetch::{Origin, Services};
use super::Problem;
use crate::tensors::hash::FileHashes;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize)]
pub struct Identified {
    pub path: PathBuf,
    pub sha256: String,
    /// `sha256` or `autov3`; `None`: Civitai does not know the file.
    pub matched_by: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// "Model name / version name".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub written: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The file of `version` whose `hashes[kind]` is `hash`.
fn file_with<'a>(version: &'a Value, kind: &str, hash: &str) -> Option<&'a Value> {
    version.get("files")?.as_array()?.iter().find(|f| {
        f.pointer(&format!("/hashes/{kind}"))
            .and_then(Value::as_str)
            .is_some_and(|h| h.eq_ignore_ascii_case(hash))
    })
}

/// Looks every file up and writes the sidecars it lacks (`.civitai.info`, preview, A1111's
/// `<stem>.json`) for the ones Civitai knows.
pub fn identify(
    services: &Services,
    files: &[(PathBuf, FileHashes)],
) -> Result<Vec<Identified>, Problem> {
    let http = &services.http;
    let sha256s: Vec<String> = files
        .iter()
        .map(|(_, h)| h.sha256.to_ascii_uppercase())
        .collect();
    let mut by_sha: HashMap<String, Value> = HashMap::new();
    for version in services.civitai.by_hashes(http, &sha256s)? {
        let hashes: Vec<String> = version
            .get("files")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|f| f.pointer("/hashes/SHA256").and_then(Value::as_str))
            .map(str::to_ascii_lowercase)
            .collect();
        for h in hashes {
            by_sha.entry(h).or_insert_with(|| version.clone());
        }
    }
    let mut out = Vec::new();
    for (path, hashes) in files {
        let sha = hashes.sha256.to_ascii_lowercase();
        let mut found = by_sha
            .get(&sha)
            .cloned()
            .map(|v| (v, "sha256", "SHA256", sha.clone()));
        if found.is_none() {
            if let Some(v3) = &hashes.autov3 {
                found = services
                    .civitai
                    .by_hash(http, v3)?
                    .map(|v| (v, "autov3", "AutoV3", v3.clone()));
            }
        }
        let mut item = Identified {
            path: path.clone(),
            sha256: sha,
            matched_by: None,
            origin: None,
            name: None,
            written: Vec::new(),
            problem: None,
        };
        if let Some((version, matched_by, kind, hash)) = found {
            let file = file_with(&version, kind, &hash);
            item.matched_by = Some(matched_by);
            item.origin = version
                .get("id")
                .and_then(Value::as_u64)
                .map(|v| Origin::Civitai {
                    model_id: version.get("modelId").and_then(Value::as_u64),
                    version_id: v,
                    file_id: file.and_then(|f| f.get("id")).and_then(Value::as_u64),
                });
            let text = |p: &str| version.pointer(p).and_then(Value::as_str).unwrap_or("?");
            item.name = Some(format!("{} / {}", text("/model/name"), text("/name")));
            match super::sidecars::write_civitai(http, path, &version, false) {
                Ok(w) => {
                    item.written = w.paths;
                    item.problem = w.preview_problem.map(|p| format!("no preview: {p}"));
                }
                Err(p) => item.problem = Some(p.to_string()),
            }
        }
        out.push(item);
    }
    Ok(out)
}

/// The Civitai model and version a `.civitai.info` (ours, or the Civitai Helper extension's) names.
pub fn ids_in_civitai_info(info: &Value) -> Option<(u64, u64)> {
    let version = info.get("id")?.as_u64()?;
    let model = info
        .get("modelId")
        .and_then(Value::as_u64)
        .or_else(|| info.pointer("/model/id").and_then(Value::as_u64))?;
    Some((model, version))
}

/// A model's newest published version: its id and name (`None`: the model has none).
pub fn newest_version(
    services: &Services,
    model_id: u64,
) -> Result<Option<(u64, String)>, Problem> {
    let model = services.civitai.model(&services.http, model_id)?;
    let Some(newest) = Civitai::newest_version_id(&model) else {
        return Ok(None);
    };
    let name = model
        .get("modelVersions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|v| v.get("id").and_then(Value::as_u64) == Some(newest))
        .and_then(|v| v.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(Some((newest, name)))
}
