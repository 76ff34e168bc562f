//! `library organize`: files move with all their sidecars, the index keeps ids, tags and notes,
//! `--dry-run` moves nothing, conflicts are skipped and reported, a second run is a no-op, and an
//! organize killed with SIGKILL followed by a scan leaves every file whole at one place.

mod library_support;

use library_support::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SIDECARS: &[&str] = &[".json", ".preview.png", ".civitai.info"];

fn add_sidecars(dir: &Path, stem: &str, creator: &str) {
    let info =
        format!(r#"{{"model": {{"name": "{stem}", "creator": {{"username": "{creator}"}}}}}}"#);
    for s in SIDECARS {
        let p = dir.join(format!("{stem}{s}"));
        if p.exists() {
            continue;
        }
        let body = match *s {
            ".civitai.info" => info.clone(),
            ".json" => r#"{"activation text": "x"}"#.to_string(),
            _ => "png".to_string(),
        };
        std::fs::write(p, body).unwrap();
    }
}

fn entry(db: &Path, name: &str) -> serde_json::Value {
    json(db, &["show", name, "--json"])
}

#[test]
fn organize_by_base_moves_each_file_with_its_sidecars() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    let stems = ["sd1_kohya_lora", "sdxl_kohya_lora", "real_flux_kohya"];
    copy(
        &c,
        &[
            "loras/sd1_kohya_lora.safetensors",
            "loras/sd1_kohya_lora.json",
            "loras/sdxl_kohya_lora.safetensors",
            "loras/real_flux_kohya.safetensors",
        ],
    );
    for s in stems {
        add_sidecars(&c, s, "someone");
    }
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    ok(&db, &["tag", "add", "sd1_kohya_lora", "fav", "style"]);
    ok(&db, &["note", "sdxl_kohya_lora", "hello"]);
    let before: Vec<serde_json::Value> = stems.iter().map(|s| entry(&db, s)).collect();
    let base = |i: usize| before[i]["base_model"].as_str().unwrap().to_string();
    assert_eq!(base(0), "sd1");
    assert_eq!(base(1), "sdxl");
    assert_eq!(base(2), "flux");
    let into = c.join("sorted");
    let into_s = into.to_str().unwrap();
    let dest = |i: usize, suffix: &str| into.join(base(i)).join(format!("{}{suffix}", stems[i]));

    // Dry run: every move printed, nothing moved.
    let plan = ok(
        &db,
        &["organize", "--by", "base", "--into", into_s, "--dry-run"],
    );
    for (i, stem) in stems.iter().enumerate() {
        for s in [".safetensors"].iter().chain(SIDECARS) {
            let line = format!(
                "{} -> {}",
                c.join(format!("{stem}{s}")).display(),
                dest(i, s).display()
            );
            assert!(plan.contains(&line), "{line} missing from\n{plan}");
        }
        assert!(c.join(format!("{stem}.safetensors")).exists());
    }
    assert!(plan.contains("dry run"), "{plan}");
    assert!(!into.exists(), "a dry run creates nothing");

    // A sidecar's destination exists: that file is skipped and reported, the others move.
    std::fs::create_dir_all(into.join("flux")).unwrap();
    let blocker = dest(2, ".preview.png");
    std::fs::write(&blocker, "someone else's").unwrap();
    let out = run(&db, &["organize", "--by", "base", "--into", into_s]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("not moved") && text.contains("exists; not overwritten"),
        "{text}"
    );
    assert_eq!(std::fs::read(&blocker).unwrap(), b"someone else's");
    for (i, stem) in stems.iter().enumerate().take(2) {
        for s in [".safetensors"].iter().chain(SIDECARS) {
            assert!(dest(i, s).is_file(), "{}", dest(i, s).display());
            assert!(!c.join(format!("{stem}{s}")).exists());
        }
    }
    for s in [".safetensors"].iter().chain(SIDECARS) {
        assert!(c.join(format!("real_flux_kohya{s}")).exists(), "{s} stayed");
    }

    // The index followed: same ids, tags and notes, new paths, sidecars at their new places.
    let sd1 = entry(&db, "sd1_kohya_lora");
    assert_eq!(sd1["id"], before[0]["id"]);
    assert_eq!(sd1["path"], dest(0, ".safetensors").to_str().unwrap());
    assert_eq!(sd1["tags"], serde_json::json!(["fav", "style"]));
    assert_eq!(entry(&db, "sdxl_kohya_lora")["note"], "hello");
    for s in sd1["sidecars"].as_array().unwrap() {
        assert!(Path::new(s["path"].as_str().unwrap()).starts_with(into.join("sd1")));
    }
    assert_eq!(sd1["sidecars"].as_array().unwrap().len(), 3);

    // Conflict gone: the last file moves; then a run has nothing to do.
    std::fs::remove_file(&blocker).unwrap();
    let text = ok(&db, &["organize", "--by", "base", "--into", into_s]);
    assert!(text.contains("1 files moved"), "{text}");
    assert!(dest(2, ".preview.png").is_file());
    let text = ok(&db, &["organize", "--by", "base", "--into", into_s]);
    assert!(
        text.contains("0 files moved") && text.contains("3 already in place"),
        "{text}"
    );
    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!((r["new"].clone(), r["moved"].clone()), (0.into(), 0.into()));
    assert_eq!(
        (r["missing"].clone(), r["unchanged"].clone()),
        (0.into(), 3.into())
    );
    assert_eq!(assert_consistent(&db), 3);
}

/// Where a generated LoRA and each of its sidecars are now: the folders holding them.
fn places(old: &Path, new: &Path, stem: &str) -> Vec<PathBuf> {
    let mut at = Vec::new();
    for s in [".safetensors"].iter().chain(SIDECARS) {
        let name = format!("{stem}{s}");
        let here: Vec<&Path> = [old, new]
            .into_iter()
            .filter(|d| d.join(&name).exists())
            .collect();
        assert_eq!(here.len(), 1, "{name} is at {here:?}");
        at.push(here[0].to_path_buf());
    }
    at
}

#[test]
fn an_organize_killed_midway_then_a_scan_leaves_every_file_whole() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    let n = 300;
    generate(&c, n);
    let old_dir = |i: usize| c.join(format!("d{}", i % 10));
    let creator = |i: usize| format!("user{}", i % 3);
    for i in 0..n {
        add_sidecars(&old_dir(i), &format!("lora_{i:05}"), &creator(i));
    }
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    ok(&db, &["tag", "add", "lora_00007", "keep"]);
    let into = c.join("by_creator");
    let mut child = library(&db)
        .args([
            "organize",
            "--by",
            "creator",
            "--into",
            into.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill after the first models reached their new place.
    let start = Instant::now();
    let count = || {
        (0..3)
            .map(|u| {
                std::fs::read_dir(into.join(format!("user{u}")))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .sum::<usize>()
    };
    while count() < 6 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = count();
    eprintln!("killed with {at_kill} of {} paths moved", 4 * n);

    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!(r["files"], n, "{r:#}");
    eprintln!(
        "the scan put {} interrupted moves together",
        r["interrupted_moves"]
    );
    assert_eq!(r["new"], 0, "{r:#}");
    assert_eq!(r["missing"], 0, "{r:#}");
    let mut moved = 0;
    for i in 0..n {
        let stem = format!("lora_{i:05}");
        let new_dir = into.join(creator(i));
        let at = places(&old_dir(i), &new_dir, &stem);
        assert!(at.iter().all(|d| *d == at[0]), "{stem} is split: {at:?}");
        moved += usize::from(at[0] == new_dir);
        let e = entry(&db, &stem);
        let want = at[0].join(format!("{stem}.safetensors"));
        assert_eq!(e["path"], want.to_str().unwrap(), "{stem}");
        assert_eq!(e["sidecars"].as_array().unwrap().len(), 3, "{stem}");
    }
    eprintln!("{moved} of {n} files had moved");
    assert_eq!(assert_consistent(&db), n);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let journal: i64 = conn
        .query_row("SELECT count(*) FROM moves", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, 0);
    assert_eq!(
        entry(&db, "lora_00007")["tags"],
        serde_json::json!(["keep"])
    );

    // The next organize finishes the job.
    ok(
        &db,
        &[
            "organize",
            "--by",
            "creator",
            "--into",
            into.to_str().unwrap(),
        ],
    );
    for i in 0..n {
        let at = places(&old_dir(i), &into.join(creator(i)), &format!("lora_{i:05}"));
        assert_eq!(at[0], into.join(creator(i)));
    }
    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!(r["unchanged"], n, "{r:#}");
    assert_eq!(assert_consistent(&db), n);
}
