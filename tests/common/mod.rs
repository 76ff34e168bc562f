//! Shared helpers for the integration tests: the fixture manifest written by fixtures/generate.py.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest parses")
}

/// Manifest entries of adapter files (the malicious pickle has no network).
pub fn adapter_entries() -> Vec<serde_json::Value> {
    manifest()["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter(|f| !f["network"].is_null())
        .cloned()
        .collect()
}

pub fn loratool() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
}
