//! The files `fetch` and `identify` write beside a model, under the names A1111, Forge and the
//! Civitai Helper extensions read: `<stem>.civitai.info` (Civitai's version response),
//! `<stem>.preview.<ext>` (the version's first image), and A1111's `<stem>.json`.

use super::civitai::sd_version;
use super::http::Http;
use super::Problem;
use crate::library::sidecar::{write_small_file, write_user_metadata, UserMetadataEdit};
use reqwest::header::HeaderMap;
use reqwest::{Method, Url};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `dir/stem` + `suffix`.
fn beside(model: &Path, suffix: &str) -> PathBuf {
    let stem = model.file_stem().unwrap_or_default();
    let mut name = stem.to_os_string();
    name.push(suffix);
    model.with_file_name(name)
}

pub fn civitai_info_path(model: &Path) -> PathBuf {
    beside(model, ".civitai.info")
}

/// Previews A1111 shows for a model (`<stem>.preview.<ext>` or `<stem>.<ext>`).
pub fn existing_preview(model: &Path) -> Option<PathBuf> {
    ["png", "jpg", "jpeg", "webp", "gif"]
        .iter()
        .find_map(|ext| {
            [format!(".preview.{ext}"), format!(".{ext}")]
                .into_iter()
                .map(|s| beside(model, &s))
                .find(|p| p.exists())
        })
}

/// What was written (paths), and why a preview could not be, if it could not.
#[derive(Debug, Default)]
pub struct Written {
    pub paths: Vec<PathBuf>,
    pub preview_problem: Option<String>,
}

/// Writes the Civitai sidecars of `model` from a version response. `replace_info` rewrites an
/// existing `.civitai.info` (fresh data after a download); the preview and `<stem>.json` are only
/// written when there is none (a curator's own are never replaced).
pub fn write_civitai(
    http: &Http,
    model: &Path,
    version: &Value,
    replace_info: bool,
) -> Result<Written, Problem> {
    let mut written = Written::default();
    let io = |e: crate::Error| Problem::Io(e.to_string());
    let info = civitai_info_path(model);
    if replace_info || !info.exists() {
        let mut bytes = serde_json::to_vec_pretty(version).unwrap_or_default();
        bytes.push(b'\n');
        write_small_file(&info, &bytes).map_err(io)?;
        written.paths.push(info);
    }
    if existing_preview(model).is_none() {
        match first_image(version) {
            Some(url) => match fetch_image(http, &url) {
                Ok((bytes, ext)) => {
                    let path = beside(model, &format!(".preview.{ext}"));
                    write_small_file(&path, &bytes).map_err(io)?;
                    written.paths.push(path);
                }
                Err(why) => written.preview_problem = Some(why),
            },
            None => written.preview_problem = Some("the version has no image".into()),
        }
    }
    let user = crate::library::sidecar::user_metadata_path(model);
    if !user.exists() {
        let words: Vec<&str> = version
            .get("trainedWords")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .collect();
        let base = version
            .get("baseModel")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let edit = UserMetadataEdit {
            activation_text: Some(words.join(", ")),
            sd_version: Some(sd_version(base).to_string()),
            description: civitai_page(version).map(|u| format!("Civitai: {u}")),
            ..Default::default()
        };
        written
            .paths
            .push(write_user_metadata(model, &edit).map_err(io)?);
    }
    Ok(written)
}

/// `https://civitai.com/models/M?modelVersionId=V` for a version response.
pub fn civitai_page(version: &Value) -> Option<String> {
    let v = version.get("id")?.as_u64()?;
    let m = version.get("modelId")?.as_u64()?;
    Some(format!("https://civitai.com/models/{m}?modelVersionId={v}"))
}

/// The first still image of the version (videos are skipped).
fn first_image(version: &Value) -> Option<String> {
    version
        .get("images")?
        .as_array()?
        .iter()
        .filter(|i| i.get("type").and_then(Value::as_str).unwrap_or("image") == "image")
        .find_map(|i| i.get("url").and_then(Value::as_str).map(str::to_string))
}

/// The image and its real extension (from its bytes, not its URL).
fn fetch_image(http: &Http, url: &str) -> Result<(Vec<u8>, &'static str), String> {
    let url = Url::parse(url).map_err(|e| format!("image URL {url:?}: {e}"))?;
    let reply = http
        .send_retrying(
            Method::GET,
            url.clone(),
            &HeaderMap::new(),
            None,
            None,
            true,
        )
        .map_err(|p| p.to_string())?;
    let status = reply.response.status();
    if !status.is_success() {
        return Err(format!("{}: status {status}", super::http::redact(&url)));
    }
    let bytes = reply
        .response
        .bytes()
        .map_err(|e| format!("{}: {e}", super::http::redact(&url)))?;
    let ext = image_extension(&bytes).ok_or_else(|| {
        format!(
            "{}: not a PNG, JPEG, WebP or GIF image",
            super::http::redact(&url)
        )
    })?;
    Ok((bytes.to_vec(), ext))
}

fn image_extension(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("jpeg")
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some("webp")
    } else if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Some("gif")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_come_from_the_bytes() {
        assert_eq!(image_extension(b"\x89PNG\r\n\x1a\nrest"), Some("png"));
        assert_eq!(image_extension(&[0xFF, 0xD8, 0xFF, 0xE0]), Some("jpeg"));
        assert_eq!(image_extension(b"RIFF\0\0\0\0WEBPVP8 "), Some("webp"));
        assert_eq!(image_extension(b"<html>"), None);
    }

    #[test]
    fn sidecar_names_follow_the_stem() {
        let m = Path::new("/x/my.lora.safetensors");
        assert_eq!(civitai_info_path(m), Path::new("/x/my.lora.civitai.info"));
        assert_eq!(
            beside(m, ".preview.png"),
            Path::new("/x/my.lora.preview.png")
        );
    }
}
