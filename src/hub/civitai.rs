//! Civitai's REST API v1 and its download endpoint (shared/reference/fetch_apis.md §1): models,
//! versions, lookups by hash, the choice of a version's file, and a [`FileOrigin`] that asks
//! `/api/download/models/V` for a fresh signed URL on every attempt.

use super::download::FileOrigin;
use super::http::{Auth, Http, Reply};
use super::{error_detail, Problem};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

pub const SERVICE: &str = "Civitai";

pub struct Civitai {
    base: Url,
    auth: Option<Auth>,
}

impl Civitai {
    /// `LORATOOL_CIVITAI_ENDPOINT` (default `https://civitai.com`); the token is `--token`, else
    /// `CIVITAI_API_TOKEN`.
    pub fn from_env(token: Option<&str>) -> Result<Civitai, Problem> {
        let endpoint = std::env::var("LORATOOL_CIVITAI_ENDPOINT")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "https://civitai.com".into());
        let base = Url::parse(&endpoint).map_err(|e| {
            Problem::Request(format!("LORATOOL_CIVITAI_ENDPOINT {endpoint:?}: {e}"))
        })?;
        let token = token
            .map(str::to_string)
            .or_else(|| std::env::var("CIVITAI_API_TOKEN").ok())
            .filter(|t| !t.trim().is_empty());
        let auth = token.as_deref().and_then(|t| Auth::new(&base, t));
        Ok(Civitai { base, auth })
    }

    /// `host:port` of the endpoint, to recognise its URLs.
    pub fn host(&self) -> String {
        super::http::host_port(&self.base)
    }

    fn url(&self, path: &str) -> Result<Url, Problem> {
        self.base
            .join(path)
            .map_err(|e| Problem::Request(format!("{path}: {e}")))
    }

    fn get_json(&self, http: &Http, path: &str, what: &str) -> Result<Value, Problem> {
        let reply = http.send_retrying(
            Method::GET,
            self.url(path)?,
            &HeaderMap::new(),
            self.auth.as_ref(),
            None,
            false,
        )?;
        self.json_of(reply, what)
    }

    fn json_of(&self, reply: Reply, what: &str) -> Result<Value, Problem> {
        let status = reply.response.status();
        let headers = reply.response.headers().clone();
        let body = reply
            .response
            .bytes()
            .map_err(|e| Problem::Network(format!("{what}: {e}")))?;
        if !status.is_success() {
            return Err(match status {
                StatusCode::NOT_FOUND => Problem::NotFound {
                    what: format!("{what} ({})", error_detail(&body)),
                },
                s => self.problem(s, &headers, &body),
            });
        }
        serde_json::from_slice(&body).map_err(|e| Problem::Status {
            status: status.as_u16(),
            detail: format!("{what}: the answer is not JSON ({e})"),
        })
    }

    pub fn model(&self, http: &Http, id: u64) -> Result<Value, Problem> {
        self.get_json(
            http,
            &format!("api/v1/models/{id}"),
            &format!("Civitai model {id}"),
        )
    }

    pub fn version(&self, http: &Http, id: u64) -> Result<Value, Problem> {
        self.get_json(
            http,
            &format!("api/v1/model-versions/{id}"),
            &format!("Civitai model version {id}"),
        )
    }

    /// The version that holds a file with this hash (SHA256, AutoV3, AutoV2, …); `None` when
    /// Civitai knows no such file.
    pub fn by_hash(&self, http: &Http, hash: &str) -> Result<Option<Value>, Problem> {
        match self.get_json(
            http,
            &format!(
                "api/v1/model-versions/by-hash/{}",
                hash.to_ascii_uppercase()
            ),
            &format!("Civitai lookup of {hash}"),
        ) {
            Ok(v) => Ok(Some(v)),
            Err(Problem::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Versions for many whole-file sha256s at once (`POST by-hash`, 100 per request); files
    /// Civitai does not know are simply absent from the answer.
    pub fn by_hashes(&self, http: &Http, sha256s: &[String]) -> Result<Vec<Value>, Problem> {
        let mut found = Vec::new();
        for chunk in sha256s.chunks(100) {
            let body = serde_json::to_vec(chunk).unwrap_or_default();
            let reply = http.send_retrying(
                Method::POST,
                self.url("api/v1/model-versions/by-hash")?,
                &HeaderMap::new(),
                self.auth.as_ref(),
                Some(body),
                false,
            )?;
            match self.json_of(reply, "Civitai lookup by hash")? {
                Value::Array(items) => found.extend(items),
                _ => {
                    return Err(Problem::Status {
                        status: 200,
                        detail: "Civitai's by-hash answer is not a list".into(),
                    })
                }
            }
        }
        Ok(found)
    }

    /// The newest published version of a model.
    pub fn newest_version_id(model: &Value) -> Option<u64> {
        let versions = model.get("modelVersions")?.as_array()?;
        versions
            .iter()
            .filter(|v| v.get("id").and_then(Value::as_u64).is_some())
            .max_by(|a, b| {
                let key = |v: &Value| {
                    (
                        v.get("publishedAt")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                        v.get("id").and_then(Value::as_u64).unwrap_or(0),
                    )
                };
                key(a).cmp(&key(b))
            })
            .and_then(|v| v.get("id").and_then(Value::as_u64))
    }

    /// The problem an error status of Civitai means (§1.7's table).
    pub fn problem(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Problem {
        let detail = error_detail(body);
        match status.as_u16() {
            401 => Problem::NeedsToken {
                service: SERVICE,
                detail,
                had_token: self.auth.is_some(),
            },
            403 => {
                let json: Option<Value> = serde_json::from_slice(body).ok();
                let deadline = json
                    .as_ref()
                    .and_then(|j| j.get("deadline"))
                    .and_then(Value::as_str);
                match deadline {
                    Some(d) => Problem::Forbidden {
                        detail: format!("this version is in Early Access until {d} ({detail})"),
                    },
                    None => Problem::Forbidden { detail },
                }
            }
            404 => Problem::NotFound { what: detail },
            410 => Problem::Archived,
            429 => Problem::RateLimited {
                retry_after_s: super::http::retry_after(headers).map(|d| d.as_secs()),
            },
            s => Problem::Status { status: s, detail },
        }
    }

    /// The download of one file of a version: the API's `downloadUrl` path and query on this
    /// endpoint.
    pub fn file_origin<'a>(&'a self, file: &Value) -> Result<CivitaiDownload<'a>, Problem> {
        let given = file
            .get("downloadUrl")
            .and_then(Value::as_str)
            .ok_or_else(|| Problem::Request("the file has no downloadUrl".into()))?;
        let parsed = Url::parse(given).or_else(|_| self.base.join(given));
        let parsed = parsed.map_err(|e| Problem::Request(format!("downloadUrl {given:?}: {e}")))?;
        let mut url = self.url(parsed.path())?;
        url.set_query(parsed.query());
        Ok(CivitaiDownload { civitai: self, url })
    }
}

pub struct CivitaiDownload<'a> {
    civitai: &'a Civitai,
    url: Url,
}

impl FileOrigin for CivitaiDownload<'_> {
    fn url(&self) -> &Url {
        &self.url
    }

    fn auth(&self) -> Option<&Auth> {
        self.civitai.auth.as_ref()
    }

    fn problem(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Problem {
        match status {
            StatusCode::NOT_FOUND => Problem::NotFound {
                what: format!(
                    "{} ({})",
                    super::http::redact(&self.url),
                    error_detail(body)
                ),
            },
            s => self.civitai.problem(s, headers, body),
        }
    }
}

/// Which file of a version to take (`--file`, `--type`, `--format`, `--fp`, `--size`).
#[derive(Debug, Clone, Default)]
pub struct FileChoice {
    pub name: Option<String>,
    pub file_type: Option<String>,
    pub format: Option<String>,
    pub fp: Option<String>,
    pub size: Option<String>,
}

impl FileChoice {
    fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.file_type.is_none()
            && self.format.is_none()
            && self.fp.is_none()
            && self.size.is_none()
    }

    fn accepts(&self, file: &Value) -> bool {
        let field = |v: &Value, key: &str| {
            v.get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let meta = file.get("metadata").cloned().unwrap_or(Value::Null);
        let eq = |want: &Option<String>, have: String| {
            want.as_ref().is_none_or(|w| w.eq_ignore_ascii_case(&have))
        };
        eq(&self.name, field(file, "name"))
            && eq(&self.file_type, field(file, "type"))
            && eq(&self.format, field(&meta, "format"))
            && eq(&self.fp, field(&meta, "fp"))
            && eq(&self.size, field(&meta, "size"))
    }
}

fn is_primary(file: &Value) -> bool {
    file.get("primary")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The version's file to download: the primary one, or the one the choice selects (the primary
/// among several that match). An error lists the files there are.
pub fn choose_file<'a>(version: &'a Value, choice: &FileChoice) -> Result<&'a Value, Problem> {
    let files: Vec<&Value> = version
        .get("files")
        .and_then(Value::as_array)
        .map(|f| f.iter().collect())
        .unwrap_or_default();
    let vid = version.get("id").and_then(Value::as_u64).unwrap_or(0);
    if files.is_empty() {
        return Err(Problem::Request(format!(
            "Civitai version {vid} lists no downloadable file"
        )));
    }
    let matching: Vec<&Value> = files
        .iter()
        .copied()
        .filter(|f| choice.accepts(f))
        .collect();
    let chosen = match (choice.is_empty(), matching.as_slice()) {
        (_, [one]) => Some(*one),
        (_, []) => None,
        (_, many) => many
            .iter()
            .copied()
            .find(|f| is_primary(f))
            .or_else(|| choice.is_empty().then(|| many[0])),
    };
    chosen.ok_or_else(|| {
        let list: Vec<String> = files.iter().map(|f| describe_file(f)).collect();
        Problem::Request(format!(
            "Civitai version {vid}: {} the files asked for; it has: {}",
            match matching.len() {
                0 => "none of its files is",
                _ => "several files are",
            },
            list.join("; ")
        ))
    })
}

/// `name (type, format, fp, size, primary)`, for messages.
pub fn describe_file(file: &Value) -> String {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("?").to_string();
    let meta = file.get("metadata");
    let mut parts = vec![s(file.get("type")), s(meta.and_then(|m| m.get("format")))];
    for k in ["fp", "size"] {
        if let Some(v) = meta.and_then(|m| m.get(k)).and_then(Value::as_str) {
            parts.push(v.to_string());
        }
    }
    if is_primary(file) {
        parts.push("primary".into());
    }
    format!("{} ({})", s(file.get("name")), parts.join(", "))
}

/// The file's SHA256 as Civitai lists it, lowercase.
pub fn listed_sha256(file: &Value) -> Option<String> {
    file.pointer("/hashes/SHA256")
        .and_then(Value::as_str)
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
}

/// Approximate size (`sizeKB` is a float in KiB): for the disk-space check only.
pub fn listed_size(file: &Value) -> Option<u64> {
    file.get("sizeKB")
        .and_then(Value::as_f64)
        .map(|kb| (kb * 1024.0).round() as u64)
}

/// A1111's `sd version` for a Civitai `baseModel`.
pub fn sd_version(base_model: &str) -> &'static str {
    let b = base_model.to_ascii_lowercase();
    if b.starts_with("sd 1") {
        "SD1"
    } else if b.starts_with("sd 2") {
        "SD2"
    } else if b.starts_with("sd 3") {
        "SD3"
    } else if b.starts_with("sdxl")
        || ["pony", "illustrious", "noobai"]
            .iter()
            .any(|p| b.starts_with(p))
    {
        "SDXL"
    } else {
        "Unknown"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn version() -> Value {
        json!({"id": 7, "files": [
            {"name": "a.safetensors", "type": "Model", "metadata": {"format": "SafeTensor", "fp": "fp16", "size": "pruned"}, "primary": true},
            {"name": "a.pt", "type": "Model", "metadata": {"format": "PickleTensor", "fp": "fp32", "size": "full"}, "primary": false},
            {"name": "data.zip", "type": "Training Data", "metadata": {"format": "Other"}}
        ]})
    }

    #[test]
    fn primary_unless_chosen_otherwise() {
        let v = version();
        let name = |c: FileChoice| {
            choose_file(&v, &c)
                .map(|f| f["name"].as_str().unwrap().to_string())
                .map_err(|e| e.to_string())
        };
        assert_eq!(name(FileChoice::default()).unwrap(), "a.safetensors");
        let pickle = FileChoice {
            format: Some("picKleTensor".into()),
            ..Default::default()
        };
        assert_eq!(name(pickle).unwrap(), "a.pt");
        let training = FileChoice {
            file_type: Some("Training Data".into()),
            ..Default::default()
        };
        assert_eq!(name(training).unwrap(), "data.zip");
        let none = FileChoice {
            fp: Some("bf16".into()),
            ..Default::default()
        };
        let e = name(none).unwrap_err();
        assert!(
            e.contains("none of its files") && e.contains("a.pt (Model, PickleTensor, fp32, full)"),
            "{e}"
        );
    }

    #[test]
    fn newest_version_by_publication() {
        let m = json!({"modelVersions": [
            {"id": 5, "publishedAt": "2026-01-01T00:00:00.000Z"},
            {"id": 9, "publishedAt": "2026-03-01T00:00:00.000Z"},
            {"id": 6, "publishedAt": "2026-02-01T00:00:00.000Z"}]});
        assert_eq!(Civitai::newest_version_id(&m), Some(9));
    }

    #[test]
    fn base_models_map_to_a1111_sd_versions() {
        assert_eq!(sd_version("SD 1.5"), "SD1");
        assert_eq!(sd_version("SDXL 1.0"), "SDXL");
        assert_eq!(sd_version("Pony"), "SDXL");
        assert_eq!(sd_version("SD 2.1 768"), "SD2");
        assert_eq!(sd_version("Flux.1 D"), "Unknown");
    }
}
