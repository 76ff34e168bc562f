//! `loratool meta`: a safetensors file's `__metadata__`, read or edited. An edit writes a new file
//! whose tensor entries and data section are the source's, unchanged (so its AutoV3/addnet hash,
//! the sha256 of the data section, is too), through the same atomic output as every writer; in
//! place, that file replaces the source by an atomic rename.

use crate::tensors::writer::{write_with_metadata, WriteOptions};
use crate::tensors::{Container, SafetensorsFile};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `ss_*` keys `--strip-training` keeps: kohya's own minimum set (what it writes with
/// `--no_metadata`, and what loaders read to tell the network and the base model), and the
/// output name UIs show. Every other `ss_*` key describes the training run.
pub const KEPT_SS_KEYS: &[&str] = &[
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_v2",
    "ss_output_name",
];

/// kohya's legacy addnet hash: taken over a serialisation of the file that carried its `ss_*`
/// keys, so it is stale once any of them changes.
const LEGACY_HASH: &str = "sshs_legacy_hash";

/// True for a key `--strip-training` removes: every `ss_*` key but [`KEPT_SS_KEYS`] (dataset
/// folders, tag frequencies, comments, seeds, optimizer, base model file name and hash, ...;
/// unknown `ss_*` keys too), and `sshs_legacy_hash`. Everything else stays: `modelspec.*`,
/// `sshs_model_hash` (the data section is unchanged), peft's `lora_adapter_metadata` (needed to
/// load the file), and any other tool's keys.
pub fn is_training_detail(key: &str) -> bool {
    (key.starts_with("ss_") && !KEPT_SS_KEYS.contains(&key)) || key == LEGACY_HASH
}

/// What to change in a file's metadata. Applied in this order: strip, unset, set — so an explicit
/// `set` survives `strip_training`.
#[derive(Debug, Clone, Default)]
pub struct MetaEdit {
    /// Keys to add or replace, with their values (a later pair for the same key wins).
    pub set: Vec<(String, String)>,
    /// Keys to remove.
    pub unset: Vec<String>,
    /// Remove the training details ([`is_training_detail`]).
    pub strip_training: bool,
}

/// One metadata key whose value an edit changed: added (`before` is `None`), replaced, or
/// removed (`after` is `None`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MetaChange {
    pub key: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

impl MetaEdit {
    /// Parses `KEY=VALUE`, split at the first `=` (the value may hold `=` and may be empty).
    pub fn parse_set(arg: &str) -> Result<(String, String)> {
        match arg.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(Error::Invalid(format!(
                "'{arg}' is not KEY=VALUE (no '=' in it)"
            ))),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.unset.is_empty() && !self.strip_training
    }

    /// Refuses empty keys, keys starting with `__` (the format reserves them: `__metadata__`),
    /// and a key both set and unset.
    pub fn validate(&self) -> Result<()> {
        let keys = self.set.iter().map(|(k, _)| k).chain(&self.unset);
        for key in keys {
            if key.is_empty() {
                return Err(Error::Invalid("metadata key is empty".into()));
            }
            if key.starts_with("__") {
                return Err(Error::Invalid(format!(
                    "metadata key '{key}': keys starting with '__' are reserved by safetensors"
                )));
            }
        }
        if let Some((key, _)) = self.set.iter().find(|(k, _)| self.unset.contains(k)) {
            return Err(Error::Invalid(format!(
                "metadata key '{key}' is both set and unset"
            )));
        }
        Ok(())
    }

    /// The metadata after this edit, and what changed (in key order). A change to any `ss_*` key
    /// also drops a stale `sshs_legacy_hash`, unless this edit sets it.
    pub fn apply(
        &self,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(BTreeMap<String, String>, Vec<MetaChange>)> {
        self.validate()?;
        let mut out = metadata.clone();
        if self.strip_training {
            out.retain(|k, _| !is_training_detail(k));
        }
        for key in &self.unset {
            out.remove(key);
        }
        for (k, v) in &self.set {
            out.insert(k.clone(), v.clone());
        }
        let ss_changed = metadata
            .iter()
            .filter(|(k, _)| k.starts_with("ss_"))
            .any(|(k, v)| out.get(k) != Some(v))
            || out
                .keys()
                .any(|k| k.starts_with("ss_") && !metadata.contains_key(k));
        if ss_changed && !self.set.iter().any(|(k, _)| k == LEGACY_HASH) {
            out.remove(LEGACY_HASH);
        }
        let keys: std::collections::BTreeSet<&String> = metadata.keys().chain(out.keys()).collect();
        let changes = keys
            .into_iter()
            .filter(|k| metadata.get(*k) != out.get(*k))
            .map(|k| MetaChange {
                key: k.clone(),
                before: metadata.get(k).cloned(),
                after: out.get(k).cloned(),
            })
            .collect();
        Ok((out, changes))
    }
}

/// Where an edited file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOutput {
    /// A new file (an existing one is replaced only with `force`; never the input).
    File { path: PathBuf, force: bool },
    /// Over the input itself, by an atomic rename (a symlink's target is replaced, not the link).
    InPlace,
}

/// The outcome of [`edit_metadata`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct MetaReport {
    /// The file written; `None` for an in-place edit that changed nothing (nothing is rewritten).
    pub output: Option<PathBuf>,
    /// The metadata of the output.
    pub metadata: BTreeMap<String, String>,
    pub changes: Vec<MetaChange>,
    /// Keys to unset that the file did not have.
    pub absent: Vec<String>,
}

/// Opens a file whose metadata is to be read or edited: safetensors only (a pickle has no
/// `__metadata__`; it is refused before it is unpickled).
pub fn open_safetensors(path: &Path) -> Result<SafetensorsFile> {
    match Container::sniff(path)? {
        Container::Safetensors => SafetensorsFile::open(path),
        Container::Pickle => Err(Error::bad_file(
            path,
            "a PyTorch pickle, not safetensors: metadata can only be read and edited in \
             safetensors files (`loratool convert` makes one)",
        )),
    }
}

/// The `__metadata__` of a safetensors file (validated as a whole first).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    Ok(open_safetensors(path)?.metadata().clone())
}

/// Applies `edit` to the metadata of `input` and writes the result to `output`: tensor entries
/// (names, dtypes, shapes, data offsets, header order) and the data section are copied unchanged
/// ([`write_with_metadata`]). The arguments and the output path are checked before the input is
/// read; nothing appears at the output unless it is complete.
pub fn edit_metadata(input: &Path, edit: &MetaEdit, output: &MetaOutput) -> Result<MetaReport> {
    edit.validate()?;
    let (target, opts) = match output {
        MetaOutput::File { path, force } => (
            path.clone(),
            WriteOptions::checked(path, *force, vec![input.to_path_buf()])?,
        ),
        // The input is the target: replaced atomically, as --force replaces an output.
        MetaOutput::InPlace => (
            std::fs::canonicalize(input).map_err(|e| Error::io(input, e))?,
            WriteOptions {
                force: true,
                inputs: Vec::new(),
            },
        ),
    };
    let file = open_safetensors(input)?;
    let (metadata, changes) = edit.apply(file.metadata())?;
    let absent = edit
        .unset
        .iter()
        .filter(|k| !file.metadata().contains_key(*k))
        .cloned()
        .collect();
    let unchanged_in_place = *output == MetaOutput::InPlace && changes.is_empty();
    if !unchanged_in_place {
        write_with_metadata(&target, &file, &metadata, &opts)?;
    }
    Ok(MetaReport {
        output: (!unchanged_in_place).then_some(target),
        metadata,
        changes,
        absent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn strip_keeps_what_loaders_and_uis_read() {
        let before = meta(&[
            ("ss_network_dim", "8"),
            ("ss_output_name", "style"),
            ("ss_tag_frequency", "{}"),
            ("ss_dataset_dirs", "{}"),
            ("ss_sd_model_name", "model.ckpt"),
            ("ss_some_future_key", "x"),
            ("sshs_model_hash", "ab"),
            ("sshs_legacy_hash", "cd"),
            ("modelspec.title", "t"),
            ("lora_adapter_metadata", "{}"),
        ]);
        let edit = MetaEdit {
            strip_training: true,
            set: vec![("ss_training_comment".into(), "kept: set after strip".into())],
            ..Default::default()
        };
        let (after, changes) = edit.apply(&before).unwrap();
        assert_eq!(
            after.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "lora_adapter_metadata",
                "modelspec.title",
                "ss_network_dim",
                "ss_output_name",
                "ss_training_comment",
                "sshs_model_hash"
            ]
        );
        let removed: Vec<&str> = changes
            .iter()
            .filter(|c| c.after.is_none())
            .map(|c| c.key.as_str())
            .collect();
        assert_eq!(
            removed,
            [
                "ss_dataset_dirs",
                "ss_sd_model_name",
                "ss_some_future_key",
                "ss_tag_frequency",
                "sshs_legacy_hash"
            ]
        );
    }

    #[test]
    fn legacy_hash_goes_only_when_an_ss_key_changes() {
        let before = meta(&[("ss_output_name", "a"), ("sshs_legacy_hash", "cd")]);
        let set = |k: &str, v: &str| MetaEdit {
            set: vec![(k.into(), v.into())],
            ..Default::default()
        };
        let (after, _) = set("modelspec.title", "t").apply(&before).unwrap();
        assert!(after.contains_key("sshs_legacy_hash"));
        let (after, _) = set("ss_output_name", "a").apply(&before).unwrap();
        assert!(after.contains_key("sshs_legacy_hash"), "same value");
        let (after, changes) = set("ss_output_name", "b").apply(&before).unwrap();
        assert!(!after.contains_key("sshs_legacy_hash"));
        assert_eq!(changes.len(), 2);
    }

    #[test]
    fn keys_are_checked_and_values_split_at_the_first_equals() {
        assert_eq!(
            MetaEdit::parse_set("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert_eq!(MetaEdit::parse_set("a=").unwrap(), ("a".into(), "".into()));
        assert!(MetaEdit::parse_set("abc").is_err());
        for bad in [
            MetaEdit {
                set: vec![("__metadata__".into(), "x".into())],
                ..Default::default()
            },
            MetaEdit {
                unset: vec!["__x".into()],
                ..Default::default()
            },
            MetaEdit {
                set: vec![("".into(), "x".into())],
                ..Default::default()
            },
            MetaEdit {
                set: vec![("k".into(), "x".into())],
                unset: vec!["k".into()],
                ..Default::default()
            },
        ] {
            assert!(bad.apply(&BTreeMap::new()).is_err(), "{bad:?}");
        }
    }
}
