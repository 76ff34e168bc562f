//! `loratool preview` end to end on a tiny SD1 checkpoint whose text encoder has CLIP's full
//! 49,408-token vocabulary (built here from the tiny fixture): the PNG and its A1111 infotext,
//! determinism, `<lora:…>` tags resolved in `--lora-dir`, weight 0 identical to no LoRA, and a
//! LoRA at load time rendering what the checkpoint `merge` writes renders; on a tiny SD2 checkpoint,
//! A1111's v-prediction rule and `--prediction` overriding it. The pieces themselves
//! are checked against the peers in preview_text, preview_unet, preview_vae, preview_render,
//! preview_sd2, sampling, prompt and png_infotext.

mod common;
use common::fixture;

use loratool::preview::infotext::parse_generation_parameters;
use loratool::preview::png::read_parameters;
use loratool::tensors::writer::{write_with_metadata, TensorSpec, WriteOptions};
use loratool::tensors::{SafetensorsFile, TensorFile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

/// The tiny SD1 checkpoint with its 1,000-row token embedding tiled to 49,408 rows.
/// A temporary folder holding [`full_vocab_checkpoint`] as `tiny_sd1.safetensors`.
fn tiny_model() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny_sd1.safetensors");
    full_vocab_checkpoint(&model);
    (dir, model)
}

fn full_vocab_checkpoint(dst: &Path) {
    common::full_vocab_sd1(dst, None)
}

fn preview(model: &Path, prompt: &str, out: &Path, extra: &[&str]) -> Output {
    preview_command(model, prompt, out, extra).output().unwrap()
}

fn preview_command(
    model: &Path,
    prompt: &str,
    out: &Path,
    extra: &[&str],
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_loratool"));
    c.arg("preview")
        .arg("--model")
        .arg(model)
        .arg("--config")
        .arg(fixture("models/sd1_diffusers"))
        .args(["--prompt", prompt])
        .arg("--lora-dir")
        .arg(fixture("loras"))
        .args(["--height", "64", "--sampler", "dpm++2m"])
        .args(["--schedule", "karras", "-o"])
        .arg(out)
        .args(extra);
    if !extra.contains(&"--db") {
        // An index of its own, so the user's is never read.
        c.arg("--db").arg(out.with_extension("db"));
    }
    // Defaults the test's `extra` may replace.
    for (flag, value) in [
        ("--negative", "blurry, (ugly:1.3)"),
        ("--seed", "42"),
        ("--steps", "3"),
        ("--width", "64"),
    ] {
        if !extra.contains(&flag) {
            c.args([flag, value]);
        }
    }
    c
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn pixels(png: &Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

#[test]
fn preview_writes_a_png_with_a1111_infotext_and_loras_at_load_match_merge() {
    let (dir, model) = tiny_model();
    let prompt = "a (red:1.2) fox, [forest] <lora:sd1_kohya_lora:0.8>";
    let out = dir.path().join("a.png");
    ok(&preview(&model, prompt, &out, &[]));

    let text = read_parameters(&out).unwrap().unwrap().text;
    let parsed = parse_generation_parameters(&text);
    assert_eq!(parsed.prompt, prompt);
    assert_eq!(parsed.negative_prompt, "blurry, (ugly:1.3)");
    for (k, v) in [
        ("Steps", "3"),
        ("Sampler", "DPM++ 2M"),
        ("Schedule type", "Karras"),
        ("CFG scale", "7"),
        ("Seed", "42"),
        ("Size", "64x64"),
        ("Model", "tiny_sd1"),
        ("RNG", "CPU"),
    ] {
        assert_eq!(parsed.get(k), Some(v), "{k} in {text}");
    }
    let lora = fixture("loras/sd1_kohya_lora.safetensors");
    let start = loratool::tensors::SafetensorsFile::data_start_of(&lora).unwrap();
    let addnet = loratool::tensors::hash::hash_file(&lora, start)
        .unwrap()
        .addnet
        .unwrap();
    let sshs = TensorFile::open(&lora)
        .unwrap()
        .metadata()
        .get("sshs_model_hash")
        .cloned();
    let expected = sshs.unwrap_or(addnet)[..12].to_string();
    assert_eq!(
        parsed.get("Lora hashes"),
        Some(format!("sd1_kohya_lora: {expected}").as_str()),
        "{text}"
    );

    // Deterministic: the same arguments give the same bytes, whatever the thread count.
    for threads in ["1", "2", "3"] {
        let again = dir.path().join(format!("b{threads}.png"));
        ok(&preview_command(&model, prompt, &again, &[])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap());
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&again).unwrap(),
            "{threads} threads"
        );
    }

    // Weight 0 renders exactly what no LoRA renders; weight 0.8 renders something else.
    let plain_prompt = "a (red:1.2) fox, [forest]";
    let (plain, zero) = (dir.path().join("plain.png"), dir.path().join("zero.png"));
    ok(&preview(&model, plain_prompt, &plain, &[]));
    ok(&preview(
        &model,
        &format!("{plain_prompt} <lora:sd1_kohya_lora:0>"),
        &zero,
        &[],
    ));
    assert_eq!(pixels(&plain), pixels(&zero));
    assert_ne!(pixels(&plain), pixels(&out));

    // The LoRA at load time renders what the merged checkpoint renders (within 1/255).
    let merged = dir.path().join("merged.safetensors");
    let m = std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
        .arg("merge")
        .arg("--base")
        .arg(&model)
        .arg("--lora")
        .arg(format!("{}:0.8", lora.display()))
        .args(["--dtype", "f32", "-o"])
        .arg(&merged)
        .output()
        .unwrap();
    ok(&m);
    // Without emphasis: A1111's mean restoration divides by the states' mean, which is near zero
    // in this random tiny model and magnifies the last-bit differences between merge's fused
    // kernel and the load-time patch (real CLIP states have a mean far from zero).
    let (at_load, from_merge) = (
        dir.path().join("at_load.png"),
        dir.path().join("merged.png"),
    );
    ok(&preview(
        &model,
        "a red fox, forest <lora:sd1_kohya_lora:0.8>",
        &at_load,
        &["--negative", ""],
    ));
    ok(&preview(
        &merged,
        "a red fox, forest",
        &from_merge,
        &["--negative", ""],
    ));
    let worst = pixels(&at_load)
        .iter()
        .zip(pixels(&from_merge))
        .map(|(a, b)| (*a as i32 - b as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "LoRA at load vs merged checkpoint: {worst}/255");
}

#[test]
fn bad_requests_are_one_line_errors_and_write_nothing() {
    let (dir, model) = tiny_model();
    let out = dir.path().join("x.png");
    let err = |o: Output| {
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        e
    };
    let e = err(preview(&model, "a fox <lora:sd1_kohya:1>", &out, &[]));
    assert!(
        e.contains("no LoRA named 'sd1_kohya'") && e.contains("sd1_kohya_lora"),
        "{e}"
    );
    let e = err(preview(
        &model,
        "a fox <lora:sd1_kohya_lora:abc>",
        &out,
        &[],
    ));
    assert!(e.contains("abc"), "{e}");
    let e = err(preview(&model, "a fox", &out, &["--width", "60"]));
    assert!(e.contains("60x64"), "{e}");
    let e = err(preview(&model, "a fox", &out, &["--steps", "0"]));
    assert!(e.contains("--steps 0"), "{e}");
    let e = err(preview(&model, "a fox", &out, &["--steps", "5000"]));
    assert!(e.contains("--steps 5000: between 1 and 1000"), "{e}");
    let sdxl_lora = fixture("loras/sdxl_kohya_lora.safetensors");
    let e = err(preview(
        &model,
        "a fox",
        &out,
        &["--lora", &format!("{}:1", sdxl_lora.display())],
    ));
    assert!(
        e.contains("this is a sdxl LoRA but")
            && e.contains("is a sd1 checkpoint")
            && !e.contains("--force"),
        "{e}"
    );
    let e = err(preview(
        &dir.path().join("missing.safetensors"),
        "a fox",
        &out,
        &[],
    ));
    assert!(e.contains("missing.safetensors: No such file"), "{e}");
    let not_a_model = fixture("loras/sd1_kohya_lora.safetensors");
    let e = err(preview(&not_a_model, "a fox", &out, &[]));
    assert!(e.contains("sd1_kohya_lora.safetensors"), "{e}");
    assert!(!out.exists());
    std::fs::write(&out, b"mine").unwrap();
    let e = err(preview(&model, "a fox", &out, &[]));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"mine");
    // A GPU this build has no backend for, an unknown device or dtype: one line, nothing written.
    let fresh = dir.path().join("gpu.png");
    let e = err(preview(&model, "a fox", &fresh, &["--device", "cuda:0"]));
    assert!(
        e.contains("--device cuda:0: this loratool was built without cuda support")
            && e.contains("--features cuda"),
        "{e}"
    );
    let e = err(preview(&model, "a fox", &fresh, &["--device", "tpu"]));
    assert!(e.contains("--device tpu: not a device"), "{e}");
    let e = err(preview(&model, "a fox", &fresh, &["--dtype", "f64"]));
    assert!(e.contains("invalid value 'f64' for '--dtype"), "{e}");
    let e = err(preview(&model, "a fox", &fresh, &["--rng", "gpu"]));
    assert!(e.contains("invalid value 'gpu' for '--rng"), "{e}");
    assert!(!fresh.exists());
}

#[test]
fn half_precision_renders_close_to_f32() {
    let (dir, model) = tiny_model();
    let render = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["--negative", "blurry"];
        args.extend_from_slice(extra);
        ok(&preview(&model, "a red fox, forest", &out, &args));
        pixels(&out)
    };
    let distance = |a: &[u8], b: &[u8]| {
        let d: Vec<i32> = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as i32 - *y as i32).abs())
            .collect();
        (
            *d.iter().max().unwrap(),
            d.iter().sum::<i32>() as f64 / d.len() as f64,
        )
    };
    let full = render("f32.png", &[]);
    let half = render("f16.png", &["--dtype", "f16"]);
    let other_seed = render("seed7.png", &["--seed", "7"]);
    // f16 rounding through the text encoder, three steps of UNet calls with CFG and the VAE
    // stays within the issue's image tolerance (measured: 1/255 at most, 0.12 on average; another
    // seed moves pixels by 36 on average). Emphasis is left out: on a tiny random model its mean
    // rescaling magnifies rounding (docs/PREVIEW.md).
    let (worst, mean) = distance(&full, &half);
    let (_, seed_mean) = distance(&full, &other_seed);
    eprintln!("f16 vs f32: worst {worst}/255, mean {mean:.3}; another seed: mean {seed_mean:.3}");
    assert!(
        worst <= 2 && mean * 10.0 <= seed_mean,
        "f16 {worst} {mean}, seed {seed_mean}"
    );
    assert_eq!(half, render("f16_again.png", &["--dtype", "f16"]));
}

#[test]
fn the_checkpoints_own_schedule_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let render = |name: &str, schedule: Option<Vec<f32>>| {
        let model = dir.path().join(format!("{name}.safetensors"));
        common::full_vocab_sd1(&model, schedule);
        let out = dir.path().join(format!("{name}.png"));
        ok(&preview(&model, "a red fox", &out, &["--steps", "2"]));
        pixels(&out)
    };
    let default = render("none", None);
    // The same schedule stored in the file gives the same image (within float rounding of the
    // stored values); another one (linear betas) a different image.
    let stored = render("scaled", Some(common::sd_alphas_cumprod(false)));
    let worst = default
        .iter()
        .zip(&stored)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "{worst}");
    assert_ne!(
        default,
        render("linear", Some(common::sd_alphas_cumprod(true)))
    );
}

#[test]
fn lora_names_resolve_through_the_library_by_alias_and_trigger_words_are_added() {
    let (dir, model) = tiny_model();
    let loras = dir.path().join("collection");
    std::fs::create_dir_all(&loras).unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("ss_output_name".to_string(), "watercolor_style".to_string());
    let src = SafetensorsFile::open(&fixture("loras/sd1_kohya_lora.safetensors")).unwrap();
    let file = loras.join("wc_v1.safetensors");
    write_with_metadata(&file, &src, &meta, &WriteOptions::default()).unwrap();
    std::fs::write(loras.join("wc_v1.json"), r#"{"activation text": "wtrclr"}"#).unwrap();
    let db = dir.path().join("index.db");
    let add = std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
        .args(["library", "--db"])
        .arg(&db)
        .arg("add")
        .arg(&loras)
        .arg("--quiet")
        .output()
        .unwrap();
    ok(&add);
    let render = |prompt: &str, name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["--db", db.to_str().unwrap()];
        args.extend_from_slice(extra);
        ok(&preview(&model, prompt, &out, &args));
        out
    };
    // By alias through the index, and by stem: the same file, the same image.
    let by_alias = render("a fox <lora:watercolor_style:0.8>", "alias.png", &[]);
    let by_stem = render("a fox <lora:wc_v1:0.8>", "stem.png", &[]);
    assert_eq!(pixels(&by_alias), pixels(&by_stem));
    // --trigger appends the activation text: the same as writing it.
    let triggered = render("a fox <lora:wc_v1:0.8>", "trigger.png", &["--trigger"]);
    let written = render("a fox, wtrclr <lora:wc_v1:0.8>", "written.png", &[]);
    assert_eq!(pixels(&triggered), pixels(&written));
    assert_ne!(pixels(&triggered), pixels(&by_stem));
}

/// The tiny checkpoint's VAE as a file of its own (LDM names without the prefix, as the VAE files
/// A1111 users download), its `conv_out` bias shifted by `shift`.
fn vae_file(dst: &Path, shift: f32) {
    let f = TensorFile::open(&fixture("models/sd1_ldm.safetensors")).unwrap();
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for t in f.tensors() {
        let Some(name) = t.name.strip_prefix("first_stage_model.") else {
            continue;
        };
        let mut values = f.read_f32(&t.name).unwrap().data;
        if name == "decoder.conv_out.bias" {
            values.iter_mut().for_each(|v| *v += shift);
        }
        specs.push(TensorSpec {
            name: name.to_string(),
            dtype: loratool::tensors::Dtype::F32,
            shape: t.shape.clone(),
        });
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    common::write_safetensors(dst, &BTreeMap::new(), &specs, &data);
}

#[test]
fn an_external_vae_replaces_the_checkpoints() {
    let (dir, model) = tiny_model();
    let (same, other) = (
        dir.path().join("same.vae.safetensors"),
        dir.path().join("other.vae.safetensors"),
    );
    vae_file(&same, 0.0);
    vae_file(&other, 0.5);
    let render = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        ok(&preview(&model, "a red fox", &out, extra));
        out
    };
    let own = render("own.png", &[]);
    let with_same = render("same.png", &["--vae", same.to_str().unwrap()]);
    let with_other = render("other.png", &["--vae", other.to_str().unwrap()]);
    assert_eq!(pixels(&own), pixels(&with_same));
    assert_ne!(pixels(&own), pixels(&with_other));
    let text = read_parameters(&with_other).unwrap().unwrap().text;
    let parsed = parse_generation_parameters(&text);
    assert_eq!(parsed.get("VAE"), Some("other.vae.safetensors"), "{text}");
    let hash = loratool::tensors::hash::hash_file(&other, None)
        .unwrap()
        .autov2
        .to_lowercase();
    assert_eq!(parsed.get("VAE hash"), Some(hash.as_str()), "{text}");
    // Not a VAE: one line naming the file.
    let lora = fixture("loras/sd1_kohya_lora.safetensors");
    let o = preview(
        &model,
        "a red fox",
        &dir.path().join("x.png"),
        &["--vae", lora.to_str().unwrap()],
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("sd1_kohya_lora.safetensors: not a VAE"), "{e}");
}

/// A textual-inversion file (`emb_params`, as A1111 saves them) with `vectors` rows.
fn embedding_file(dst: &Path, vectors: &[Vec<f32>]) {
    tables_file(dst, &[("emb_params", vectors)]);
}

/// A safetensors file of named f32 `[rows, width]` tables.
fn tables_file(dst: &Path, tables: &[(&str, &[Vec<f32>])]) {
    let specs: Vec<TensorSpec> = tables
        .iter()
        .map(|(name, rows)| TensorSpec {
            name: name.to_string(),
            dtype: loratool::tensors::Dtype::F32,
            shape: vec![rows.len(), rows[0].len()],
        })
        .collect();
    let data: Vec<u8> = tables
        .iter()
        .flat_map(|(_, rows)| rows.iter().flatten().flat_map(|v| v.to_le_bytes()))
        .collect();
    common::write_safetensors(dst, &BTreeMap::new(), &specs, &data);
}

#[test]
fn textual_inversion_vectors_replace_their_names_tokens() {
    let (dir, model) = tiny_model();
    let embeddings = dir.path().join("embeddings");
    std::fs::create_dir_all(&embeddings).unwrap();
    // `foxemb`: one vector, the token embedding of "fox" itself: "a foxemb" must render "a fox".
    let fox = loratool::preview::tokenizer::ClipTokenizer::new()
        .unwrap()
        .encode("fox");
    assert_eq!(fox.len(), 1);
    let table = TensorFile::open(&model)
        .unwrap()
        .read_f32("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        .unwrap();
    let row = fox[0] as usize * 16;
    embedding_file(
        &embeddings.join("foxemb.safetensors"),
        &[table.data[row..row + 16].to_vec()],
    );
    embedding_file(
        &embeddings.join("easyneg.safetensors"),
        &[vec![0.25; 16], vec![-0.5; 16]],
    );
    let render = |name: &str, prompt: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["--embedding-dir", embeddings.to_str().unwrap()];
        args.extend_from_slice(extra);
        ok(&preview(&model, prompt, &out, &args));
        out
    };
    let by_word = render("word.png", "a fox", &["--negative", ""]);
    let by_embedding = render("emb.png", "a foxemb", &["--negative", ""]);
    assert_eq!(pixels(&by_word), pixels(&by_embedding));
    let text = read_parameters(&by_embedding).unwrap().unwrap().text;
    let sha = loratool::tensors::hash::hash_file(&embeddings.join("foxemb.safetensors"), None)
        .unwrap()
        .sha256;
    assert_eq!(
        parse_generation_parameters(&text).get("TI hashes"),
        Some(format!("foxemb: {}", &sha[..12]).as_str()),
        "{text}"
    );
    // In the negative prompt too; without the folder the name is plain text.
    let with = render("neg.png", "a fox", &["--negative", "easyneg"]);
    let out = dir.path().join("plain_neg.png");
    ok(&preview(&model, "a fox", &out, &["--negative", "easyneg"]));
    assert_ne!(pixels(&with), pixels(&out));

    // An SDXL embedding (clip_l + clip_g) does not fit an SD1 model: A1111 skips it and encodes
    // the name as words; the render says so on stderr.
    let (l, g) = (vec![vec![0.5f32; 16]], vec![vec![-0.5f32; 24]]);
    tables_file(
        &embeddings.join("sdxlneg.safetensors"),
        &[("clip_g", &g), ("clip_l", &l)],
    );
    let loaded =
        loratool::preview::embeddings::load(&embeddings.join("sdxlneg.safetensors")).unwrap();
    assert_eq!((loaded.vectors, loaded.vectors_g), (l, Some(g)));
    let skipped_out = dir.path().join("sdxl_neg.png");
    let o = preview(
        &model,
        "a fox",
        &skipped_out,
        &[
            "--negative",
            "sdxlneg",
            "--embedding-dir",
            embeddings.to_str().unwrap(),
        ],
    );
    ok(&o);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("note: embedding 'sdxlneg' not used:")
            && e.contains("an SDXL embedding (clip_l + clip_g); the model is not SDXL"),
        "{e}"
    );
    let plain_out = dir.path().join("plain_sdxl_neg.png");
    ok(&preview(
        &model,
        "a fox",
        &plain_out,
        &["--negative", "sdxlneg"],
    ));
    assert_eq!(pixels(&skipped_out), pixels(&plain_out));
}

/// Where the 64×64 RGB image `cell` sits in `sheet` (width `w`), if anywhere.
fn find_cell(sheet: &[u8], w: usize, cell: &[u8]) -> Option<(usize, usize)> {
    let h = sheet.len() / (w * 3);
    for y in 0..=h.saturating_sub(64) {
        for x in 0..=w.saturating_sub(64) {
            if (0..64).all(|r| {
                let at = ((y + r) * w + x) * 3;
                sheet[at..at + 64 * 3] == cell[r * 64 * 3..(r + 1) * 64 * 3]
            }) {
                return Some((x, y));
            }
        }
    }
    None
}

#[test]
fn a_grid_lays_out_each_weight_and_seed_with_the_first_cells_infotext() {
    let (dir, model) = tiny_model();
    let prompt = "a red fox <lora:sd1_kohya_lora:1>";
    let sheet = dir.path().join("grid.png");
    ok(&preview(
        &model,
        prompt,
        &sheet,
        &["--grid", "weights=0,0.8;seeds=42,7", "--negative", ""],
    ));
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&sheet).unwrap(),
    ));
    let width = decoder.read_info().unwrap().info().width as usize;
    let sheet_pixels = pixels(&sheet);
    let mut places = Vec::new();
    for seed in ["42", "7"] {
        for w in ["0", "0.8"] {
            let single = dir.path().join(format!("s{seed}_w{w}.png"));
            let p = format!("a red fox <lora:sd1_kohya_lora:{w}>");
            ok(&preview(
                &model,
                &p,
                &single,
                &["--seed", seed, "--negative", ""],
            ));
            let at = find_cell(&sheet_pixels, width, &pixels(&single))
                .unwrap_or_else(|| panic!("seed {seed} weight {w} is not in the sheet"));
            places.push(at);
        }
    }
    // Columns are weights, rows are seeds.
    assert!(
        places[0].0 < places[1].0 && places[0].1 == places[1].1,
        "{places:?}"
    );
    assert!(
        places[0].1 < places[2].1 && places[0].0 == places[2].0,
        "{places:?}"
    );
    let text = read_parameters(&sheet).unwrap().unwrap().text;
    assert_eq!(
        parse_generation_parameters(&text).get("Seed"),
        Some("42"),
        "{text}"
    );
    let o = preview(
        &model,
        "a fox",
        &dir.path().join("x.png"),
        &["--grid", "weights=0,1"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no LoRA to weigh"));
}

#[test]
fn pickled_and_safetensors_embeddings_load_the_same_vectors() {
    let pt = loratool::preview::embeddings::load(&fixture("preview/tinyemb.pt")).unwrap();
    let st = loratool::preview::embeddings::load(&fixture("preview/tinyemb.safetensors")).unwrap();
    assert_eq!(pt.name, "tinyemb");
    assert_eq!((pt.vectors.len(), pt.width()), (2, 16));
    assert_eq!(pt.vectors, st.vectors);
    let e = loratool::preview::embeddings::load(&fixture("models/sd1_ldm.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a textual-inversion embedding"), "{e}");
}

/// `loratool preview` on the tiny SD2 checkpoint (common::sd2_variant) with its configs.
fn preview_sd2(model: &Path, out: &Path, extra: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
        .arg("preview")
        .arg("--model")
        .arg(model)
        .arg("--config")
        .arg(fixture("preview/sd2_diffusers"))
        .args(["--prompt", "a red fox, (snow:1.2)", "--negative", "blurry"])
        .args([
            "--seed", "42", "--steps", "3", "--width", "64", "--height", "64",
        ])
        .args(["--sampler", "euler", "-o"])
        .arg(out)
        .arg("--db")
        .arg(out.with_extension("db"))
        .args(extra)
        .output()
        .unwrap()
}

/// A LyCORIS full-weight module on the UNet's conv_out that leaves the weight and raises the
/// bias by 1: at weight 1 it moves A1111's probe from −1.5 (v) to −0.5 (ε).
fn conv_out_bias_lora(path: &Path) {
    let specs = [
        ("lora_unet_conv_out.diff", vec![4, 4, 3, 3], 0.0f32),
        ("lora_unet_conv_out.diff_b", vec![4], 1.0),
    ];
    let mut data = Vec::new();
    let specs: Vec<TensorSpec> = specs
        .into_iter()
        .map(|(name, shape, value)| {
            let n: usize = shape.iter().product();
            data.extend((0..n).flat_map(|_| value.to_le_bytes()));
            TensorSpec {
                name: name.into(),
                dtype: loratool::tensors::Dtype::F32,
                shape,
            }
        })
        .collect();
    let meta = BTreeMap::from([("ss_base_model_version".to_string(), "sd_v2".to_string())]);
    common::write_safetensors(path, &meta, &specs, &data);
}

#[test]
fn sd2_renders_with_a1111s_prediction_rule_and_prediction_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let v_model = dir.path().join("tiny_sd2.safetensors");
    common::sd2_variant(&v_model, 0.0, Some(49408));
    let render = |model: &Path, name: &str, extra: &[&str]| {
        let out = dir.path().join(format!("{name}.png"));
        ok(&preview_sd2(model, &out, extra));
        let text = read_parameters(&out).unwrap().unwrap().text;
        (pixels(&out), text)
    };
    // A1111's probe says v: the infotext is A1111's own (it has no prediction key).
    let (auto, text) = render(&v_model, "auto", &[]);
    let parsed = parse_generation_parameters(&text);
    for (k, v) in [
        ("Model", "tiny_sd2"),
        ("Sampler", "Euler"),
        ("Size", "64x64"),
    ] {
        assert_eq!(parsed.get(k), Some(v), "{k} in {text}");
    }
    assert_eq!(parsed.get("Prediction"), None, "{text}");
    assert_eq!(
        render(&v_model, "v", &["--prediction", "v"]),
        (auto.clone(), text.clone())
    );
    let (eps, eps_text) = render(&v_model, "eps", &["--prediction", "eps"]);
    assert_ne!(eps, auto);
    assert_eq!(
        parse_generation_parameters(&eps_text).get("Prediction"),
        Some("eps")
    );
    // A1111 conditions SD2 on the penultimate layer whatever its clip skip, and records it.
    let (skip2, skip2_text) = render(&v_model, "skip2", &["--clip-skip", "2"]);
    assert_eq!(skip2, auto);
    assert_eq!(
        parse_generation_parameters(&skip2_text).get("Clip skip"),
        Some("2")
    );

    // The ε twin (conv_out bias +1): the probe says ε.
    let eps_model = dir.path().join("tiny_sd2_eps.safetensors");
    common::sd2_variant(&eps_model, 1.0, Some(49408));
    let (twin, twin_text) = render(&eps_model, "twin", &[]);
    assert_eq!(
        parse_generation_parameters(&twin_text).get("Prediction"),
        None
    );
    assert_eq!(
        render(&eps_model, "twin_eps", &["--prediction", "eps"]).0,
        twin
    );
    let (_, forced) = render(&eps_model, "twin_v", &["--prediction", "v"]);
    assert_eq!(
        parse_generation_parameters(&forced).get("Prediction"),
        Some("v")
    );

    // A1111 probes the checkpoint before LoRAs: a LoRA that would move the probe to ε leaves v.
    let lora = dir.path().join("conv_out_bias.safetensors");
    conv_out_bias_lora(&lora);
    let with = format!("{}:1", lora.display());
    let (lora_auto, _) = render(&v_model, "lora_auto", &["--lora", &with]);
    assert_ne!(lora_auto, auto, "the LoRA changes the image");
    let (lora_v, lora_v_text) = render(&v_model, "lora_v", &["--lora", &with, "--prediction", "v"]);
    assert_eq!(lora_auto, lora_v);
    assert_eq!(
        parse_generation_parameters(&lora_v_text).get("Prediction"),
        None
    );

    // A bad value is one line, and nothing is written.
    let out = dir.path().join("bad.png");
    let o = preview_sd2(&v_model, &out, &["--prediction", "x0"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("--prediction 'x0': eps or v"), "{e}");
    assert!(!out.exists());
}

#[test]
fn save_beside_writes_the_loras_preview_and_the_index_learns_of_it() {
    let (dir, model) = tiny_model();
    let loras = dir.path().join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    let lora = loras.join("style.safetensors");
    std::fs::copy(fixture("loras/sd1_kohya_lora.safetensors"), &lora).unwrap();
    let db = dir.path().join("lib.db");
    let add = std::process::Command::new(env!("CARGO_BIN_EXE_loratool"))
        .args(["library", "--db"])
        .arg(&db)
        .arg("add")
        .arg(&loras)
        .arg("--quiet")
        .output()
        .unwrap();
    ok(&add);
    let has_preview = || {
        let lib = loratool::library::Library::open(&db).unwrap();
        let entries = lib.list(&Default::default()).unwrap();
        assert_eq!(entries.len(), 1);
        entries[0].has_preview
    };
    assert!(!has_preview());

    let prompt = "a fox <lora:style:0.8>";
    let out = dir.path().join("a.png");
    let extra = [
        "--lora-dir",
        loras.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
        "--save-beside",
    ];
    ok(&preview(&model, prompt, &out, &extra));
    let beside = loras.join("style.preview.png");
    assert_eq!(
        std::fs::read(&beside).unwrap(),
        std::fs::read(&out).unwrap()
    );
    assert!(has_preview());

    // Never over an existing preview without --force: one line, the preview untouched.
    std::fs::write(&beside, b"mine").unwrap();
    let again = dir.path().join("b.png");
    let o = preview(&model, prompt, &again, &extra);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("style.preview.png: already exists"), "{e}");
    assert_eq!(std::fs::read(&beside).unwrap(), b"mine");
    assert!(!again.exists());

    // Two LoRAs: which one's preview would it be? Refused before rendering.
    let two = format!("{prompt} <lora:sd1_kohya_lora:1>");
    let o = preview(&model, &two, &again, &extra);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--save-beside: the render uses 2 LoRAs; it needs exactly one"),
        "{e}"
    );
}
