//! `library` commands end to end: name resolution, listing filters and search, tags and notes,
//! the A1111 sidecar, verify, export, roots and the index's location.

mod library_support;

use library_support::*;
use std::path::Path;

fn collection(t: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let c = t.join("c");
    let db = t.join("lib.db");
    copy(
        &c,
        &[
            "loras/sd1_kohya_lora.safetensors",
            "loras/sd1_kohya_lora.json",
            "loras/sdxl_loha.safetensors",
            "loras/sd1_locon.safetensors",
            "loras/real_flux_kohya.safetensors",
        ],
    );
    copy(&c.join("models"), &["models/sdxl_ldm.safetensors"]);
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    (c, db)
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["stem"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn show_resolves_stems_aliases_hashes_and_paths() {
    let t = tempfile::tempdir().unwrap();
    let (c, db) = collection(t.path());
    let e = json(&db, &["show", "sd1_kohya_lora", "--json"]);
    assert_eq!(e["stem"], "sd1_kohya_lora");
    assert!(e["metadata"].is_object(), "show carries the metadata");
    let id = e["id"].clone();
    let autov3 = e["autov3"].as_str().unwrap().to_string();
    let autov2 = e["autov2"].as_str().unwrap().to_string();
    let sha = e["sha256"].as_str().unwrap().to_string();
    for q in [
        autov3.as_str(),
        &autov3.to_lowercase(),
        autov2.as_str(),
        &sha[..16],
        c.join("sd1_kohya_lora.safetensors").to_str().unwrap(),
    ] {
        assert_eq!(json(&db, &["show", q, "--json"])["id"], id, "{q}");
    }
    // The alias (ss_output_name) of another file.
    let loha = json(&db, &["show", "sdxl_loha", "--json"]);
    if let Some(alias) = loha["alias"].as_str().filter(|a| *a != "sdxl_loha") {
        let by_alias = run(&db, &["show", alias, "--json"]);
        assert!(!by_alias.stdout.is_empty() || !by_alias.status.success());
    }
    // A copy under another folder makes the stem ambiguous: every candidate, non-zero exit.
    copy(&c.join("other"), &["loras/sd1_kohya_lora.safetensors"]);
    ok(&db, &["scan"]);
    let out = run(&db, &["show", "sd1_kohya_lora"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ambiguous"), "{err}");
    assert!(err.contains("other/sd1_kohya_lora.safetensors"), "{err}");
    let out = run(&db, &["show", "no_such_lora"]);
    assert!(!out.status.success());
}

#[test]
fn list_filters_sorts_and_searches() {
    let t = tempfile::tempdir().unwrap();
    let (_c, db) = collection(t.path());
    assert_eq!(names(&json(&db, &["list", "--json"])).len(), 4);
    assert_eq!(
        names(&json(&db, &["list", "--type", "checkpoint", "--json"])),
        ["sdxl_ldm"]
    );
    assert_eq!(
        names(&json(&db, &["list", "--type", "all", "--json"])).len(),
        5
    );
    assert_eq!(
        names(&json(&db, &["list", "--base", "sdxl", "--json"])),
        ["sdxl_loha"]
    );
    assert_eq!(
        names(&json(&db, &["list", "--kind", "locon", "--json"])),
        ["sd1_locon"]
    );
    let by_size = names(&json(&db, &["list", "--sort", "size", "--json"]));
    assert_eq!(by_size[0], "real_flux_kohya");
    // Trigger words and training tags (several fixtures share these).
    assert!(names(&json(&db, &["list", "--search", "mychar", "--json"]))
        .contains(&"sd1_kohya_lora".to_string()));
    assert_eq!(
        json(&db, &["list", "--search", "zzzunknownword", "--json"]),
        serde_json::json!([])
    );
    // Tags and notes are searchable too, and --tag filters.
    ok(&db, &["tag", "add", "sd1_locon", "watercolor"]);
    ok(&db, &["note", "sdxl_loha", "bought from a friend"]);
    assert_eq!(
        names(&json(&db, &["list", "--tag", "watercolor", "--json"])),
        ["sd1_locon"]
    );
    assert_eq!(
        names(&json(&db, &["list", "--search", "waterc", "--json"])),
        ["sd1_locon"]
    );
    assert_eq!(
        names(&json(&db, &["list", "--search", "friend", "--json"])),
        ["sdxl_loha"]
    );
    ok(&db, &["tag", "rm", "sd1_locon", "watercolor"]);
    assert_eq!(
        json(&db, &["list", "--tag", "watercolor", "--json"]),
        serde_json::json!([])
    );
    let no_preview = names(&json(&db, &["list", "--missing-preview", "--json"]));
    assert_eq!(no_preview.len(), 4);
    // Tables render for humans.
    let table = ok(&db, &["list"]);
    assert!(
        table.contains("sd1_locon") && table.contains("4 files"),
        "{table}"
    );
}

#[test]
fn sidecar_writes_a1111_fields_keeps_the_rest_and_reindexes() {
    let t = tempfile::tempdir().unwrap();
    let (c, db) = collection(t.path());
    let side = c.join("sd1_kohya_lora.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&side).unwrap()).unwrap();
    v["modelId"] = 1234.into();
    std::fs::write(&side, v.to_string()).unwrap();
    ok(
        &db,
        &[
            "sidecar",
            "sd1_kohya_lora",
            "--activation-text",
            "bluebird, feathers",
            "--preferred-weight",
            "0.65",
            "--negative-text",
            "lowres",
            "--sd-version",
            "SD1",
        ],
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&side).unwrap()).unwrap();
    assert_eq!(v["activation text"], "bluebird, feathers");
    assert_eq!(v["preferred weight"], 0.65);
    assert_eq!(v["negative text"], "lowres");
    assert_eq!(v["sd version"], "SD1");
    assert_eq!(v["modelId"], 1234);
    assert_eq!(
        v["description"],
        "loratool fixture: tiny SD1 kohya LoRA with random weights"
    );
    // Re-indexed: the new activation text is a trigger word and searchable.
    assert_eq!(
        names(&json(&db, &["list", "--search", "bluebird", "--json"])),
        ["sd1_kohya_lora"]
    );
    // A sidecar for a file that has none yet.
    ok(&db, &["sidecar", "sd1_locon", "--notes", "soft lines"]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.join("sd1_locon.json")).unwrap()).unwrap();
    assert_eq!(v, serde_json::json!({"notes": "soft lines"}));
    let bad = run(&db, &["sidecar", "sd1_locon", "--sd-version", "SD9"]);
    assert!(!bad.status.success());
}

#[test]
fn verify_reports_changed_truncated_and_missing_files() {
    let t = tempfile::tempdir().unwrap();
    let (c, db) = collection(t.path());
    let r = json(&db, &["verify", "--json", "--quiet"]);
    assert_eq!(r["issues"], serde_json::json!([]));
    assert_eq!(r["ok"], 5);

    let f = c.join("sd1_locon.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff; // same size, other content (bit rot)
    std::fs::write(&f, &bytes).unwrap();
    let g = c.join("sdxl_loha.safetensors");
    let bytes = std::fs::read(&g).unwrap();
    std::fs::write(&g, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(c.join("real_flux_kohya.safetensors")).unwrap();

    let out = run(&db, &["verify", "--json", "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut problems: Vec<(String, String)> = r["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let p = i["path"].as_str().unwrap();
            (
                Path::new(p)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                i["problem"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    problems.sort();
    assert_eq!(
        problems,
        [
            ("real_flux_kohya.safetensors".into(), "missing".into()),
            ("sd1_locon.safetensors".into(), "changed".into()),
            ("sdxl_loha.safetensors".into(), "truncated".into()),
        ]
    );
}

#[test]
fn export_roots_and_the_database_location() {
    let t = tempfile::tempdir().unwrap();
    let (c, db) = collection(t.path());
    let e = json(&db, &["export", "--json"]);
    assert_eq!(e["schema_version"], loratool::library::db::SCHEMA_VERSION);
    assert_eq!(e["files"].as_array().unwrap().len(), 5);
    assert!(e["files"][0]["metadata"].is_object());
    assert_eq!(
        e["roots"][0]["path"],
        std::fs::canonicalize(&c).unwrap().to_str().unwrap()
    );
    let roots = json(&db, &["roots", "--json"]);
    assert_eq!(roots[0]["files"], 5);

    // LORATOOL_DB on its own, and XDG_DATA_HOME.
    let env_db = t.path().join("env.db");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
        .args(["library", "roots", "--json"])
        .env("LORATOOL_DB", &env_db)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(env_db.exists());
    let xdg = t.path().join("xdg");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
        .args(["library", "roots"])
        .env_remove("LORATOOL_DB")
        .env("XDG_DATA_HOME", &xdg)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(xdg.join("loratool/library.db").exists());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, loratool::library::db::SCHEMA_VERSION);
}

#[test]
fn a1111_cache_hashes_are_used_for_unchanged_files() {
    let t = tempfile::tempdir().unwrap();
    let webui = t.path().join("webui");
    let c = webui.join("models/Lora");
    copy(&c, &["loras/sd1_locon.safetensors"]);
    let f = c.join("sd1_locon.safetensors");
    let real = loratool::tensors::hash::hash_file(&f, Some(data_start(&f))).unwrap();
    let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
    let mtime = mtime
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // Hashes A1111 would have written (made up, to see that they are taken as they are).
    let fake_sha = "1".repeat(64);
    let fake_addnet = "2".repeat(64);
    let cache = serde_json::json!({
        "hashes": {"lora/sd1_locon": {"mtime": mtime, "sha256": fake_sha}},
        "hashes-addnet": {"lora/sd1_locon": {"mtime": mtime, "sha256": fake_addnet}},
    });
    std::fs::write(webui.join("cache.json"), cache.to_string()).unwrap();
    let db = t.path().join("lib.db");
    let r = json(&db, &["add", c.to_str().unwrap(), "--json"]);
    assert_eq!(r["hashes_from_a1111_cache"], 1, "{r}");
    assert_eq!(r["bytes_read"], 0);
    let e = json(&db, &["show", "sd1_locon", "--json"]);
    assert_eq!(e["sha256"], fake_sha.as_str());
    assert_eq!(e["autov3"], "222222222222");
    assert_eq!(e["hash_source"], "a1111_cache");
    // A changed file is read.
    std::fs::remove_file(webui.join("cache.json")).unwrap();
    let bytes = std::fs::read(&f).unwrap();
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, &bytes).unwrap();
    let e2 = t.path().join("lib2.db");
    ok(&e2, &["add", c.to_str().unwrap()]);
    assert_eq!(
        json(&e2, &["show", "sd1_locon", "--json"])["sha256"],
        real.sha256.as_str()
    );
}

fn data_start(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap();
    8 + u64::from_le_bytes(b[..8].try_into().unwrap())
}
