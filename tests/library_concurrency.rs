//! Two scans at once, and a scan killed with SIGKILL: the index stays consistent, each file once.

mod library_support;

use library_support::*;
use std::time::{Duration, Instant};

#[test]
fn two_processes_scanning_at_once_both_succeed() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    generate(&c, 300);
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    // Forget everything but the root, then let two scans race over the whole collection.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("DELETE FROM files; DELETE FROM files_fts;")
            .unwrap();
    }
    let a = library(&db).args(["scan", "--quiet"]).spawn().unwrap();
    let b = library(&db).args(["scan", "--quiet"]).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    assert_eq!(assert_consistent(&db), 300);
    let r = json(&db, &["scan", "--json"]);
    assert_eq!(r["unchanged"], 300);
}

#[test]
fn a_scan_killed_halfway_then_a_rescan_ends_consistent() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    let n = 1000;
    generate(&c, n);
    let root = c.to_str().unwrap();
    let mut child = library(&db)
        .args(["add", root, "--quiet"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the first batch is committed.
    let start = Instant::now();
    let mut at_kill = 0;
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(conn) = rusqlite::Connection::open(&db) {
            let count: rusqlite::Result<i64> =
                conn.query_row("SELECT count(*) FROM files", [], |r| r.get(0));
            if let Ok(k) = count {
                if k > 0 {
                    at_kill = k;
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    eprintln!("killed with {at_kill} of {n} files committed");
    assert!(at_kill > 0, "the scan committed nothing within a minute");
    assert!(assert_consistent(&db) <= n);
    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!(r["files"], n);
    assert_eq!(assert_consistent(&db), n);
    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!(r["unchanged"], n);
}
