//! `library similar` and `dupes --near` end to end: a LoRA and its resized copy rank first and
//! group together, unrelated ones stay apart, exact results are cached, the scan stores no sketch
//! and the similarity commands compute the missing ones (also for a migrated schema-1 index).

mod common;
mod library_support;

use common::write_random_lora;
use library_support::*;
use loratool::adapter::Adapter;
use loratool::ops::resize::{resize_lora, RankRule, ResizeOptions};
use loratool::tensors::Dtype;
use std::path::Path;

/// `src` (random, rank 16), `src_r8` (its resize to rank 8), `other` (unrelated, same layout),
/// and two fixtures (one SD1, one SDXL).
fn collection(t: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let c = t.join("c");
    let db = t.join("lib.db");
    copy(
        &c,
        &[
            "loras/sd1_kohya_lora.safetensors",
            "loras/sdxl_kohya_lora.safetensors",
        ],
    );
    let template = Adapter::open(&fixture("loras/sd1_kohya_lora.safetensors")).unwrap();
    write_random_lora(&c.join("src.safetensors"), &template, 16, 1, 0.75);
    write_random_lora(&c.join("other.safetensors"), &template, 8, 12, 0.75);
    let opts = ResizeOptions {
        rule: RankRule::Fixed(8),
        max_rank: None,
        dtype: Some(Dtype::F32),
        force: true,
        progress: Default::default(),
    };
    std::fs::create_dir_all(c.join("sub")).unwrap();
    resize_lora(
        &c.join("src.safetensors"),
        &c.join("sub/src_r8.safetensors"),
        &opts,
    )
    .unwrap();
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    (c, db)
}

fn cache_rows(db: &Path) -> Vec<(String, String, f64, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT addnet_a, addnet_b, cosine, computed_at FROM similarity ORDER BY 1, 2")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[test]
fn a_resized_copy_ranks_first_and_results_are_cached() {
    let t = tempfile::tempdir().unwrap();
    let (_c, db) = collection(t.path());
    let r = json(&db, &["similar", "src", "--json"]);
    let matches = r["matches"].as_array().unwrap();
    let stems: Vec<&str> = matches
        .iter()
        .map(|m| m["file"]["stem"].as_str().unwrap())
        .collect();
    assert_eq!(stems[0], "src_r8", "{r:#}");
    assert!(matches[0]["cosine"].as_f64().unwrap() > 0.95, "{r:#}");
    let other = matches
        .iter()
        .find(|m| m["file"]["stem"] == "other")
        .unwrap();
    assert!(other["cosine"].as_f64().unwrap().abs() < 0.2, "{r:#}");
    assert!(!stems.contains(&"sdxl_kohya_lora"), "another base model");
    assert_eq!(r["candidates"], 3);
    assert_eq!(r["computed"], 3);
    let rows = cache_rows(&db);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|(a, b, _, _)| a < b));

    // The second call computes nothing and leaves the cache as it was.
    let again = json(&db, &["similar", "src", "--json", "--top", "2"]);
    assert_eq!(again["computed"], 0);
    assert!(again["matches"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["cached"] == true));
    assert_eq!(again["matches"][0]["cosine"], r["matches"][0]["cosine"]);
    assert_eq!(cache_rows(&db), rows);

    // The table output names the match and its cosine.
    let text = ok(&db, &["similar", "src"]);
    assert!(
        text.contains("src_r8") && text.contains("0 computed"),
        "{text}"
    );
}

#[test]
fn dupes_near_groups_the_resized_copy_with_its_source() {
    let t = tempfile::tempdir().unwrap();
    let (_c, db) = collection(t.path());
    let r = json(&db, &["dupes", "--near", "--json"]);
    let groups = r["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{r:#}");
    let mut stems: Vec<&str> = groups[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["stem"].as_str().unwrap())
        .collect();
    stems.sort();
    assert_eq!(stems, ["src", "src_r8"]);
    assert!(groups[0]["pairs"][0]["cosine"].as_f64().unwrap() > 0.95);
    // 4 SD1 LoRAs: 6 estimates; the SDXL one is alone in its family.
    assert_eq!(r["estimates"], 6);
    let again = json(&db, &["dupes", "--near", "--json"]);
    assert_eq!(again["computed"], 0);
    let text = ok(&db, &["dupes", "--near", "--threshold", "0.5"]);
    assert!(text.contains("src_r8"), "{text}");
}

fn sketchless(db: &Path, stem: Option<&str>) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT count(*) FROM files WHERE type = 'lora' AND sketch IS NULL
         AND (?1 IS NULL OR stem = ?1)",
        [stem],
        |r| r.get(0),
    )
    .unwrap()
}

#[test]
fn the_scan_stores_no_sketch_and_similar_computes_them_once() {
    let t = tempfile::tempdir().unwrap();
    let (c, db) = collection(t.path());
    assert_eq!(sketchless(&db, None), 5, "the scan reads no factors");
    let r = json(&db, &["similar", "src", "--json"]);
    assert_eq!(r["matches"][0]["file"]["stem"], "src_r8");
    for stem in ["src", "src_r8", "other"] {
        assert_eq!(
            sketchless(&db, Some(stem)),
            0,
            "{stem}: sketched by similar"
        );
    }
    let r = json(&db, &["dupes", "--near", "--json"]);
    assert!(!r["groups"].as_array().unwrap().is_empty(), "{r:#}");
    assert_eq!(sketchless(&db, None), 0, "dupes --near sketches every LoRA");
    // An unchanged file keeps its sketch; one whose content changed loses it until the next use.
    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!(r["unchanged"], 5);
    assert_eq!(sketchless(&db, None), 0);
    let template = Adapter::open(&fixture("loras/sd1_kohya_lora.safetensors")).unwrap();
    std::fs::remove_file(c.join("other.safetensors")).unwrap();
    write_random_lora(&c.join("other.safetensors"), &template, 8, 99, 0.75);
    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!(r["changed"], 1, "{r:#}");
    assert_eq!(sketchless(&db, Some("other")), 1);
    assert_eq!(sketchless(&db, None), 1);
    let r = json(&db, &["similar", "src", "--json"]);
    assert_eq!(r["matches"][0]["file"]["stem"], "src_r8");
    assert_eq!(sketchless(&db, None), 0);
    assert_consistent(&db);
}

#[test]
fn a_schema_1_index_is_migrated_and_gets_its_sketches_on_first_use() {
    let t = tempfile::tempdir().unwrap();
    let (_c, db) = collection(t.path());
    // Turn the index back into schema version 1.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "ALTER TABLE files DROP COLUMN sketch;
             ALTER TABLE similarity DROP COLUMN energy_a;
             ALTER TABLE similarity DROP COLUMN energy_b;
             DROP TABLE moves;
             DROP TABLE civitai_models;
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let r = json(&db, &["scan", "--json", "--quiet"]);
    assert_eq!(
        r["unchanged"], 5,
        "a migrated index is not read again: {r:#}"
    );
    assert_eq!(r["bytes_read"], 0);
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, loratool::library::db::SCHEMA_VERSION);
    }
    assert_eq!(sketchless(&db, None), 5);
    let r = json(&db, &["similar", "src", "--json"]);
    assert_eq!(r["matches"][0]["file"]["stem"], "src_r8");
    assert_eq!(
        sketchless(&db, Some("src")),
        0,
        "sketches appear on first use"
    );
    assert_eq!(sketchless(&db, Some("src_r8")), 0);
    json(&db, &["dupes", "--near", "--json"]);
    assert_eq!(sketchless(&db, None), 0);
    assert_consistent(&db);
}
