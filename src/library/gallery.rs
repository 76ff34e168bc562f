//! `library gallery -o DIR`: a static page over the index (docs/LIBRARY.md, "Gallery").
//!
//! `DIR/index.html` holds the page (HTML, CSS and script from `gallery/`) with the present LoRAs
//! as JSON inside it; `DIR/thumbs/` holds one JPEG of at most [`THUMB_SIZE`] px per preview. The
//! page opens from disk: no server, no network, nothing fetched from elsewhere.
//!
//! Metadata is data, never markup: the JSON is escaped so that no value can end its script
//! element, the script builds every card with DOM text, and the page's Content-Security-Policy
//! lets only its own script (by hash) run.

use super::query::{a1111_names, Entry, ListFilter, Sort, EMBEDDED_IMAGE_KEYS};
use super::scan::{mtime_ns, Problem};
use super::sidecar::{path_bytes, preview_candidates, write_small_file, A1111Card};
use super::Library;
use crate::ops::progress::ProgressSink;
use crate::tensors::writer::hex;
use crate::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

const PAGE: &str = include_str!("gallery/page.html");
const STYLE: &str = include_str!("gallery/gallery.css");
const SCRIPT: &str = include_str!("gallery/gallery.js");

/// The longest side of a thumbnail, in pixels.
pub const THUMB_SIZE: u32 = 256;
const THUMB_QUALITY: u8 = 82;
/// Part of every thumbnail's name: changing how thumbnails are made renames them all, so none
/// made the old way is reused.
const THUMB_VERSION: u32 = 1;
/// Transparent previews are flattened onto the page's card colour (JPEG has no alpha).
const THUMB_BACKGROUND: [u8; 3] = [38, 40, 48];
/// Metadata values longer than this are cut in the page (`library show` has them whole): kohya's
/// tag frequencies and dataset lists would otherwise make a page of thousands of LoRAs hundreds
/// of megabytes.
const METADATA_VALUE_CHARS: usize = 500;
/// Marks a page this command wrote: only such an `index.html` is replaced without `--force`.
const GENERATOR: &str = "loratool library gallery";

#[derive(Clone, Default)]
pub struct GalleryOptions {
    /// The folder to write (created when missing).
    pub out: PathBuf,
    /// Replace an `index.html` that this command did not write.
    pub force: bool,
    /// Counts previews as their thumbnails are made or found.
    pub progress: ProgressSink,
}

/// What `library gallery` did (`--json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GalleryReport {
    /// The page: `DIR/index.html`.
    pub output: String,
    pub loras: usize,
    pub thumbnails_written: usize,
    /// Thumbnails already there from an earlier run for the same preview (path, size, mtime).
    pub thumbnails_reused: usize,
    /// Thumbnails of earlier runs that no LoRA uses any more, deleted.
    pub thumbnails_removed: usize,
    /// LoRAs with no preview recorded in the index.
    pub missing_previews: usize,
    /// LoRAs whose preview could not be read or decoded (each also a note).
    pub unreadable_previews: usize,
    pub notes: Vec<Problem>,
}

/// One LoRA as the page's script sees it.
#[derive(Serialize)]
struct Card<'a> {
    id: i64,
    /// A1111's name (the stem).
    name: &'a str,
    alias: Option<&'a str>,
    file: &'a str,
    path: &'a str,
    base: Option<&'a str>,
    kind: Option<&'a str>,
    format: Option<&'a str>,
    rank: Option<i64>,
    rank_min: Option<i64>,
    alpha: Option<f64>,
    dtype: Option<&'a str>,
    modules: Option<i64>,
    components: &'a [String],
    size: i64,
    added: i64,
    modified: i64,
    sha256: Option<&'a str>,
    autov2: Option<&'a str>,
    addnet: Option<&'a str>,
    autov3: Option<&'a str>,
    triggers: &'a [String],
    top_tags: &'a [String],
    tags: &'a [String],
    note: &'a str,
    /// A1111's `<stem>.json`, whole.
    user: Option<&'a serde_json::Value>,
    sidecars: Vec<&'a str>,
    warnings: &'a [String],
    /// `thumbs/<name>.jpg`, relative to the page.
    thumb: Option<String>,
    /// The preview's file name, when there is one.
    preview: Option<String>,
    /// Why a preview that exists has no thumbnail.
    preview_problem: Option<String>,
    /// What clicking the card in A1111 inserts.
    prompt: String,
    metadata: BTreeMap<&'a str, String>,
}

/// A thumbnail to find or make.
struct Job {
    card: usize,
    preview: PathBuf,
}

enum Thumb {
    Written(String),
    Reused(String),
    Failed(String),
}

impl Library {
    /// `library gallery`: writes `opts.out/index.html` and its thumbnails.
    pub fn gallery(&self, opts: &GalleryOptions) -> Result<GalleryReport> {
        let out = &opts.out;
        let thumbs = out.join("thumbs");
        let page_path = out.join("index.html");
        prepare_folder(out)?;
        check_page(&page_path, opts.force)?;
        prepare_folder(&thumbs)?;

        let loras = self.list_with_metadata(&ListFilter {
            file_type: Some("lora".into()),
            sort: Sort::Name,
            ..Default::default()
        })?;
        let names = a1111_names(&loras);
        let colliding: HashSet<&str> = names
            .iter()
            .filter(|(_, files)| files.len() > 1)
            .map(|(name, _)| *name)
            .collect();

        let mut report = GalleryReport {
            output: page_path.to_string_lossy().into_owned(),
            loras: loras.len(),
            ..Default::default()
        };
        let mut cards: Vec<Card> = Vec::with_capacity(loras.len());
        let mut jobs = Vec::new();
        for e in &loras {
            let preview = preview_of(e);
            match &preview {
                Some(p) => jobs.push(Job {
                    card: cards.len(),
                    preview: p.clone(),
                }),
                None => report.missing_previews += 1,
            }
            let mut card = card_of(e, &colliding);
            card.preview = preview.map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            });
            cards.push(card);
        }

        opts.progress.start(jobs.len() as u64);
        let made: Vec<(usize, PathBuf, Thumb)> = jobs
            .par_iter()
            .map(|j| {
                let t = thumbnail(&j.preview, &thumbs);
                opts.progress.advance(1);
                (j.card, j.preview.clone(), t)
            })
            .collect();
        let mut used = HashSet::new();
        for (i, preview, t) in made {
            let name = match t {
                Thumb::Written(n) => {
                    report.thumbnails_written += 1;
                    n
                }
                Thumb::Reused(n) => {
                    report.thumbnails_reused += 1;
                    n
                }
                Thumb::Failed(why) => {
                    report.unreadable_previews += 1;
                    report.notes.push(Problem {
                        path: preview.to_string_lossy().into_owned(),
                        message: format!("preview left out: {why}"),
                    });
                    cards[i].preview_problem = Some(why);
                    continue;
                }
            };
            cards[i].thumb = Some(format!("thumbs/{name}"));
            used.insert(name);
        }
        report.thumbnails_removed = remove_unused(&thumbs, &used, &mut report.notes);

        let page = render(&cards)?;
        write_small_file(&page_path, page.as_bytes())?;
        Ok(report)
    }
}

/// Creates `dir` when missing; anything else at that path is an error naming it.
fn prepare_folder(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Invalid(format!(
            "{}: exists and is not a folder",
            dir.display()
        ))),
        Err(_) => std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e)),
    }
}

/// Refuses to replace an `index.html` this command did not write, unless `force`.
fn check_page(page: &Path, force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    match std::fs::read(page) {
        Ok(bytes) => {
            let head = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
            if head.contains(&format!(
                "<meta name=\"generator\" content=\"{GENERATOR}\">"
            )) {
                Ok(())
            } else {
                Err(Error::Invalid(format!(
                    "{}: exists and is not a loratool gallery (--force replaces it)",
                    page.display()
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(page, e)),
    }
}

/// The preview A1111 would show: the first of its candidates that the index records as a preview
/// sidecar (the scan's listing; a preview added since is seen after `library scan`).
fn preview_of(e: &Entry) -> Option<PathBuf> {
    let recorded: HashSet<&str> = e
        .sidecars
        .iter()
        .filter(|s| s.kind == "preview")
        .map(|s| s.path.as_str())
        .collect();
    preview_candidates(&e.file_path())
        .into_iter()
        .find(|c| recorded.contains(c.to_string_lossy().as_ref()))
}

fn card_of<'a>(e: &'a Entry, colliding: &HashSet<&str>) -> Card<'a> {
    let metadata = e
        .metadata
        .iter()
        .flatten()
        .filter(|(k, _)| !EMBEDDED_IMAGE_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), cut(v, METADATA_VALUE_CHARS)))
        .collect();
    Card {
        id: e.id,
        name: &e.stem,
        alias: e.alias.as_deref(),
        file: &e.file_name,
        path: &e.path,
        base: e.base_model.as_deref(),
        kind: e.kind.as_deref(),
        format: e.format.as_deref(),
        rank: e.rank,
        rank_min: e.rank_min,
        alpha: e.alpha,
        dtype: e.dtype.as_deref(),
        modules: e.module_count,
        components: &e.components,
        size: e.size,
        added: e.added_at,
        modified: e.mtime_ns / 1_000_000_000,
        sha256: e.sha256.as_deref(),
        autov2: e.autov2.as_deref(),
        addnet: e.addnet.as_deref(),
        autov3: e.autov3.as_deref(),
        triggers: &e.trigger_words,
        top_tags: &e.top_tags,
        tags: &e.tags,
        note: &e.note,
        user: e.user_metadata.as_ref(),
        sidecars: e
            .sidecars
            .iter()
            .map(|s| s.path.rsplit('/').next().unwrap_or(&s.path))
            .collect(),
        warnings: &e.warnings,
        thumb: None,
        preview: None,
        preview_problem: None,
        prompt: a1111_prompt(e, colliding),
        metadata,
    }
}

/// `s`, cut to `max` characters with a note of its whole length.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((at, _)) => format!("{}… ({} characters in all)", &s[..at], s.chars().count()),
    }
}

/// What A1111's Lora tab inserts when the card is clicked (`ui_extra_networks_lora.py`,
/// `create_item`): `<lora:{alias}:{preferred weight, else the default multiplier 1}>`, then a space
/// and the activation text when there is one. The alias is `ss_output_name` unless it is
/// "none" or another LoRA answers to the same name (A1111's forbidden aliases); then the stem.
pub fn a1111_prompt(e: &Entry, colliding: &HashSet<&str>) -> String {
    let name = match e.alias.as_deref() {
        Some(a) if !a.eq_ignore_ascii_case("none") && !colliding.contains(a) => a,
        _ => e.stem.as_str(),
    };
    let card = e
        .user_metadata
        .as_ref()
        .and_then(|u| u.as_object())
        .map(A1111Card::of)
        .unwrap_or_default();
    let weight = card
        .preferred_weight
        .map(python_float)
        .unwrap_or_else(|| "1".into());
    let mut prompt = format!("<lora:{name}:{weight}>");
    if let Some(text) = &card.activation_text {
        prompt.push(' ');
        prompt.push_str(text);
    }
    prompt
}

/// A float as Python's `str` writes it in the range weights take (`1.0`, `0.8`).
fn python_float(w: f64) -> String {
    if w.fract() == 0.0 && w.abs() < 1e16 {
        format!("{w:.1}")
    } else {
        format!("{w}")
    }
}

/// The thumbnail's file name: a hash of the preview's path, size and mtime (and of how thumbnails
/// are made), so an unchanged preview is found without reading it and a changed one gets a new
/// name (no stale thumbnail, and no browser cache showing the old one).
fn thumb_name(preview: &Path, meta: &std::fs::Metadata) -> String {
    let mut h = Sha256::new();
    h.update(format!("v{THUMB_VERSION} {THUMB_SIZE} {THUMB_QUALITY}\0").as_bytes());
    h.update(path_bytes(preview));
    h.update(format!("\0{} {}", meta.len(), mtime_ns(meta)).as_bytes());
    format!("{}.jpg", hex(&h.finalize()[..8]))
}

fn is_thumb_name(name: &str) -> bool {
    name.len() == 20
        && name.ends_with(".jpg")
        && name[..16]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Finds or makes the thumbnail of one preview.
fn thumbnail(preview: &Path, thumbs: &Path) -> Thumb {
    let meta = match std::fs::metadata(preview) {
        Ok(m) => m,
        Err(e) => return Thumb::Failed(format!("cannot read: {e}")),
    };
    let name = thumb_name(preview, &meta);
    let target = thumbs.join(&name);
    if target.is_file() {
        return Thumb::Reused(name);
    }
    let bytes = match encode_thumbnail(preview) {
        Ok(b) => b,
        Err(why) => return Thumb::Failed(why),
    };
    match write_small_file(&target, &bytes) {
        Ok(()) => Thumb::Written(name),
        Err(e) => Thumb::Failed(e.to_string()),
    }
}

/// Decodes an image (its format from its bytes, whatever its name says), scales it to fit
/// [`THUMB_SIZE`] (never up), flattens any transparency and encodes it as JPEG.
fn encode_thumbnail(preview: &Path) -> std::result::Result<Vec<u8>, String> {
    let img = image::ImageReader::open(preview)
        .map_err(|e| format!("cannot read: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?
        .decode()
        .map_err(|e| format!("not a readable image: {e}"))?;
    let img = match img.width() > THUMB_SIZE || img.height() > THUMB_SIZE {
        true => img.thumbnail(THUMB_SIZE, THUMB_SIZE),
        false => img,
    };
    let rgba = img.to_rgba8();
    let mut rgb = image::RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in rgb.pixels_mut().zip(rgba.pixels()) {
        let a = src[3] as u32;
        for c in 0..3 {
            let over = src[c] as u32 * a + THUMB_BACKGROUND[c] as u32 * (255 - a);
            dst[c] = ((over + 127) / 255) as u8;
        }
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, THUMB_QUALITY)
        .encode_image(&rgb)
        .map_err(|e| format!("cannot encode its thumbnail: {e}"))?;
    Ok(out)
}

/// Deletes thumbnails of earlier runs that no card uses (only names this command makes).
fn remove_unused(thumbs: &Path, used: &HashSet<String>, notes: &mut Vec<Problem>) -> usize {
    let Ok(dir) = std::fs::read_dir(thumbs) else {
        return 0;
    };
    let mut removed = 0;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_thumb_name(&name) || used.contains(&name) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => notes.push(Problem {
                path: entry.path().to_string_lossy().into_owned(),
                message: format!("old thumbnail not removed: {e}"),
            }),
        }
    }
    removed
}

/// JSON that can sit inside a `<script>` element: `<`, `>` and `&` (so no `</script>` or
/// `<!--` can appear) and U+2028/U+2029 are written as `\u` escapes, which only occur inside
/// JSON strings and mean the same there.
pub fn script_safe_json<T: Serialize>(v: &T) -> Result<String> {
    let json = serde_json::to_string(v).map_err(|e| Error::Invalid(format!("gallery: {e}")))?;
    let mut out = String::with_capacity(json.len() + json.len() / 16);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The page: the template with the style, the script, its CSP hash and the data put in (the data
/// last, so nothing in it is ever taken for a placeholder).
fn render(cards: &[Card]) -> Result<String> {
    #[derive(Serialize)]
    struct Data<'a> {
        version: &'static str,
        loras: &'a [Card<'a>],
    }
    let data = script_safe_json(&Data {
        version: env!("CARGO_PKG_VERSION"),
        loras: cards,
    })?;
    let summary = match cards.len() {
        0 => "No LoRAs in the index yet: `loratool library add DIR` indexes a folder, then run \
              `loratool library gallery` again."
            .to_string(),
        // The live count sits beside the controls.
        _ => String::new(),
    };
    let script_hash = base64(&Sha256::digest(SCRIPT.as_bytes()));
    Ok(PAGE
        .replacen("{{GENERATOR}}", GENERATOR, 1)
        .replacen("{{SCRIPT_HASH}}", &script_hash, 1)
        .replacen("{{SUMMARY}}", &summary, 1)
        .replacen("{{STYLE}}", STYLE, 1)
        .replacen("{{SCRIPT}}", SCRIPT, 1)
        .replacen("{{DATA}}", &data, 1))
}

/// Standard base64 with padding (the CSP's script hash).
fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_cannot_close_its_script_element() {
        let v = serde_json::json!({"a": "</script><script>x()</script>", "b": "<!-- & \u{2028}\u{2029}"});
        let s = script_safe_json(&v).unwrap();
        for bad in ["<", ">", "&", "\u{2028}", "\u{2029}"] {
            assert!(!s.contains(bad), "{s}");
        }
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn base64_as_csp_wants_it() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn weights_as_python_writes_them() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.8), "0.8");
        assert_eq!(python_float(0.75), "0.75");
    }

    #[test]
    fn long_values_are_cut_on_characters() {
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("日本語です", 2), "日本… (5 characters in all)");
    }

    #[test]
    fn thumbnail_names_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        std::fs::write(&p, b"x").unwrap();
        let name = thumb_name(&p, &std::fs::metadata(&p).unwrap());
        assert!(is_thumb_name(&name), "{name}");
        assert!(!is_thumb_name("notes.jpg"));
    }
}
