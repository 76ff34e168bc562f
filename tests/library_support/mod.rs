//! Shared by the `library_*` tests: collections in a tempdir, the binary with its own index.
#![allow(dead_code)]

use loratool::tensors::writer::{build_header, TensorSpec};
use loratool::tensors::TensorFile;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// `loratool library --db DB ARGS…`.
pub fn library(db: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loratool"));
    c.arg("library").arg("--db").arg(db);
    c
}

pub fn run(db: &Path, args: &[&str]) -> Output {
    library(db).args(args).output().expect("runs")
}

/// Runs and expects exit 0; returns stdout.
pub fn ok(db: &Path, args: &[&str]) -> String {
    let out = run(db, args);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

pub fn json(db: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(db, args)).expect("JSON")
}

/// Copies fixtures (paths under fixtures/) into `dir`.
pub fn copy(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for n in names {
        let src = fixture(n);
        std::fs::copy(&src, dir.join(src.file_name().unwrap())).unwrap();
    }
}

/// A LoRA file with `src`'s tensors and `metadata` (header built by the project's writer code,
/// written without fsync: tests make many).
pub fn write_variant(src: &Path, dst: &Path, metadata: &BTreeMap<String, String>) {
    let f = TensorFile::open(src).unwrap();
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for t in f.tensors() {
        specs.push(TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        });
    }
    for s in &specs {
        data.extend_from_slice(&f.raw_bytes(&s.name).unwrap());
    }
    let mut bytes = with_length(build_header(metadata, &specs));
    bytes.extend_from_slice(&data);
    std::fs::write(dst, bytes).unwrap();
}

/// A header with its 8-byte length in front.
fn with_length(header: Vec<u8>) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes
}

/// `n` distinct small LoRAs (one fixture's tensors, metadata differing) in `dir`.
pub fn generate(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let src = fixture("loras/sd1_lokr_tucker.safetensors");
    let f = TensorFile::open(&src).unwrap();
    let specs: Vec<TensorSpec> = f
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let mut data = Vec::new();
    for s in &specs {
        data.extend_from_slice(&f.raw_bytes(&s.name).unwrap());
    }
    for i in 0..n {
        let mut meta = f.metadata().clone();
        meta.insert("ss_output_name".into(), format!("gen_{i}"));
        let mut bytes = with_length(build_header(&meta, &specs));
        bytes.extend_from_slice(&data);
        let sub = dir.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("lora_{i:05}.safetensors")), bytes).unwrap();
    }
}

/// Each file in the index once, and SQLite's own check passes.
pub fn assert_consistent(db: &Path) -> usize {
    let conn = rusqlite::Connection::open(db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let (n, distinct): (i64, i64) = conn
        .query_row(
            "SELECT count(*), count(DISTINCT path) FROM files",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(n, distinct);
    let fts: i64 = conn
        .query_row("SELECT count(*) FROM files_fts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(fts, n, "one full-text row per file");
    n as usize
}

/// A solid-colour image of `w`×`h` at `path`, its format from the extension.
pub fn write_image(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
        .save(path)
        .unwrap();
}

/// The JSON a gallery page carries (`<script type="application/json" id="gallery-data">`).
pub fn gallery_data(page: &str) -> serde_json::Value {
    let open = r#"<script type="application/json" id="gallery-data">"#;
    let start = page.find(open).expect("data element") + open.len();
    let end = start + page[start..].find("</script>").expect("end of data");
    serde_json::from_str(&page[start..end]).expect("the data is JSON")
}

/// A LoRA from a fixture's tensors under the name `stem` in `dir`, with `ss_output_name` and
/// other metadata as given (distinct metadata, distinct sha256).
pub fn lora_named(dir: &Path, fixture_name: &str, stem: &str, meta: &[(&str, &str)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = fixture(fixture_name);
    let mut m: BTreeMap<String, String> = TensorFile::open(&src).unwrap().metadata().clone();
    m.insert("loratool_test_name".into(), stem.into());
    for (k, v) in meta {
        m.insert(k.to_string(), v.to_string());
    }
    let dst = dir.join(format!("{stem}.safetensors"));
    write_variant(&src, &dst, &m);
    dst
}
