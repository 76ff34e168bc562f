//! What `loratool fetch SOURCE` may name: Civitai ids, web and download URLs and AIR URNs; Hugging
//! Face `hf:` paths and `resolve/` / `blob/` URLs.

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A Civitai model (its newest published version unless `version` is given), or a version
    /// alone (download URLs name only the version).
    Civitai {
        model: Option<u64>,
        version: Option<u64>,
    },
    /// A file in a Hugging Face model repository; `path: None` means "the repo's one LoRA file".
    HuggingFace {
        repo: String,
        path: Option<String>,
        revision: String,
    },
}

/// Hosts whose URLs are Civitai's (besides the configured endpoint's host).
const CIVITAI_HOSTS: &[&str] = &["civitai.com", "civitai.red", "civitai.green"];
/// Hosts whose URLs are the Hugging Face Hub's (besides `HF_ENDPOINT`'s host).
const HF_HOSTS: &[&str] = &["huggingface.co", "hf.co"];

/// Parses one SOURCE argument. `endpoint_hosts` are the hosts of the configured Civitai and
/// Hugging Face endpoints (so URLs of a mirror or test server are recognised).
pub fn parse(arg: &str, civitai_host: &str, hf_host: &str) -> Result<Source> {
    let bad = |why: &str| Error::Invalid(format!("{arg}: {why}"));
    let lower = arg.to_ascii_lowercase();
    if let Some(rest) = lower
        .strip_prefix("civitai:")
        .map(|_| &arg["civitai:".len()..])
    {
        let (model, version) = match rest.split_once('@') {
            Some((m, v)) => (m, Some(v)),
            None => (rest, None),
        };
        let model = number(model).ok_or_else(|| bad("expected civitai:MODEL_ID[@VERSION_ID]"))?;
        let version = match version {
            Some(v) => Some(number(v).ok_or_else(|| bad("the version after @ is not a number"))?),
            None => None,
        };
        return Ok(Source::Civitai {
            model: Some(model),
            version,
        });
    }
    if lower.starts_with("urn:air:") || lower.starts_with("air:") {
        return air(arg).ok_or_else(|| {
            bad("not a Civitai AIR (urn:air:ECOSYSTEM:TYPE:civitai:MODEL@VERSION)")
        });
    }
    if let Some(rest) = lower.strip_prefix("hf:").map(|_| &arg[3..]) {
        return hf_path(rest).ok_or_else(|| bad("expected hf:OWNER/REPO[/PATH][@REVISION]"));
    }
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let url = reqwest::Url::parse(arg).map_err(|e| bad(&format!("not a URL: {e}")))?;
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let host_port = super::http::host_port(&url).to_ascii_lowercase();
        let is = |list: &[&str], configured: &str| {
            list.iter()
                .any(|h| host == *h || host.ends_with(&format!(".{h}")))
                || (!configured.is_empty() && host_port == configured)
        };
        if is(CIVITAI_HOSTS, civitai_host) {
            return civitai_url(&url).ok_or_else(|| {
                bad("not a Civitai model page (/models/ID) or download URL (/api/download/models/VERSION)")
            });
        }
        if is(HF_HOSTS, hf_host) {
            return hf_url(&url).ok_or_else(|| {
                bad("not a Hugging Face file URL (/OWNER/REPO/resolve/REV/PATH or /blob/REV/PATH)")
            });
        }
        return Err(bad("only Civitai and Hugging Face URLs can be fetched"));
    }
    Err(bad(
        "expected civitai:ID[@VERSION], a Civitai URL or AIR, hf:OWNER/REPO[/PATH][@REV] or a Hugging Face URL",
    ))
}

fn number(s: &str) -> Option<u64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// `urn:air:{ecosystem}:{type}:civitai:{model}[@{version}][+{file}][.{format}]`; the ecosystem and
/// type are optional when parsing (Civitai's own grammar).
fn air(arg: &str) -> Option<Source> {
    let s = arg.strip_prefix("urn:").unwrap_or(arg);
    let s = s.strip_prefix("air:").unwrap_or(s);
    let parts: Vec<&str> = s.split(':').collect();
    let source_at = parts
        .iter()
        .position(|p| p.eq_ignore_ascii_case("civitai"))?;
    if source_at + 2 != parts.len() || source_at > 2 {
        return None;
    }
    let tail = parts[source_at + 1];
    // Drop `.format` and `+fileId`.
    let tail = tail.split('.').next()?;
    let tail = tail.split('+').next()?;
    let (model, version) = match tail.split_once('@') {
        Some((m, v)) => (number(m)?, Some(number(v)?)),
        None => (number(tail)?, None),
    };
    Some(Source::Civitai {
        model: Some(model),
        version,
    })
}

fn civitai_url(url: &reqwest::Url) -> Option<Source> {
    let segs: Vec<&str> = url.path_segments()?.filter(|s| !s.is_empty()).collect();
    let query = |key: &str| {
        url.query_pairs()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| number(&v))
    };
    match segs.as_slice() {
        ["models", id, ..] => Some(Source::Civitai {
            model: Some(number(id)?),
            version: query("modelVersionId"),
        }),
        ["api", "download", "models", v] => Some(Source::Civitai {
            model: None,
            version: Some(number(v)?),
        }),
        ["model-versions", v, ..] => Some(Source::Civitai {
            model: None,
            version: Some(number(v)?),
        }),
        _ => None,
    }
}

/// `OWNER/REPO[/PATH…][@REV]`.
fn hf_path(rest: &str) -> Option<Source> {
    let (body, revision) = match rest.rsplit_once('@') {
        Some((b, r)) => (b, r.to_string()),
        None => (rest, "main".to_string()),
    };
    if revision.is_empty() {
        return None;
    }
    let mut segs = body.split('/').filter(|s| !s.is_empty());
    let owner = segs.next()?;
    let name = segs.next()?;
    let path: Vec<&str> = segs.collect();
    Some(Source::HuggingFace {
        repo: format!("{owner}/{name}"),
        path: (!path.is_empty()).then(|| path.join("/")),
        revision,
    })
}

fn hf_url(url: &reqwest::Url) -> Option<Source> {
    let segs: Vec<String> = url
        .path_segments()?
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(&super::filename::percent_decode(s)).into_owned())
        .collect();
    match segs.as_slice() {
        [owner, name, kind, rev, path @ ..]
            if (kind == "resolve" || kind == "blob") && !path.is_empty() =>
        {
            Some(Source::HuggingFace {
                repo: format!("{owner}/{name}"),
                path: Some(path.join("/")),
                revision: rev.clone(),
            })
        }
        [owner, name] => Some(Source::HuggingFace {
            repo: format!("{owner}/{name}"),
            path: None,
            revision: "main".into(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Source {
        parse(s, "127.0.0.1:9", "127.0.0.1:8").unwrap()
    }
    fn civ(model: Option<u64>, version: Option<u64>) -> Source {
        Source::Civitai { model, version }
    }
    fn hf(repo: &str, path: Option<&str>, rev: &str) -> Source {
        Source::HuggingFace {
            repo: repo.into(),
            path: path.map(Into::into),
            revision: rev.into(),
        }
    }

    #[test]
    fn civitai_forms() {
        assert_eq!(p("civitai:100001"), civ(Some(100001), None));
        assert_eq!(p("civitai:100001@200002"), civ(Some(100001), Some(200002)));
        assert_eq!(
            p("https://civitai.com/models/100001/watercolor-style?modelVersionId=200002"),
            civ(Some(100001), Some(200002))
        );
        assert_eq!(
            p("https://civitai.com/models/100001"),
            civ(Some(100001), None)
        );
        assert_eq!(
            p("https://civitai.com/api/download/models/200002?type=Model&format=SafeTensor"),
            civ(None, Some(200002))
        );
        assert_eq!(
            p("http://127.0.0.1:9/api/download/models/5"),
            civ(None, Some(5))
        );
        assert_eq!(
            p("urn:air:sdxl:lora:civitai:100001@200002"),
            civ(Some(100001), Some(200002))
        );
        assert_eq!(
            p("urn:air:sdxl:checkpoint:civitai:827184@2514310+2402203.safetensors"),
            civ(Some(827184), Some(2514310))
        );
        assert_eq!(p("air:civitai:7"), civ(Some(7), None));
    }

    #[test]
    fn hugging_face_forms() {
        assert_eq!(
            p("hf:alice/styles/loras/water.safetensors"),
            hf("alice/styles", Some("loras/water.safetensors"), "main")
        );
        assert_eq!(
            p("hf:alice/styles/w.safetensors@v1.0"),
            hf("alice/styles", Some("w.safetensors"), "v1.0")
        );
        assert_eq!(
            p("hf:alice/styles@abc123"),
            hf("alice/styles", None, "abc123")
        );
        assert_eq!(
            p("https://huggingface.co/alice/styles/resolve/main/loras/w.safetensors?download=true"),
            hf("alice/styles", Some("loras/w.safetensors"), "main")
        );
        assert_eq!(
            p("https://huggingface.co/alice/styles/blob/refs%2Fpr%2F1/w.safetensors"),
            hf("alice/styles", Some("w.safetensors"), "refs/pr/1")
        );
    }

    #[test]
    fn refusals_say_what_was_expected() {
        let e = |s: &str| parse(s, "", "").unwrap_err().to_string();
        assert!(
            e("civitai:abc").contains("civitai:MODEL_ID"),
            "{}",
            e("civitai:abc")
        );
        assert!(e("https://example.com/x.safetensors").contains("only Civitai and Hugging Face"));
        assert!(e("https://civitai.com/images/5").contains("not a Civitai model page"));
        assert!(e("hf:alone").contains("hf:OWNER/REPO"));
        assert!(e("somefile.safetensors").starts_with("somefile.safetensors: expected"));
    }
}
