//! `library add` / `scan` against a real index file: new, unchanged, moved, renamed (with
//! sidecars), edited, deleted and pruned files; checkpoints and other files; unreadable files,
//! broken symlinks, loops, names that are not UTF-8, files that change while they are read.

mod library_support;

use library_support::*;
use loratool::library::scan::ScanOptions;
use loratool::library::Library;
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn entries(db: &Path, ty: &str) -> Vec<serde_json::Value> {
    json(db, &["list", "--type", ty, "--json"])
        .as_array()
        .unwrap()
        .clone()
}

fn by_name<'a>(list: &'a [serde_json::Value], file_name: &str) -> &'a serde_json::Value {
    list.iter()
        .find(|e| e["file_name"] == file_name)
        .unwrap_or_else(|| panic!("{file_name} not in {list:#?}"))
}

#[test]
fn first_scan_indexes_every_kind_and_a_rescan_reads_nothing() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    copy(
        &c,
        &[
            "loras/sd1_kohya_lora.safetensors",
            "loras/sd1_kohya_lora.json",
            "loras/sdxl_loha.safetensors",
            "loras/sd1_peft.safetensors",
            "legacy/sd1_kohya_lora.ckpt",
        ],
    );
    copy(&c.join("models"), &["models/sd1_ldm.safetensors"]);
    std::fs::copy(
        fixture("loras/sd1_kohya_lora.safetensors"),
        c.join("sd1_kohya_lora.preview.png"),
    )
    .unwrap();
    std::fs::write(c.join("notes.txt"), "not a model").unwrap();

    let r = json(&db, &["add", c.to_str().unwrap(), "--json", "--quiet"]);
    assert_eq!(r["files"], 5);
    assert_eq!(r["new"], 5);
    let loras = entries(&db, "lora");
    assert_eq!(loras.len(), 4);
    let k = by_name(&loras, "sd1_kohya_lora.safetensors");
    assert_eq!(k["base_model"], "sd1");
    assert_eq!(k["kind"], "lora");
    assert_eq!(k["rank"], 4);
    assert_eq!(k["has_preview"], true);
    assert!(k["trigger_words"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w == "mychar"));
    assert_eq!(k["user_metadata"]["preferred weight"], 0.8);
    assert_eq!(k["autov3"].as_str().unwrap().len(), 12);
    assert_eq!(k["autov2"].as_str().unwrap().len(), 10);
    let kinds: Vec<&str> = k["sidecars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["user_metadata", "preview"]);
    // The pickle LoRA: sha256 but no data-section hash.
    let ckpt = by_name(&loras, "sd1_kohya_lora.ckpt");
    assert_eq!(ckpt["container"], "pickle");
    assert!(ckpt["sha256"].is_string() && ckpt["autov3"].is_null());
    let cps = entries(&db, "checkpoint");
    assert_eq!(cps.len(), 1);
    assert_eq!(cps[0]["family"], "sd1");
    assert!(cps[0]["components"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "unet"));

    let r = json(&db, &["scan", "--json"]);
    assert_eq!(r["unchanged"], 5);
    assert_eq!(r["bytes_read"], 0);
    assert_eq!(assert_consistent(&db), 5);
}

#[test]
fn moves_and_renames_keep_the_entry_tags_and_notes() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    copy(
        &c,
        &[
            "loras/sd1_kohya_lora.safetensors",
            "loras/sd1_kohya_lora.json",
            "loras/sdxl_loha.safetensors",
        ],
    );
    ok(&db, &["add", c.to_str().unwrap()]);
    ok(&db, &["tag", "add", "sd1_kohya_lora", "favourite", "anime"]);
    ok(&db, &["note", "sdxl_loha", "from the old drive"]);
    let before = entries(&db, "lora");
    let id = by_name(&before, "sd1_kohya_lora.safetensors")["id"].clone();
    let id2 = by_name(&before, "sdxl_loha.safetensors")["id"].clone();

    // Rename with its sidecar, and move another file into a subfolder.
    std::fs::rename(
        c.join("sd1_kohya_lora.safetensors"),
        c.join("hero.safetensors"),
    )
    .unwrap();
    std::fs::rename(c.join("sd1_kohya_lora.json"), c.join("hero.json")).unwrap();
    std::fs::create_dir(c.join("xl")).unwrap();
    std::fs::rename(
        c.join("sdxl_loha.safetensors"),
        c.join("xl/sdxl_loha.safetensors"),
    )
    .unwrap();
    let r = json(&db, &["scan", "--json"]);
    assert_eq!(r["moved"], 2, "{r}");
    assert_eq!(r["new"], 0);
    assert_eq!(r["missing"], 0);

    let after = entries(&db, "lora");
    assert_eq!(after.len(), 2);
    let hero = by_name(&after, "hero.safetensors");
    assert_eq!(hero["id"], id);
    assert_eq!(hero["tags"], serde_json::json!(["anime", "favourite"]));
    assert_eq!(hero["sidecars"][0]["kind"], "user_metadata");
    assert!(hero["sidecars"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("hero.json"));
    let moved = by_name(&after, "sdxl_loha.safetensors");
    assert_eq!(moved["id"], id2);
    assert_eq!(moved["note"], "from the old drive");
    assert!(moved["path"]
        .as_str()
        .unwrap()
        .ends_with("xl/sdxl_loha.safetensors"));
    assert_eq!(assert_consistent(&db), 2);
}

#[test]
fn deleted_files_are_missing_until_pruned() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    copy(
        &c,
        &["loras/sd1_locon.safetensors", "loras/sd1_loha.safetensors"],
    );
    ok(&db, &["add", c.to_str().unwrap()]);
    std::fs::remove_file(c.join("sd1_loha.safetensors")).unwrap();
    let r = json(&db, &["scan", "--json"]);
    assert_eq!(r["missing"], 1);
    assert_eq!(entries(&db, "lora").len(), 1);
    let missing = json(&db, &["list", "--missing", "--json"]);
    assert_eq!(missing[0]["file_name"], "sd1_loha.safetensors");
    assert_eq!(missing[0]["missing"], true);
    // Back at the same place: present again.
    copy(&c, &["loras/sd1_loha.safetensors"]);
    ok(&db, &["scan"]);
    assert_eq!(entries(&db, "lora").len(), 2);
    std::fs::remove_file(c.join("sd1_loha.safetensors")).unwrap();
    let r = json(&db, &["scan", "--prune", "--json"]);
    assert_eq!(r["pruned"], 1);
    assert_eq!(
        json(&db, &["list", "--missing", "--json"]),
        serde_json::json!([])
    );
    assert_eq!(assert_consistent(&db), 1);
}

#[test]
fn a_metadata_edit_keeps_autov3_and_dupes_reports_it() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    copy(&c, &["loras/sd1_kohya_lora.safetensors"]);
    std::fs::create_dir(c.join("copy")).unwrap();
    std::fs::copy(
        c.join("sd1_kohya_lora.safetensors"),
        c.join("copy/same_bytes.safetensors"),
    )
    .unwrap();
    ok(&db, &["add", c.to_str().unwrap()]);
    let before = entries(&db, "lora");
    let orig = by_name(&before, "sd1_kohya_lora.safetensors").clone();
    assert_eq!(
        orig["sha256"],
        by_name(&before, "same_bytes.safetensors")["sha256"]
    );

    // Rewrite with other metadata through the project's writer, then put it in place.
    let src = c.join("sd1_kohya_lora.safetensors");
    let f = loratool::tensors::TensorFile::open(&src).unwrap();
    let mut meta: BTreeMap<String, String> = f.metadata().clone();
    meta.insert("ss_output_name".into(), "renamed_alias".into());
    let tensors: Vec<_> = f
        .tensors()
        .iter()
        .map(|t| {
            (
                loratool::tensors::TensorSpec {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                },
                f.raw_bytes(&t.name).unwrap().into_owned(),
            )
        })
        .collect();
    drop(f);
    let edited = t.path().join("edited.safetensors");
    loratool::tensors::writer::write_all(&edited, &meta, &tensors, &Default::default()).unwrap();
    std::fs::rename(&edited, &src).unwrap();

    let r = json(&db, &["scan", "--json"]);
    assert_eq!(r["changed"], 1, "{r}");
    let after = entries(&db, "lora");
    let e = by_name(&after, "sd1_kohya_lora.safetensors");
    assert_eq!(e["id"], orig["id"]);
    assert_eq!(e["autov3"], orig["autov3"]);
    assert_ne!(e["sha256"], orig["sha256"]);
    assert_eq!(e["alias"], "renamed_alias");

    let dupes = json(&db, &["dupes", "--json"]);
    let reasons: Vec<&str> = dupes
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["reason"].as_str().unwrap())
        .collect();
    // The copy keeps the old `ss_output_name`, which is now the other file's stem: A1111 would
    // resolve that name to either.
    assert_eq!(reasons, ["same_tensors", "name_collision"], "{dupes:#}");
    assert_eq!(dupes[0]["files"].as_array().unwrap().len(), 2);
}

#[test]
fn exact_copies_and_a1111_name_collisions() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    copy(
        &c.join("a"),
        &[
            "loras/sd1_kohya_lora.safetensors",
            "loras/sd1_loha.safetensors",
        ],
    );
    copy(&c.join("b"), &["loras/sd1_kohya_lora.safetensors"]);
    // Same stem, other content, in a third folder.
    std::fs::create_dir_all(c.join("c")).unwrap();
    std::fs::copy(
        fixture("loras/sd1_locon.safetensors"),
        c.join("c/sd1_loha.safetensors"),
    )
    .unwrap();
    ok(&db, &["add", c.to_str().unwrap()]);
    let dupes = json(&db, &["dupes", "--json"]);
    let groups: Vec<(String, String, usize)> = dupes
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["reason"].as_str().unwrap().to_string(),
                g["key"].as_str().unwrap().to_string(),
                g["files"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert!(
        groups.iter().any(|g| g.0 == "same_file" && g.2 == 2),
        "{groups:?}"
    );
    assert!(groups.contains(&("name_collision".into(), "sd1_kohya_lora".into(), 2)));
    assert!(groups.contains(&("name_collision".into(), "sd1_loha".into(), 2)));
}

#[test]
fn bad_files_links_loops_and_odd_names_are_reported_never_fatal() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    copy(&c, &["loras/sd1_locon.safetensors"]);
    std::fs::write(c.join("junk.safetensors"), b"this is no tensor file").unwrap();
    let full = std::fs::read(fixture("loras/sd1_loha.safetensors")).unwrap();
    std::fs::write(c.join("truncated.safetensors"), &full[..full.len() / 2]).unwrap();
    std::os::unix::fs::symlink(t.path().join("nowhere"), c.join("broken.safetensors")).unwrap();
    std::os::unix::fs::symlink(&c, c.join("loop")).unwrap();
    std::os::unix::fs::symlink(c.join("sd1_locon.safetensors"), c.join("link.safetensors"))
        .unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9.safetensors");
    std::fs::copy(fixture("loras/sd1_lokr_full.safetensors"), c.join(odd)).unwrap();
    // A safetensors file that is no LoRA and no model.
    let header = br#"{"foo":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 8]);
    std::fs::write(c.join("not_a_lora.pt"), bytes).unwrap();
    std::fs::write(c.join("zero.ckpt"), b"").unwrap();

    let out = run(&db, &["add", c.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = r["problems"].to_string();
    assert!(problems.contains("broken symlink"), "{problems}");
    assert!(problems.contains("symlink loop"), "{problems}");
    assert!(problems.contains("junk.safetensors"), "{problems}");
    assert!(problems.contains("truncated.safetensors"), "{problems}");

    let all = entries(&db, "all");
    let unreadable: Vec<&str> = all
        .iter()
        .filter(|e| e["type"] == "unreadable")
        .map(|e| e["file_name"].as_str().unwrap())
        .collect();
    assert!(unreadable.contains(&"junk.safetensors"));
    assert!(unreadable.contains(&"truncated.safetensors"));
    assert_eq!(by_name(&all, "not_a_lora.pt")["type"], "other");
    assert_eq!(by_name(&all, "not_a_lora.pt")["kind"], "unknown");
    let junk = by_name(&all, "junk.safetensors");
    assert!(junk["error"].as_str().unwrap().contains("junk.safetensors"));
    assert!(
        junk["sha256"].is_string(),
        "an unreadable file is still hashed"
    );
    // The file symlink is followed once: indexed under its own path.
    assert_eq!(by_name(&all, "link.safetensors")["type"], "lora");
    let odd_entry = all
        .iter()
        .find(|e| e["path_hex"].is_string())
        .expect("the non-UTF-8 name is indexed");
    assert_eq!(odd_entry["type"], "lora");
    assert!(odd_entry["path_hex"]
        .as_str()
        .unwrap()
        .ends_with(&hex(b"caf\xe9.safetensors")));
    // Found again by its raw path.
    let shown = library(&db)
        .arg("show")
        .arg(c.join(odd))
        .arg("--json")
        .output()
        .unwrap();
    assert!(shown.status.success());
    // Nothing looped: each file once.
    let n = assert_consistent(&db);
    assert_eq!(n, all.len());
    let r = json(&db, &["scan", "--json"]);
    assert_eq!(r["new"], 0);
    assert_eq!(r["changed"], 0);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_file_that_changes_while_read_is_reread_or_left_out() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    copy(
        &c,
        &["loras/sd1_locon.safetensors", "loras/sd1_loha.safetensors"],
    );
    let mut lib = Library::open(&t.path().join("lib.db")).unwrap();
    let roots = lib.add_roots(std::slice::from_ref(&c)).unwrap();

    // Changes once (during the first read): read again, indexed with the final content's hash.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let opts = ScanOptions {
        after_read: Some(Arc::new(move |p: &Path| {
            if p.ends_with("sd1_locon.safetensors") && seen.fetch_add(1, Ordering::SeqCst) == 0 {
                let meta = BTreeMap::from([("edited".to_string(), "during the scan".to_string())]);
                write_variant(&fixture("loras/sd1_locon.safetensors"), p, &meta);
            }
        })),
        ..Default::default()
    };
    let r = lib.scan_roots(&roots, &opts).unwrap();
    assert_eq!(r.new, 2, "{r:?}");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let final_hash =
        loratool::tensors::hash::hash_file(&c.join("sd1_locon.safetensors"), None).unwrap();
    let q = lib.resolve(std::ffi::OsStr::new("sd1_locon")).unwrap();
    let loratool::library::query::Resolved::One(e) = q else {
        panic!("{q:?}")
    };
    assert_eq!(e.sha256.as_deref(), Some(final_hash.sha256.as_str()));

    // Changes on every read: reported, the entry left as it was.
    let opts = ScanOptions {
        after_read: Some(Arc::new(|p: &Path| {
            if p.ends_with("sd1_loha.safetensors") {
                let mut bytes = std::fs::read(p).unwrap();
                bytes.push(b' ');
                std::fs::write(p, bytes).unwrap();
            }
        })),
        ..Default::default()
    };
    let before = lib.resolve(std::ffi::OsStr::new("sd1_loha")).unwrap();
    std::fs::write(c.join("sd1_loha.safetensors"), b"changed before the scan").unwrap();
    let r = lib.scan_roots(&roots, &opts).unwrap();
    assert_eq!(r.problems.len(), 1, "{r:?}");
    assert!(r.problems[0].message.contains("changed while being read"));
    let after = lib.resolve(std::ffi::OsStr::new("sd1_loha")).unwrap();
    match (before, after) {
        (
            loratool::library::query::Resolved::One(a),
            loratool::library::query::Resolved::One(b),
        ) => assert_eq!(a.sha256, b.sha256, "never indexed with a wrong hash"),
        other => panic!("{other:?}"),
    }
}

/// Counts what a scan reports to its progress bar.
struct CountedProgress {
    total: AtomicUsize,
    done: AtomicUsize,
    calls: AtomicUsize,
}

impl loratool::ops::progress::Progress for CountedProgress {
    fn start(&self, total: u64) {
        self.total.store(total as usize, Ordering::SeqCst);
    }
    fn advance(&self, done: u64) {
        self.done.fetch_add(done as usize, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn progress_counts_every_byte_once_and_moves_inside_large_files() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    copy(&c, &["loras/sd1_locon.safetensors"]);
    // 150 MiB: the hash reports it in several chunks (64 MiB mapped, 16 MiB direct).
    let big = c.join("big.safetensors");
    {
        let bytes = std::fs::read(fixture("loras/sd1_locon.safetensors")).unwrap();
        let mut f = std::fs::File::create(&big).unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        f.set_len(150 << 20).unwrap();
    }
    let expected: u64 = ["sd1_locon.safetensors", "big.safetensors"]
        .iter()
        .map(|n| std::fs::metadata(c.join(n)).unwrap().len())
        .sum();
    let counted = Arc::new(CountedProgress {
        total: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        calls: AtomicUsize::new(0),
    });
    let mut lib = Library::open(&t.path().join("lib.db")).unwrap();
    let roots = lib.add_roots(std::slice::from_ref(&c)).unwrap();
    let opts = ScanOptions {
        progress: loratool::ops::progress::ProgressSink::new(counted.clone()),
        ..Default::default()
    };
    let r = lib.scan_roots(&roots, &opts).unwrap();
    assert_eq!(r.new, 2, "{r:?}");
    assert_eq!(counted.total.load(Ordering::SeqCst) as u64, expected);
    assert_eq!(counted.done.load(Ordering::SeqCst) as u64, expected);
    assert!(
        counted.calls.load(Ordering::SeqCst) >= 4,
        "the 150 MiB file was reported in chunks"
    );
}

#[test]
fn known_hashes_come_from_the_index_only_while_the_file_is_unchanged() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    copy(&c, &["loras/sd1_locon.safetensors"]);
    let mut lib = Library::open(&t.path().join("lib.db")).unwrap();
    let roots = lib.add_roots(std::slice::from_ref(&c)).unwrap();
    lib.scan_roots(&roots, &ScanOptions::default()).unwrap();
    let file = std::fs::canonicalize(c.join("sd1_locon.safetensors")).unwrap();
    let start = loratool::tensors::SafetensorsFile::data_start_of(&file).unwrap();
    let read = loratool::tensors::hash::hash_file(&file, start).unwrap();
    assert_eq!(lib.known_hashes(&file), Some(read));
    // Another size: the index's hashes no longer describe the file.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.push(0);
    std::fs::write(&file, bytes).unwrap();
    assert_eq!(lib.known_hashes(&file), None);
}
