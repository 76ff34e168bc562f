//! A demo collection for `library gallery` (docs/gallery_screenshot.sh makes docs/gallery.png from
//! it): a dozen small LoRAs made from the fixtures' tensors under made-up names, most with a
//! colourful preview and an A1111 `<stem>.json`.
//!
//! `cargo run --example gallery_demo -- DIR`

use loratool::tensors::writer::{write_with_metadata, WriteOptions};
use loratool::tensors::SafetensorsFile;
use std::path::{Path, PathBuf};

/// (stem, fixture, alias, activation text, preferred weight, preview colours or none)
type Demo = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    f64,
    Option<[[u8; 3]; 3]>,
);

const DEMOS: &[Demo] = &[
    (
        "watercolor_hills",
        "sdxl_kohya_lora",
        "watercolor_v3",
        "watercolor, soft wash",
        0.8,
        Some([[250, 214, 165], [120, 180, 200], [70, 120, 90]]),
    ),
    (
        "neon_city",
        "sd1_kohya_lora",
        "neon_city",
        "neon lights, night",
        0.7,
        Some([[25, 10, 60], [230, 60, 160], [40, 220, 230]]),
    ),
    (
        "ukiyoe_waves",
        "sd1_locon",
        "vague_déferlante",
        "ukiyo-e, great wave",
        1.0,
        Some([[240, 230, 200], [30, 70, 130], [200, 60, 50]]),
    ),
    (
        "desert_sunset",
        "sdxl_loha",
        "desert_sunset",
        "",
        0.0,
        Some([[250, 150, 60], [200, 70, 60], [110, 50, 60]]),
    ),
    (
        "pastel_portrait",
        "sd1_loha",
        "pastel_portrait",
        "pastel colors",
        0.6,
        Some([[250, 220, 230], [200, 180, 240], [150, 200, 190]]),
    ),
    (
        "forest_mist",
        "sd1_lokr_full",
        "forest_mist",
        "misty forest",
        0.9,
        Some([[200, 220, 210], [90, 140, 110], [30, 70, 50]]),
    ),
    (
        "pixel_art",
        "sd1_dora",
        "pixel_art_16bit",
        "pixel art",
        1.0,
        Some([[60, 40, 90], [240, 200, 80], [90, 200, 120]]),
    ),
    (
        "ink_sketch",
        "sd1_kohya_lora",
        "ink_sketch",
        "ink sketch, lineart",
        0.75,
        None,
    ),
    (
        "aurora_sky",
        "sdxl_kohya_lora",
        "aurora",
        "aurora borealis",
        0.85,
        Some([[10, 20, 50], [60, 220, 160], [150, 90, 220]]),
    ),
    (
        "autumn_leaves",
        "sd1_locon",
        "autumn_leaves",
        "autumn",
        1.0,
        Some([[250, 200, 120], [220, 110, 40], [120, 50, 30]]),
    ),
    ("glass_sculpture", "sdxl_loha", "glass", "", 0.0, None),
    (
        "retro_poster",
        "sd1_loha",
        "retro_poster",
        "retro poster, 1960s",
        0.9,
        Some([[240, 225, 190], [230, 90, 60], [40, 110, 120]]),
    ),
];

fn main() {
    let dir = PathBuf::from(std::env::args_os().nth(1).expect("usage: gallery_demo DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/loras");
    for (i, (stem, fixture, alias, activation, weight, colours)) in DEMOS.iter().enumerate() {
        let src = fixtures.join(format!("{fixture}.safetensors"));
        write_lora(&src, &dir.join(format!("{stem}.safetensors")), alias, i);
        let mut user = serde_json::Map::new();
        user.insert("activation text".into(), (*activation).into());
        user.insert("preferred weight".into(), (*weight).into());
        user.insert("description".into(), format!("Demo LoRA {}", i + 1).into());
        let json = serde_json::to_string_pretty(&serde_json::Value::Object(user)).unwrap();
        std::fs::write(dir.join(format!("{stem}.json")), json).unwrap();
        if let Some(c) = colours {
            preview(c, i as u32)
                .save(dir.join(format!("{stem}.png")))
                .unwrap();
        }
    }
    println!("{} LoRAs in {}", DEMOS.len(), dir.display());
}

/// `src`'s tensors with its metadata, `ss_output_name` set to `alias` (and a serial, so every
/// file's hash differs).
fn write_lora(src: &Path, dst: &Path, alias: &str, serial: usize) {
    let f = SafetensorsFile::open(src).unwrap();
    let mut meta = f.metadata().clone();
    meta.insert("ss_output_name".into(), alias.into());
    meta.insert("demo_serial".into(), serial.to_string());
    write_with_metadata(dst, &f, &meta, &WriteOptions::default()).unwrap();
}

/// A 384×512 landscape in three colours: sky bands, a sun, two ranges of hills. Flat bands keep
/// the screenshot small.
fn preview(c: &[[u8; 3]; 3], seed: u32) -> image::RgbImage {
    let (w, h) = (384u32, 512u32);
    let mix = |a: [u8; 3], b: [u8; 3], t: f32| {
        let t = (t * 4.0).floor() / 4.0;
        image::Rgb([0, 1, 2].map(|i| (a[i] as f32 + (b[i] as f32 - a[i] as f32) * t) as u8))
    };
    let phase = seed as f32 * 0.9;
    let sun = (
        90.0 + 40.0 * (seed % 5) as f32,
        150.0 + 10.0 * (seed % 3) as f32,
    );
    image::RgbImage::from_fn(w, h, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let far = 300.0 + 40.0 * ((xf / 60.0) + phase).sin();
        let near = 390.0 + 30.0 * ((xf / 37.0) - phase).cos();
        if yf > near {
            mix(
                c[2],
                [10, 10, 10],
                (yf - near) / (h as f32 - near + 1.0) * 0.5,
            )
        } else if yf > far {
            mix(c[1], c[2], 0.5)
        } else if (xf - sun.0).powi(2) + (yf - sun.1).powi(2) < 42.0f32.powi(2) {
            image::Rgb([255, 245, 220])
        } else {
            mix(c[0], c[1], yf / far)
        }
    })
}
