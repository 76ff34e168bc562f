//! The files other tools keep beside a model (`<stem>.json`, `.civitai.info`, previews, …), A1111's
//! hash cache (`cache.json`), and writing A1111's user-metadata sidecar.

use crate::tensors::{OutputFile, WriteOptions};
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// What a sidecar is, by the suffix after the model's stem (shared/reference
/// a1111_comfy_diffusers.md §5). Longer suffixes first: `.preview.png` before `.png`.
pub const SIDECARS: &[(&str, &str)] = &[
    (".cm-info.json", "cm_info"),
    (".api_info.json", "api_info"),
    (".metadata.json", "metadata_json"),
    (".civitai.info", "civitai_info"),
    (".preview.png", "preview"),
    (".preview.jpg", "preview"),
    (".preview.jpeg", "preview"),
    (".preview.webp", "preview"),
    (".preview.gif", "preview"),
    (".description.txt", "description"),
    (".json", "user_metadata"),
    (".png", "preview"),
    (".jpg", "preview"),
    (".jpeg", "preview"),
    (".webp", "preview"),
    (".gif", "preview"),
    (".txt", "description"),
    (".html", "html"),
];

/// A sidecar found beside a model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    pub kind: &'static str,
    pub path: PathBuf,
}

/// The sidecars of the model file `stem` (raw bytes) in a folder whose entry names are `names`:
/// looked up in the listing the walk already made, so finding them costs no system call.
pub fn find(dir: &Path, stem: &[u8], names: &HashSet<OsString>) -> Vec<Sidecar> {
    let mut found = Vec::new();
    for (suffix, kind) in SIDECARS {
        let mut name = stem.to_vec();
        name.extend_from_slice(suffix.as_bytes());
        let name = OsString::from_vec(name);
        if names.contains(&name) {
            found.push(Sidecar {
                kind,
                path: dir.join(name),
            });
        }
    }
    found
}

/// The preview images beside `model` that A1111 would find, in its lookup order
/// ([`preview_candidates`] that exist).
pub fn previews_of(model: &Path) -> Vec<PathBuf> {
    preview_candidates(model)
        .into_iter()
        .filter(|p| p.is_file())
        .collect()
}

/// Where loratool writes a LoRA's preview: `<stem>.preview.png` beside it (A1111's and ComfyUI's
/// preview name that leaves a downloaded `<stem>.png` alone).
pub fn rendered_preview_path(model: &Path) -> PathBuf {
    let mut name = model.file_stem().unwrap_or_default().to_os_string();
    name.push(".preview.png");
    model.with_file_name(name)
}

/// A short fingerprint of the sidecars' names, sizes and mtimes: a rescan re-reads a model's
/// header when its sidecars changed even though the model file did not.
pub fn signature(sidecars: &[Sidecar]) -> String {
    let mut sig = String::new();
    for s in sidecars {
        let (size, mtime) = std::fs::metadata(&s.path)
            .map(|m| (m.len(), super::scan::mtime_ns(&m)))
            .unwrap_or((0, 0));
        let name = s.path.file_name().unwrap_or_default().to_string_lossy();
        sig.push_str(&format!("{name}:{size}:{mtime};"));
    }
    sig
}

/// Preview image extensions in the order A1111 tries them (`ui_extra_networks.py`, `find_preview`:
/// for each extension `<stem>.<ext>`, then `<stem>.preview.<ext>`; the first that exists wins).
pub const PREVIEW_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "gif"];

/// The paths A1111 looks at for `model`'s preview, in its order (raw bytes kept: names need not be
/// UTF-8).
pub fn preview_candidates(model: &Path) -> Vec<PathBuf> {
    let dir = model.parent().unwrap_or(Path::new(""));
    let stem = model.file_stem().map(OsStr::as_bytes).unwrap_or_default();
    let mut out = Vec::new();
    for ext in PREVIEW_EXTENSIONS {
        for middle in ["", ".preview"] {
            let mut name = stem.to_vec();
            name.extend_from_slice(format!("{middle}.{ext}").as_bytes());
            out.push(dir.join(OsString::from_vec(name)));
        }
    }
    out
}

/// A `.civitai.info` sidecar (Civitai's model-version response, as `fetch` and the Civitai Helper
/// extensions write it), when it is readable JSON.
pub fn read_civitai_info(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// A1111's `<stem>.json`, when it exists and is a JSON object. Unreadable ones are ignored: they
/// are the user's notes, not the model.
pub fn read_user_metadata(model: &Path) -> Option<serde_json::Map<String, serde_json::Value>> {
    let path = user_metadata_path(model);
    if path == model {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// What a LoRA's A1111 card says (its `<stem>.json`), by A1111's rules (`ui_extra_networks_lora.py`):
/// a text counts when it is a non-empty string, kept as written; a preferred weight of 0 (or none)
/// means the default multiplier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct A1111Card {
    pub activation_text: Option<String>,
    pub negative_text: Option<String>,
    pub preferred_weight: Option<f64>,
}

impl A1111Card {
    pub fn of(user: &serde_json::Map<String, serde_json::Value>) -> A1111Card {
        let text = |key: &str| {
            user.get(key)
                .and_then(|v| v.as_str())
                .filter(|t| !t.is_empty())
                .map(str::to_string)
        };
        A1111Card {
            activation_text: text("activation text"),
            negative_text: text("negative text"),
            preferred_weight: user
                .get("preferred weight")
                .and_then(|w| w.as_f64())
                .filter(|w| *w != 0.0 && w.is_finite()),
        }
    }

    /// The card of the LoRA at `model` (empty when it has none).
    pub fn read(model: &Path) -> A1111Card {
        read_user_metadata(model)
            .map(|m| A1111Card::of(&m))
            .unwrap_or_default()
    }

    /// The activation text for joining into a prompt: trimmed, `None` when only blanks.
    pub fn trigger(&self) -> Option<&str> {
        trimmed(&self.activation_text)
    }

    /// The negative text for joining into a negative prompt, likewise.
    pub fn negative(&self) -> Option<&str> {
        trimmed(&self.negative_text)
    }
}

fn trimmed(text: &Option<String>) -> Option<&str> {
    text.as_deref().map(str::trim).filter(|t| !t.is_empty())
}

/// `foo.safetensors` → `foo.json` (A1111: `os.path.splitext(path)[0] + ".json"`).
pub fn user_metadata_path(model: &Path) -> PathBuf {
    model.with_extension("json")
}

/// The fields of A1111's user-metadata sidecar that `library sidecar` sets; `None` leaves a field
/// as it is.
#[derive(Debug, Clone, Default)]
pub struct UserMetadataEdit {
    pub activation_text: Option<String>,
    pub preferred_weight: Option<f64>,
    pub negative_text: Option<String>,
    pub notes: Option<String>,
    pub description: Option<String>,
    pub sd_version: Option<String>,
}

/// A1111's `sd version` choices (`SdVersion` plus SD3).
pub const SD_VERSIONS: &[&str] = &["Unknown", "SD1", "SD2", "SDXL", "SD3"];

/// Writes `<stem>.json` beside `model` with the edits applied, keeping every other field (and the
/// fields' order), formatted as A1111 writes it (`json.dump(indent=4, ensure_ascii=False)`). The
/// new file replaces the old one atomically. Returns the sidecar's path.
pub fn write_user_metadata(model: &Path, edit: &UserMetadataEdit) -> Result<PathBuf> {
    let path = user_metadata_path(model);
    if path == model {
        return Err(Error::Invalid(format!(
            "{}: the model file is itself a .json",
            model.display()
        )));
    }
    let mut map = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => {
                return Err(Error::bad_file(
                    &path,
                    "not a JSON object; refusing to replace it",
                ))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let mut set = |key: &str, value: Option<serde_json::Value>| {
        if let Some(v) = value {
            map.insert(key.to_string(), v);
        }
    };
    set("description", edit.description.clone().map(Into::into));
    if let Some(v) = &edit.sd_version {
        let canonical = SD_VERSIONS
            .iter()
            .find(|s| s.eq_ignore_ascii_case(v))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "sd version '{v}': A1111 knows {}",
                    SD_VERSIONS.join(", ")
                ))
            })?;
        set("sd version", Some((*canonical).into()));
    }
    set(
        "activation text",
        edit.activation_text.clone().map(Into::into),
    );
    if let Some(w) = edit.preferred_weight {
        if !w.is_finite() {
            return Err(Error::Invalid(format!(
                "preferred weight {w}: not a number"
            )));
        }
        set(
            "preferred weight",
            serde_json::Number::from_f64(w).map(Into::into),
        );
    }
    set("negative text", edit.negative_text.clone().map(Into::into));
    set("notes", edit.notes.clone().map(Into::into));

    let mut bytes = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut bytes, fmt);
    serde::Serialize::serialize(&serde_json::Value::Object(map), &mut ser)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    write_small_file(&path, &bytes)?;
    Ok(path)
}

/// Replaces `target` with `bytes` atomically: the bytes go to an unnamed (or hidden) file in the
/// same folder, fsynced, then renamed over the target (the project's `OutputFile`).
pub fn write_small_file(target: &Path, bytes: &[u8]) -> Result<()> {
    let opts = WriteOptions {
        force: true,
        inputs: Vec::new(),
    };
    let mut out = OutputFile::create(target, &opts)?;
    out.write_all(bytes).map_err(|e| Error::io(target, e))?;
    out.commit()
}

/// Hashes from A1111's `cache.json` (`modules/hashes.py`): per title (`lora/<stem>`), the mtime
/// A1111 saw and the hash. `hashes` holds whole-file sha256s, `hashes-addnet` data-section ones.
#[derive(Debug, Default)]
pub struct A1111Cache {
    sha256: HashMap<String, (f64, String)>,
    addnet: HashMap<String, (f64, String)>,
}

impl A1111Cache {
    /// The `cache.json` files of A1111 installs around `roots`: a LoRA root is
    /// `<webui>/models/Lora`, so each root and up to three folders above it are looked at.
    pub fn find(roots: &[PathBuf]) -> A1111Cache {
        let mut cache = A1111Cache::default();
        let mut seen = HashSet::new();
        for root in roots {
            for dir in root.ancestors().take(4) {
                let file = dir.join("cache.json");
                if seen.insert(file.clone()) && file.is_file() {
                    cache.load(&file);
                }
            }
        }
        cache
    }

    /// Adds the entries of one `cache.json`; a file that does not parse is ignored.
    pub fn load(&mut self, file: &Path) {
        let Ok(text) = std::fs::read_to_string(file) else {
            return;
        };
        let Ok(serde_json::Value::Object(all)) = serde_json::from_str(&text) else {
            return;
        };
        for (section, map) in [
            ("hashes", &mut self.sha256),
            ("hashes-addnet", &mut self.addnet),
        ] {
            let Some(entries) = all.get(section).and_then(|v| v.as_object()) else {
                continue;
            };
            for (title, v) in entries {
                let mtime = v.get("mtime").and_then(|m| m.as_f64());
                let hash = v.get("sha256").and_then(|h| h.as_str());
                if let (Some(mtime), Some(hash)) = (mtime, hash) {
                    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                        map.insert(title.clone(), (mtime, hash.to_ascii_lowercase()));
                    }
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sha256.is_empty() && self.addnet.is_empty()
    }

    /// The cached (sha256, addnet) of the LoRA `stem` whose mtime is `mtime_ns`, when A1111 saw
    /// the file at exactly that mtime. Either may be missing.
    pub fn lookup(&self, stem: &OsStr, mtime_ns: i64) -> (Option<String>, Option<String>) {
        let Some(stem) = stem.to_str() else {
            return (None, None);
        };
        let title = format!("lora/{stem}");
        let mtime = mtime_ns as f64 / 1e9;
        let fresh = |map: &HashMap<String, (f64, String)>| {
            map.get(&title)
                .filter(|(m, _)| (m - mtime).abs() < 1e-5)
                .map(|(_, h)| h.clone())
        };
        (fresh(&self.sha256), fresh(&self.addnet))
    }
}

/// The raw bytes of a path (the index stores paths as bytes: names need not be UTF-8).
pub fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// A path from the bytes the index stored.
pub fn path_from_bytes(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_by_suffix() {
        let names: HashSet<OsString> = [
            "a.safetensors",
            "a.json",
            "a.preview.png",
            "a.civitai.info",
            "a.txt",
            "ab.json",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let found = find(Path::new("/d"), b"a", &names);
        let kinds: Vec<&str> = found.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            ["civitai_info", "preview", "user_metadata", "description"]
        );
        assert_eq!(found[1].path, Path::new("/d/a.preview.png"));
    }

    #[test]
    fn previews_in_a1111_order() {
        let c = preview_candidates(Path::new("/d/a.b.safetensors"));
        assert_eq!(c[0], Path::new("/d/a.b.png"));
        assert_eq!(c[1], Path::new("/d/a.b.preview.png"));
        assert_eq!(c[2], Path::new("/d/a.b.jpg"));
        assert_eq!(c.len(), 2 * PREVIEW_EXTENSIONS.len());
    }

    #[test]
    fn user_metadata_keeps_other_fields_and_writes_a1111_names() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.safetensors");
        std::fs::write(
            dir.path().join("m.json"),
            r#"{"modelId": 5, "sha256": "AB", "notes": "old"}"#,
        )
        .unwrap();
        let edit = UserMetadataEdit {
            activation_text: Some("red hair".into()),
            preferred_weight: Some(0.7),
            sd_version: Some("sdxl".into()),
            ..Default::default()
        };
        write_user_metadata(&model, &edit).unwrap();
        let map = read_user_metadata(&model).unwrap();
        assert_eq!(map["modelId"], 5);
        assert_eq!(map["notes"], "old");
        assert_eq!(map["activation text"], "red hair");
        assert_eq!(map["preferred weight"], 0.7);
        assert_eq!(map["sd version"], "SDXL");
        let text = std::fs::read_to_string(dir.path().join("m.json")).unwrap();
        assert!(text.contains("\n    \"modelId\": 5"), "{text}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a1111_cache_entries_need_the_same_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cache.json");
        let h = "a".repeat(64);
        std::fs::write(
            &file,
            format!(
                r#"{{"hashes-addnet": {{"lora/x": {{"mtime": 1700000000.5, "sha256": "{h}"}}}}}}"#
            ),
        )
        .unwrap();
        let mut c = A1111Cache::default();
        c.load(&file);
        assert_eq!(
            c.lookup(OsStr::new("x"), 1_700_000_000_500_000_000),
            (None, Some(h))
        );
        assert_eq!(
            c.lookup(OsStr::new("x"), 1_700_000_001_000_000_000),
            (None, None)
        );
    }

    /// The card's rules: a text counts when it is a non-empty string, kept as written (A1111
    /// inserts it so); for joining into a prompt it is trimmed, and blanks do not count; a weight
    /// of 0 or a non-number means the default multiplier.
    #[test]
    fn a1111_card_rules() {
        let card = |json: &str| {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            A1111Card::of(v.as_object().unwrap())
        };
        let c = card(
            r#"{"activation text": " red hair ", "negative text": "", "preferred weight": 0.7}"#,
        );
        assert_eq!(c.activation_text.as_deref(), Some(" red hair "));
        assert_eq!(c.trigger(), Some("red hair"));
        assert_eq!((c.negative_text, c.preferred_weight), (None, Some(0.7)));
        let c =
            card(r#"{"activation text": "   ", "negative text": "blurry", "preferred weight": 0}"#);
        assert_eq!(c.activation_text.as_deref(), Some("   "));
        assert_eq!((c.trigger(), c.negative()), (None, Some("blurry")));
        assert_eq!(c.preferred_weight, None);
        let c = card(r#"{"activation text": 3, "preferred weight": "0.5"}"#);
        assert_eq!(c, A1111Card::default());
        // A model file named like its own sidecar has none.
        assert_eq!(read_user_metadata(Path::new("/d/x.json")), None);
    }

    /// The scan's suffix table and A1111's preview lookup name the same preview files (the table
    /// needs its own order, longest suffix first, so it cannot be built from the other).
    #[test]
    fn the_sidecar_table_knows_every_preview_a1111_looks_for() {
        let mut table: Vec<&str> = SIDECARS
            .iter()
            .filter(|(_, kind)| *kind == "preview")
            .map(|(suffix, _)| *suffix)
            .collect();
        let mut looked_for: Vec<String> = preview_candidates(Path::new("/d/m.safetensors"))
            .iter()
            .map(|p| p.to_string_lossy().trim_start_matches("/d/m").to_string())
            .collect();
        table.sort_unstable();
        looked_for.sort_unstable();
        assert_eq!(table, looked_for);
    }
}
