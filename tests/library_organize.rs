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
    let into = t.path().join("c").join("by_creator");
    kill_organize_midway_then_scan(t.path(), &into);
}

/// The same across filesystems: a kill can also come while a copy is unfinished, or between the
/// copy's link and the unlink of the old name.
#[test]
fn an_organize_across_filesystems_killed_midway_then_a_scan_leaves_every_file_whole() {
    let t = tempdir_on_disk();
    let Some(shm) = folder_on_another_filesystem(t.path()) else {
        return;
    };
    let into = std::fs::canonicalize(shm.path())
        .unwrap()
        .join("by_creator");
    kill_organize_midway_then_scan(t.path(), &into);
    let temps: Vec<PathBuf> = [t.path(), into.as_path()]
        .iter()
        .flat_map(|d| files_under(d))
        .filter(|p| p.to_string_lossy().contains(".loratool-"))
        .collect();
    assert!(temps.is_empty(), "temp copies left: {temps:?}");
}

/// Generates a collection in `dir`/c, starts an organize into `into`, kills it (SIGKILL) once some
/// files moved, and checks that a scan leaves each file whole at one place and that the next
/// organize finishes.
fn kill_organize_midway_then_scan(dir: &Path, into: &Path) {
    let c = dir.join("c");
    let db = dir.join("lib.db");
    let n = 300;
    generate(&c, n);
    let old_dir = |i: usize| c.join(format!("d{}", i % 10));
    let creator = |i: usize| format!("user{}", i % 3);
    for i in 0..n {
        add_sidecars(&old_dir(i), &format!("lora_{i:05}"), &creator(i));
    }
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    ok(&db, &["tag", "add", "lora_00007", "keep"]);
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

/// A fresh folder under /dev/shm when that is another filesystem than `near` (removed when
/// dropped, a failed assertion included); `None`, said on stderr, where there is none.
fn folder_on_another_filesystem(near: &Path) -> Option<tempfile::TempDir> {
    use std::os::unix::fs::MetadataExt;
    let shm = Path::new("/dev/shm");
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
    match (dev(shm), dev(near)) {
        (Ok(a), Ok(b)) if a != b => Some(
            tempfile::Builder::new()
                .prefix("loratool-organize-")
                .tempdir_in(shm)
                .expect("a folder in /dev/shm"),
        ),
        (Ok(_), Ok(_)) => {
            eprintln!(
                "SKIPPED: /dev/shm is on the same filesystem as {}; no cross-filesystem move to test",
                near.display()
            );
            None
        }
        _ => {
            eprintln!("SKIPPED: no /dev/shm on this machine; no cross-filesystem move to test");
            None
        }
    }
}

/// A tempdir on the disk the build is on (the tests' own temp folder under target/).
fn tempdir_on_disk() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_type().is_dir())
        .map(|e| e.path().strip_prefix(dir).unwrap().to_path_buf())
        .collect();
    v.sort();
    v
}

/// What a moved file must keep: bytes, mtime (to the nanosecond), permissions.
fn kept(p: &Path) -> (Vec<u8>, std::time::SystemTime, u32) {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(p).unwrap();
    (
        std::fs::read(p).unwrap(),
        m.modified().unwrap(),
        m.permissions().mode(),
    )
}

#[test]
fn organize_into_another_filesystem_copies_verifies_then_removes() {
    let t = tempdir_on_disk();
    let Some(shm) = folder_on_another_filesystem(t.path()) else {
        return;
    };
    let into = std::fs::canonicalize(shm.path()).unwrap().join("sorted");
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
    // Old, odd mtimes and one odd mode: a copy that took "now" or the umask would show.
    for (i, p) in files_under(&c).iter().enumerate() {
        use std::os::unix::fs::PermissionsExt;
        let f = std::fs::File::options()
            .write(true)
            .open(c.join(p))
            .unwrap();
        let secs = 1_500_000_000 + 86_400 * i as u64;
        f.set_modified(std::time::UNIX_EPOCH + Duration::new(secs, 987_654_321))
            .unwrap();
        if i == 0 {
            f.set_permissions(std::fs::Permissions::from_mode(0o640))
                .unwrap();
        }
    }
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    ok(&db, &["tag", "add", "sd1_kohya_lora", "fav", "style"]);
    ok(&db, &["note", "sdxl_kohya_lora", "hello"]);
    let before: Vec<serde_json::Value> = stems.iter().map(|s| entry(&db, s)).collect();
    let originals: Vec<(PathBuf, _)> = files_under(&c)
        .into_iter()
        .map(|p| (p.clone(), kept(&c.join(&p))))
        .collect();
    assert_eq!(originals.len(), 12);

    let text = ok(
        &db,
        &["organize", "--by", "base", "--into", into.to_str().unwrap()],
    );
    assert!(text.contains("3 files moved"), "{text}");

    // Each file and sidecar: at its new place with its bytes, mtime and mode; gone from the old.
    for (i, stem) in stems.iter().enumerate() {
        let base = before[i]["base_model"].as_str().unwrap();
        for (name, want) in originals.iter().filter(|(p, _)| {
            p.to_str()
                .unwrap()
                .strip_prefix(stem)
                .is_some_and(|rest| rest.starts_with('.'))
        }) {
            let new = into.join(base).join(name);
            assert!(new.is_file(), "{} missing", new.display());
            assert!(
                kept(&new) == *want,
                "{} differs from its original",
                new.display()
            );
            assert!(!c.join(name).exists(), "{} still there", name.display());
        }
    }
    // Nothing else in either place: no temp copy, no leftover.
    assert!(files_under(&c).is_empty(), "{:?}", files_under(&c));
    let mut want: Vec<PathBuf> = originals.iter().map(|(p, _)| p.clone()).collect();
    want.sort();
    let mut got: Vec<PathBuf> = files_under(&into)
        .into_iter()
        .map(|p| p.file_name().unwrap().into())
        .collect();
    got.sort();
    assert_eq!(got, want);

    // The index followed: ids, tags, note kept; paths and sidecar paths on the other filesystem.
    for (i, stem) in stems.iter().enumerate() {
        let e = entry(&db, stem);
        let base = before[i]["base_model"].as_str().unwrap();
        assert_eq!(e["id"], before[i]["id"]);
        let want = into.join(base).join(format!("{stem}.safetensors"));
        assert_eq!(e["path"], want.to_str().unwrap());
        let sidecars = e["sidecars"].as_array().unwrap();
        assert_eq!(sidecars.len(), 3, "{stem}");
        for s in sidecars {
            assert!(Path::new(s["path"].as_str().unwrap()).starts_with(into.join(base)));
        }
    }
    assert_eq!(
        entry(&db, "sd1_kohya_lora")["tags"],
        serde_json::json!(["fav", "style"])
    );
    assert_eq!(entry(&db, "sdxl_kohya_lora")["note"], "hello");

    // Same size and mtime: the rescan reads nothing.
    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!(r["files"], 3, "{r:#}");
    assert_eq!(r["unchanged"], 3, "{r:#}");
    for k in ["new", "changed", "moved", "missing", "bytes_read"] {
        assert_eq!(r[k], 0, "{k}: {r:#}");
    }
    assert_eq!(assert_consistent(&db), 3);
    let text = ok(
        &db,
        &["organize", "--by", "base", "--into", into.to_str().unwrap()],
    );
    assert!(text.contains("3 already in place"), "{text}");
}

/// The states a cross-filesystem move can be killed in, made on disk with their journal rows:
/// a hidden temp copy left in the new folder (model not moved: undone, temp removed), a complete
/// copy at the new name with the old name still there (same bytes: finished forward), and a new
/// name holding other bytes (left alone and reported).
#[test]
fn a_killed_cross_filesystem_move_is_finished_or_undone() {
    let t = tempdir_on_disk();
    let Some(shm) = folder_on_another_filesystem(t.path()) else {
        return;
    };
    let into = std::fs::canonicalize(shm.path()).unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    let stems = ["sd1_kohya_lora", "sdxl_kohya_lora", "real_flux_kohya"];
    copy(
        &c,
        &[
            "loras/sd1_kohya_lora.safetensors",
            "loras/sdxl_kohya_lora.safetensors",
            "loras/real_flux_kohya.safetensors",
        ],
    );
    for s in stems {
        add_sidecars(&c, s, "someone");
    }
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    // organize adds DIR as a root before it moves anything.
    ok(&db, &["add", into.to_str().unwrap(), "--quiet"]);
    ok(&db, &["tag", "add", "sdxl_kohya_lora", "keep"]);
    let ids: Vec<i64> = stems
        .iter()
        .map(|s| entry(&db, s)["id"].as_i64().unwrap())
        .collect();
    let group = into.join("g");
    std::fs::create_dir_all(&group).unwrap();
    let suffixes: Vec<&str> = [".safetensors"]
        .into_iter()
        .chain(SIDECARS.to_vec())
        .collect();
    let old = |i: usize, s: &str| c.join(format!("{}{s}", stems[i]));
    let new = |i: usize, s: &str| group.join(format!("{}{s}", stems[i]));
    let conn = rusqlite::Connection::open(&db).unwrap();
    for (i, id) in ids.iter().enumerate() {
        for s in &suffixes {
            conn.execute(
                "INSERT INTO moves (file_id, old_path, new_path, is_model, planned_at)
                 VALUES (?1, ?2, ?3, ?4, 0)",
                rusqlite::params![
                    id,
                    old(i, s).to_str().unwrap().as_bytes(),
                    new(i, s).to_str().unwrap().as_bytes(),
                    *s == ".safetensors"
                ],
            )
            .unwrap();
        }
    }
    drop(conn);
    let bytes = |p: &Path| std::fs::read(p).unwrap();

    // 0: one sidecar moved, the model's copy unfinished (a dead process's hidden temp).
    let moved_sidecar = bytes(&old(0, ".json"));
    std::fs::write(new(0, ".json"), &moved_sidecar).unwrap();
    std::fs::remove_file(old(0, ".json")).unwrap();
    let temp = group.join(format!(
        ".{}.safetensors.loratool-{}-0.tmp",
        stems[0],
        i32::MAX
    ));
    std::fs::write(&temp, &bytes(&old(0, ".safetensors"))[..1000]).unwrap();
    // 1: sidecars moved, the model copied and linked, its old name not yet removed.
    for s in SIDECARS {
        std::fs::copy(old(1, s), new(1, s)).unwrap();
        std::fs::remove_file(old(1, s)).unwrap();
    }
    let model1 = bytes(&old(1, ".safetensors"));
    std::fs::write(new(1, ".safetensors"), &model1).unwrap();
    // 2: the new name holds other bytes of the same length.
    let mut other = bytes(&old(2, ".safetensors"));
    let last = other.len() - 1;
    other[last] ^= 0xff;
    std::fs::write(new(2, ".safetensors"), &other).unwrap();

    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!(r["interrupted_moves"], 3, "{r:#}");
    let problems = r["problems"].to_string();
    assert!(
        problems.contains("both exist; left as they are")
            && problems.contains(&format!("{}.safetensors", stems[2])),
        "{r:#}"
    );
    assert_eq!(r["problems"].as_array().unwrap().len(), 1, "{r:#}");

    // 0 is back at its old place, whole, and the temp copy is gone.
    assert!(!temp.exists(), "the temp copy was left");
    for s in &suffixes {
        assert!(old(0, s).is_file() && !new(0, s).exists(), "{s}");
    }
    assert_eq!(bytes(&old(0, ".json")), moved_sidecar);
    assert_eq!(
        entry(&db, stems[0])["path"],
        old(0, ".safetensors").to_str().unwrap()
    );
    // 1 is at its new place, once; its entry (tag kept) says so.
    for s in &suffixes {
        assert!(new(1, s).is_file() && !old(1, s).exists(), "{s}");
    }
    assert_eq!(bytes(&new(1, ".safetensors")), model1);
    let e = entry(&db, stems[1]);
    assert_eq!(e["id"], ids[1]);
    assert_eq!(e["path"], new(1, ".safetensors").to_str().unwrap());
    assert_eq!(e["tags"], serde_json::json!(["keep"]));
    assert_eq!(e["sidecars"].as_array().unwrap().len(), 3);
    // 2: both names kept as they were; the entry stays at the old place with its sidecars.
    assert_eq!(bytes(&new(2, ".safetensors")), other);
    assert!(old(2, ".safetensors").is_file());
    // (Asked by path: the other bytes at the new name were indexed too, under the same stem.)
    let e = entry(&db, old(2, ".safetensors").to_str().unwrap());
    assert_eq!(e["id"], ids[2]);
    assert_eq!(e["sidecars"].as_array().unwrap().len(), 3);
    for s in SIDECARS {
        assert!(old(2, s).is_file() && !new(2, s).exists(), "{s}");
    }

    let conn = rusqlite::Connection::open(&db).unwrap();
    let journal: i64 = conn
        .query_row("SELECT count(*) FROM moves", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, 0);
    // The scan indexed the other bytes at 2's new name as a file of their own.
    assert_eq!(r["files"], 4, "{r:#}");
    assert_eq!(assert_consistent(&db), 4);
}
