//! `library gallery`: the page on an empty and on a tricky library (non-ASCII names, metadata
//! that looks like HTML), thumbnails (size, A1111's preview order, reuse, removal), bad inputs.
//! The page in a real browser: tests/library_gallery_browser.rs.

mod library_support;

use library_support::*;
use std::path::Path;

fn gallery(db: &Path, out: &Path) -> serde_json::Value {
    json(db, &["gallery", "-o", out.to_str().unwrap(), "--json"])
}

fn page(out: &Path) -> String {
    std::fs::read_to_string(out.join("index.html")).unwrap()
}

fn cards(out: &Path) -> Vec<serde_json::Value> {
    gallery_data(&page(out))["loras"]
        .as_array()
        .unwrap()
        .clone()
}

fn card<'a>(cards: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    cards
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no card {name}: {cards:?}"))
}

#[test]
fn an_empty_library_gives_a_page_saying_so() {
    let t = tempfile::tempdir().unwrap();
    let db = t.path().join("lib.db");
    let out = t.path().join("site");
    let r = gallery(&db, &out);
    assert_eq!(r["loras"], 0);
    assert_eq!(r["thumbnails_written"], 0);
    assert_eq!(
        r["output"].as_str().unwrap(),
        out.join("index.html").to_str().unwrap()
    );
    let html = page(&out);
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("No LoRAs in the index yet"), "{html}");
    assert_eq!(gallery_data(&html)["loras"], serde_json::json!([]));
    assert!(out.join("thumbs").is_dir());
    assert_eq!(std::fs::read_dir(out.join("thumbs")).unwrap().count(), 0);
    // No external asset: nothing is loaded from another host.
    for needle in ["http://", "https://", "src=\"//"] {
        assert!(!html.contains(needle), "{needle}");
    }
}

#[test]
fn non_ascii_names_round_trip_and_html_looking_metadata_stays_text() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    let jp = "日本語スタイル_🎨";
    let payload = "</script><script>window.__pwned=1</script><!--";
    let img = "<img src=x onerror=window.__pwned=2>";
    lora_named(
        &c,
        "loras/sd1_kohya_lora.safetensors",
        jp,
        &[
            ("ss_output_name", "絵柄 ✨ café"),
            ("ss_training_comment", payload),
            ("line_separators", "a\u{2028}b\u{2029}c & d"),
        ],
    );
    // The fixture's alias is `sd1_locon`; a second LoRA with that alias makes it ambiguous.
    lora_named(&c, "loras/sd1_locon.safetensors", img, &[]);
    lora_named(
        &c,
        "loras/sd1_loha.safetensors",
        "twin",
        &[("ss_output_name", "sd1_locon")],
    );
    std::fs::write(
        c.join(format!("{jp}.json")),
        r#"{"activation text": "<b>bold</b> & ゆめ", "preferred weight": 0.8, "notes": "</script>"}"#,
    )
    .unwrap();
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    ok(&db, &["tag", "add", img, "<i>tag</i>"]);
    let out = t.path().join("site");
    let r = gallery(&db, &out);
    assert_eq!(r["loras"], 3);
    assert_eq!(r["missing_previews"], 3);

    let html = page(&out);
    // Nothing from the data appears as markup: only the template's two script elements close.
    assert_eq!(html.matches("</script>").count(), 2, "{html}");
    for raw in [
        "<script>window",
        "<img src=x",
        "<b>bold",
        "<i>tag",
        "\u{2028}",
    ] {
        assert!(!html.contains(raw), "{raw} appears unescaped");
    }
    let cards = cards(&out);
    let a = card(&cards, jp);
    assert_eq!(a["alias"], "絵柄 ✨ café");
    assert_eq!(a["file"], format!("{jp}.safetensors"));
    assert_eq!(a["metadata"]["ss_training_comment"], payload);
    assert_eq!(a["metadata"]["line_separators"], "a\u{2028}b\u{2029}c & d");
    assert_eq!(a["user"]["notes"], "</script>");
    // A1111's click: the alias, the preferred weight, then the activation text.
    assert_eq!(a["prompt"], "<lora:絵柄 ✨ café:0.8> <b>bold</b> & ゆめ");
    assert_eq!(a["base"], "sd1");
    assert!(a["sha256"].as_str().unwrap().len() == 64);
    assert!(a["autov3"].as_str().is_some());
    let b = card(&cards, img);
    assert_eq!(b["tags"], serde_json::json!(["<i>tag</i>"]));
    assert_eq!(b["kind"], "locon");
    // An alias two LoRAs share is one A1111 forbids: the stem, at the default multiplier.
    assert_eq!(b["alias"], "sd1_locon");
    assert_eq!(b["prompt"], format!("<lora:{img}:1>"));
    assert_eq!(card(&cards, "twin")["prompt"], "<lora:twin:1>");
}

#[test]
fn thumbnails_are_small_follow_a1111s_order_and_are_reused() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    lora_named(&c, "loras/sd1_kohya_lora.safetensors", "tall", &[]);
    lora_named(&c, "loras/sdxl_loha.safetensors", "wide", &[]);
    lora_named(&c, "loras/sd1_locon.safetensors", "tiny", &[]);
    lora_named(&c, "loras/sd1_loha.safetensors", "both", &[]);
    lora_named(&c, "loras/sd1_lokr_full.safetensors", "none", &[]);
    write_image(&c.join("tall.png"), 600, 900, [200, 40, 40]);
    write_image(&c.join("wide.preview.jpg"), 700, 350, [40, 200, 40]);
    write_image(&c.join("tiny.webp"), 64, 48, [40, 40, 200]);
    // A1111 takes `<stem>.png` before `<stem>.preview.png`.
    write_image(&c.join("both.png"), 300, 300, [250, 250, 0]);
    write_image(&c.join("both.preview.png"), 300, 300, [0, 0, 250]);
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    let out = t.path().join("site");

    let r = gallery(&db, &out);
    assert_eq!(r["loras"], 5);
    assert_eq!(r["thumbnails_written"], 4);
    assert_eq!(r["thumbnails_reused"], 0);
    assert_eq!(r["missing_previews"], 1);
    let cards = cards(&out);
    let dims = |name: &str| {
        let thumb = card(&cards, name)["thumb"].as_str().unwrap().to_string();
        assert!(
            thumb.starts_with("thumbs/") && thumb.ends_with(".jpg"),
            "{thumb}"
        );
        let img = image::open(out.join(&thumb)).unwrap().to_rgb8();
        (
            img.width(),
            img.height(),
            img.get_pixel(img.width() / 2, img.height() / 2).0,
        )
    };
    let (w, h, _) = dims("tall");
    assert_eq!((w.max(h), h), (256, 256));
    assert!((170..=171).contains(&w), "{w}");
    let (w, h, _) = dims("wide");
    assert_eq!((w, h), (256, 128));
    let (w, h, _) = dims("tiny");
    assert_eq!((w, h), (64, 48), "never scaled up");
    let (_, _, px) = dims("both");
    assert!(
        px[0] > 200 && px[2] < 60,
        "both.png, not both.preview.png: {px:?}"
    );
    assert!(card(&cards, "none")["thumb"].is_null());
    assert_eq!(card(&cards, "both")["preview"], "both.png");
    assert!(card(&cards, "wide")["sidecars"]
        .as_array()
        .unwrap()
        .contains(&"wide.preview.jpg".into()));

    // A second run reads no preview again and rewrites no thumbnail.
    let thumbs = out.join("thumbs");
    let before: Vec<_> = std::fs::read_dir(&thumbs)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), e.metadata().unwrap().modified().unwrap())
        })
        .collect();
    let r = gallery(&db, &out);
    assert_eq!(r["thumbnails_written"], 0);
    assert_eq!(r["thumbnails_reused"], 4);
    for (name, mtime) in &before {
        let now = std::fs::metadata(thumbs.join(name))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(&now, mtime, "{name:?} rewritten");
    }

    // A changed preview gets a new thumbnail once the index has seen it; the old one goes.
    write_image(&c.join("tall.png"), 512, 512, [10, 10, 10]);
    ok(&db, &["scan", "--quiet"]);
    let r = gallery(&db, &out);
    assert_eq!(r["thumbnails_written"], 1);
    assert_eq!(r["thumbnails_reused"], 3);
    assert_eq!(r["thumbnails_removed"], 1);
    assert_eq!(std::fs::read_dir(&thumbs).unwrap().count(), 4);
    // Files that are not thumbnails of ours are left alone.
    std::fs::write(thumbs.join("mine.txt"), b"x").unwrap();
    gallery(&db, &out);
    assert!(thumbs.join("mine.txt").exists());
}

#[test]
fn bad_inputs_are_one_line_errors_or_notes() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    lora_named(&c, "loras/sd1_kohya_lora.safetensors", "good", &[]);
    lora_named(&c, "loras/sd1_locon.safetensors", "broken", &[]);
    write_image(&c.join("good.png"), 32, 32, [1, 2, 3]);
    std::fs::write(c.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);

    // A corrupt preview: a note naming it, a placeholder, exit 0.
    let out = t.path().join("site");
    let r = gallery(&db, &out);
    assert_eq!(r["thumbnails_written"], 1);
    assert_eq!(r["unreadable_previews"], 1);
    let note = &r["notes"][0];
    assert!(
        note["path"].as_str().unwrap().ends_with("broken.png"),
        "{r}"
    );
    let cards = cards(&out);
    let b = card(&cards, "broken");
    assert!(b["thumb"].is_null());
    assert!(
        b["preview_problem"].as_str().unwrap().contains("image"),
        "{b}"
    );
    let text = run(&db, &["gallery", "-o", out.to_str().unwrap()]);
    assert!(text.status.success());
    let err = String::from_utf8_lossy(&text.stderr);
    assert!(err.contains("broken.png"), "{err}");

    let fails = |out: &Path, extra: &[&str], want: &str| {
        let mut args = vec!["gallery", "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = run(&db, &args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(want), "{err} should name {want}");
    };
    // DIR is a file; DIR lies under a file.
    let file = t.path().join("plain.txt");
    std::fs::write(&file, b"x").unwrap();
    fails(&file, &[], file.to_str().unwrap());
    fails(&file.join("sub"), &[], file.to_str().unwrap());
    // thumbs is a file.
    let odd = t.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::write(odd.join("thumbs"), b"x").unwrap();
    fails(&odd, &[], odd.join("thumbs").to_str().unwrap());
    // An index.html loratool did not write is kept unless --force.
    let foreign = t.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("index.html"), b"<p>my own page</p>").unwrap();
    fails(&foreign, &[], foreign.join("index.html").to_str().unwrap());
    assert_eq!(
        std::fs::read(foreign.join("index.html")).unwrap(),
        b"<p>my own page</p>"
    );
    assert!(
        !foreign.join("thumbs").exists(),
        "nothing written before the refusal"
    );
    ok(
        &db,
        &[
            "gallery",
            "-o",
            foreign.to_str().unwrap(),
            "--force",
            "--quiet",
        ],
    );
    assert!(page(&foreign).contains("loratool library gallery"));
    // No temp files are left beside the outputs.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["index.html", "thumbs"]);
}

#[test]
fn a_non_utf8_file_name_still_gets_its_preview() {
    use std::os::unix::ffi::OsStrExt;
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    let made = lora_named(&c, "loras/sd1_kohya_lora.safetensors", "latin1", &[]);
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let model = c.join(name).with_extension("safetensors");
    std::fs::rename(&made, &model).unwrap();
    write_image(&c.join(name).with_extension("png"), 40, 30, [9, 9, 9]);
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    let out = t.path().join("site");
    let r = gallery(&db, &out);
    assert_eq!(r["thumbnails_written"], 1, "{r}");
    let cards = cards(&out);
    assert_eq!(cards[0]["name"], "caf\u{fffd}");
    assert!(cards[0]["thumb"].as_str().is_some());
}
