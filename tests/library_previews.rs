//! `library previews` over a small generated collection: LoRAs rendered with their sidecar's
//! trigger words and preferred weight exactly as `preview` renders the same prompt, a family with
//! no checkpoint skipped, a broken file and a LoRA that cannot be applied reported without
//! stopping the run, existing previews kept, the index told, the checkpoint loaded once, and a
//! run killed halfway resumed by running it again.

mod common;
mod library_support;

use library_support::{copy, fixture, json, ok, run};
use loratool::preview::infotext::parse_generation_parameters;
use loratool::preview::png::read_parameters;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The tiny SD1 checkpoint with CLIP's full vocabulary, outside the collection.
fn tiny_model(t: &Path) -> PathBuf {
    let model = t.join("models").join("tiny_sd1.safetensors");
    std::fs::create_dir_all(model.parent().unwrap()).unwrap();
    common::full_vocab_sd1(&model, None);
    model
}

fn previews_args<'a>(model: &'a str, config: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "previews",
        "--model-for",
        model,
        "--config",
        config,
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--sampler",
        "dpm++2m",
        "--negative",
        "blurry",
        "--seed",
        "5",
    ];
    args.extend_from_slice(extra);
    args
}

fn pixels(png_path: &Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

fn outcome<'v>(report: &'v Value, stem: &str) -> &'v Value {
    report["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| {
            Path::new(o["path"].as_str().unwrap())
                .file_stem()
                .is_some_and(|s| s == stem)
        })
        .unwrap_or_else(|| panic!("no outcome for {stem}: {report}"))
}

#[test]
fn a_collection_gets_previews_as_preview_would_render_them() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    copy(
        &c,
        &[
            "loras/sd1_kohya_lora.safetensors",
            "loras/sd1_locon.safetensors",
            "loras/sd1_loha.safetensors",
            "loras/sd1_lokr_full.safetensors",
            "loras/real_sdxl_kohya.safetensors",
        ],
    );
    // Trigger words, preferred weight and negative text from A1111's sidecar.
    std::fs::write(
        c.join("sd1_kohya_lora.json"),
        r#"{"activation text": "foxy style", "preferred weight": 0.7, "negative text": "ugly"}"#,
    )
    .unwrap();
    // A downloaded preview under another A1111 name, and one of loratool's own.
    std::fs::write(c.join("sd1_loha.png"), b"not really a png").unwrap();
    std::fs::write(c.join("sd1_lokr_full.preview.png"), b"keep me").unwrap();
    common::write_lora_with_a_nan(&c.join("poisoned.safetensors"));
    std::fs::write(
        c.join("broken.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{oops",
    )
    .unwrap();
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);

    let model_for = format!("sd1={}", model.display());
    let config = fixture("models/sd1_diffusers");
    let config = config.to_str().unwrap();
    let out = run(&db, &previews_args(&model_for, config, &["--json"]));
    assert_eq!(out.status.code(), Some(1), "a LoRA failed: exit 1");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["model_loads"], 1,
        "one load for every sd1 LoRA: {report}"
    );
    let status = |stem: &str| {
        outcome(&report, stem)["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let reason = |stem: &str| {
        outcome(&report, stem)["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for stem in ["sd1_kohya_lora", "sd1_locon", "sd1_loha"] {
        assert_eq!(status(stem), "rendered", "{report}");
        assert!(c.join(format!("{stem}.preview.png")).is_file());
    }
    assert_eq!(status("sd1_lokr_full"), "skipped");
    assert!(reason("sd1_lokr_full").contains("--force"), "{report}");
    assert_eq!(
        std::fs::read(c.join("sd1_lokr_full.preview.png")).unwrap(),
        b"keep me"
    );
    assert_eq!(status("real_sdxl_kohya"), "skipped");
    assert!(
        reason("real_sdxl_kohya").contains("--model-for sdxl=PATH"),
        "{report}"
    );
    assert_eq!(status("poisoned"), "failed");
    assert!(
        reason("poisoned").contains("poisoned.safetensors"),
        "{report}"
    );
    assert_eq!(status("broken"), "skipped");
    assert!(reason("broken").starts_with("unreadable"), "{report}");
    assert_eq!(report["rendered"], 3);
    assert_eq!(report["failed"], 1);

    // The LoRA's preview is what `preview` renders for the same prompt, infotext included.
    let kohya = outcome(&report, "sd1_kohya_lora");
    assert_eq!(kohya["prompt"], "foxy style <lora:sd1_kohya_lora:0.7>");
    let by_hand = t.path().join("by_hand.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
        .args(["preview", "--model"])
        .arg(&model)
        .args([
            "--config",
            config,
            "--prompt",
            "foxy style <lora:sd1_kohya_lora:0.7>",
        ])
        .args(["--negative", "blurry, ugly", "--lora-dir"])
        .arg(&c)
        .args(["--steps", "2", "--width", "64", "--height", "64"])
        .args(["--sampler", "dpm++2m", "--seed", "5", "--db"])
        .arg(&db)
        .arg("-o")
        .arg(&by_hand)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written = c.join("sd1_kohya_lora.preview.png");
    assert!(pixels(&written) == pixels(&by_hand));
    let text = read_parameters(&written).unwrap().unwrap().text;
    assert_eq!(text, read_parameters(&by_hand).unwrap().unwrap().text);
    assert_eq!(
        parse_generation_parameters(&text).get("Lora hashes"),
        parse_generation_parameters(&read_parameters(&by_hand).unwrap().unwrap().text)
            .get("Lora hashes")
    );

    // The index knows of the new previews, and of the render's parameters.
    let shown = json(&db, &["show", "sd1_locon", "--json"]);
    assert_eq!(shown["has_preview"], true, "{shown}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (rendered, parameters): (i64, String) = conn
        .query_row(
            "SELECT p.rendered, p.parameters FROM previews p JOIN files f ON f.id = p.file_id
             WHERE f.stem = 'sd1_kohya_lora'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rendered, 1);
    assert_eq!(parameters, text);

    // --missing: every sd1 LoRA now has a preview; nothing is rendered and nothing rewritten.
    let before = std::fs::metadata(&written).unwrap().modified().unwrap();
    let again = run(
        &db,
        &previews_args(&model_for, config, &["--json", "--missing"]),
    );
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["rendered"], 0, "{again}");
    assert_eq!(outcome(&again, "sd1_loha")["reason"], "has a preview");
    assert_eq!(
        std::fs::metadata(&written).unwrap().modified().unwrap(),
        before
    );
    // --force replaces loratool's own preview name, never the downloaded one.
    let forced = run(
        &db,
        &previews_args(&model_for, config, &["--json", "--force", "--base", "sd1"]),
    );
    let forced: Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_eq!(outcome(&forced, "sd1_lokr_full")["status"], "rendered");
    assert_eq!(
        std::fs::read(c.join("sd1_loha.png")).unwrap(),
        b"not really a png"
    );
}

#[test]
fn bad_model_flags_are_one_line_errors() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let db = t.path().join("lib.db");
    copy(&t.path().join("c"), &["loras/sd1_locon.safetensors"]);
    ok(
        &db,
        &["add", t.path().join("c").to_str().unwrap(), "--quiet"],
    );
    let config = fixture("models/sd1_diffusers");
    for (spec, expected) in [
        (
            format!("sdxl={}", model.display()),
            "an sd1 checkpoint, given for sdxl LoRAs",
        ),
        ("sd1".to_string(), "BASE=PATH"),
        (
            format!("sd1={}", t.path().join("nope.safetensors").display()),
            "nope.safetensors",
        ),
    ] {
        let out = run(&db, &previews_args(&spec, config.to_str().unwrap(), &[]));
        assert_eq!(out.status.code(), Some(1), "{spec}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{spec}: {err}");
    }
}

#[test]
fn a_killed_run_is_resumed_by_running_it_again() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    let loras = [
        "sd1_kohya_lora",
        "sd1_locon",
        "sd1_loha",
        "sd1_lokr_full",
        "sd1_full",
        "sd1_ia3",
    ];
    let files: Vec<String> = loras
        .iter()
        .map(|l| format!("loras/{l}.safetensors"))
        .collect();
    copy(&c, &files.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    let model_for = format!("sd1={}", model.display());
    let config = fixture("models/sd1_diffusers");
    let config = config.to_str().unwrap();
    // Enough steps that a render takes a while: the kill lands between two previews.
    let mut slow = previews_args(&model_for, config, &[]);
    let steps = slow.iter().position(|a| *a == "--steps").unwrap();
    slow[steps + 1] = "40";
    let previews = || -> Vec<PathBuf> {
        loras
            .iter()
            .map(|l| c.join(format!("{l}.preview.png")))
            .filter(|p| p.exists())
            .collect()
    };
    let mut child = library_support::library(&db)
        .args(&slow)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while previews().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no preview came"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no cleanup of any kind runs
    child.wait().unwrap();
    let written = previews();
    assert!(
        !written.is_empty() && written.len() < loras.len(),
        "{} of {} written before the kill",
        written.len(),
        loras.len()
    );
    // Whatever exists is whole, and nothing else was left in the folder.
    let kept: Vec<(PathBuf, Vec<u8>)> = written.iter().map(|p| (p.clone(), pixels(p))).collect();
    let names: Vec<String> = std::fs::read_dir(&c)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".safetensors") && !n.ends_with(".preview.png"))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");

    let out = run(&db, &previews_args(&model_for, config, &["--json"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rendered"], loras.len() - written.len(), "{report}");
    assert_eq!(report["skipped"], written.len(), "{report}");
    assert_eq!(previews().len(), loras.len());
    for (p, before) in kept {
        assert!(pixels(&p) == before, "{} was rewritten", p.display());
    }

    // Two workers, each with its own models, render what one does.
    ok(&db, &previews_args(&model_for, config, &["--force"]));
    let single: Vec<Vec<u8>> = previews().iter().map(|p| pixels(p)).collect();
    let out = run(
        &db,
        &previews_args(&model_for, config, &["--json", "--force", "--jobs", "2"]),
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rendered"], loras.len(), "{report}");
    assert_eq!(report["model_loads"], 2, "{report}");
    let parallel: Vec<Vec<u8>> = previews().iter().map(|p| pixels(p)).collect();
    assert!(single == parallel);
}

#[test]
fn sdxl_loras_render_with_an_sdxl_pipeline_folder() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c");
    let db = t.path().join("lib.db");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::copy(
        fixture("preview/sdxl_lora.safetensors"),
        c.join("sdxl_style.safetensors"),
    )
    .unwrap();
    std::fs::write(
        c.join("sdxl_style.json"),
        r#"{"activation text": "red fox", "preferred weight": 0.8}"#,
    )
    .unwrap();
    ok(&db, &["add", c.to_str().unwrap(), "--quiet"]);
    // The tiny SDXL pipeline folder: its own configs give the head counts.
    let folder = fixture("preview/sdxl_diffusers");
    let model_for = format!("sdxl={}", folder.display());
    let report = json(
        &db,
        &[
            "previews",
            "--model-for",
            &model_for,
            "--base",
            "sdxl",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--sampler",
            "euler",
            "--seed",
            "3",
            "--json",
        ],
    );
    assert_eq!(report["rendered"], 1, "{report}");
    let o = outcome(&report, "sdxl_style");
    assert_eq!(o["prompt"], "red fox <lora:sdxl_style:0.8>");
    // `preview` on the same prompt, with the LoRA found by its stem in the collection.
    let by_hand = |prompt: &str, out: &Path| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
            .args(["preview", "--model"])
            .arg(&folder)
            .args(["--prompt", prompt, "--lora-dir"])
            .arg(&c)
            .args(["--steps", "2", "--width", "64", "--height", "64"])
            .args(["--sampler", "euler", "--seed", "3", "--db"])
            .arg(&db)
            .arg("-o")
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        pixels(out)
    };
    let written = pixels(&c.join("sdxl_style.preview.png"));
    assert!(written == by_hand("red fox <lora:sdxl_style:0.8>", &t.path().join("a.png")));
    // And the LoRA changed the image: weight 0 renders another one.
    assert!(written != by_hand("red fox <lora:sdxl_style:0>", &t.path().join("b.png")));
}
