//! Preview output: A1111's infotext (exact strings, our parser against A1111's own, recorded by
//! fixtures/generate_infotext.py), PNGs that Pillow reads back byte for byte, A1111's pixel rule,
//! deterministic bytes, atomic writes, and the contact sheet.
//!
//! The PNGs under fixtures/png/ are written by this file's ignored test `write_png_fixtures`
//! (`cargo test --test png_infotext -- --ignored write_png_fixtures`), then read by the Python
//! script; building and testing never need Python.

mod common;

use loratool::preview::contact_sheet::{contact_sheet, GridLabels};
use loratool::preview::infotext::{
    format_infotext, loratool_version, parse_generation_parameters, quote, schedule_type,
    GenerationParameters, NamedHash, SamplerName, ScheduleName,
};
use loratool::preview::png::{
    encode_png, read_parameters, write_png, ChannelLayout, RgbImage, TextChunkKind,
};
use loratool::tensors::WriteOptions;
use loratool::Error;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn png_fixtures() -> PathBuf {
    common::fixtures().join("png")
}

fn recorded() -> Value {
    let text = std::fs::read_to_string(png_fixtures().join("a1111_infotext.json"))
        .expect("fixtures/png/a1111_infotext.json");
    serde_json::from_str(&text).expect("the recording parses")
}

fn owned(s: &str) -> Option<String> {
    Some(s.to_string())
}

/// A preview with one LoRA, as `loratool preview` records it.
fn preview_with_lora() -> GenerationParameters {
    GenerationParameters {
        prompt: "a photo of a cat <lora:mystyle:0.8>".into(),
        negative_prompt: "blurry, lowres".into(),
        steps: 20,
        sampler: SamplerName::EulerAncestral.a1111_name().into(),
        schedule_type: owned(schedule_type(
            SamplerName::EulerAncestral,
            ScheduleName::Normal,
        )),
        cfg_scale: 7.0,
        seed: 42,
        width: 512,
        height: 512,
        model_hash: owned("6ce0161689"),
        model: owned("v1-5-pruned-emaonly"),
        rng: owned("CPU"),
        lora_hashes: vec![NamedHash::new("mystyle", "0123456789ab")],
        // Fixed, not loratool_version(): the fixture PNGs must not change with each release.
        version: owned("loratool 0.1.0"),
        ..Default::default()
    }
}

const PREVIEW_WITH_LORA: &str = "a photo of a cat <lora:mystyle:0.8>\n\
    Negative prompt: blurry, lowres\n\
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 512x512, \
    Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, \
    Lora hashes: \"mystyle: 0123456789ab\", Version: loratool 0.1.0";

/// Every field, values that need quoting, a prompt over two lines, no negative prompt.
fn everything() -> GenerationParameters {
    GenerationParameters {
        prompt: "masterpiece, portrait <lora:detail:0.6> <lora:style:te=0.5:unet=1>\n\
                 second line (red:1.2)"
            .into(),
        negative_prompt: String::new(),
        steps: 30,
        sampler: SamplerName::DpmPp2M.a1111_name().into(),
        schedule_type: owned(schedule_type(SamplerName::DpmPp2M, ScheduleName::Karras)),
        cfg_scale: 7.5,
        seed: 4_294_967_295,
        width: 640,
        height: 448,
        model_hash: owned("a1b2c3d4e5"),
        model: owned("my model, final"),
        vae_hash: owned("735e4c3a44"),
        vae: owned("vae-ft-mse-840000-ema-pruned"),
        clip_skip: 2,
        rng: owned("CPU"),
        lora_hashes: vec![
            NamedHash::new("detail", "111111111111"),
            NamedHash::new("style", "222222222222"),
        ],
        ti_hashes: vec![NamedHash::new("easynegative", "c74b4e810b03")],
        extra: vec![
            ("Preview grid".into(), "weights=0,0.5,1".into()),
            ("Note".into(), "say \"hi\": ok".into()),
        ],
        version: owned("loratool 0.1.0"),
    }
}

const EVERYTHING: &str = "masterpiece, portrait <lora:detail:0.6> <lora:style:te=0.5:unet=1>\n\
    second line (red:1.2)\n\
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 4294967295, \
    Size: 640x448, Model hash: a1b2c3d4e5, Model: \"my model, final\", VAE hash: 735e4c3a44, \
    VAE: vae-ft-mse-840000-ema-pruned, Clip skip: 2, RNG: CPU, \
    Lora hashes: \"detail: 111111111111, style: 222222222222\", \
    TI hashes: \"easynegative: c74b4e810b03\", Preview grid: \"weights=0,0.5,1\", \
    Note: \"say \\\"hi\\\": ok\", Version: loratool 0.1.0";

/// Nothing optional: no model name or hash, no schedule type, no version.
fn minimal() -> GenerationParameters {
    GenerationParameters {
        prompt: "a red cube".into(),
        steps: 1,
        sampler: SamplerName::Ddim.a1111_name().into(),
        cfg_scale: 1.0,
        seed: 0,
        width: 8,
        height: 8,
        ..Default::default()
    }
}

const MINIMAL: &str = "a red cube\nSteps: 1, Sampler: DDIM, CFG scale: 1, Seed: 0, Size: 8x8";

/// Not Latin-1: the PNG must carry it in iTXt.
fn unicode_prompt() -> GenerationParameters {
    GenerationParameters {
        prompt: "一只猫在窗边 <lora:猫咪风格:0.7>\n😀 second line".into(),
        negative_prompt: "模糊, ugly".into(),
        sampler: SamplerName::Euler.a1111_name().into(),
        schedule_type: owned("Automatic"),
        seed: 7,
        width: 8,
        height: 8,
        model: owned("模型"),
        rng: owned("CPU"),
        lora_hashes: vec![NamedHash::new("猫咪风格", "abcdefabcdef")],
        version: owned("loratool 0.1.0"),
        ..Default::default()
    }
}

#[test]
fn infotexts_are_written_as_a1111_writes_them() {
    assert_eq!(preview_with_lora().to_infotext(), PREVIEW_WITH_LORA);
    assert_eq!(everything().to_infotext(), EVERYTHING);
    assert_eq!(minimal().to_infotext(), MINIMAL);
    assert!(loratool_version().starts_with("loratool "));

    // A1111 keys LoRA hashes by name (the last hash, the first place) and drops `:` and `,`
    // from names; TI hashes are listed as given.
    let mut p = minimal();
    p.lora_hashes = vec![
        NamedHash::new("a, b:c", "111111111111"),
        NamedHash::new("other", "222222222222"),
        NamedHash::new("a, b:c", "333333333333"),
        NamedHash::new("", "444444444444"),
        NamedHash::new("nohash", ""),
    ];
    p.ti_hashes = vec![NamedHash::new("emb", "555555555555"); 2];
    assert_eq!(
        p.to_infotext(),
        format!(
            "{MINIMAL}, Lora hashes: \"a bc: 333333333333, other: 222222222222\", \
             TI hashes: \"emb: 555555555555, emb: 555555555555\""
        )
    );

    // An extra key with a field's name replaces that value in its place, as in A1111's dict;
    // a value equal to its key is written alone.
    p = minimal();
    p.extra = vec![
        ("Seed".into(), "99".into()),
        ("Tiling".into(), "Tiling".into()),
    ];
    assert_eq!(
        p.to_infotext(),
        "a red cube\nSteps: 1, Sampler: DDIM, CFG scale: 1, Seed: 99, Size: 8x8, Tiling"
    );

    // Clip skip 1 is not written; whitespace around the whole text is stripped.
    p = minimal();
    p.prompt = "  padded  ".into();
    p.clip_skip = 1;
    // Only the whole text is stripped: the prompt line keeps its trailing spaces.
    assert!(p.to_infotext().starts_with("padded  \nSteps: 1,"));
}

#[test]
fn infotexts_round_trip_through_our_parser() {
    for p in [
        preview_with_lora(),
        everything(),
        minimal(),
        unicode_prompt(),
    ] {
        let text = p.to_infotext();
        let back = GenerationParameters::from_infotext(&text).unwrap();
        assert_eq!(back, p, "{text}");
    }
    // Missing and malformed fields are errors that name the key.
    let e = GenerationParameters::from_infotext("p\nSteps: 1, Sampler: x, Seed: 1").unwrap_err();
    assert!(e.to_string().contains("'CFG scale'"), "{e}");
    let e = GenerationParameters::from_infotext(
        "p\nSteps: 1, Sampler: x, CFG scale: 7, Seed: -1, Size: 8x8",
    )
    .unwrap_err();
    assert!(e.to_string().contains("'Seed' is '-1'"), "{e}");
    let e = GenerationParameters::from_infotext(
        "p\nSteps: 1, Sampler: x, CFG scale: 7, Seed: 1, Size: 8x8, Lora hashes: nohash",
    )
    .unwrap_err();
    assert!(e.to_string().contains("Lora hashes"), "{e}");
    let err: Error = e.into();
    assert!(matches!(err, Error::Invalid(_)));
}

/// The JSON value A1111 reads for a key it did not find in the text.
fn a1111_defaults() -> Vec<(&'static str, Value)> {
    let s = |v: &str| Value::String(v.to_string());
    vec![
        ("Clip skip", s("1")),
        ("Hires resize-1", 0.into()),
        ("Hires resize-2", 0.into()),
        ("Hires sampler", s("Use same sampler")),
        ("Hires schedule type", s("Use same scheduler")),
        ("Hires checkpoint", s("Use same checkpoint")),
        ("Hires prompt", s("")),
        ("Hires negative prompt", s("")),
        ("Mask mode", s("Inpaint masked")),
        ("Masked content", s("original")),
        ("Inpaint area", s("Whole picture")),
        ("Masked area padding", 32.into()),
        ("RNG", s("GPU")),
        ("Schedule type", s("Automatic")),
        ("Schedule max sigma", 0.into()),
        ("Schedule min sigma", 0.into()),
        ("Schedule rho", 0.into()),
        ("VAE Encoder", s("Full")),
        ("VAE Decoder", s("Full")),
        ("FP8 weight", s("Disable")),
        ("Emphasis", s("Original")),
        ("Refiner switch by sampling steps", false.into()),
    ]
}

/// A1111's `^(\d+)x(\d+)$` (the recorded texts use ASCII digits only).
fn as_size(value: &str) -> Option<(&str, &str)> {
    let (w, h) = value.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(w) && digits(h)).then_some((w, h))
}

#[test]
fn our_parser_agrees_with_a1111s() {
    let recorded = recorded();
    let parses = recorded["parses"].as_array().unwrap();
    assert!(parses.len() >= 15, "{} recorded parses", parses.len());
    let defaults = a1111_defaults();
    for case in parses {
        let text = case["text"].as_str().unwrap();
        let a1111 = case["a1111"].as_object().unwrap();
        let ours = parse_generation_parameters(text);
        assert_eq!(ours.prompt, a1111["Prompt"], "prompt of {text:?}");
        assert_eq!(
            ours.negative_prompt, a1111["Negative prompt"],
            "negative prompt of {text:?}"
        );
        let raw: Vec<(String, String)> = case["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| {
                let kv = kv.as_array().unwrap();
                (
                    kv[0].as_str().unwrap().into(),
                    kv[1].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(ours.params, raw, "parameters of {text:?}");

        // A1111's dict: our pairs (WxH split into -1/-2), its defaults, nothing else.
        let mut covered = vec!["Prompt".to_string(), "Negative prompt".to_string()];
        for (key, value) in &ours.params {
            match as_size(value) {
                Some((w, h)) => {
                    assert_eq!(a1111[&format!("{key}-1")], *w, "{key} of {text:?}");
                    assert_eq!(a1111[&format!("{key}-2")], *h, "{key} of {text:?}");
                    covered.extend([format!("{key}-1"), format!("{key}-2")]);
                }
                None => {
                    assert_eq!(a1111[key], *value, "{key} of {text:?}");
                    covered.push(key.clone());
                }
            }
        }
        for (key, value) in a1111 {
            if covered.contains(key) {
                continue;
            }
            let default = defaults.iter().find(|(k, _)| k == key);
            assert_eq!(
                default.map(|(_, v)| v),
                Some(value),
                "A1111 read '{key}' from {text:?}"
            );
        }

        // create_infotext writes the parsed text back the way we do.
        let params: Vec<(String, Option<String>)> = ours
            .params
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        assert_eq!(
            format_infotext(&ours.prompt, &ours.negative_prompt, &params),
            case["rejoined"].as_str().unwrap(),
            "rejoined {text:?}"
        );
    }
}

#[test]
fn quoting_agrees_with_a1111s() {
    for pair in recorded()["quote"].as_array().unwrap() {
        let (value, quoted) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        assert_eq!(quote(value), quoted, "{value:?}");
    }
}

/// The float image behind decoded_8x8.png: a ramp past both ends of [-1, 1] with the edge
/// cases first ([3, 8, 8], CHW).
fn decoded_values() -> Vec<f32> {
    let mut v: Vec<f32> = (0..192).map(|i| -1.25 + 2.5 * i as f32 / 191.0).collect();
    let edges = [
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.998,
        1.0,
        -1.0,
        0.0,
        0.99999994,
        -0.99999994,
        1e-8,
        3.0e38,
        -3.0e38,
    ];
    v[..edges.len()].copy_from_slice(&edges);
    v
}

fn pattern_8x8() -> RgbImage {
    let pixels = (0..64u32)
        .flat_map(|i| {
            let (x, y) = (i % 8, i / 8);
            [(x * 32) as u8, (y * 32) as u8, ((x + y) * 16) as u8]
        })
        .collect();
    RgbImage::new(8, 8, pixels).unwrap()
}

fn grid_cells() -> Vec<RgbImage> {
    [[200, 40, 40], [40, 160, 40], [40, 40, 200], [230, 200, 60]]
        .into_iter()
        .map(|rgb| RgbImage::filled(24, 24, rgb).unwrap())
        .collect()
}

fn grid_labels() -> GridLabels {
    GridLabels {
        columns: vec!["w 0".into(), "w 1".into()],
        rows: vec!["seed 1".into(), "seed 2".into()],
    }
}

/// The committed PNG fixtures: name, image, infotext (a grid carries its first cell's, as
/// A1111's X/Y plot does).
fn fixture_images() -> Vec<(&'static str, RgbImage, String)> {
    let decoded = RgbImage::from_decoded(&decoded_values(), 8, 8, ChannelLayout::Chw).unwrap();
    let grid = contact_sheet(&grid_cells(), 2, &grid_labels()).unwrap();
    vec![
        (
            "decoded_8x8.png",
            decoded,
            preview_with_lora().to_infotext(),
        ),
        (
            "unicode_8x8.png",
            pattern_8x8(),
            unicode_prompt().to_infotext(),
        ),
        ("grid_2x2.png", grid, everything().to_infotext()),
    ]
}

/// Writes fixtures/png/*.png and decoded_8x8.f32; then run fixtures/generate_infotext.py.
#[test]
#[ignore = "regenerates the committed fixtures"]
fn write_png_fixtures() {
    let dir = png_fixtures();
    std::fs::create_dir_all(&dir).unwrap();
    let floats: Vec<u8> = decoded_values()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.join("decoded_8x8.f32"), floats).unwrap();
    let force = WriteOptions {
        force: true,
        ..Default::default()
    };
    for (name, image, text) in fixture_images() {
        write_png(&dir.join(name), &image, &text, &force).unwrap();
    }
}

#[test]
fn pillow_reads_our_parameters_byte_identically() {
    let recorded = recorded();
    let pillow = recorded["pillow"].as_object().unwrap();
    assert_eq!(pillow.len(), 3);
    for (name, image, text) in fixture_images() {
        let seen = &pillow[name];
        assert_eq!(seen["parameters"], text, "{name}: Pillow's parameters");
        let ours = read_parameters(&png_fixtures().join(name))
            .unwrap()
            .unwrap();
        assert_eq!(ours.text, text, "{name}: our reader");
        let itxt = text.chars().any(|c| c as u32 > 0xFF);
        assert_eq!(seen["itxt"], itxt, "{name}");
        let kind = match itxt {
            true => TextChunkKind::InternationalText,
            false => TextChunkKind::Text,
        };
        assert_eq!(ours.kind, kind, "{name}");
        assert_eq!(seen["mode"], "RGB");
        assert_eq!(
            seen["size"],
            serde_json::json!([image.width(), image.height()])
        );
        match seen.get("pixels") {
            Some(pixels) => {
                let pixels: Vec<u8> = serde_json::from_value(pixels.clone()).unwrap();
                assert_eq!(pixels, image.pixels(), "{name}: pixels");
            }
            None => {
                use sha2::{Digest, Sha256};
                let digest: String = Sha256::digest(image.pixels())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                assert_eq!(seen["pixels_sha256"], digest, "{name}: pixels");
            }
        }
    }
}

#[test]
fn pixels_follow_a1111s_truncation_rule() {
    let floats: Vec<f32> = std::fs::read(png_fixtures().join("decoded_8x8.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(
        floats.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        decoded_values()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    );
    let a1111: Vec<u8> = serde_json::from_value(recorded()["pixel_rule"].clone()).unwrap();
    let ours = RgbImage::from_decoded(&floats, 8, 8, ChannelLayout::Chw).unwrap();
    assert_eq!(ours.pixels(), a1111.as_slice());
    // The recording tells truncation from rounding: some values round up.
    let rounded = (0..192).filter(|&i| {
        let (p, c) = (i / 3, i % 3);
        let unit = ((floats[c * 64 + p] + 1.0) / 2.0).clamp(0.0, 1.0);
        (255.0 * unit).round() as u8 != a1111[i]
    });
    assert!(rounded.count() > 50);
}

#[test]
fn png_bytes_are_deterministic() {
    for (name, image, text) in fixture_images() {
        let bytes = encode_png(&image, &text).unwrap();
        assert_eq!(bytes, encode_png(&image, &text).unwrap(), "{name}");
        let committed = std::fs::read(png_fixtures().join(name)).unwrap();
        assert!(
            bytes == committed,
            "{name}: the encoder's bytes changed (png crate or settings); if intended, rerun \
             write_png_fixtures and fixtures/generate_infotext.py"
        );
    }
    let parallel: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| encode_png(&pattern_8x8(), MINIMAL).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(parallel.windows(2).all(|w| w[0] == w[1]));
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn writes_are_atomic_and_refuse_an_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("preview.png");
    let image = pattern_8x8();
    write_png(&out, &image, MINIMAL, &WriteOptions::default()).unwrap();
    let first = std::fs::read(&out).unwrap();
    assert_eq!(names(dir.path()), ["preview.png"]);

    let e = write_png(&out, &image, PREVIEW_WITH_LORA, &WriteOptions::default()).unwrap_err();
    assert!(matches!(e, Error::OutputExists { .. }), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), first, "left as it was");
    assert_eq!(names(dir.path()), ["preview.png"], "no temp file left");

    let force = WriteOptions {
        force: true,
        ..Default::default()
    };
    write_png(&out, &image, PREVIEW_WITH_LORA, &force).unwrap();
    assert_eq!(
        read_parameters(&out).unwrap().unwrap().text,
        PREVIEW_WITH_LORA
    );
    assert_eq!(names(dir.path()), ["preview.png"]);

    let missing = dir.path().join("no/such/folder/x.png");
    let e = write_png(&missing, &image, MINIMAL, &WriteOptions::default()).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert_eq!(names(dir.path()), ["preview.png"]);
}

#[test]
fn a_non_latin1_infotext_goes_to_itxt() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            unicode_prompt().to_infotext(),
            TextChunkKind::InternationalText,
        ),
        ("café, naïve\nSteps: 1".to_string(), TextChunkKind::Text),
        (
            "Ā is past Latin-1".to_string(),
            TextChunkKind::InternationalText,
        ),
    ];
    for (i, (text, kind)) in cases.into_iter().enumerate() {
        let bytes = encode_png(&pattern_8x8(), &text).unwrap();
        // Pillow's layouts: `tEXt` keyword NUL Latin-1; `iTXt` keyword NUL, flag 0, method 0,
        // empty language tag and translated keyword, UTF-8.
        let (chunk, payload): (&[u8], Vec<u8>) = match kind {
            TextChunkKind::Text => (b"tEXtparameters\0", text.chars().map(|c| c as u8).collect()),
            _ => (b"iTXtparameters\0\0\0\0\0", text.as_bytes().to_vec()),
        };
        let mut expected = chunk.to_vec();
        expected.extend_from_slice(&payload);
        assert!(
            bytes.windows(expected.len()).any(|w| w == expected),
            "{text:?}"
        );
        let path = dir.path().join(format!("{i}.png"));
        std::fs::write(&path, &bytes).unwrap();
        let read = read_parameters(&path).unwrap().unwrap();
        assert_eq!((read.kind, read.text.as_str()), (kind, text.as_str()));
    }
}

#[test]
fn the_reader_takes_ztxt_and_refuses_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.png");
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.add_ztxt_chunk("Software".into(), "other".into())
            .unwrap();
        enc.add_ztxt_chunk("parameters".into(), MINIMAL.into())
            .unwrap();
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[1, 2, 3]).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(&path, &bytes).unwrap();
    let read = read_parameters(&path).unwrap().unwrap();
    assert_eq!(read.kind, TextChunkKind::CompressedText);
    assert_eq!(read.text, MINIMAL);

    // No parameters chunk.
    let plain = dir.path().join("plain.png");
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[1, 2, 3]).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(&plain, &bytes).unwrap();
    assert_eq!(read_parameters(&plain).unwrap(), None);

    // A flipped byte in the text fails its CRC; a file that is not a PNG; a truncated one.
    let mut broken = encode_png(&pattern_8x8(), MINIMAL).unwrap();
    let at = broken.windows(4).position(|w| w == b"a re").unwrap();
    broken[at] ^= 1;
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, &broken).unwrap();
    let e = read_parameters(&bad).unwrap_err().to_string();
    assert!(
        e.contains("bad checksum in tEXt") && e.contains("bad.png"),
        "{e}"
    );
    std::fs::write(&bad, b"GIF89a....").unwrap();
    assert!(read_parameters(&bad)
        .unwrap_err()
        .to_string()
        .contains("not a PNG"));
    let whole = encode_png(&pattern_8x8(), MINIMAL).unwrap();
    std::fs::write(&bad, &whole[..40]).unwrap();
    assert!(read_parameters(&bad)
        .unwrap_err()
        .to_string()
        .contains("truncated"));
}

#[test]
fn the_contact_sheet_is_deterministic_and_labelled() {
    let a = contact_sheet(&grid_cells(), 2, &grid_labels()).unwrap();
    let b = contact_sheet(&grid_cells(), 2, &grid_labels()).unwrap();
    assert_eq!(a, b);
    // Row labels to the left: 3/4 of a 24-pixel cell is 18, but "seed" takes 23 pixels and
    // 2 of padding each side; one line of text above (9 rows and 2 of padding each side).
    let (left, top) = (27, 13);
    assert_eq!((a.width(), a.height()), (left + 48, top + 48));
    assert_eq!(a.pixel(left, top), Some([200, 40, 40]));
    assert_eq!(a.pixel(left + 24, top + 24), Some([230, 200, 60]));
    let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (x, y)))
            .filter(|&(x, y)| a.pixel(x, y) == Some([0, 0, 0]))
            .count()
    };
    assert!(
        dark(left, left + 24, 0, top) > 10,
        "the first column's label"
    );
    assert!(
        dark(left + 24, left + 48, 0, top) > 10,
        "the second column's label"
    );
    assert!(dark(0, left, top, top + 24) > 10, "the first row's label");
    assert!(
        dark(0, left, top + 24, top + 48) > 10,
        "the second row's label"
    );
    assert_eq!(dark(0, left, 0, top), 0, "the corner stays empty");
}
