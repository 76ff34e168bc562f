//! `loratool inspect`: flags and rendering (table or JSON).

use clap::Args;
use loratool::ops::inspect::{inspect_many, InspectOptions, InspectReport, Report};
use loratool::ops::inspect_model::{ModelKind, ModelReport};
use std::io::Write;
use std::path::PathBuf;
use tabled::builder::Builder;
use tabled::settings::Style;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// LoRA files (.safetensors, or .ckpt/.pt/.bin read without running code); also checkpoints,
    /// diffusers pipeline folders, VAEs, text encoders and embeddings.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print a JSON array, one object per file (schema: docs/INSPECT_JSON.md).
    #[arg(long)]
    pub json: bool,
    /// Read the factors and report each module's ‖ΔW‖_F (scale included), plus zero/NaN checks.
    #[arg(long)]
    pub norms: bool,
    /// Hash each file: sha256, AutoV2, addnet (sshs_model_hash) and AutoV3.
    #[arg(long)]
    pub hash: bool,
    /// List every module in the table output.
    #[arg(long)]
    pub modules: bool,
}

pub fn run(args: InspectArgs) -> loratool::Result<i32> {
    let opts = InspectOptions {
        norms: args.norms,
        hash: args.hash,
    };
    let results = inspect_many(&args.files, opts);
    let failed = results.iter().filter(|r| r.is_err()).count();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        // Streamed: one object at a time into a buffered stdout.
        let mut w = std::io::BufWriter::new(&mut out);
        let _ = w.write_all(b"[");
        for (i, (r, path)) in results.iter().zip(&args.files).enumerate() {
            let _ = w.write_all(if i == 0 { b"\n" } else { b",\n" });
            let _ = match r {
                Ok(rep) => serde_json::to_writer_pretty(&mut w, rep),
                Err(e) => serde_json::to_writer_pretty(
                    &mut w,
                    &serde_json::json!({"path": path.display().to_string(), "error": e.to_string()}),
                ),
            };
        }
        let _ = w.write_all(b"\n]\n");
    } else {
        // Failed files are reported once, on stderr below; stdout has only the tables.
        for (i, rep) in results.iter().filter_map(|r| r.as_ref().ok()).enumerate() {
            if i > 0 {
                let _ = writeln!(out);
            }
            let text = match rep {
                Report::Lora(rep) => render(rep, args.modules || args.norms),
                Report::Model(rep) if rep.kind == ModelKind::Checkpoint => render_checkpoint(rep),
                Report::Model(rep) => describe_file(rep),
            };
            let _ = write!(out, "{text}");
        }
    }
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        eprintln!("loratool: {e}");
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn human_size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn fmt_f32(v: f32) -> String {
    if v.fract() == 0.0 && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn counts(map: &std::collections::BTreeMap<&'static str, usize>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn render(rep: &InspectReport, list_modules: bool) -> String {
    let mut b = Builder::default();
    b.push_record(["file", &rep.path]);
    b.push_record([
        "format",
        &format!("{} ({:?})", rep.format, rep.container).to_lowercase(),
    ]);
    b.push_record(["network", rep.network]);
    let mut base = rep.base_model.name().to_string();
    let sources: Vec<String> = [
        rep.base_model_metadata
            .map(|b| format!("metadata: {}", b.name())),
        rep.base_model_keys.map(|b| format!("keys: {}", b.name())),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !sources.is_empty() {
        base = format!("{base} ({})", sources.join(", "));
    }
    b.push_record(["base model", &base]);
    let rank = match (rep.rank_min, rep.rank) {
        (Some(lo), Some(hi)) if lo != hi => format!("{lo}–{hi}"),
        (_, Some(r)) => r.to_string(),
        _ => "–".into(),
    };
    b.push_record(["rank", &rank]);
    let alpha = match rep.alpha {
        Some(a) => fmt_f32(a),
        None if rep.modules.iter().any(|m| m.alpha.is_some()) => "per module".into(),
        None => "none (scale 1)".into(),
    };
    b.push_record(["alpha", &alpha]);
    b.push_record(["dtype", &rep.dtype]);
    b.push_record(["size", &human_size(rep.file_size)]);
    b.push_record([
        "modules",
        &format!(
            "{} ({})",
            rep.module_count,
            counts(&rep.modules_by_component)
        ),
    ]);
    b.push_record(["layers", &counts(&rep.modules_by_layer_type)]);
    if !rep.trigger_words.is_empty() {
        b.push_record(["trigger words", &rep.trigger_words.join(", ")]);
    }
    if !rep.top_tags.is_empty() {
        let tags: Vec<String> = rep
            .top_tags
            .iter()
            .map(|t| format!("{} ({})", t.tag, t.count))
            .collect();
        b.push_record(["top tags", &tags.join(", ")]);
    }
    let mut text = finish_table(b, &rep.training, rep.hashes.as_ref(), &rep.warnings);
    if list_modules {
        let mut m = Builder::default();
        let with_norm = rep.modules.iter().any(|m| m.norm.is_some());
        let mut head = vec!["module", "component", "kind", "rank", "alpha", "shape"];
        if with_norm {
            head.push("‖ΔW‖");
        }
        m.push_record(head);
        for md in &rep.modules {
            let mut row = vec![
                md.name.clone(),
                md.component.name().to_string(),
                if md.dora {
                    format!("{}+dora", md.kind.name())
                } else {
                    md.kind.name().to_string()
                },
                md.rank.map(|r| r.to_string()).unwrap_or("–".into()),
                md.alpha.map(fmt_f32).unwrap_or("–".into()),
                format!("{:?}", md.shape),
            ];
            if with_norm {
                row.push(md.norm.map(|n| format!("{n:.6}")).unwrap_or("–".into()));
            }
            m.push_record(row);
        }
        text.push_str(&m.build().with(Style::sharp()).to_string());
        text.push('\n');
    }
    text
}

/// Parameter counts as people say them (860 M, 2.6 B).
fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1} K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} M", n as f64 / 1e6),
        _ => format!("{:.2} B", n as f64 / 1e9),
    }
}

fn dtype_mix(rep: &ModelReport) -> String {
    rep.dtypes
        .iter()
        .map(|(d, c)| format!("{d} {} ({})", c.tensors, human_size(c.bytes)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn family_line(rep: &ModelReport) -> String {
    match (&rep.prediction, &rep.prediction_source) {
        (Some(p), Some(src)) => {
            let p = serde_json::to_value(p).unwrap_or_default();
            format!(
                "{} (prediction: {} from {src})",
                rep.family,
                p.as_str().unwrap_or("?")
            )
        }
        _ => rep.family.to_string(),
    }
}

fn render_checkpoint(rep: &ModelReport) -> String {
    let mut b = Builder::default();
    b.push_record(["file", &rep.path]);
    b.push_record([
        "kind",
        &format!(
            "checkpoint ({}, {})",
            rep.layout.unwrap_or("?"),
            rep.container
        ),
    ]);
    b.push_record(["family", &family_line(rep)]);
    b.push_record([
        "parameters",
        &format!("{} ({})", human_count(rep.parameters), rep.parameters),
    ]);
    b.push_record(["dtypes", &dtype_mix(rep)]);
    b.push_record(["size", &human_size(rep.file_size)]);
    let vae = match (rep.has_vae, rep.files.is_some()) {
        (true, false) => "baked in",
        (true, true) => "included (vae/)",
        (false, _) => "not included",
    };
    b.push_record(["VAE", vae]);
    let ema = match &rep.ema {
        Some(e) => format!(
            "present: {} tensors, {} parameters",
            e.tensor_count,
            human_count(e.parameters)
        ),
        None => "none".into(),
    };
    b.push_record(["EMA", &ema]);
    for (k, v) in &rep.modelspec {
        b.push_record([format!("modelspec.{k}"), clip(v)]);
    }
    let mut text = finish_table(b, &rep.training, rep.hashes.as_ref(), &rep.warnings);

    let mut c = Builder::default();
    let with_files = rep.components.iter().any(|p| p.file.is_some());
    let mut head = vec!["component", "encoder", "tensors", "parameters", "size"];
    if with_files {
        head.push("file");
    }
    c.push_record(head);
    for p in &rep.components {
        let mut row = vec![
            p.name.name().to_string(),
            p.encoder.map(|e| e.describe()).unwrap_or("–").to_string(),
            p.tensor_count.to_string(),
            human_count(p.parameters),
            human_size(p.bytes),
        ];
        if with_files {
            row.push(p.file.clone().unwrap_or_default());
        }
        c.push_record(row);
    }
    text.push_str(&c.build().with(Style::sharp()).to_string());
    text.push('\n');

    // A pipeline's weight files, each hashed on its own.
    let hashed: Vec<_> = rep
        .files
        .iter()
        .flatten()
        .filter_map(|f| Some((f, f.hashes.as_ref()?)))
        .collect();
    if !hashed.is_empty() {
        let mut h = Builder::default();
        h.push_record(["weight file", "size", "sha256", "AutoV2", "AutoV3"]);
        for (f, hashes) in hashed {
            h.push_record([
                f.path.clone(),
                human_size(f.file_size),
                hashes.sha256.clone(),
                hashes.autov2.clone(),
                hashes.autov3.clone().unwrap_or("–".into()),
            ]);
        }
        text.push_str(&h.build().with(Style::sharp()).to_string());
        text.push('\n');
    }
    text
}

/// One line for a VAE, text encoder, embedding or unknown file (and one for its hashes).
fn describe_file(rep: &ModelReport) -> String {
    let what = match rep.kind {
        ModelKind::Vae => format!("a VAE ({})", rep.layout.unwrap_or("?")),
        ModelKind::TextEncoder => {
            let encoders: Vec<&str> = rep
                .components
                .iter()
                .filter_map(|p| p.encoder.map(|e| e.describe()))
                .collect();
            format!(
                "a text encoder ({}, {})",
                encoders.join(" + "),
                rep.layout.unwrap_or("?")
            )
        }
        ModelKind::Embedding => format!(
            "a textual-inversion embedding ({}, {} vectors)",
            rep.family,
            rep.embedding_vectors
                .map(|v| v.to_string())
                .unwrap_or("?".into())
        ),
        ModelKind::Unknown => format!(
            "not a LoRA or a model file loratool knows ({} tensors)",
            rep.tensor_count
        ),
        ModelKind::Checkpoint => "a checkpoint".into(),
    };
    let mut line = format!(
        "{}: {what}, {} parameters, {}, {}\n",
        rep.path,
        human_count(rep.parameters),
        rep.dtype,
        human_size(rep.file_size)
    );
    if let Some(h) = &rep.hashes {
        line.push_str(&format!("  sha256 {}, AutoV2 {}", h.sha256, h.autov2));
        if let (Some(a), Some(v3)) = (&h.addnet, &h.autov3) {
            line.push_str(&format!(", addnet {a}, AutoV3 {v3}"));
        }
        line.push('\n');
    }
    line
}

fn clip(v: &str) -> String {
    match v.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &v[..i]),
        None => v.to_string(),
    }
}

/// The rows every report's main table ends with (training summary, hashes, warnings), rendered.
fn finish_table(
    mut b: Builder,
    training: &std::collections::BTreeMap<&'static str, String>,
    hashes: Option<&loratool::tensors::hash::FileHashes>,
    warnings: &[String],
) -> String {
    for (k, v) in training {
        b.push_record([format!("training: {}", k.replace('_', " ")), clip(v)]);
    }
    if let Some(h) = hashes {
        push_hashes(&mut b, h);
    }
    for w in warnings {
        b.push_record(["warning", w]);
    }
    let mut text = b.build().with(Style::sharp()).to_string();
    text.push('\n');
    text
}

fn push_hashes(b: &mut Builder, h: &loratool::tensors::hash::FileHashes) {
    b.push_record(["sha256", &h.sha256]);
    b.push_record(["AutoV2", &h.autov2]);
    if let (Some(a), Some(v3)) = (&h.addnet, &h.autov3) {
        b.push_record(["addnet hash", a]);
        b.push_record(["AutoV3", v3]);
    }
}
