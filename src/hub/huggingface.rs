//! The few Hugging Face Hub endpoints a LoRA download needs (shared/reference/fetch_apis.md §3):
//! `HEAD resolve` for the commit, sha256 and size, the tree API to find a repo's LoRA file, and a
//! [`FileOrigin`] for `GET resolve` (302 to the CDN, followed without the token).

use super::download::FileOrigin;
use super::http::{Auth, Http};
use super::{error_detail, Problem};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_LENGTH, ETAG};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use std::path::PathBuf;

pub const SERVICE: &str = "Hugging Face";

pub struct HuggingFace {
    base: Url,
    auth: Option<Auth>,
}

/// What `HEAD resolve` tells about a file.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    pub repo: String,
    pub path: String,
    /// The commit the revision resolved to (`X-Repo-Commit`).
    pub commit: Option<String>,
    /// Content sha256 of an LFS file (`X-Linked-Etag`), lowercase.
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

/// The token as huggingface_hub finds it: `--token`, `HF_TOKEN`, the file at `HF_TOKEN_PATH`, then
/// `$HF_HOME/token` (default `~/.cache/huggingface/token`); `HF_HUB_DISABLE_IMPLICIT_TOKEN` stops
/// after the explicit one.
pub fn find_token(explicit: Option<&str>) -> Option<String> {
    let clean = |t: String| Some(t.trim().to_string()).filter(|t| !t.is_empty());
    if let Some(t) = explicit.map(str::to_string).and_then(clean) {
        return Some(t);
    }
    let set = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if set("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_some_and(|v| !matches!(v.as_str(), "0" | "false")) {
        return None;
    }
    if let Some(t) = set("HF_TOKEN").and_then(clean) {
        return Some(t);
    }
    let file = set("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
        let home = set("HF_HOME").map(PathBuf::from).or_else(|| {
            let cache = set("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("huggingface"))
        })?;
        Some(home.join("token"))
    })?;
    std::fs::read_to_string(file).ok().and_then(clean)
}

impl HuggingFace {
    /// `HF_ENDPOINT` (default `https://huggingface.co`) and [`find_token`].
    pub fn from_env(token: Option<&str>) -> Result<HuggingFace, Problem> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        let base = Url::parse(&format!("{}/", endpoint.trim_end_matches('/')))
            .map_err(|e| Problem::Request(format!("HF_ENDPOINT {endpoint:?}: {e}")))?;
        let auth = find_token(token).and_then(|t| Auth::new(&base, &t));
        Ok(HuggingFace { base, auth })
    }

    pub fn host(&self) -> String {
        super::http::host_port(&self.base)
    }

    fn resolve_url(&self, repo: &str, revision: &str, path: &str) -> Result<Url, Problem> {
        let mut url = self.base.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|_| Problem::Request("HF_ENDPOINT cannot be a base URL".into()))?;
            segs.pop_if_empty();
            segs.extend(repo.split('/'));
            segs.push("resolve");
            // The revision is one segment (`refs/pr/1` → `refs%2Fpr%2F1`); the path one per part.
            segs.push(revision);
            segs.extend(path.split('/'));
        }
        Ok(url)
    }

    fn api_url(&self, repo: &str, tail: &[&str]) -> Result<Url, Problem> {
        let mut url = self.base.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|_| Problem::Request("HF_ENDPOINT cannot be a base URL".into()))?;
            segs.pop_if_empty();
            segs.extend(["api", "models"]);
            segs.extend(repo.split('/'));
            segs.extend(tail);
        }
        Ok(url)
    }

    /// The problem an error status means; the Hub says which in `X-Error-Code`.
    pub fn problem(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        what: &str,
    ) -> Problem {
        let code = headers
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let message = headers
            .get("x-error-message")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| error_detail(body));
        let had_token = self.auth.is_some();
        match (status.as_u16(), code) {
            (_, "GatedRepo") => Problem::NeedsToken {
                service: SERVICE,
                detail: format!("{what} is in a gated repo"),
                had_token,
            },
            (401, "RepoNotFound") => Problem::NeedsToken {
                service: SERVICE,
                detail: format!("{what}: the repo does not exist or is private"),
                had_token,
            },
            (401, _) => Problem::NeedsToken {
                service: SERVICE,
                detail: format!("{what}: {message}"),
                had_token,
            },
            (403, _) => Problem::Forbidden {
                detail: format!("{what}: {message}"),
            },
            (404, "EntryNotFound") => Problem::NotFound {
                what: format!("{what}: no such file in the repo"),
            },
            (404, "RevisionNotFound") => Problem::NotFound {
                what: format!("{what}: no such revision"),
            },
            (404, _) => Problem::NotFound {
                what: format!("{what}: no such repo"),
            },
            (429, _) => Problem::RateLimited {
                retry_after_s: super::http::retry_after(headers).map(|d| d.as_secs()),
            },
            (s, _) => Problem::Status {
                status: s,
                detail: format!("{what}: {message}"),
            },
        }
    }

    /// `HEAD resolve`, without following the redirect to the CDN: the commit, the content sha256
    /// and size of an LFS file (`X-Linked-*`; a redirect's own `Content-Length` is not the file's).
    pub fn head(
        &self,
        http: &Http,
        repo: &str,
        revision: &str,
        path: &str,
    ) -> Result<RemoteFile, Problem> {
        let what = format!("{repo}/{path}@{revision}");
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let url = self.resolve_url(repo, revision, path)?;
        let reply =
            http.send_retrying(Method::HEAD, url, &headers, self.auth.as_ref(), None, false)?;
        let status = reply.response.status();
        let h = reply.response.headers();
        if !(status.is_success() || status.is_redirection()) {
            return Err(self.problem(status, h, &[], &what));
        }
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let unquote = |v: &str| {
            v.trim_start_matches("W/")
                .trim_matches('"')
                .to_ascii_lowercase()
        };
        let sha256 = text("x-linked-etag")
            .map(unquote)
            .filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()));
        let size = text("x-linked-size")
            .and_then(|v| v.parse().ok())
            .or_else(|| {
                status
                    .is_success()
                    .then(|| h.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok())
                    .flatten()
            });
        let _etag = h.get(ETAG);
        Ok(RemoteFile {
            repo: repo.to_string(),
            path: path.to_string(),
            commit: text("x-repo-commit").map(str::to_string),
            sha256,
            size,
        })
    }

    /// The repo's `.safetensors` files at a revision (tree API, recursive, every page).
    pub fn safetensors_files(
        &self,
        http: &Http,
        repo: &str,
        revision: &str,
    ) -> Result<Vec<String>, Problem> {
        let what = format!("{repo}@{revision}");
        let mut url = self.api_url(repo, &["tree", revision])?;
        url.set_query(Some("recursive=true"));
        let mut files = Vec::new();
        for _page in 0..1000 {
            let reply = http.send_retrying(
                Method::GET,
                url.clone(),
                &HeaderMap::new(),
                self.auth.as_ref(),
                None,
                false,
            )?;
            let status = reply.response.status();
            let headers = reply.response.headers().clone();
            let body = reply
                .response
                .bytes()
                .map_err(|e| Problem::Network(format!("{what}: {e}")))?;
            if !status.is_success() {
                return Err(self.problem(status, &headers, &body, &what));
            }
            let entries: Value = serde_json::from_slice(&body).map_err(|e| Problem::Status {
                status: status.as_u16(),
                detail: format!("{what}: the tree listing is not JSON ({e})"),
            })?;
            for e in entries.as_array().into_iter().flatten() {
                let path = e.get("path").and_then(Value::as_str).unwrap_or_default();
                if e.get("type").and_then(Value::as_str) == Some("file")
                    && path.to_ascii_lowercase().ends_with(".safetensors")
                {
                    files.push(path.to_string());
                }
            }
            match next_link(&headers).and_then(|n| url.join(&n).ok()) {
                Some(next) => url = next,
                None => break,
            }
        }
        Ok(files)
    }

    pub fn file_origin(&self, file: &RemoteFile) -> Result<HfDownload<'_>, Problem> {
        // Pinned to the commit the HEAD saw, so a resume continues the same bytes.
        let rev = file.commit.as_deref().unwrap_or("main");
        Ok(HfDownload {
            hub: self,
            url: self.resolve_url(&file.repo, rev, &file.path)?,
            what: format!("{}/{}", file.repo, file.path),
        })
    }
}

/// `Link: <url>; rel="next"`.
fn next_link(headers: &HeaderMap) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

pub struct HfDownload<'a> {
    hub: &'a HuggingFace,
    url: Url,
    what: String,
}

impl FileOrigin for HfDownload<'_> {
    fn url(&self) -> &Url {
        &self.url
    }

    fn auth(&self) -> Option<&Auth> {
        self.hub.auth.as_ref()
    }

    fn problem(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Problem {
        self.hub.problem(status, headers, body, &self.what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_urls_encode_the_revision_as_one_segment() {
        let hub = HuggingFace {
            base: Url::parse("https://huggingface.co/").unwrap(),
            auth: None,
        };
        let u = hub
            .resolve_url("alice/styles", "refs/pr/1", "loras/a b.safetensors")
            .unwrap();
        assert_eq!(
            u.as_str(),
            "https://huggingface.co/alice/styles/resolve/refs%2Fpr%2F1/loras/a%20b.safetensors"
        );
    }

    #[test]
    fn next_page_links() {
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            HeaderValue::from_static("<https://hf.co/api/x?cursor=2>; rel=\"next\""),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("https://hf.co/api/x?cursor=2")
        );
    }
}
